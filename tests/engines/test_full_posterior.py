"""CholeskyFullPosterior (the default dense posterior) and the memory limit of "full"."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

import skuq.curvature.memory as memory
from skuq.curvature import compute_curvature, select_weights
from skuq.curvature.memory import check_full_memory, full_memory_bytes
from skuq.posterior import CholeskyFullPosterior, FullPosterior, posterior_from_curvature
from skuq.predictive import glm_predictive
from tests._helpers import brute_jacobian


def _spd(P, rank, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, rank, generator=g, dtype=dtype)
    return A @ A.T, torch.randn(P, generator=g, dtype=dtype)


@pytest.fixture(params=["float64 work", "float32 work"])
def work(request, monkeypatch):
    """Both factorization dtypes: float64 (small P) and the posterior's own (large P)."""
    if request.param == "float32 work":
        monkeypatch.setattr(memory, "FLOAT64_FACTOR_MAX_PARAMS", 0)
    return request.param


def test_matches_inverse_of_the_precision(work):
    """Covariance, marginal variances, J Sigma J^T and log det against float64 inverses,
    for a scalar and a per-layer prior; H of rank 20 < P (a flat likelihood direction)."""
    H, mean = _spd(40, 20)
    H32, mean32 = H.float(), mean.float()
    tol = 1e-10 if work == "float64 work" else 1e-4  # float64 work: the float64 posterior
    for dtype, (Hd, m) in ((torch.float64, (H, mean)), (torch.float32, (H32, mean32))):
        for delta, sizes in ((0.7, None), (torch.tensor([0.3, 2.0]), [15, 25])):
            post = CholeskyFullPosterior(
                m, Hd, prior_precision=delta, group_sizes=sizes, sigma_noise=0.5
            )
            dv = post._delta_vector(post.prior_precision).double()
            prec = 4.0 * Hd.double() + torch.diag(dv)  # s = 1 / sigma^2; H as given
            cov = torch.linalg.inv(prec)
            t = tol if dtype == torch.float64 else max(tol, 2e-5)
            scale = float(cov.abs().max())
            assert float((post.covariance().double() - cov).abs().max()) < t * scale
            assert (
                float((post.marginal_variance().double() - cov.diagonal()).abs().max()) < t * scale
            )
            J = torch.randn(5, 3, 40, dtype=torch.float64)
            ref = J @ cov @ J.transpose(1, 2)
            got = post.functional_variance(J.to(dtype)).double()
            assert float((got - ref).abs().max()) < t * float(ref.abs().max())
            logdet = float(torch.logdet(prec))
            # float32 (work or, per layer, the Cholesky of s H + diag(delta) in H's dtype):
            # eigenvalues or pivots off by ~eps32 |H| each
            exact = work == "float64 work" and dtype == torch.float64
            assert float(post.log_det_posterior_precision()) == pytest.approx(
                logdet, rel=1e-10 if exact else 2e-5
            )


def test_same_numbers_as_the_eigendecomposition(work):
    """Evidence, its optimum and the predictive of a last layer against FullPosterior."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(200, 5)
    y = model(x).argmax(1)
    y[:20] = torch.randint(0, 4, (20,))
    w = select_weights(model, "last_layer", example_input=x)
    curv = compute_curvature(w, [(x, y)], structure="full")
    kw = dict(prior_precision=0.5, loss=curv.loss, n_data=curv.n_data, n_outputs=curv.n_outputs)
    ref = FullPosterior(w.vector(), curv.full, **kw)
    post = posterior_from_curvature(curv, w.vector(), prior_precision=0.5)
    assert isinstance(post, CholeskyFullPosterior)
    assert float(post.log_marginal_likelihood()) == pytest.approx(
        float(ref.log_marginal_likelihood()), rel=1e-6
    )
    for center in (False, True):
        a = glm_predictive(w, ref, x[:30], center=center)
        b = glm_predictive(w, post, x[:30], center=center)
        # the feature route of the triangular factor against the Jacobian route
        c = glm_predictive(w, post, x[:30], center=center, use_features=False)
        scale = float(a.covariance.abs().max())
        for other in (b, c):
            assert float((other.covariance - a.covariance).abs().max()) < 1e-5 * scale
            if center:
                d = (other.centered_covariance - a.centered_covariance).abs().max()
                assert float(d) < 1e-5 * float(a.centered_covariance.abs().max())
    # the evidence's optimum against a float64 search over float64 eigenvalues; the
    # posterior's search evaluates the prior and scatter terms in float32 (rounding ~1e-5
    # of an evidence of ~100, on an optimum flat to second order: ~5e-4 in delta)
    lam = torch.linalg.eigvalsh(curv.full.double()).clamp_min(0).numpy()
    theta2 = float((w.vector().double() ** 2).sum())

    def neg_evidence(z):
        d = np.exp(z)
        return 0.5 * (np.log(lam + d).sum() - lam.size * z + d * theta2)

    best = scipy.optimize.minimize_scalar(
        neg_evidence, bounds=(-10, 10), method="bounded", options={"xatol": 1e-9}
    ).x
    post.optimize_prior_precision()
    assert float(post.prior_precision) == pytest.approx(np.exp(best), rel=1e-3)


def test_centered_covariance_keeps_float32_precision(work):
    """A float32 last layer under a weak prior (delta 1e-3): the shared-shift variance is
    ~1e3 times the rest; the centered covariance from the triangular factor keeps the
    float32 posterior's own rounding, against a float64 brute-force reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4)).float()
    x = torch.randn(60, 3)
    y = model(x).argmax(1)
    C, delta = 4, 1e-3
    w = select_weights(model, "last_layer", example_input=x)
    curv = compute_curvature(w, [(x, y)], structure="full")
    post = posterior_from_curvature(curv, w.vector(), prior_precision=delta)
    dist = glm_predictive(w, post, x[:20], center=True)
    H = curv.full.double()
    cov = torch.linalg.inv(H + delta * torch.eye(H.shape[0], dtype=torch.float64))
    J = brute_jacobian(copy.deepcopy(model).double(), x[:20].double())[:, :, -w.n_params :]
    P = torch.eye(C, dtype=torch.float64) - 1.0 / C
    reference = P @ (J @ cov @ J.transpose(1, 2)) @ P
    scale = float(reference.diagonal(dim1=1, dim2=2).mean())
    err = float((dist.centered_covariance.double() - reference).abs().max())
    limit = 1e-4 if work == "float64 work" else 1e-3  # a float32 Cholesky at condition ~1e6
    assert err < limit * scale


def test_samples_have_the_covariance():
    H, mean = _spd(6, 4, seed=1)
    post = CholeskyFullPosterior(mean, H, prior_precision=0.5)
    s = post.sample(200_000, torch.Generator().manual_seed(0))
    emp = torch.cov(s.T)
    cov = torch.linalg.inv(H + 0.5 * torch.eye(6, dtype=torch.float64))
    sd = cov.diagonal().sqrt()
    assert float(((emp - cov) / torch.outer(sd, sd)).abs().max()) < 0.02  # ~4.5 MC s.e.
    assert float(((s.mean(0) - mean) / sd).abs().max()) < 0.02


def test_eigvecs_on_demand_agree_with_eigvals():
    H, mean = _spd(30, 10, seed=2)
    post = CholeskyFullPosterior(mean, H)
    assert post._eigvecs is None
    Q = post.eigvecs
    rebuilt = (Q * post.eigvals) @ Q.T
    assert float((rebuilt - H).abs().max()) < 1e-10 * float(H.abs().max())


@pytest.mark.parametrize(
    "bias,likelihood", [(True, "classification"), (False, "classification"), (True, "regression")]
)
def test_last_layer_class_pair_blocks_match_jacobians(bias, likelihood):
    """The last-layer dense block assembled from the class pairs c <= c' equals the
    per-sample Jacobian route."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3, bias=bias))
    x = torch.randn(50, 4, dtype=torch.float64)
    model = model.double()
    y = model(x).argmax(1) if likelihood == "classification" else torch.randn(50, 3).double()
    w = select_weights(model, "last_layer", example_input=x)
    a = compute_curvature(
        w, [(x[:20], y[:20]), (x[20:], y[20:])], structure="full", likelihood=likelihood
    )
    b = compute_curvature(w, [(x, y)], structure="full", likelihood=likelihood, route="jacobians")
    torch.testing.assert_close(a.full, b.full, rtol=1e-12, atol=1e-12)


def test_memory_error_before_allocating(monkeypatch):
    """The limit is the memory available: the message names the bytes and alternatives."""
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 10_000_000)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 10))  # 1,650 weights
    x, y = torch.randn(8, 30), torch.randint(0, 10, (8,))
    need = full_memory_bytes(1650)
    assert need == 1650**2 * (4 + 8)
    with pytest.raises(
        MemoryError,
        match=rf"needs 0.03 GiB \({need:,} bytes.*0.01 GiB are "
        "available.*subset_of_weights='last_layer'",
    ):
        compute_curvature(select_weights(model), [(x, y)], structure="full")
    w = select_weights(model, "last_layer", example_input=x)
    compute_curvature(w, [(x, y)], structure="full")  # 410 weights: 2 MB, fits
    # the posterior checks its own work array (the curvature may come from elsewhere)
    with pytest.raises(MemoryError, match="hessian_structure='full' over 2,000 weights"):
        CholeskyFullPosterior(torch.zeros(2000), torch.zeros(1, 1).expand(2000, 2000))
    check_full_memory(100, torch.float32, "cpu")


def test_available_memory_reads_the_machine():
    avail = memory.available_memory("cpu")
    assert avail is None or 0 < avail < 2**50


def test_a_grid_of_delta_reuses_one_eigendecomposition(monkeypatch):
    """Once the eigenvectors exist (the held-out grid asks for them), a new scalar delta
    is a rescaling, not a Cholesky factorization; the covariance is the same."""
    H, mean = _spd(30, 10, seed=3)
    post = CholeskyFullPosterior(mean, H, prior_precision=0.3)
    by_cholesky = post.covariance().clone()
    _ = post.eigvecs
    import skuq.posterior.full as posterior

    def fail(W):
        raise AssertionError("factorized again")

    monkeypatch.setattr(posterior, "_inverse_cholesky_lower", fail)
    for delta in (0.3, 3.0):
        post.set_hyperparameters(prior_precision=delta)
        cov = torch.linalg.inv(H + delta * torch.eye(30, dtype=torch.float64))
        torch.testing.assert_close(post.covariance(), cov, rtol=1e-9, atol=1e-12)
    post.set_hyperparameters(prior_precision=0.3)
    torch.testing.assert_close(post.covariance(), by_cholesky, rtol=1e-9, atol=1e-12)


def test_cholesky_posterior_falls_back_to_the_eigenbasis_when_the_factor_fails():
    # a curvature a little indefinite from rounding (an eigenvalue of -1e-3) and a prior
    # precision below it: s H + delta I is not positive definite and its Cholesky fails,
    # but Sigma over H's clamped eigenvalues (what the evidence and the grid use) exists
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    lam = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.0, -1e-3], dtype=torch.float64)
    H = Q @ torch.diag(lam) @ Q.T
    post = CholeskyFullPosterior(torch.zeros(6, dtype=torch.float64), H, prior_precision=1e-4)
    J = torch.randn(3, 2, 6, dtype=torch.float64)
    expected = torch.einsum("bck,k,bdk->bcd", J @ Q, 1.0 / (lam.clamp_min(0) + 1e-4), J @ Q)
    torch.testing.assert_close(post.functional_variance(J), expected, rtol=1e-8, atol=1e-10)
    # a per-layer prior has no eigenbasis shortcut: the error names the fix
    per_layer = CholeskyFullPosterior(
        torch.zeros(6, dtype=torch.float64),
        H,
        prior_precision=torch.tensor([1e-4, 1e-4], dtype=torch.float64),
        group_sizes=[3, 3],
    )
    with pytest.raises(FloatingPointError, match="raise prior_precision"):
        per_layer.functional_variance(J)


@pytest.mark.parametrize("n, block", [(1, 4), (50, 16), (64, 16), (700, 512)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inverse_cholesky_factor_is_computed_in_place_from_the_lower_triangle(n, block, dtype):
    """L^-1 of W = L L^T in W's own storage, across several blocks (the last one
    partial or not), reading only W's lower triangle (the upper one is garbage)."""
    from skuq.posterior.linalg import _inverse_cholesky_lower

    S, _ = _spd(n, n + 5, seed=n)
    S = S / n + torch.eye(n, dtype=torch.float64)
    ref = torch.linalg.inv(torch.linalg.cholesky(S))
    W = (torch.tril(S) + torch.triu(torch.full_like(S, 1e3), 1)).to(dtype)
    out = _inverse_cholesky_lower(W, block=block)
    assert out.data_ptr() == W.data_ptr()
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # condition number of S below 10
    assert float((out.double() - ref).abs().max()) < tol * float(ref.abs().max())
    assert float(out.triu(1).abs().max()) == 0.0


def test_inverse_cholesky_refuses_a_matrix_that_is_not_positive_definite():
    from skuq.posterior.linalg import _inverse_cholesky_lower

    W = torch.eye(5, dtype=torch.float64)
    W[3, 3] = -1.0
    with pytest.raises(FloatingPointError, match="not positive definite"):
        _inverse_cholesky_lower(W)


def test_evidence_from_the_curvatures_spectrum_equals_the_posteriors_own():
    """A dense curvature of few rows brings its eigenvalues: the evidence and the
    marginal-likelihood prior are those of eigenvalues computed from H itself."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    w = select_weights(net)
    curv = compute_curvature(w, [(x, y)], structure="full")
    assert curv.spectrum is not None  # 24 rows, 123 weights
    given = posterior_from_curvature(curv, w.vector(), prior_precision=1.0)
    own = CholeskyFullPosterior(
        w.vector(),
        curv.full,
        prior_precision=1.0,
        loss=curv.loss,
        n_data=curv.n_data,
        n_outputs=curv.n_outputs,
    )
    assert given._eigvals is not None and own._eigvals is None
    for delta in (0.01, 1.0, 30.0):
        a = float(given.log_det_posterior_precision(torch.tensor(delta, dtype=torch.float64)))
        b = float(own.log_det_posterior_precision(torch.tensor(delta, dtype=torch.float64)))
        assert a == pytest.approx(b, rel=1e-10)
    given.optimize_prior_precision()
    own.optimize_prior_precision()
    assert float(given.prior_precision) == pytest.approx(float(own.prior_precision), rel=1e-6)
