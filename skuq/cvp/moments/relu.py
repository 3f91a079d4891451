"""Exact moments of the piecewise-linear maps of Gaussians: ReLU, LeakyReLU,
clamp (hardtanh) and the maximum of two Gaussians (Clark)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._normal import _cdf, _clip, _f64, _pdf, _std_normal


def _relu_parts(mu: Tensor, var: Tensor):
    """Standardized pieces of ``max(x, 0)``: ``(v, sd, a, Phi(a), phi(a))`` with
    ``a = mu / sd`` clipped (see :func:`_clip`)."""
    v = var.clamp_min(0.0)
    tiny = torch.finfo(mu.dtype).tiny
    # strictly positive: sqrt has an infinite derivative at 0 (NaN gradients in calibration)
    sd = v.clamp_min(tiny).sqrt()
    clip = _clip(mu.dtype)
    a = (mu / sd).clamp(-clip, clip)
    cdf, pdf = _std_normal(a)
    return v, sd, a, cdf, pdf


def _relu_std_var(a: Tensor, cdf: Tensor, pdf: Tensor) -> tuple[Tensor, Tensor]:
    """``(t, g)``: mean and variance of ``relu(N(a, 1))``, ``t = a Phi + phi``,
    ``g = Phi + t (a - t)`` (clamped at 0)."""
    t = torch.addcmul(pdf, a, cdf)
    g = torch.addcmul(cdf, t, a - t).clamp_min(0.0)
    return t, g


def relu_moments(mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of ``max(x, 0)`` for ``x ~ N(mu, var)``.

    With ``a = mu / sd``: ``E = mu Phi(a) + sd phi(a)`` and
    ``E[y^2] = (mu^2 + var) Phi(a) + mu sd phi(a)``; the variance is computed
    in standardized units, ``Var = var (Phi + t (a - t))`` with ``t = a Phi +
    phi``, so it is accurate for tiny and huge ``var`` (computed in the input
    dtype; ``var = 0`` gives ``relu(mu)`` and 0 exactly).

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import relu_moments
    >>> m, v = relu_moments(torch.tensor([0.0]), torch.tensor([1.0]))
    >>> round(float(m), 4), round(float(v), 4)  # 1/sqrt(2 pi), 1/2 - 1/(2 pi)
    (0.3989, 0.3408)
    """
    # the hot rule of ReLU nets: input dtype, no branches. The standardized form
    # keeps float32 accurate: the cancellation in g is at most a^2 eps for clipped |a|
    v, sd, a, cdf, pdf = _relu_parts(mu, var)
    mean = torch.addcmul(mu * cdf, sd, pdf)
    _, g = _relu_std_var(a, cdf, pdf)
    return mean, v * g


def clamp_moments(mu: Tensor, var: Tensor, min=None, max=None) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of ``clamp(x, min, max)`` for ``x ~ N(mu, var)``.

    With ``a = (min - mu) / sd`` and ``b = (max - mu) / sd`` (a missing bound is
    infinite): ``E = min Phi(a) + max (1 - Phi(b)) + mu (Phi(b) - Phi(a)) +
    sd (phi(a) - phi(b))``; the variance is computed in standardized units,
    ``Var / var = a^2 Phi(a) + b^2 (1 - Phi(b)) + Phi(b) - Phi(a) + a phi(a) -
    b phi(b) - e^2`` with ``e`` the standardized mean (truncated-normal
    moments). Bounds are numbers or deterministic tensors, ``min <= max``.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import clamp_moments
    >>> m, v = clamp_moments(torch.tensor([0.0]), torch.tensor([1.0]), min=0.0)  # = relu
    >>> round(float(m), 4), round(float(v), 4)
    (0.3989, 0.3408)
    """
    m, v, dtype = _f64(mu, var)
    sd = v.sqrt()
    zero = torch.zeros_like(m)
    mean, e1, e2 = zero, zero, zero
    lo_cdf, hi_cdf = zero, torch.ones_like(m)
    if min is not None:
        lo = torch.as_tensor(min, dtype=torch.float64, device=m.device)
        a = (lo - m) / sd
        lo_cdf, pdf = _cdf(a), _pdf(a)
        mean = mean + lo * lo_cdf + sd * pdf
        e1 = e1 + a * lo_cdf + pdf
        e2 = e2 + a * a * lo_cdf + a * pdf
    if max is not None:
        hi = torch.as_tensor(max, dtype=torch.float64, device=m.device)
        b = (hi - m) / sd
        hi_cdf, pdf = _cdf(b), _pdf(b)
        mean = mean + hi * (1.0 - hi_cdf) - sd * pdf
        e1 = e1 + b * (1.0 - hi_cdf) - pdf
        e2 = e2 + b * b * (1.0 - hi_cdf) - b * pdf
    inside = (hi_cdf - lo_cdf).clamp_min(0.0)
    mean = mean + m * inside
    # clamp is 1-Lipschitz: 0 <= Var / var <= 1 (far outside the bounds the
    # standardized terms overflow to inf - inf; the variance is then ~0)
    g = torch.nan_to_num(e2 + inside - e1 * e1, nan=0.0, posinf=0.0, neginf=0.0)
    out_var = v * g.clamp(0.0, 1.0)
    det = var == 0
    if bool(det.any()):
        mean = torch.where(
            det,
            torch.clamp(m, min, max)
            if min is None or max is None
            else torch.minimum(torch.maximum(m, lo), hi),
            mean,
        )
        out_var = torch.where(det, zero, out_var)
    return mean.to(dtype), out_var.to(dtype)


def leaky_relu_moments(mu: Tensor, var: Tensor, negative_slope: float = 0.01):
    """Exact moments of LeakyReLU, ``y = s x + (1 - s) relu(x)``.

    ``E = s mu + (1 - s) E[relu]``; ``Var = var (s^2 + (1 - s)^2 g + 2 s (1 - s)
    Phi(a))`` with ``g = Var[relu] / var`` and ``Cov(x, relu(x)) = var Phi(a)``
    (Stein's lemma): for ``0 <= s <= 1`` a sum of non-negative terms, computed
    in the input dtype.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import leaky_relu_moments
    >>> m, v = leaky_relu_moments(torch.tensor([0.0]), torch.tensor([1.0]), 1.0)
    >>> round(float(m), 6), round(float(v), 6)  # slope 1 is the identity
    (0.0, 1.0)
    """
    s = float(negative_slope)
    v, sd, a, cdf, pdf = _relu_parts(mu, var)
    relu_mean = torch.addcmul(mu * cdf, sd, pdf)
    _, g = _relu_std_var(a, cdf, pdf)
    mean = torch.add(relu_mean * (1.0 - s), mu, alpha=s)
    factor = torch.add(g * ((1.0 - s) ** 2), cdf, alpha=2.0 * s * (1.0 - s)).add_(s * s)
    return mean, v * factor.clamp_min(0.0)


def max_moments(mu1: Tensor, var1: Tensor, mu2: Tensor, var2: Tensor):
    """Clark's (1961) exact mean and variance of ``max(x1, x2)``, independent Gaussians.

    Written as ``max = x_b + relu(x_o - x_b)`` with ``x_b`` the one with the
    larger mean: with ``theta^2 = var1 + var2`` and ``b = |mu1 - mu2| / theta``,
    ``E = max(mu1, mu2) + theta t`` and ``Var = var_b (1 - 2 Phi(-b)) + theta^2
    g``, where ``t, g`` are the mean and variance of ``relu(N(-b, 1))`` (the
    covariance term by Stein's lemma). Both variance terms are non-negative,
    so the input dtype suffices.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import max_moments
    >>> z, o = torch.zeros(1), torch.ones(1)
    >>> m, v = max_moments(z, o, z, o)
    >>> round(float(m), 4)  # 1/sqrt(pi)
    0.5642
    """
    v1, v2 = var1.clamp_min(0.0), var2.clamp_min(0.0)
    theta2 = v1 + v2
    theta = theta2.clamp_min(torch.finfo(theta2.dtype).tiny).sqrt()
    d = mu1 - mu2
    b = (d / theta).abs().clamp_max(_clip(d.dtype))
    nb = -b
    cdf, pdf = _std_normal(nb)  # Phi(-b), phi(b)
    t, g = _relu_std_var(nb, cdf, pdf)
    mean = torch.addcmul(torch.maximum(mu1, mu2), theta, t)
    # variance of the larger-mean input, without a (slow) boolean select
    half_sum, half_diff = (v1 + v2).mul_(0.5), (v1 - v2).mul_(0.5)
    v_b = torch.addcmul(half_sum, torch.sign(d), half_diff)
    out_var = torch.addcmul(theta2 * g, v_b, torch.add(cdf, -0.5).mul_(-2.0))
    return mean, out_var.clamp_min(0.0)
