"""Moments of the erf GELU ``x Phi(x)``: exact mean, Hermite-expansion variance for
small input variances, the exact closed form in float64 for larger ones."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._normal import (
    _GL_T,
    _GL_W,
    SMOOTH_VAR_SPLIT,
    _cdf,
    _clip,
    _pdf,
    _replace,
    _split,
    _std_normal,
)

# (largest input variance, number of terms): the GELU Hermite expansion is cut
# at K terms by the largest variance in the tensor, for a relative truncation
# error below ~1e-5 wherever the variance is not negligible (> 1e-9 var)
_CHAOS_TERMS = ((0.05, 6), (0.1, 8), (0.25, 11), (SMOOTH_VAR_SPLIT, 13))


def _gelu_var_chaos(
    h: Tensor, v: Tensor, inv_q2: Tensor, cdf: Tensor, pdf: Tensor, n_terms: int
) -> Tensor:
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
    out_var = _gelu_var_chaos(h, v, inv_q * inv_q, cdf, pdf, n_terms)
    if idx is not None:
        m64, v64 = mu.reshape(-1)[idx].double(), v.reshape(-1)[idx].double()
        out_var = _replace(out_var, idx, _gelu_exact64(m64, v64)[1])
    return mean, out_var
