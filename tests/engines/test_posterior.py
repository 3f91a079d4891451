"""Weight posteriors against dense linear algebra, and the predictives against brute force."""

from __future__ import annotations

import copy
import math
from unittest.mock import patch

import numpy as np
import pytest
import torch
from torch import nn

from skuq.curvature import compute_curvature, select_weights
from skuq.posterior import (
    DiagPosterior,
    FullPosterior,
    KronPosterior,
    LowRankPosterior,
    posterior_from_curvature,
)
from skuq.predictive import glm_predictive, needs_jacobians, nn_predictive
from tests._helpers import (
    _cnn,
    _data,
    _mlp,
    batches,
    brute_ggn,
    brute_jacobian,
    brute_layerwise_marglik_optimum,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _posteriors(model, x, y, delta=0.7, **kw):
    w = select_weights(model)
    out = {}
    for s in ("diag", "kron", "full", "lowrank"):
        curv = compute_curvature(
            w,
            batches(x, y),
            structure=s,
            rank=w.n_params,
            generator=torch.Generator().manual_seed(0),
        )
        out[s] = (
            curv,
            posterior_from_curvature(
                curv, w.vector(), prior_precision=delta, group_sizes=w.group_sizes(), **kw
            ),
        )
    return w, out


@pytest.mark.parametrize("structure", ["diag", "kron", "full", "lowrank"])
def test_posterior_against_dense(structure):
    model = _mlp()
    x, y = _data(model, n=10)
    w, posts = _posteriors(model, x, y, delta=0.7, temperature=0.5)
    curv, post = posts[structure]
    H = curv.dense()
    prec = H / 0.5 + 0.7 * torch.eye(w.n_params)
    cov = torch.linalg.inv(prec)
    torch.testing.assert_close(post.log_det_posterior_precision(), torch.logdet(prec))
    torch.testing.assert_close(post.marginal_variance(), torch.diagonal(cov))
    J = brute_jacobian(model, x[:4])
    torch.testing.assert_close(post.functional_variance(J), J @ cov @ J.transpose(1, 2))
    # the evidence, term by term
    theta = w.vector()
    direct = (
        -curv.loss / 0.5
        - 0.5 * (torch.logdet(prec) - w.n_params * math.log(0.7))
        - 0.5 * 0.7 * theta @ theta
    )
    torch.testing.assert_close(post.log_marginal_likelihood(), direct)
    # samples: mean and covariance by Monte Carlo
    gen = torch.Generator().manual_seed(0)
    s = post.sample(20000, gen)
    z = (s - theta) @ torch.linalg.cholesky(prec)  # whitened: identity covariance
    emp = z.T @ z / len(z)
    assert (emp - torch.eye(w.n_params)).abs().max() < 0.06
    assert (z.mean(0)).abs().max() < 0.03


def test_changing_prior_precision_needs_no_data():
    model = _mlp()
    x, y = _data(model, n=10)
    w, posts = _posteriors(model, x, y, delta=1.0)
    H = brute_ggn(model, x)
    for structure in ("diag", "full"):
        post = posts[structure][1]
        post.prior_precision = 3.0
        target = torch.diag(H) if structure == "diag" else H
        prec = (torch.diag(target) if structure == "diag" else target) + 3 * torch.eye(len(H))
        torch.testing.assert_close(post.marginal_variance(), torch.diagonal(torch.linalg.inv(prec)))


def test_layerwise_prior_against_dense():
    model = _mlp()
    x, y = _data(model, n=10)
    w = select_weights(model)
    deltas = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25, 4.0])
    dvec = torch.repeat_interleave(deltas, torch.tensor(w.group_sizes()))
    for s in ("diag", "kron", "full"):
        curv = compute_curvature(w, batches(x, y), structure=s)
        post = posterior_from_curvature(
            curv, w.vector(), prior_precision=deltas, group_sizes=w.group_sizes()
        )
        prec = curv.dense() + torch.diag(dvec)
        torch.testing.assert_close(post.log_det_posterior_precision(), torch.logdet(prec))
        torch.testing.assert_close(post.marginal_variance(), torch.diagonal(torch.linalg.inv(prec)))


def test_marglik_gradient_and_optimum():
    """d/d delta log p(D) = P/(2 delta) - tr(Sigma)/2 - |theta|^2/2, zero at the optimum."""
    model = _mlp()
    x, y = _data(model, n=10)
    w, posts = _posteriors(model, x, y, delta=1.0)
    theta = w.vector()
    for structure in ("diag", "kron", "full", "lowrank"):
        curv, post = posts[structure]
        H = curv.dense()
        d = torch.tensor(0.8, requires_grad=True)
        post.log_marginal_likelihood(d).backward()
        cov = torch.linalg.inv(H + 0.8 * torch.eye(len(H)))
        expected = w.n_params / 1.6 - torch.trace(cov) / 2 - theta @ theta / 2
        torch.testing.assert_close(d.grad, expected)
        post.optimize_prior_precision()
        d = post.prior_precision
        cov = torch.linalg.inv(H + d * torch.eye(len(H)))
        grad = w.n_params / (2 * d) - torch.trace(cov) / 2 - theta @ theta / 2
        assert abs(float(grad * d)) < 1e-5


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_layerwise_marglik_optimum_against_brute_force(structure):
    """One prior precision per parameter tensor, against a dense float64 maximization."""
    model = _mlp()
    x, y = _data(model, n=10)
    w = select_weights(model)
    curv = compute_curvature(w, batches(x, y), structure=structure)
    H = brute_ggn(model, x)
    # the same matrix the posterior approximates: exact for full, its diagonal for diag
    dense = {"full": H, "diag": torch.diag(torch.diagonal(H)), "kron": curv.dense()}[structure]
    post = posterior_from_curvature(
        curv, w.vector(), prior_precision=1.0, group_sizes=w.group_sizes()
    )
    post.optimize_prior_precision("layerwise")
    expected = brute_layerwise_marglik_optimum(dense.numpy(), w.vector().numpy(), w.group_sizes())
    assert post.prior_precision.shape == (6,)
    np.testing.assert_allclose(post.prior_precision.numpy(), expected, rtol=1e-6)
    assert np.ptp(np.log(expected)) > 0.5  # the groups do want different precisions


def test_regression_marglik_with_noise():
    model = _mlp()
    x, _ = _data(model, n=10)
    y = torch.randn(10, 3)
    w = select_weights(model)
    curv = compute_curvature(w, batches(x, y), likelihood="regression", structure="full")
    post = posterior_from_curvature(curv, w.vector(), prior_precision=0.5, sigma_noise=0.3)
    H = brute_ggn(model, x, likelihood="regression") / 0.09
    theta, P = w.vector(), w.n_params
    sse = float(((model(x) - y) ** 2).sum())
    direct = (
        -sse / (2 * 0.09)
        - 30 * math.log(0.3 * math.sqrt(2 * math.pi))
        - 0.5 * (torch.logdet(H + 0.5 * torch.eye(P)) - P * math.log(0.5))
        - 0.25 * theta @ theta
    )
    torch.testing.assert_close(post.log_marginal_likelihood(), direct)
    post.optimize_prior_precision(fit_sigma_noise=True)
    s = torch.tensor(post.sigma_noise, requires_grad=True)
    d = post.prior_precision.clone().requires_grad_(True)
    post.log_marginal_likelihood(d, s).backward()
    assert abs(float(s.grad * s)) < 1e-4 and abs(float(d.grad * d)) < 1e-4


def test_glm_predictive_against_brute_force_and_last_layer_features():
    model = _mlp()
    x, y = _data(model, n=10)
    for subset in ("all", "last_layer"):
        w = select_weights(model, subset, example_input=x)
        J = brute_jacobian(model, x)
        if subset == "last_layer":
            J = J[:, :, -w.n_params :]
        for s in ("diag", "kron", "full"):
            curv = compute_curvature(w, batches(x, y), structure=s)
            post = posterior_from_curvature(curv, w.vector(), prior_precision=0.5)
            cov = torch.linalg.inv(curv.dense() + 0.5 * torch.eye(w.n_params))
            for route in (True, False):  # feature / layer routes, and plain Jacobians
                dist = glm_predictive(w, post, x, use_features=route)
                torch.testing.assert_close(dist.covariance, J @ cov @ J.transpose(1, 2))
                torch.testing.assert_close(dist.mean, model(x).detach())
                _assert_centered_route(w, post, x, J @ cov @ J.transpose(1, 2), route)


def _assert_centered_route(w, post, x, expected, use_features):
    """``center=True``: the same covariance of f, plus that of the centered logits P f."""
    dist = glm_predictive(w, post, x, use_features=use_features, center=True)
    C = expected.shape[-1]
    P = torch.eye(C) - 1.0 / C
    torch.testing.assert_close(dist.covariance, expected)
    torch.testing.assert_close(dist.centered_covariance, P @ expected @ P)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_glm_predictive_of_a_cnn_by_layers_against_brute_force(structure):
    """Conv2d + Linear, all weights: the layer route (no Jacobian of all weights, rows in
    chunks) equals J Sigma J^T from brute-force Jacobians, conv biases included."""
    model = _cnn()
    x, y = _data(model, n=9)
    w = select_weights(model)
    curv = compute_curvature(w, batches(x, y), structure=structure)
    post = posterior_from_curvature(curv, w.vector(), prior_precision=0.5)
    cov = torch.linalg.inv(curv.dense() + 0.5 * torch.eye(w.n_params))
    J = brute_jacobian(model, x)
    expected = J @ cov @ J.transpose(1, 2)
    assert not needs_jacobians(w, post, x)
    torch.testing.assert_close(glm_predictive(w, post, x).covariance, expected)
    with patch("skuq.predictive.DEFAULT_MAX_ELEMENTS", 40):  # one row per chunk
        torch.testing.assert_close(glm_predictive(w, post, x).covariance, expected)
    torch.testing.assert_close(glm_predictive(w, post, x, use_features=False).covariance, expected)
    for route in (True, False):
        _assert_centered_route(w, post, x, expected, route)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_centered_covariance_keeps_float32_precision_where_projecting_loses_it(structure):
    """A float32 last layer under a weak prior (delta 1e-3): the shift shared by all
    logits has variance ~1/delta (the likelihood is flat along it), 1e3 times the
    rest. Projecting the finished float32 covariance, P S P, cancels its digits
    (2.4e-4 relative error against float64, measured); the centered route is left
    with the float32 posterior's own rounding (1.6e-5)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4)).float()
    x = torch.randn(60, 3, dtype=torch.float32)
    y = model(x).argmax(1)
    C, delta = 4, 1e-3
    w = select_weights(model, "last_layer", example_input=x)
    curv = compute_curvature(w, [(x, y)], structure=structure)
    post = posterior_from_curvature(curv, w.vector(), prior_precision=delta)
    dist = glm_predictive(w, post, x[:20], center=True)

    # float64 reference: the same weights and curvature, brute-force Jacobians
    H = curv.dense().double()
    cov = torch.linalg.inv(H + delta * torch.eye(H.shape[0]))
    J = brute_jacobian(copy.deepcopy(model).double(), x[:20].double())[:, :, -w.n_params :]
    P = torch.eye(C) - 1.0 / C
    reference = P @ (J @ cov @ J.transpose(1, 2)) @ P
    scale = float(reference.diagonal(dim1=1, dim2=2).mean())
    assert float(dist.covariance.diagonal(dim1=1, dim2=2).mean()) > 1e3 * scale
    err_centered = float((dist.centered_covariance.double() - reference).abs().max())
    err_projected = float((P @ dist.covariance.double() @ P - reference).abs().max())
    assert err_centered < 1e-4 * scale
    assert err_projected > 5 * err_centered


def test_nn_and_glm_agree_for_a_linear_model():
    """For f linear in the weights, weight sampling is exactly the linearized Gaussian."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    w = select_weights(model)
    curv = compute_curvature(w, [(x, y)], structure="full")
    post = posterior_from_curvature(curv, w.vector(), prior_precision=1.0)
    glm = glm_predictive(w, post, x[:5])
    sampled = nn_predictive(
        w, post, x[:5], n_samples=20000, generator=torch.Generator().manual_seed(0)
    )
    scale = glm.variance.sqrt()
    assert ((sampled.output_mean - glm.mean) / scale).abs().max() < 0.03
    emp = torch.einsum("sni,snj->nij", sampled.samples - glm.mean, sampled.samples - glm.mean)
    emp = emp / sampled.samples.shape[0]
    rel = (emp - glm.covariance) / (scale.unsqueeze(2) * scale.unsqueeze(1))
    assert rel.abs().max() < 0.04


def test_posterior_bad_input():
    with pytest.raises(ValueError, match="prior_precision must be finite and > 0"):
        DiagPosterior(torch.zeros(3), torch.ones(3), prior_precision=0.0)
    with pytest.raises(ValueError, match="one value per layer"):
        DiagPosterior(torch.zeros(3), torch.ones(3), prior_precision=[1.0, 2.0])
    with pytest.raises(ValueError, match="scalar prior precision only"):
        LowRankPosterior(
            torch.zeros(3),
            torch.ones(1),
            torch.eye(3)[:, :1],
            prior_precision=[1.0, 2.0],
            group_sizes=[1, 2],
        )
    with pytest.raises(ValueError, match="P x P"):
        FullPosterior(torch.zeros(3), torch.eye(2))
    assert KronPosterior  # imported for the docs
