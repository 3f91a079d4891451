"""skuq.conformal: posterior scores in MAPIE's split and cross conformal."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy import stats

from skuq import LaplaceClassifier, LaplaceRegressor
from skuq.conformal import PosteriorMarginClassifier, margin_probabilities
from skuq.datasets import make_gap_regression
from skuq.outputs import OutputDistribution
from tests._helpers import make_classifier_net, make_regressor_net

pytest.importorskip("mapie")
from skuq.conformal import cross_conformal, split_conformal  # noqa: E402

LEVEL = 0.9


def coverage_interval(n_cal: int, n_test: int, n_splits: int, level: float = LEVEL):
    """99 % interval of the pooled test coverage of split conformal over ``n_splits`` splits.

    With ``n_cal`` calibration rows and continuous scores, the coverage of one split
    is exactly Beta(k, n_cal + 1 - k) with ``k = ceil((n_cal + 1) level)``; its
    ``n_test`` test rows are binomial given it (beta-binomial overall), and the
    splits' counts add up (treated as independent; normal approximation).
    """
    k = int(np.ceil((n_cal + 1) * level))
    a, b = k, n_cal + 1 - k
    mean = a / (a + b)
    var_one = n_test * mean * (1 - mean) * (a + b + n_test) / (a + b + 1)
    sd = np.sqrt(n_splits * var_one) / (n_splits * n_test)
    z = stats.norm.ppf(0.995)
    return mean - z * sd, mean + z * sd


def _halves(n, rng):
    perm = rng.permutation(n)
    return perm[: n // 2], perm[n // 2 :]


def test_margin_probabilities_match_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([[1.0, 0.6, -0.5], [0.0, 0.1, 2.0]], dtype=torch.float64)
    L = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    cov = L @ L.transpose(1, 2) * 0.5 + 0.1 * torch.eye(3, dtype=torch.float64)
    got = margin_probabilities(OutputDistribution.gaussian(mu, cov)).numpy()
    # ground truth: P(f_y > f_k) by sampling, the least of them over rivals k, normalized
    f = mu + torch.einsum(
        "nij,snj->sni",
        torch.linalg.cholesky(cov),
        torch.randn(400_000, 2, 3, generator=gen, dtype=torch.float64),
    )
    wins = (f[:, :, :, None] > f[:, :, None, :]).double().mean(dim=0)  # [n, y, k]
    wins = wins + torch.diag_embed(torch.ones(2, 3, dtype=torch.float64))  # never its own rival
    weight = 1 / (1 - torch.log(wins.amin(dim=2)))
    expected = (weight / weight.sum(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(got, expected, atol=3e-3)  # MC sd of each entry < 1e-3
    # the sampled form of the same distribution agrees with the Gaussian form
    sampled = margin_probabilities(OutputDistribution.from_samples(f[:100_000])).numpy()
    np.testing.assert_allclose(sampled, got, atol=1e-2)


def test_margin_probabilities_are_finite_for_a_point_mass():
    p = margin_probabilities(OutputDistribution.point_mass(torch.tensor([[50.0, 0.0, -50.0]])))
    assert torch.isfinite(p).all() and p.argmax() == 0 and float(p.sum()) == pytest.approx(1)


@pytest.fixture(scope="module")
def regression():
    d = make_gap_regression(n_samples=1000, random_state=0)
    est = LaplaceRegressor(make_regressor_net(max_epochs=60), random_state=0)
    est.fit(d.X[:300], d.y[:300])
    return est, d.X[300:], d.y[300:], d


@pytest.mark.parametrize("score", ["posterior", "absolute"])
def test_split_conformal_regression_covers_at_the_target(regression, score):
    est, X, y, _ = regression
    rng, n_splits, hits = np.random.RandomState(0), 20, []
    for _ in range(n_splits):
        cal, test = _halves(len(X), rng)
        cp = split_conformal(est, X[cal], y[cal], confidence_level=LEVEL, score=score)
        bounds = cp.predict_interval(X[test])[1][:, :, 0]
        hits.append(np.mean((y[test] >= bounds[:, 0]) & (y[test] <= bounds[:, 1])))
    lo, hi = coverage_interval(len(X) // 2, len(X) - len(X) // 2, n_splits)
    assert lo <= np.mean(hits) <= hi, (np.mean(hits), lo, hi)


def test_posterior_intervals_follow_the_predictive_std(regression):
    est, X, y, d = regression
    cp = split_conformal(est, X[:350], y[:350], confidence_level=LEVEL)
    grid = d.X_test
    bounds = cp.predict_interval(grid)[1][:, :, 0]
    width = bounds[:, 1] - bounds[:, 0]
    std = est.predict(grid, return_std=True)[1]
    # one conformal factor times the posterior std, so the gap's intervals are the widest
    np.testing.assert_allclose(width / std, np.full_like(std, width[0] / std[0]), rtol=1e-4)
    assert width[d.in_gap].mean() > width[~d.in_gap & (np.abs(grid[:, 0]) < 2)].mean()


def test_cross_conformal_regression_runs_with_the_posterior_score(gap_data):
    est = LaplaceRegressor(make_regressor_net(max_epochs=20), random_state=0)
    cp = cross_conformal(est, gap_data.X, gap_data.y, cv=3, random_state=0)
    pred, bounds = cp.predict_interval(gap_data.X_test[:20])
    assert bounds.shape == (20, 2, 1) and np.all(bounds[:, 0, 0] < bounds[:, 1, 0])


@pytest.fixture(scope="module")
def classification(digits):
    est = LaplaceClassifier(make_classifier_net(max_epochs=10), random_state=0)
    half = len(digits.X_train) // 2
    est.fit(digits.X_train[:half], digits.y_train[:half])
    X = np.concatenate([digits.X_train[half:], digits.X_test])
    y = np.concatenate([digits.y_train[half:], digits.y_test])
    return est, X, y


@pytest.mark.parametrize("score", ["posterior", "lac"])
def test_split_conformal_sets_cover_at_the_target(classification, score):
    est, X, y = classification
    rng, n_splits, hits = np.random.RandomState(1), 10, []
    for _ in range(n_splits):
        cal, test = _halves(len(X), rng)
        cp = split_conformal(est, X[cal], y[cal], confidence_level=LEVEL, score=score)
        sets = cp.predict_set(X[test])[1][:, :, 0]
        hits.append(np.mean(sets[np.arange(len(test)), np.searchsorted(est.classes_, y[test])]))
    lo, hi = coverage_interval(len(X) // 2, len(X) - len(X) // 2, n_splits)
    assert lo <= np.mean(hits) <= hi, (np.mean(hits), lo, hi)


def test_cross_conformal_classifier_with_the_posterior_score(digits):
    est = LaplaceClassifier(make_classifier_net(max_epochs=3), random_state=0)
    X, y = digits.X_train[:300], digits.y_train[:300]
    cp = cross_conformal(est, X, y, cv=3, random_state=0)
    sets = cp.predict_set(digits.X_test[:50])[1]
    assert sets.shape == (50, 5, 1) and sets.sum(axis=1).min() >= 0
    wrapped = cp._mapie_classifier.estimator_.single_estimator_
    assert isinstance(wrapped, PosteriorMarginClassifier)


def test_a_clear_error_without_mapie(classification, monkeypatch):
    est, X, y = classification
    monkeypatch.setitem(sys.modules, "mapie", None)
    with pytest.raises(ImportError, match=r"pip install 'skuq\[conformal\]'"):
        split_conformal(est, X[:50], y[:50])


def test_margin_classifier_refuses_a_non_skuq_estimator():
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(TypeError, match="wraps a skuq classifier"):
        PosteriorMarginClassifier(LogisticRegression()).fit(np.eye(4), [0, 1, 0, 1])
