"""Same ``random_state``, same numbers: whatever the joblib backend, the batch a row
falls in, and without touching the caller's random number generators."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from joblib import parallel_config
from sklearn.model_selection import GridSearchCV
from torch import nn

from skuq import DeepEnsembleClassifier, LaplaceClassifier, MCDropoutClassifier
from skuq._utils import seeded_global_rng
from skuq.base import UQClassifierMixin, all_estimators
from skuq.baselines import DropoutSampler, mc_dropout_samples
from tests._helpers import make_check_instance, make_classifier_net


def _data(n=60, d=3, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    return X, y


# ------------------------------------------------------------ the caller's RNGs
@pytest.mark.parametrize("name, cls", all_estimators(), ids=[n for n, _ in all_estimators()])
def test_fit_and_predict_leave_the_global_rngs_as_they_were(name, cls):
    X, y = _data()
    est = make_check_instance(name, cls)
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002 - the global RNG is what is checked
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()  # noqa: NPY002
    est.fit(X, y if issubclass(cls, UQClassifierMixin) else X[:, 0])
    if hasattr(est, "predict_proba"):
        est.predict_proba(X)
    est.predict(X)
    est.predict_uncertainty(X)
    assert torch.equal(torch.get_rng_state(), torch_state), "torch's global RNG was drawn from"
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:], "numpy's global RNG was drawn from"


def test_seeded_global_rng_lets_one_thread_in_at_a_time():
    """Two threads drawing from privately seeded blocks get a serial run's draws."""

    def draws():
        with seeded_global_rng(7):
            out = []
            for _ in range(20):
                out.append(torch.rand(1))
                time.sleep(0.001)  # hand the GIL over mid-block
            return torch.cat(out)

    expected = draws()
    results = [None, None]

    def worker(i):
        results[i] = draws()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)


# ----------------------------------------------------------------- backends
def _ensemble():
    net = make_classifier_net(max_epochs=15, hidden=(32,), lr=3e-2, batch_size=16)
    return DeepEnsembleClassifier(net, n_estimators=3, n_jobs=2, random_state=0)


@pytest.fixture(scope="module")
def serial_ensemble_proba():
    X, y = _data(n=200)
    with parallel_config(backend="sequential"):
        return _ensemble().fit(X, y).predict_proba(X)


@pytest.mark.parametrize(
    "config", [{"backend": "threading"}, {"prefer": "threads"}], ids=["threading", "prefer-threads"]
)
def test_deep_ensemble_is_bit_identical_to_serial_under_every_backend(
    config, serial_ensemble_proba
):
    X, y = _data(n=200)
    with parallel_config(**config):
        proba = _ensemble().fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(proba, serial_ensemble_proba)


def test_grid_search_over_threads_is_bit_identical_to_serial():
    X, y = _data(n=80)
    est = LaplaceClassifier(
        make_classifier_net(max_epochs=15, hidden=(16,), lr=3e-2), random_state=0
    )
    grid = {"estimator__lr": [1e-2, 3e-2]}
    scores = []
    for backend in ("sequential", "threading"):
        with parallel_config(backend=backend):
            search = GridSearchCV(est, grid, cv=2, n_jobs=2, scoring="neg_log_loss").fit(X, y)
        scores.append(search.cv_results_["split0_test_score"])
        scores.append(search.cv_results_["split1_test_score"])
    np.testing.assert_array_equal(scores[:2], scores[2:])


# --------------------------------------------------------------- MC dropout
def test_dropout_sampler_shares_each_samples_masks_over_rows():
    net = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.3))
    x = torch.randn(1, 4).expand(6, 4)  # six copies of one row
    out = mc_dropout_samples(net, x, n_samples=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, out[:, :1].expand_as(out))  # one network per sample
    assert not torch.equal(out[0], out[1])  # different networks across samples


def test_dropout_sampler_masks_have_the_dropout_law():
    p, n_samples = 0.3, 4000
    x = torch.ones(2, 10)
    out = DropoutSampler(nn.Sequential(nn.Dropout(p)), n_samples, torch.Generator().manual_seed(0))(
        x
    )
    dropped = float((out == 0).double().mean())
    assert abs(dropped - p) < 4 * np.sqrt(p * (1 - p) / (n_samples * 10))
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))
    # channel dropout: a whole channel is kept or dropped
    img = torch.ones(3, 4, 5, 5)
    out = DropoutSampler(nn.Sequential(nn.Dropout2d(0.5)), 20, torch.Generator().manual_seed(0))(
        img
    )
    per_channel = out.reshape(20, 3, 4, 25)
    assert torch.equal(per_channel, per_channel[..., :1].expand_as(per_channel))


def test_alpha_dropout_sampler_keeps_mean_and_variance():
    x = torch.randn(20000, 1)
    layer = nn.Sequential(nn.AlphaDropout(0.2))
    out = DropoutSampler(layer, 1, torch.Generator().manual_seed(0))(x.T.contiguous())
    assert abs(float(out.mean())) < 0.05 and abs(float(out.var()) - 1) < 0.05


def test_dropout_sampler_restores_modes_and_draws_from_its_generator():
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    net.train()
    x = torch.randn(4, 3)
    state = torch.get_rng_state()
    a = mc_dropout_samples(net, x, 5, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(m.training for m in net.modules())
    assert a.shape == (5, 4, 8)


@pytest.fixture(scope="module")
def mc_dropout():
    X, y = _data(n=120)
    net = make_classifier_net(max_epochs=10, hidden=(32,), lr=3e-2, module__dropout=0.3)
    return MCDropoutClassifier(net, n_samples=20, random_state=0).fit(X, y), X


def test_mc_dropout_row_does_not_depend_on_its_neighbours(mc_dropout):
    est, X = mc_dropout
    proba = est.predict_proba(X[:20])
    alone = np.concatenate([est.predict_proba(X[i : i + 1]) for i in range(20)])
    np.testing.assert_allclose(alone, proba, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(alone.argmax(1), proba.argmax(1))
    order = np.random.RandomState(0).permutation(20)
    np.testing.assert_allclose(est.predict_proba(X[:20][order]), proba[order], rtol=0, atol=1e-6)


def test_mc_dropout_is_the_same_for_every_batch_size(mc_dropout):
    est, X = mc_dropout
    proba = est.predict_proba(X)
    est.set_params(batch_size=7)
    try:
        np.testing.assert_allclose(est.predict_proba(X), proba, rtol=0, atol=1e-6)
    finally:
        est.set_params(batch_size=256)


def test_mc_link_rows_do_not_depend_on_their_neighbours():
    X, y = _data(n=80)
    est = LaplaceClassifier(
        make_classifier_net(max_epochs=10, hidden=(16,), lr=3e-2),
        link_approx="mc",
        n_samples=200,
        random_state=0,
    ).fit(X, y)
    proba = est.predict_proba(X[:15])
    alone = np.concatenate([est.predict_proba(X[i : i + 1]) for i in range(15)])
    np.testing.assert_allclose(alone, proba, rtol=0, atol=1e-6)
    est.set_params(batch_size=4)
    np.testing.assert_allclose(est.predict_proba(X[:15]), proba, rtol=0, atol=1e-6)
