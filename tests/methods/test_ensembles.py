"""MC dropout and deep ensembles against ground truth computed by hand."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from torch import nn

from skuq import (
    DeepEnsembleClassifier,
    DeepEnsembleRegressor,
    MCDropoutClassifier,
    MCDropoutRegressor,
)
from skuq.base import all_estimators
from skuq.baselines import EnsembleModule, mc_dropout_mode, mc_dropout_samples
from tests._helpers import make_classifier_net, make_regressor_net


def _tiny_dropout_net(p=0.3, seed=0, batch_norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 6)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.ReLU(), nn.Dropout(p), nn.Linear(6, 2)]
    return nn.Sequential(*layers)


def _xy(n=40, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, 3).astype(np.float32)
    return X, (X[:, 0] > 0).astype(int)


# ------------------------------------------------------------------ MC dropout
def test_mc_dropout_moments_match_analytic_dropout_moments():
    """Inverted dropout on the last hidden layer: E[f] = W2 h + b2 and
    Var[f_k] = sum_j W2_kj^2 h_j^2 p / (1 - p), with h the ReLU features."""
    p, S = 0.3, 20000
    net = _tiny_dropout_net(p).double()
    X, _ = _xy(6)
    y = np.arange(6) % 2
    est = MCDropoutClassifier(net.float(), n_samples=S, random_state=0, device="cpu").fit(X, y)
    dist = est.predict_distribution(X)
    with torch.no_grad():
        x = torch.as_tensor(X, dtype=torch.float64)
        h = torch.relu(net[0].double()(x))
        W2, b2 = net[3].weight.double(), net[3].bias.double()
        mean = h @ W2.T + b2
        var = (h**2) @ (W2.T**2) * p / (1 - p)
    samples = dist.samples.double()
    assert samples.shape == (S, 6, 2)
    se = (var / S).sqrt()
    assert torch.all((samples.mean(0) - mean).abs() < 5 * se + 1e-6)
    np.testing.assert_allclose(samples.var(0), var, rtol=0.08)


def test_mc_dropout_samples_are_the_explicit_loop_with_the_same_masks():
    """Sample s is one network: a mask over the 6 hidden units drawn from a generator
    seeded with random_state (sample by sample), the same for every row."""
    p = 0.5
    net = _tiny_dropout_net(p)
    X, y = _xy(10)
    est = MCDropoutClassifier(net, n_samples=7, random_state=3, device="cpu").fit(X, y)
    got = est.predict_distribution(X).samples
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        h = torch.relu(net[0](torch.as_tensor(X)))
        expected = []
        for _ in range(7):
            keep = torch.empty(6).bernoulli_(1 - p, generator=gen)
            expected.append(net[3](h * keep / (1 - p)))
        expected = torch.stack(expected)
    torch.testing.assert_close(got, expected)
    # the predictive is the average softmax of those passes, and passes differ
    np.testing.assert_allclose(
        est.predict_proba(X), torch.softmax(expected, -1).mean(0).double(), rtol=1e-5
    )
    assert not torch.allclose(expected[0], expected[1])


def test_mc_dropout_keeps_batchnorm_in_eval_and_restores_modes():
    net = _tiny_dropout_net(0.2, batch_norm=True)
    bn = net[1]
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    seen = []
    bn.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    X, y = _xy(30)
    est = MCDropoutClassifier(net, n_samples=5, random_state=0, device="cpu").fit(X, y)
    est.predict_proba(X)
    assert seen and not any(seen)
    torch.testing.assert_close(bn.running_mean, torch.full((6,), 0.5))
    torch.testing.assert_close(bn.running_var, torch.full((6,), 2.0))
    assert not any(m.training for m in net.modules())


def test_mc_dropout_is_reproducible_and_leaves_global_rng_alone():
    X, y = _xy(20)
    est = MCDropoutClassifier(_tiny_dropout_net(), n_samples=10, random_state=1, device="cpu")
    est.fit(X, y)
    state = torch.get_rng_state()
    a = est.predict_proba(X)
    assert torch.equal(state, torch.get_rng_state())
    np.testing.assert_array_equal(a, est.predict_proba(X))
    b = clone(est).set_params(random_state=2).fit(X, y).predict_proba(X)
    assert not np.allclose(a, b)


def test_mc_dropout_core_refuses_a_net_without_dropout():
    net = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.0))
    with pytest.raises(ValueError, match="needs a network with dropout layers"):
        mc_dropout_samples(net, torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        mc_dropout_samples(_tiny_dropout_net(), torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="needs a network with dropout layers"):
        with mc_dropout_mode(nn.Linear(3, 2)):
            pass


def test_mc_dropout_estimator_bad_input():
    X, y = _xy(30)
    for method in ("predict", "predict_proba", "predict_uncertainty"):
        with pytest.raises(NotFittedError):
            getattr(MCDropoutClassifier(_tiny_dropout_net()), method)(X)
    with pytest.raises(NotFittedError):
        DeepEnsembleClassifier(make_classifier_net()).predict(X)
    with pytest.raises(ValueError, match="module__dropout"):
        MCDropoutClassifier(make_classifier_net(max_epochs=1), device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        MCDropoutClassifier(_tiny_dropout_net(), n_samples=0).fit(X, y)
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        MCDropoutRegressor(_tiny_dropout_net(), n_samples=2.5).fit(X, X[:, :2])


def test_mc_dropout_regressor_moments_and_noise():
    rng = np.random.RandomState(0)
    X = rng.randn(50, 3).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.randn(50)).astype(np.float32)
    net = make_regressor_net(max_epochs=30, module__dropout=0.2)
    est = MCDropoutRegressor(net, n_samples=30, random_state=0, device="cpu")
    est.fit(X[:40], y[:40], X_cal=X[40:], y_cal=y[40:])
    s = est.predict_distribution(X).samples[:, :, 0].double()
    mean, std = est.predict(X, return_std=True)
    np.testing.assert_allclose(mean, s.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std**2, s.var(0) + est.sigma_noise_**2, rtol=1e-4)
    # the noise: the held-out mean squared residual of the deterministic net less the
    # mean dropout variance there
    with torch.no_grad():
        pred = est.net_.module_.eval()(torch.as_tensor(X[40:]))[:, 0].double().numpy()
    mse = np.mean((pred - y[40:]) ** 2)
    spread = float(s[:, 40:].var(0).mean())
    assert est.sigma_noise_**2 == pytest.approx(max(mse - spread, 0.01 * mse), rel=1e-4)


# --------------------------------------------------------------- deep ensembles
@pytest.fixture(scope="module")
def ensemble(digits):
    X, y = digits.X_train[:200], digits.y_train[:200]
    net = make_classifier_net(max_epochs=4, hidden=(16,))
    est = DeepEnsembleClassifier(net, n_estimators=3, random_state=0, device="cpu").fit(X, y)
    return est, X, y


def test_ensemble_proba_is_the_average_of_member_softmax(ensemble, digits):
    est, _, _ = ensemble
    X = digits.X_test[:50]
    with torch.no_grad():
        probs = [torch.softmax(n.module_(torch.as_tensor(X)), -1) for n in est.net_]
    np.testing.assert_allclose(est.predict_proba(X), torch.stack(probs).mean(0), rtol=1e-5)
    assert len(est.net_) == 3 and len(set(est.member_seeds_)) == 3
    assert not torch.allclose(probs[0], probs[1], atol=1e-3)  # members differ
    mi = est.predict_uncertainty(X, kind="mutual_information")
    assert mi.shape == (50,) and (mi > 0).all()


def test_ensemble_members_are_the_net_trained_with_their_seed(ensemble):
    est, X, y = ensemble
    for i in (0, 2):
        torch.manual_seed(int(est.member_seeds_[i]))
        ref = clone(est.estimator).set_params(module__n_outputs=5, device="cpu").fit(X, y)
        for a, b in zip(ref.module_.parameters(), est.net_[i].module_.parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_ensemble_is_reproducible_clone_and_pickle(ensemble, digits):
    est, X, y = ensemble
    X_test = digits.X_test[:20]
    again = clone(est).fit(X, y)
    np.testing.assert_array_equal(again.predict_proba(X_test), est.predict_proba(X_test))
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.predict_proba(X_test), est.predict_proba(X_test))
    assert clone(est).get_params()["n_estimators"] == 3


def test_ensemble_members_go_through_the_active_joblib_backend():
    """A custom joblib backend (as Dask or Ray register) receives every member."""
    from joblib import parallel_config, register_parallel_backend
    from joblib._parallel_backends import SequentialBackend

    calls = []

    class Recording(SequentialBackend):
        def configure(self, n_jobs=1, parallel=None, **kwargs):
            calls.append(n_jobs)
            return super().configure(n_jobs=n_jobs, parallel=parallel, **kwargs)

    register_parallel_backend("skuq_recording", Recording)
    X, y = _xy(40)
    net = make_classifier_net(max_epochs=2, hidden=(4,))
    kw = dict(n_estimators=3, random_state=5, device="cpu")
    seq = DeepEnsembleClassifier(net, **kw).fit(X, y)
    with parallel_config(backend="skuq_recording"):
        rec = DeepEnsembleClassifier(net, n_jobs=2, **kw).fit(X, y)
    assert calls == [2]  # the ensemble's n_jobs reached the active backend
    np.testing.assert_allclose(rec.predict_proba(X), seq.predict_proba(X), rtol=1e-6)


def test_ensemble_bad_input():
    X, y = _xy(30)
    trained = make_classifier_net(max_epochs=1).fit(X, y)
    with pytest.raises(TypeError, match="needs an unfitted skorch net"):
        DeepEnsembleClassifier(FrozenEstimator(trained)).fit(X, y)
    with pytest.raises(TypeError, match="needs an unfitted skorch net"):
        DeepEnsembleRegressor(nn.Linear(3, 1)).fit(X, X[:, 0])
    with pytest.raises(ValueError, match="n_estimators must be an int >= 1"):
        DeepEnsembleClassifier(make_classifier_net(), n_estimators=0).fit(X, y)
    with pytest.raises(ValueError, match="n_jobs must be None or a non-zero int"):
        DeepEnsembleClassifier(make_classifier_net(), n_jobs=0).fit(X, y)
    with pytest.raises(ValueError, match="an ensemble needs at least one member"):
        EnsembleModule([])


def test_ensemble_regressor_is_the_mixture_of_members(gap_data):
    net = make_regressor_net(max_epochs=20, hidden=(16,))
    est = DeepEnsembleRegressor(net, n_estimators=3, random_state=0, device="cpu")
    X_cal, y_cal = gap_data.X[150:], gap_data.y[150:]
    est.fit(gap_data.X[:150], gap_data.y[:150], X_cal=X_cal, y_cal=y_cal)
    with torch.no_grad():
        outs = torch.stack(
            [n.module_(torch.as_tensor(gap_data.X_test))[:, 0] for n in est.net_]
        ).double()
        cal_outs = torch.stack([n.module_(torch.as_tensor(X_cal))[:, 0] for n in est.net_]).double()
    mean, std = est.predict(gap_data.X_test, return_std=True)
    mix_mean = outs.mean(0)
    mix_var = ((outs - mix_mean) ** 2).mean(0)
    np.testing.assert_allclose(mean, mix_mean, rtol=1e-5, atol=1e-6)
    # the noise: the held-out mean squared residual of the mixture mean less its spread
    mse = float(np.mean((cal_outs.mean(0).numpy() - y_cal) ** 2))
    spread = float(((cal_outs - cal_outs.mean(0)) ** 2).mean(0).mean())
    sigma = np.sqrt(max(mse - spread, 0.01 * mse))
    assert est.sigma_noise_ == pytest.approx(sigma, rel=1e-4)
    np.testing.assert_allclose(std**2, mix_var + sigma**2, rtol=1e-4)
    epi = est.predict_uncertainty(gap_data.X_test, kind="epistemic_variance")
    assert epi[gap_data.in_gap].mean() > 0  # members disagree


def test_registry_finds_the_new_baselines():
    names = dict(all_estimators("classifier"))
    assert {"MCDropoutClassifier", "DeepEnsembleClassifier"} <= set(names)
    assert {"MCDropoutRegressor", "DeepEnsembleRegressor"} <= set(dict(all_estimators("regressor")))
