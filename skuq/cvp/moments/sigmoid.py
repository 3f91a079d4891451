"""Moments of sigmoid, tanh and SiLU: Gauss-Hermite quadrature for small input
variances, the probit proxy plus a residual integral for larger ones."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._normal import (
    _GL_T,
    _GL_W,
    _HE_W,
    _INV_SQRT_2PI,
    _LAM,
    SMOOTH_VAR_SPLIT,
    _cdf,
    _f64,
    _gh,
    _hermite_rule,
    _pdf,
    _replace,
    _split,
)
from .gelu import _gelu_exact64

# (largest input variance, Gauss-Hermite nodes) of the small-variance SiLU branch
# (relative error below 2e-5)
_SILU_NODES = ((0.1, 8), (SMOOTH_VAR_SPLIT, 10))


_SILU_RULES = {n: _hermite_rule(n) for _, n in _SILU_NODES}


def _owens_t(h: Tensor, a: Tensor) -> Tensor:
    """Owen's T(h, a) for 0 <= a <= 1 by Gauss-Legendre quadrature on [0, a]."""
    t = a.unsqueeze(-1) * _GL_T.to(h.device)
    one_t2 = 1.0 + t * t
    integrand = torch.exp(-0.5 * (h * h).unsqueeze(-1) * one_t2) / one_t2
    return a * (integrand * _GL_W.to(h.device)).sum(-1) / (2.0 * math.pi)


def _probit_sq_mean(m: Tensor, v: Tensor, lam: float) -> Tensor:
    """E[Phi(lam x)^2] = Phi2(h, h; rho) (bivariate normal CDF) for x ~ N(m, v)."""
    q = 1.0 + lam * lam * v
    h = lam * m / q.sqrt()
    a = torch.rsqrt(1.0 + 2.0 * lam * lam * v)  # sqrt((1 - rho) / (1 + rho))
    return _cdf(h) - 2.0 * _owens_t(h, a)


#: panels x nodes of the composite Gauss-Legendre grid for the residuals (see _resid_grid)
_RESID_PANELS, _RESID_NODES = 16, 16
#: the residuals ``sigmoid(x) - Phi(lam x)`` (and ``x`` times it) fall like ``exp(-|x|)``:
#: below 1e-17 outside this half-width
_RESID_HALF = 40.0
_rl_x, _rl_w = np.polynomial.legendre.leggauss(_RESID_NODES)
_RESID_T = torch.as_tensor(
    (np.arange(_RESID_PANELS)[:, None] + (_rl_x[None, :] + 1.0) / 2.0).reshape(-1),
    dtype=torch.float64,
)  # node positions in panel units, [0, _RESID_PANELS]
_RESID_W = torch.as_tensor(np.tile(_rl_w / 2.0, _RESID_PANELS), dtype=torch.float64)


def _resid_grid(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes and weights (times the N(m, v) density) of a composite Gauss-Legendre rule on
    ``[max(m - 10 sd, -H), min(m + 10 sd, H)]``, ``H = _RESID_HALF``: for integrands that
    are bounded by ``exp(-|x|)`` and smooth on the scale of 1 (panels of width <= 5)."""
    sd = v.sqrt()
    lo = (m - 10.0 * sd).clamp_min(-_RESID_HALF)
    hi = (m + 10.0 * sd).clamp_max(_RESID_HALF)
    h = ((hi - lo) / _RESID_PANELS).clamp_min(0.0)  # empty when the mass lies outside
    x = lo.unsqueeze(-1) + h.unsqueeze(-1) * _RESID_T.to(m.device)
    z = (x - m.unsqueeze(-1)) / sd.unsqueeze(-1)
    dens = torch.exp(-0.5 * z * z) * (_INV_SQRT_2PI / sd).unsqueeze(-1)
    return x, h.unsqueeze(-1) * _RESID_W.to(m.device) * dens


#: at and below this input variance sigmoid and tanh use plain Gauss-Hermite quadrature
#: (sd <= 1 against sigmoid's poles at +-i pi: relative error ~1e-10)
_SIGMOID_GH_VAR = 1.0


def _sigmoid64(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``sigmoid(x)``, ``x ~ N(m, v)``, float64.

    Computed for ``-|m|`` (``sigmoid(-x) = 1 - sigmoid(x)``: the small values carry
    their own relative precision) and reflected back. ``v <= 1``: 32-node Gauss-Hermite
    of sigmoid and of its centred square. ``v > 1``: the probit proxy ``Phi(lam x)``
    (exact Gaussian moments) plus the residual ``sigmoid - Phi(lam x)`` by a composite
    Gauss-Legendre rule where it is not negligible (:func:`_resid_grid`).
    """
    neg = m > 0
    mr = torch.where(neg, -m, m)
    small = v <= _SIGMOID_GH_VAR
    # small variances: Gauss-Hermite
    vs = torch.where(small, v, torch.ones_like(v))
    e1_gh, vals = _gh(torch.sigmoid, mr, vs.sqrt())
    w = _HE_W.to(m.device)
    var_gh = ((vals - e1_gh.unsqueeze(-1)) ** 2 * w).sum(-1)
    # large variances: proxy plus residual
    vl = torch.where(small, torch.full_like(v, 4.0), v)
    q = torch.sqrt(1.0 + _LAM * _LAM * vl)
    x, wts = _resid_grid(mr, vl)
    s, p = torch.sigmoid(x), _cdf(_LAM * x)
    e1_l = _cdf(_LAM * mr / q) + ((s - p) * wts).sum(-1)
    e2_l = _probit_sq_mean(mr, vl, _LAM) + ((s * s - p * p) * wts).sum(-1)
    var_l = e2_l - e1_l * e1_l
    e1 = torch.where(small, e1_gh, e1_l)
    out_var = torch.where(small, var_gh, var_l).clamp_min(0.0)
    return torch.where(neg, 1.0 - e1, e1), out_var


def sigmoid_moments(mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of the logistic sigmoid, in float64 (see :func:`_sigmoid64`).

    Relative error against adaptive quadrature below ~1e-8 (mean, of the output RMS)
    and ~1e-7 (variance) for input variances 1e-6 to 1e4; where the output variance is
    below ~1e-20 (the mean 40+ standard deviations into the tail) it is only accurate
    in absolute terms.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import sigmoid_moments
    >>> m, v = sigmoid_moments(torch.tensor([0.0]), torch.tensor([1e4]))
    >>> round(float(m), 4), 0.24 < float(v) < 0.25  # nearly a fair coin flip
    (0.5, True)
    """
    m, v, dtype = _f64(mu, var)
    e1, out_var = _sigmoid64(m, v)
    return e1.to(dtype), out_var.to(dtype)


def tanh_moments(mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of tanh through ``tanh(x) = 2 sigmoid(2x) - 1`` (accuracy of
    :func:`sigmoid_moments` at four times the variance).

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import tanh_moments
    >>> m, v = tanh_moments(torch.tensor([0.5]), torch.tensor([1e-10]))
    >>> round(float(m), 6) == round(float(torch.tanh(torch.tensor(0.5))), 6)
    True
    """
    m, v, dtype = _f64(mu, var)
    e1, out_var = _sigmoid64(2.0 * m, 4.0 * v)
    return (2.0 * e1 - 1.0).to(dtype), (4.0 * out_var).to(dtype)


def _gelu_sq_mean64(m: Tensor, v: Tensor) -> Tensor:
    """``E[(x Phi(x))^2]`` for ``x ~ N(m, v)`` (float64), the closed form of
    :func:`_gelu_exact64`."""
    e1, var = _gelu_exact64(m, v)
    return var + e1 * e1


def _silu_exact64(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU moments, any variance (float64): the proxy ``x Phi(lam x)`` has closed-form
    first and second moments (``x Phi(lam x) = GELU(lam x) / lam``); the residuals
    ``x (sigmoid - Phi(lam x))`` and ``x^2 (sigmoid^2 - Phi(lam x)^2)`` are integrated
    by the composite Gauss-Legendre rule of :func:`_resid_grid`."""
    q = torch.sqrt(1.0 + _LAM * _LAM * v)
    h = _LAM * m / q
    proxy = m * _cdf(h) + _LAM * v / q * _pdf(h)
    proxy_sq = _gelu_sq_mean64(_LAM * m, _LAM * _LAM * v) / (_LAM * _LAM)
    x, wts = _resid_grid(m, v)
    s, p = torch.sigmoid(x), _cdf(_LAM * x)
    mean = proxy + (x * (s - p) * wts).sum(-1)
    e2 = proxy_sq + (x * x * (s * s - p * p) * wts).sum(-1)
    return mean, (e2 - mean * mean).clamp_min(0.0)


def _silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def silu_moments(mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of SiLU ``x sigmoid(x)``.

    For ``var <= 0.5``, where SiLU is smooth on the scale of ``sqrt(var)``:
    8-node (largest variance <= 0.1) or 10-node Gauss-Hermite quadrature in
    the input dtype, of ``f(x) - f(mu)``
    (``Var = E[d^2] - E[d]^2`` with ``d = f(x) - f(mu)``, both of order
    ``var``, so float32 does not cancel; relative error below 2e-5). Otherwise,
    in float64: the first two moments of ``x Phi(lam x)`` in closed form plus the
    residuals integrated where they are not negligible (:func:`_silu_exact64`;
    relative error below 1e-9).

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import silu_moments
    >>> m, v = silu_moments(torch.tensor([1.0]), torch.tensor([1e-10]))
    >>> round(float(m), 6) == round(float(torch.nn.functional.silu(torch.tensor(1.0))), 6)
    True
    """
    v = var.clamp_min(0.0)
    sd = v.clamp_min(torch.finfo(v.dtype).tiny).sqrt()  # finite gradients where var = 0
    f0 = _silu(mu)
    n_nodes, idx = _split(v, _SILU_NODES)
    acc1 = acc2 = None
    for z, w in _SILU_RULES[n_nodes]:
        d = _silu(torch.add(mu, sd, alpha=z)).sub_(f0)
        acc1 = d * w if acc1 is None else acc1.add_(d, alpha=w)
        acc2 = (d * d).mul_(w) if acc2 is None else acc2.addcmul_(d, d, value=w)
    mean = f0 + acc1
    out_var = (acc2 - acc1 * acc1).clamp_min(0.0)
    if idx is not None:
        m64, v64 = mu.reshape(-1)[idx].double(), v.reshape(-1)[idx].double()
        big_mean, big_var = _silu_exact64(m64, v64)
        mean, out_var = _replace(mean, idx, big_mean), _replace(out_var, idx, big_var)
    return mean, out_var
