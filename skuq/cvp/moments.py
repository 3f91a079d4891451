"""Moments of elementwise functions of Gaussian inputs (pure torch).

Each function takes the mean ``mu`` and variance ``var`` of independent
Gaussian inputs ``x ~ N(mu, var)`` (tensors of one shape) and returns the mean
and variance of ``f(x)``.

* ReLU, LeakyReLU and the maximum of two Gaussians (Clark): exact closed
  forms, computed in the input dtype in standardized units (every variance is
  a sum of non-negative terms, so float32 does not cancel).
* GELU (erf form): exact mean. Variance, for ``var <= 0.5``, by the Hermite
  (Wiener chaos) expansion ``Var f(x) = sum_k var^k E[f^(k)(x)]^2 / k!``,
  whose terms are closed forms (``f^(k)`` is a polynomial times the normal
  density) and all non-negative, in the input dtype: 6 to 13 terms, by the
  largest variance in the tensor, for a relative truncation error below
  ~1e-5 wherever the variance is not negligible (above 1e-9 of the input
  variance; below that the absolute error is under 1e-8 of it). For
  ``var > 0.5`` the exact closed form ``E[x^2 Phi(x)^2] = (mu^2 + var)
  Phi_2(h, h; rho) + 2 var (mu E[Phi phi] + E[x Phi phi])`` in float64, with
  the bivariate normal CDF ``Phi_2`` as ``Phi(h)^2`` plus a Gauss-Legendre
  integral of a smooth positive integrand (only on the entries that need it).
* clamp (hardtanh): exact closed form (truncated-normal moments).
* sigmoid, tanh, SiLU: for small variances (sigmoid and tanh: ``var <= 1`` at the
  sigmoid's scale; SiLU: ``var <= 0.5``) Gauss-Hermite quadrature, which is accurate
  while the map is smooth on the scale of ``sqrt(var)``. For larger variances nodes
  far apart miss the transition, so: "probit proxy plus residual". With
  ``lam = sqrt(pi/8)``, ``sigmoid(x) ~ Phi(lam x)`` has exact Gaussian moments
  (the second one through the bivariate normal CDF, computed with Owen's T
  function by Gauss-Legendre quadrature; SiLU's proxy ``x Phi(lam x)`` is GELU's
  closed form rescaled); the difference ``sigmoid(x) - Phi(lam x)`` (at most
  0.018, falling like ``exp(-|x|)``) is integrated by a composite Gauss-Legendre
  rule on the interval where it and the Gaussian are not negligible. Against
  adaptive quadrature (``scipy.integrate.quad``), input variances 1e-6 to 1e4:
  relative error below 1e-9 (sigmoid, tanh; SiLU for ``var > 0.5``) and below
  2e-5 (SiLU's input-dtype branch, measured 1.5e-6); ``tests/test_cvp.py``
  checks these bounds.
* :func:`quadrature_moments`: 32-node Gauss-Hermite for any smooth ``f``: accurate
  when ``f`` is smooth on the scale of ``sqrt(var)`` (Softplus: relative error below
  1e-8 for ``var <= 1``, 1e-6 up to 4, ~1 % at 100 and beyond; ELU, whose second
  derivative jumps at 0: 2e-5 below ``var = 1e-3``, 2e-3 up to 1, ~1 % above).
* :func:`linearized_moments`: the first-order (delta method) fallback,
  ``E f ~ f(mu)``, ``Var f ~ f'(mu)^2 var``; named as such, never a default.

Where a rule has no cancellation-free form (sigmoid, tanh, clamp, the
large-variance branches) it runs in float64 (variances can be 1e-12 of the
squared mean, so ``E[f^2] - E[f]^2`` would cancel in float32) and casts back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "relu_moments",
    "leaky_relu_moments",
    "clamp_moments",
    "gelu_moments",
    "sigmoid_moments",
    "tanh_moments",
    "silu_moments",
    "quadrature_moments",
    "linearized_moments",
    "max_moments",
]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LAM = math.sqrt(math.pi / 8.0)  # sigmoid(x) ~ Phi(_LAM x)
_N_HERMITE = 32
_N_LEGENDRE = 20
_INV_SQRT2 = 1.0 / _SQRT2
_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)


def _clip(dtype: torch.dtype) -> float:
    """Bound on a standardized argument ``a`` before ``Phi(a)``, ``phi(a)``.

    float64: 40, where ``Phi(-a)`` and ``phi(a)`` underflow to exactly 0. Lower
    precisions: 12.5, where they are ~1e-35 -- negligible against 1 and still
    normal numbers: ``erfc`` and ``exp`` take a slow path (10-20x) whenever
    their float32 result underflows, which large standardized means (tiny
    variances) would otherwise hit on many entries.
    """
    return 40.0 if dtype == torch.float64 else 12.5
#: at and below this input variance GELU and SiLU use their fast input-dtype branches
SMOOTH_VAR_SPLIT = 0.5
# (largest input variance, number of terms): the GELU Hermite expansion is cut
# at K terms by the largest variance in the tensor, for a relative truncation
# error below ~1e-5 wherever the variance is not negligible (> 1e-9 var)
_CHAOS_TERMS = ((0.05, 6), (0.1, 8), (0.25, 11), (SMOOTH_VAR_SPLIT, 13))
# (largest input variance, Gauss-Hermite nodes) of the small-variance SiLU branch
# (relative error below 2e-5)
_SILU_NODES = ((0.1, 8), (SMOOTH_VAR_SPLIT, 10))
_he_x, _he_w = np.polynomial.hermite_e.hermegauss(_N_HERMITE)
_HE_X = torch.as_tensor(_he_x, dtype=torch.float64)
_HE_W = torch.as_tensor(_he_w / math.sqrt(2.0 * math.pi), dtype=torch.float64)
_gl_x, _gl_w = np.polynomial.legendre.leggauss(_N_LEGENDRE)
_GL_T = torch.as_tensor((_gl_x + 1.0) / 2.0, dtype=torch.float64)  # nodes on [0, 1]
_GL_W = torch.as_tensor(_gl_w / 2.0, dtype=torch.float64)


def _hermite_rule(n: int) -> list[tuple[float, float]]:
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return [(float(a), float(b)) for a, b in zip(z, w / math.sqrt(2.0 * math.pi), strict=True)]


_SILU_RULES = {n: _hermite_rule(n) for _, n in _SILU_NODES}


#: entries per slice when an elementwise rule runs without autograd: a slice's
#: temporaries stay in cache and are recycled by the allocator (whole-tensor
#: temporaries of millions of entries go to main memory, fresh pages each time)
SLICE_ENTRIES = 1 << 17


def _in_slices(fn: Callable[..., tuple[Tensor, Tensor]], mu: Tensor, var: Tensor, *args):
    """``fn(mu, var, *args)`` for an elementwise moment function, evaluated on
    slices of the flattened inputs when no gradient is needed (same values)."""
    n = mu.numel()
    if (n <= SLICE_ENTRIES or mu.shape != var.shape
            or (torch.is_grad_enabled() and (mu.requires_grad or var.requires_grad))):
        return fn(mu, var, *args)
    flat_mu, flat_var = mu.reshape(-1), var.reshape(-1)
    out_mean, out_var = torch.empty_like(flat_mu), torch.empty_like(flat_mu)
    for i in range(0, n, SLICE_ENTRIES):
        m, v = fn(flat_mu[i: i + SLICE_ENTRIES], flat_var[i: i + SLICE_ENTRIES], *args)
        out_mean[i: i + SLICE_ENTRIES] = m
        out_var[i: i + SLICE_ENTRIES] = v
    return out_mean.view(mu.shape), out_var.view(mu.shape)


def _cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / _SQRT2)


def _pdf(x: Tensor) -> Tensor:
    return _INV_SQRT_2PI * torch.exp(-0.5 * x * x)


def _f64(mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    # strictly positive: sqrt has an infinite derivative at 0 (NaN gradients in calibration)
    return mu.double(), var.double().clamp_min(1e-300), mu.dtype


def _gh(fn: Callable[[Tensor], Tensor], mu: Tensor, sd: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite E[fn(x)] and the values at the nodes (last dim = nodes)."""
    x = mu.unsqueeze(-1) + sd.unsqueeze(-1) * _HE_X.to(mu.device)
    vals = fn(x)
    return (vals * _HE_W.to(mu.device)).sum(-1), vals


# ------------------------------------------------------------------- exact
def _std_normal(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(Phi(a), phi(a))`` in ``a``'s dtype (erfc keeps the lower tail accurate)."""
    cdf = torch.erfc(a * -_INV_SQRT2).mul_(0.5)
    pdf = torch.exp((a * a).mul_(-0.5).add_(_LOG_INV_SQRT_2PI))
    return cdf, pdf


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
        mean = torch.where(det, torch.clamp(m, min, max) if min is None or max is None
                           else torch.minimum(torch.maximum(m, lo), hi), mean)
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


# --------------------------------------------------------------- smooth ones
def _gelu(x: Tensor) -> Tensor:
    return x * _cdf(x)


def _gelu_var_chaos(h: Tensor, v: Tensor, q2: Tensor, inv_q2: Tensor, cdf: Tensor,
                    pdf: Tensor, n_terms: int) -> Tensor:
    """GELU variance by its Hermite (Wiener chaos) expansion, ``n_terms`` terms.

    With ``x = mu + sd z``, ``Var f(x) = sum_{k>=1} var^k E[f^(k)(x)]^2 / k!``.
    For ``f = x Phi(x)``: ``f' = Phi + x phi`` and ``f^(k) = phi^(k-2) - phi^(k)``
    (k >= 2), and ``E[phi^(j)(x)] = (-1)^j He_j(h) phi(h) / q^(j+1)`` with
    ``q^2 = 1 + var``, ``h = mu / q``. So the k-th term is
    ``rho^k q^2 phi(h)^2 (He_{k-2}(h) - He_k(h) / q^2)^2 / k!`` with
    ``rho = var / (1 + var)``: non-negative terms (no cancellation in float32),
    decaying like ``rho^k``.
    """
    c1 = torch.addcmul(cdf, h * inv_q2, pdf)  # E[f'(x)]
    var = v * (c1 * c1)
    if n_terms < 2:
        return var
    rho = v * inv_q2
    # strictly positive under the root (finite gradients where var = 0)
    u = rho.clamp_min(torch.finfo(rho.dtype).tiny).sqrt() * h
    # p[k] = rho^(k/2) He_k(h): p_k = u p_{k-1} - (k - 1) rho p_{k-2}. The k-th term is
    # q^2 phi(h)^2 e_k^2 / k! with e_k = rho p_{k-2} - p_k / q^2 = (var p_{k-2} - p_k) / q^2,
    # so the sum is phi(h)^2 / q^2 * sum_k (p_k - var p_{k-2})^2 / k!
    p = [None, u]
    acc = None
    fact = 1.0
    for k in range(2, n_terms + 1):
        if k == 2:
            p.append(torch.sub(u * u, rho))  # p_0 = 1
            e = torch.sub(p[2], v)
        else:
            p.append(torch.addcmul(u * p[k - 1], rho, p[k - 2], value=-(k - 1)))
            e = torch.addcmul(p[k], v, p[k - 2], value=-1.0)
        fact *= k
        acc = (e * e).mul_(1.0 / fact) if acc is None else acc.addcmul_(e, e, value=1.0 / fact)
    return var.add_((pdf * pdf).mul_(inv_q2).mul_(acc))


def _gelu_exact64(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of GELU by the exact closed form (float64 inputs).

    ``E[x^2 Phi(x)^2] = (mu^2 + var) A + 2 var (mu B + C)`` (Stein's lemma twice),
    ``A = E[Phi(x)^2] = Phi_2(h, h; rho) = Phi(h)^2 + (1/pi) int_a^1
    exp(-h^2 (1 + t^2) / 2) / (1 + t^2) dt`` with ``a = 1 / sqrt(1 + 2 var)``
    (Owen's T difference ``2 (T(h, 1) - T(h, a))``; Gauss-Legendre, the
    integrand is smooth and positive), and ``B = E[Phi(x) phi(x)]``, ``C = E[x
    Phi(x) phi(x)]`` elementary (``phi(x)`` times the density of x is a scaled
    Gaussian density).
    """
    q2 = 1.0 + v
    q = q2.sqrt()
    h = m / q
    ph_cdf, ph_pdf = _cdf(h), _pdf(h)
    e1 = m * ph_cdf + v / q * ph_pdf
    a = torch.rsqrt(1.0 + 2.0 * v)
    t = a.unsqueeze(-1) + (1.0 - a).unsqueeze(-1) * _GL_T.to(m.device)
    one_t2 = 1.0 + t * t
    integrand = torch.exp(-0.5 * (h * h).unsqueeze(-1) * one_t2) / one_t2
    big_a = ph_cdf * ph_cdf + (1.0 - a) * (integrand * _GL_W.to(m.device)).sum(-1) / math.pi
    nf = ph_pdf / q  # N(mu; 0, 1 + var)
    v_p, m_p = v / q2, m / q2  # phi(x) N(x; mu, var) = nf N(x; m_p, v_p)
    q_p = (1.0 + v_p).sqrt()
    h_p = m_p / q_p
    b = nf * _cdf(h_p)
    c = nf * (m_p * _cdf(h_p) + v_p / q_p * _pdf(h_p))
    e2 = (m * m + v) * big_a + 2.0 * v * (m * b + c)
    return e1, (e2 - e1 * e1).clamp_min(0.0)


def _split(v: Tensor, table) -> tuple[int, Tensor | None]:
    """``(order, idx)``: the order of the fast branch for the largest variance
    (from ``table``), and the flat indices of entries above ``SMOOTH_VAR_SPLIT``
    (None if there are none)."""
    vmax = float(v.detach().amax()) if v.numel() else 0.0
    order = next((n for lim, n in table if vmax <= lim), table[-1][1])
    if vmax <= SMOOTH_VAR_SPLIT:
        return order, None
    return order, torch.nonzero(v.reshape(-1) > SMOOTH_VAR_SPLIT).squeeze(1)


def _replace(out: Tensor, idx: Tensor, values: Tensor) -> Tensor:
    return out.reshape(-1).index_copy(0, idx, values.to(out.dtype)).view_as(out)


def gelu_moments(mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of the erf GELU ``x Phi(x)``.

    Mean exact: ``mu Phi(h) + var/sqrt(1+var) phi(h)``, ``h = mu/sqrt(1+var)``
    (input dtype). Variance: for ``var <= 0.5`` the Hermite expansion
    (closed-form, non-negative terms, input dtype; relative truncation error
    below ~1e-5 where the variance is not negligible); for ``var > 0.5`` the
    exact closed form through the bivariate normal CDF, in float64 (see the
    module docstring).

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import gelu_moments
    >>> m, v = gelu_moments(torch.tensor([2.0]), torch.tensor([1e-8]))
    >>> round(float(m), 5) == round(float(torch.nn.functional.gelu(torch.tensor(2.0))), 5)
    True
    """
    v = var.clamp_min(0.0)
    q2 = 1.0 + v
    inv_q = q2.rsqrt()
    clip = _clip(mu.dtype)
    h = (mu * inv_q).clamp(-clip, clip)
    cdf, pdf = _std_normal(h)
    mean = torch.addcmul(mu * cdf, v * inv_q, pdf)
    n_terms, idx = _split(v, _CHAOS_TERMS)
    out_var = _gelu_var_chaos(h, v, q2, inv_q * inv_q, cdf, pdf, n_terms)
    if idx is not None:
        m64, v64 = mu.reshape(-1)[idx].double(), v.reshape(-1)[idx].double()
        out_var = _replace(out_var, idx, _gelu_exact64(m64, v64)[1])
    return mean, out_var


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
    dtype=torch.float64)  # node positions in panel units, [0, _RESID_PANELS]
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


def quadrature_moments(fn: Callable[[Tensor], Tensor], mu: Tensor, var: Tensor):
    """Gauss-Hermite (32 nodes) moments of any smooth elementwise ``fn``.

    Accurate when ``fn`` is smooth on the scale of ``sqrt(var)``; for
    saturating functions under very large variances prefer a dedicated rule.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import quadrature_moments
    >>> m, v = quadrature_moments(torch.exp, torch.tensor([0.0]), torch.tensor([1.0]))
    >>> round(float(m), 4), round(float(v), 3)  # lognormal: e^0.5, (e - 1) e
    (1.6487, 4.671)
    """
    m, v, dtype = _f64(mu, var)
    mean, vals = _gh(fn, m, v.sqrt())
    out_var = ((vals - mean.unsqueeze(-1)) ** 2 * _HE_W.to(m.device)).sum(-1)
    return mean.to(dtype), out_var.to(dtype)


def linearized_moments(fn: Callable[[Tensor], Tensor], mu: Tensor, var: Tensor):
    """First-order fallback: ``(f(mu), f'(mu)^2 var)`` (the delta method).

    Cheap and exact for affine ``f``, but biased for curved ``f`` under large
    variance. Offered as a named fallback, never used by default.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.moments import linearized_moments
    >>> m, v = linearized_moments(torch.tanh, torch.tensor([0.0]), torch.tensor([0.5]))
    >>> float(m), float(v)
    (0.0, 0.5)
    """
    with torch.enable_grad():
        x = mu.detach().requires_grad_(True)
        y = fn(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), grad.detach() ** 2 * var


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
