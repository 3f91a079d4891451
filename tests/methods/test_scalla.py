"""ScaLLA: the surrogate neural kernel, its JVP-only loss and the feature-space Laplace.

Ground truth: exact NTKs ``J J^T`` from brute-force per-row Jacobians
(``skuq.curvature.jacobians``) on tiny nets, skuq's full-GGN Laplace over all
weights (itself checked against laplace-torch in test_laplace.py), and the
exact NTK truncated to its top eigen-directions.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch
from sklearn.frozen import FrozenEstimator
from torch import nn

from skuq import LaplaceClassifier, ScaLLAClassifier
from skuq.curvature import hessian_sqrt, jacobians, select_weights
from skuq.metrics import ood_auroc
from skuq.scalla import (
    FeaturePosterior,
    draw_probes,
    kernel_matching_loss,
    probe_outputs,
)
from skuq.scalla import estimator as scalla
from tests._helpers import (
    CountingMLP,
    assert_centered_predictive,
    assert_heldout_rule,
    make_classifier_net,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    """benchmarks/scalla.py as a module (for its memory counter)."""
    spec = importlib.util.spec_from_file_location(
        "skuq_bench_scalla", os.path.join(ROOT, "benchmarks", "scalla.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _blobs(n, c=3, seed=0):
    """2-d inputs, labels from a softmax model (the loss cannot reach 0: a stable MAP)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g)
    W = torch.randn(2, c, generator=g)
    y = torch.multinomial(torch.softmax(2 * X @ W, 1), 1, generator=g)[:, 0]
    return X, y


def _train(net, X, y, steps=300):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    return net.eval()


def _ntk(net, X):
    """Exact stacked Jacobian (N*C, P) and kernel."""
    w = select_weights(net)
    J, _ = jacobians(w, torch.as_tensor(X))
    J = J.detach().double().reshape(-1, w.n_params)
    return J, J @ J.T


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------- the loss
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_jvp_loss_is_an_unbiased_estimate_of_the_kernel_matching_loss(probe):
    """E_v[L_hat] = sum_ij ||g_i g_j^T - K_ij||^2 / B^2 exactly, K the exact NTK.

    20000 independent draws of S = 4 probes on a 2-6-3 tanh net (45 weights,
    float64), at arbitrary features G: the mean of the estimates is within 4
    standard errors of the exact loss, of ||K||^2, and its gradient in G
    within 3 % of the exact gradient. Measured (seed 1): loss 18.77 exact vs
    18.62 +- 0.10 (Rademacher, 1.5 s.e.) and 18.68 +- 0.11 (Gaussian, 0.9
    s.e.); ||K||^2 19.35 vs 19.19 +- 0.10 and 19.24 +- 0.12; gradient
    relative error 0.007 and 0.012.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    _, K = _ntk(net, x)
    G = (0.5 * torch.randn(5, 3, 4, dtype=torch.float64)).requires_grad_(True)
    Gf = G.reshape(15, 4)
    exact = ((Gf @ Gf.T - K) ** 2).sum() / 25
    (grad_exact,) = torch.autograd.grad(exact, G)

    R, S = 20000, 4
    gen = torch.Generator().manual_seed(1)
    Z = probe_outputs(select_weights(net), x, R * S, probe, generator=gen).reshape(R, S, 5, 3)
    est = torch.vmap(lambda z: torch.stack(kernel_matching_loss(G, z)))(Z)  # (R, 2)
    mean, se = est.mean(0), est.std(0).detach() / math.sqrt(R)
    assert abs(float((mean[0] - exact).detach())) < 4 * float(se[0])
    assert abs(float(mean[1].detach() - (K**2).sum() / 25)) < 4 * float(se[1])
    (grad_mean,) = torch.autograd.grad(mean[0], G)
    assert _rel(grad_mean, grad_exact) < 0.03
    # the second moment of the probes is the identity
    v = draw_probes(20000, 3, probe, generator=gen, dtype=torch.float64)
    assert torch.allclose(v.T @ v / len(v), torch.eye(3, dtype=torch.float64), atol=0.03)


def test_loss_row_weights_and_zero_features():
    Z = torch.randn(6, 4, 2)
    loss, ksq = kernel_matching_loss(torch.zeros(4, 2, 3), Z)
    assert torch.allclose(loss, ksq)
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])  # zero weight = the rows are left out
    G = torch.randn(4, 2, 3)
    a = kernel_matching_loss(G, Z, w)
    b = kernel_matching_loss(G[:2], Z[:, :2])
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 probes"):
        kernel_matching_loss(G, Z[:1])


# ------------------------------------------------------- against full LLA
def test_surrogate_kernel_and_variance_match_full_lla_on_softmax_regression():
    """m >= rank, enough training: kernel and predictive variance of the full LLA.

    Softmax regression on 2-d inputs (a linear "net": 9 weights, m = 9, NTK
    ``(x.x' + 1) I_C`` of full rank and a flat spectrum), 600 full-batch steps
    with 64 Rademacher probes each. Measured on 100 held-out rows: kernel
    relative error (Frobenius) 0.054, predictive variance relative error
    0.051 against skuq's full-GGN Laplace with the same prior precision;
    ``tau`` by marginal likelihood 0.624 vs the full LLA's 0.619 (the
    evidence of :class:`FeaturePosterior` is the weight-space one when the
    spectra agree).
    """
    X, y = _blobs(400)
    torch.manual_seed(0)
    net = _train(nn.Linear(2, 3), X[:300], y[:300])
    Xtr, ytr, Xte = X[:300].numpy(), y[:300].numpy(), X[300:].numpy()
    kw = dict(
        n_features=9,
        n_probes=64,
        surrogate__epochs=600,
        surrogate__batch_size=300,
        surrogate__width=64,
        surrogate__lr=3e-3,
        random_state=0,
        device="cpu",
    )
    est = ScaLLAClassifier(net, prior_precision=1.0, **kw).fit(Xtr, ytr)
    ref = LaplaceClassifier(
        net, subset_of_weights="all", hessian_structure="full", prior_precision=1.0, device="cpu"
    ).fit(Xtr, ytr)
    _, K = _ntk(net, Xte)
    G = est.surrogate_(torch.as_tensor(Xte)).double().reshape(-1, 9)
    assert _rel(G @ G.T, K) < 0.1
    v_s = est.predict_distribution(Xte).variance
    v_f = ref.predict_distribution(Xte).variance
    assert _rel(v_s, v_f) < 0.1
    assert_centered_predictive(est, Xte)

    # tau by the evidence: the same sums, so the same optimum as the full LLA's
    est.posterior_.optimize_prior_precision()
    ref_ml = LaplaceClassifier(
        net,
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision="marglik",
        device="cpu",
    ).fit(Xtr, ytr)
    assert est.posterior_.prior_precision == pytest.approx(ref_ml.prior_precision_, rel=0.1)


def test_tanh_net_surrogate_captures_the_dominant_kernel_directions():
    """A 2-8-3 tanh net (51 weights, m = 51 >= rank): the kernel, and the top directions.

    The NTK's spectrum spans 6 decades (squared singular values 2800 ... 0.002
    over 300 rows). The Frobenius kernel loss weighs a direction by its
    squared eigenvalue, so the surrogate learns the top directions first; the
    predictive variance depends on directions down to the prior precision
    (the exact NTK truncated to its top 10 / 15 / 20 training directions
    gives variance errors 0.32 / 0.22 / 0.11). Measured (1,800 steps of 100
    rows, 32 probes, 4 s): kernel relative error on 100 held-out rows 0.106,
    variance relative error 0.115 against the full-GGN Laplace -- about the
    top-20 truncation of the exact kernel. More training barely helps (6,000
    steps: 0.080 / 0.107), and neither does removing the probe noise: trained
    on the *exact* kernel (3,000 full-batch steps), the held-out kernel error
    floors at 0.04 with training eigenvalues below 1e-3 of the top off by
    factors 0.6-1.5 -- the loss's weighting, not its estimator, sets the floor.
    """
    X, y = _blobs(400)
    torch.manual_seed(0)
    net = _train(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)), X[:300], y[:300])
    Xtr, ytr, Xte = X[:300].numpy(), y[:300].numpy(), X[300:].numpy()
    est = ScaLLAClassifier(
        net,
        n_features=51,
        n_probes=32,
        surrogate__epochs=600,
        surrogate__batch_size=100,
        surrogate__width=128,
        surrogate__lr=1e-2,
        prior_precision=1.0,
        random_state=0,
        device="cpu",
    ).fit(Xtr, ytr)
    _, K = _ntk(net, Xte)
    G = est.surrogate_(torch.as_tensor(Xte)).double().reshape(-1, 51)
    assert _rel(G @ G.T, K) < 0.13

    # the exact NTK truncated to its top-10 training directions, through the same Laplace
    Jtr, _ = _ntk(net, Xtr)
    Jte, _ = _ntk(net, Xte)
    top = torch.linalg.svd(Jtr, full_matrices=False).Vh[:10].T
    f = net(torch.as_tensor(Xtr)).detach().double()
    L = hessian_sqrt(f, "classification")
    Ftr = (Jtr @ top).reshape(300, 3, 10)
    LF = L.transpose(1, 2) @ Ftr
    post = FeaturePosterior(
        torch.einsum("nck,ncl->kl", LF, LF), theta_sq_norm=1.0, prior_precision=1.0
    )
    v_top10 = post.functional_variance((Jte @ top).reshape(100, 3, 10)).diagonal(dim1=1, dim2=2)
    v_full = LaplaceClassifier(
        net, subset_of_weights="all", hessian_structure="full", prior_precision=1.0, device="cpu"
    ).fit(Xtr, ytr)
    v_full = v_full.predict_distribution(Xte).variance.double()
    v_s = est.predict_distribution(Xte).variance.double()
    assert _rel(v_s, v_full) < _rel(v_top10, v_full)
    assert _rel(v_s, v_full) < 0.15


def test_context_rows_join_the_kernel_fit():
    """Kernel biasing: the NTK at far-away rows is learned when context rows like them are fit.

    A 2-8-3 tanh net on 2-d data; context: 100 rows on a ring of radius 4,
    evaluated at 100 fresh rows of the same ring. Measured: kernel relative
    error there 0.51 without context vs 0.25 with it, at no cost in
    distribution (0.20 vs 0.18). The predictive variance on the ring hardly
    moves in this small 2-d problem (3.69 vs 3.53; full LLA 4.62): the
    surrogate without context already extrapolates the kernel's scale.
    """
    X, y = _blobs(300)
    torch.manual_seed(0)
    net = _train(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)), X, y)
    g = torch.Generator().manual_seed(5)
    angle = torch.rand(200, generator=g) * 2 * math.pi
    ring = (4 * torch.stack([angle.cos(), angle.sin()], 1)).numpy()
    ctx, fresh = ring[:100], ring[100:]
    kw = dict(
        n_features=24,
        n_probes=16,
        surrogate__epochs=60,
        surrogate__batch_size=100,
        surrogate__width=64,
        surrogate__lr=1e-2,
        prior_precision=1.0,
        random_state=0,
        device="cpu",
    )
    plain = ScaLLAClassifier(net, **kw).fit(X.numpy(), y.numpy())
    biased = ScaLLAClassifier(net, **kw).fit(X.numpy(), y.numpy(), context=ctx)

    def kernel_error(est, rows):
        _, K = _ntk(net, rows)
        G = est.surrogate_(torch.as_tensor(rows)).double().reshape(-1, 24)
        return _rel(G @ G.T, K)

    assert kernel_error(biased, fresh) < 0.7 * kernel_error(plain, fresh)
    inside = X.numpy()[:100]
    assert kernel_error(biased, inside) < 1.3 * kernel_error(plain, inside)


def test_the_biased_kernel_improves_ood_detection(digits):
    """Kernel biasing with context rows like the OOD inputs raises the OOD AUROC of the
    predictive variance on *other* OOD rows. Digits 0-4 (a 64-16-5 tanh net), context: 150
    rows of digits 5-9, scored on the remaining ones against the test digits. Measured:
    AUROC 0.349 without context (the surrogate's kernel is lower off the data), 0.529 with
    it; the context also raises the OOD / test variance ratio (0.89 -> 1.05). Without the
    bias (context ignored, or weighted 0) the two would be equal."""
    torch.manual_seed(0)
    X, y = torch.as_tensor(digits.X_train), torch.as_tensor(digits.y_train)
    net = _train(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 5)), X, y, steps=200)
    perm = np.random.RandomState(0).permutation(len(digits.X_ood))
    ctx, held = digits.X_ood[perm[:150]], digits.X_ood[perm[150:]]
    kw = dict(
        n_features=16,
        surrogate__epochs=30,
        surrogate__width=64,
        prior_precision=1.0,
        random_state=0,
        device="cpu",
    )
    auroc = {}
    for name, context in (("plain", None), ("biased", ctx)):
        est = ScaLLAClassifier(net, **kw).fit(digits.X_train, digits.y_train, context=context)
        auroc[name] = ood_auroc(
            est.predict_uncertainty(digits.X_test, "variance"),
            est.predict_uncertainty(held, "variance"),
        )
    assert auroc["biased"] > auroc["plain"] + 0.1, auroc


# --------------------------------------------------------------------- memory
def test_peak_memory_does_not_grow_with_p_beyond_the_net():
    """Two widths, 84k and 1.12M weights: the extra peak is a few copies of the weights.

    Method: :class:`benchmarks.scalla.LiveTensorBytes` counts the bytes of
    every tensor storage an op allocates during ``fit`` (torch ops, autograd
    and torch.func included; views and in-place results are not allocations)
    until it is freed; the net's own weights and the data existed before and
    are not counted. Measured: peak 3.1 MB and 10.8 MB (2.4 weight vectors at
    1.12M weights): the peak grows by 1.85 x the growth of the weights' bytes
    (the weight vector the JVPs take, one probe, the tangents), while one
    batch's Jacobian alone would grow by 320 x (64 rows x 5 outputs). The
    largest single tensor is one weight vector. Predicting allocates 0.13 /
    0.52 MB: nothing of size P (the surrogate replaces the Jacobian).
    """
    LiveTensorBytes = _bench().LiveTensorBytes
    rng = np.random.RandomState(0)
    X = rng.rand(64, 64).astype(np.float32)
    y = np.arange(64) % 5
    peaks, pred_peaks, sizes = [], [], []
    for width in (256, 1024):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5)
        )
        P = sum(p.numel() for p in net.parameters())
        est = ScaLLAClassifier(
            net,
            n_features=8,
            surrogate__width=16,
            surrogate__epochs=1,
            surrogate__batch_size=64,
            n_probes=4,
            random_state=0,
            device="cpu",
        )
        with LiveTensorBytes() as mem:
            est.fit(X, y)
        with LiveTensorBytes() as pred:
            est.predict_proba(X)
        peaks.append(mem.peak)
        pred_peaks.append(pred.peak)
        sizes.append(4 * P)
        assert mem.largest <= 4 * P + 2**20
    growth = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    assert growth < 3, growth
    jacobian_growth = 64 * 5  # one batch of Jacobians, per weight
    assert growth < jacobian_growth / 50
    # predict: the net's forward activations and the surrogate, nothing of size P
    assert pred_peaks[1] < sizes[1] / 4


# ------------------------------------------------------------------ estimator
def test_digits_frozen_net_reproducible_and_posterior_only_changes(digits, monkeypatch):
    net = make_classifier_net(max_epochs=10, hidden=(16,), lr=3e-2, module__n_outputs=5)
    net.fit(digits.X_train, digits.y_train)
    kw = dict(n_features=8, surrogate__epochs=3, surrogate__width=32, random_state=0, device="cpu")
    trained = []
    real_fit = scalla.fit_surrogate
    monkeypatch.setattr(
        scalla, "fit_surrogate", lambda *a, **k: trained.append(1) or real_fit(*a, **k)
    )
    scalla.clear_surrogate_cache()
    a = ScaLLAClassifier(FrozenEstimator(net), **kw).fit(digits.X_train, digits.y_train)
    scalla.clear_surrogate_cache()
    b = ScaLLAClassifier(FrozenEstimator(net), **kw).fit(digits.X_train, digits.y_train)
    assert len(trained) == 2
    pa = a.predict_proba(digits.X_test)
    np.testing.assert_array_equal(pa, b.predict_proba(digits.X_test))
    assert pa.shape == (len(digits.X_test), 5) and np.allclose(pa.sum(1), 1)
    assert a.surrogate_loss_.shape == (3,) and a.surrogate_loss_[-1] < a.surrogate_loss_[0]
    assert a.n_params_ == sum(p.numel() for p in net.module_.parameters())
    assert a.prior_precision_ > 0 and a.kernel_scale_ > 0
    # more prior precision, less spread
    c = ScaLLAClassifier(FrozenEstimator(net), prior_precision=1e4, **kw).fit(
        digits.X_train, digits.y_train
    )
    assert (
        c.predict_uncertainty(digits.X_test, "variance")
        < a.predict_uncertainty(digits.X_test, "variance")
    ).all()
    assert len(trained) == 2  # a posterior-only change reuses the cached surrogate
    np.testing.assert_array_equal(c.surrogate_loss_, a.surrogate_loss_)
    ScaLLAClassifier(FrozenEstimator(net), **{**kw, "random_state": 1}).fit(
        digits.X_train, digits.y_train
    )
    assert len(trained) == 3  # another seed, another surrogate
    # held-out prior: the widest posterior within 5 % of the best held-out NLL
    h = ScaLLAClassifier(FrozenEstimator(net), prior_precision="heldout", **kw)
    h.fit(digits.X_train, digits.y_train, X_cal=digits.X_test[:80], y_cal=digits.y_test[:80])
    assert_heldout_rule(h)


def test_surrogate_options():
    X, y = _blobs(60)
    torch.manual_seed(0)
    net = _train(nn.Linear(2, 3), X, y, steps=50)
    kw = dict(n_features=4, surrogate__epochs=2, random_state=0, device="cpu")
    mod = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 12))
    est = ScaLLAClassifier(net, surrogate=mod, **kw).fit(X.numpy(), y.numpy())
    assert est.surrogate_.net is not mod  # copied, the given module is left untouched
    est = ScaLLAClassifier(
        net, surrogate=lambda shape, n: nn.Linear(shape[0], n), probe="gaussian", **kw
    ).fit(X.numpy(), y.numpy())
    assert isinstance(est.surrogate_.net, nn.Linear)
    with pytest.raises(ValueError, match="n_outputs \\* n_features"):
        ScaLLAClassifier(net, surrogate=nn.Linear(2, 5), **kw).fit(X.numpy(), y.numpy())
    with pytest.raises(ValueError, match="channels, H, W"):
        ScaLLAClassifier(net, surrogate="cnn", **kw).fit(X.numpy(), y.numpy())


def test_surrogate_training_options_grid_search_clone_and_deprecated_names():
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    X, y = _blobs(60)
    torch.manual_seed(0)
    net = _train(nn.Linear(2, 3), X, y, steps=50)
    X, y = X.numpy(), y.numpy()
    kw = dict(n_features=4, random_state=0, device="cpu")
    est = ScaLLAClassifier(net, surrogate__width=16, surrogate__epochs=3, **kw)
    copy = clone(est)
    assert copy.get_params()["surrogate__epochs"] == 3 and copy.surrogate__width == 16
    assert copy.set_params(surrogate__lr=5e-3) is copy
    assert copy.get_params()["surrogate__lr"] == 5e-3 and est.surrogate__lr == 1e-3
    grid = [1, 3]
    scalla.clear_surrogate_cache()
    search = GridSearchCV(est, {"surrogate__epochs": grid}, cv=2, error_score="raise").fit(X, y)
    assert list(search.cv_results_["param_surrogate__epochs"]) == grid
    best = search.best_params_["surrogate__epochs"]
    assert search.best_estimator_.surrogate_loss_.shape == (best,)
    # the deprecated flat names: a FutureWarning pointing at the caller, the same results
    scalla.clear_surrogate_cache()
    flat_est = ScaLLAClassifier(net, surrogate_width=16, **kw)
    deprecated = "surrogate_(width|epochs) is deprecated.*use surrogate__(width|epochs)"
    with pytest.warns(FutureWarning, match=deprecated):
        flat = GridSearchCV(flat_est, {"surrogate_epochs": grid}, cv=2, error_score="raise")
        flat.fit(X, y)
    np.testing.assert_array_equal(
        flat.cv_results_["mean_test_score"], search.cv_results_["mean_test_score"]
    )
    np.testing.assert_array_equal(
        flat.best_estimator_.predict_proba(X), search.best_estimator_.predict_proba(X)
    )
    with pytest.warns(FutureWarning, match=deprecated) as record:
        clone(flat_est).set_params(surrogate_epochs=1).fit(X, y)
    assert {w.filename for w in record} == {__file__}
    with pytest.raises(ValueError, match="give only surrogate__epochs"):
        ScaLLAClassifier(net, surrogate_epochs=2, surrogate__epochs=3, **kw).fit(X, y)


def test_default_cnn_surrogate_on_images():
    from skuq.nets import SmallCNN

    rng = np.random.RandomState(0)
    X = rng.rand(40, 1, 8, 8).astype(np.float32)
    y = np.arange(40) % 3
    torch.manual_seed(0)
    cnn = SmallCNN(n_outputs=3, channels=(4, 4), hidden=8)
    cnn(torch.as_tensor(X[:2]))  # materialize the lazy layers
    est = ScaLLAClassifier(
        cnn.eval(), n_features=4, surrogate__epochs=1, random_state=0, device="cpu"
    ).fit(X, y)
    assert isinstance(est.surrogate_.net[0], nn.Conv2d)
    assert est.predict_proba(X).shape == (40, 3)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("m", [0, -3, 2.5, True])
def test_bad_n_features(m):
    X, y = _blobs(20)
    with pytest.raises(ValueError, match="n_features"):
        ScaLLAClassifier(nn.Linear(2, 3), n_features=m).fit(X.numpy(), y.numpy())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_probes": 1}, "n_probes"),
        ({"probe": "sobol"}, "probe"),
        ({"surrogate": "rnn"}, "surrogate"),
        ({"surrogate": 3}, "surrogate"),
        ({"prior_precision": -1.0}, "prior_precision"),
        ({"prior_precision": "cv"}, "prior_precision"),
        ({"context_weight": 0.0}, "context_weight"),
        ({"surrogate__epochs": 0}, "surrogate__epochs"),
    ],
)
def test_bad_options(kwargs, match):
    X, y = _blobs(20)
    with pytest.raises((ValueError, TypeError), match=match):
        ScaLLAClassifier(nn.Linear(2, 3), **kwargs).fit(X.numpy(), y.numpy())


def test_context_of_the_wrong_shape_is_refused_before_training(digits):
    net = make_classifier_net(max_epochs=1, hidden=(8,), module=CountingMLP)
    est = ScaLLAClassifier(net, n_features=4, surrogate__epochs=1, device="cpu")
    built = CountingMLP.n_built
    for bad in (
        digits.X_train[:10, :30],
        digits.X_train[0],
        digits.X_train[:0],
        digits.X_train[:5].reshape(5, 8, 8),
    ):
        with pytest.raises(ValueError, match="context"):
            est.fit(digits.X_train, digits.y_train, context=bad)
    assert CountingMLP.n_built == built  # the net was never trained
    nan = digits.X_train[:5].copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="context"):
        est.fit(digits.X_train, digits.y_train, context=nan)


def test_a_diverging_surrogate_is_a_clear_error_not_nan():
    X, y = _blobs(64)
    torch.manual_seed(0)
    net = _train(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)), X, y, steps=50)
    est = ScaLLAClassifier(
        net, n_features=4, surrogate__epochs=20, surrogate__lr=1e12, random_state=0, device="cpu"
    )
    with pytest.raises(FloatingPointError, match="diverged.*surrogate__lr"):
        est.fit(X.numpy(), y.numpy())
    assert not hasattr(est, "posterior_")
