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
  2e-5 (SiLU's input-dtype branch, measured 1.5e-6); ``tests/methods/test_cvp.py``
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

from collections.abc import Callable

import torch
from torch import Tensor

from ._normal import SMOOTH_VAR_SPLIT  # noqa: F401  (public constant, documented there)
from .gelu import gelu_moments
from .generic import linearized_moments, quadrature_moments
from .relu import clamp_moments, leaky_relu_moments, max_moments, relu_moments
from .sigmoid import sigmoid_moments, silu_moments, tanh_moments

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


#: entries per slice when an elementwise rule runs without autograd: a slice's
#: temporaries stay in cache and are recycled by the allocator (whole-tensor
#: temporaries of millions of entries go to main memory, fresh pages each time)
SLICE_ENTRIES = 1 << 17


def _in_slices(fn: Callable[..., tuple[Tensor, Tensor]], mu: Tensor, var: Tensor, *args):
    """``fn(mu, var, *args)`` for an elementwise moment function, evaluated on
    slices of the flattened inputs when no gradient is needed (same values)."""
    n = mu.numel()
    if (
        n <= SLICE_ENTRIES
        or mu.shape != var.shape
        or (torch.is_grad_enabled() and (mu.requires_grad or var.requires_grad))
    ):
        return fn(mu, var, *args)
    flat_mu, flat_var = mu.reshape(-1), var.reshape(-1)
    out_mean, out_var = torch.empty_like(flat_mu), torch.empty_like(flat_mu)
    for i in range(0, n, SLICE_ENTRIES):
        m, v = fn(flat_mu[i : i + SLICE_ENTRIES], flat_var[i : i + SLICE_ENTRIES], *args)
        out_mean[i : i + SLICE_ENTRIES] = m
        out_var[i : i + SLICE_ENTRIES] = v
    return out_mean.view(mu.shape), out_var.view(mu.shape)
