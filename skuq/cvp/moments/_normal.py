"""Shared pieces of the moment functions: normal CDF and density, quadrature
nodes, float64 promotion, and the split between fast and exact branches."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

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


_he_x, _he_w = np.polynomial.hermite_e.hermegauss(_N_HERMITE)
_HE_X = torch.as_tensor(_he_x, dtype=torch.float64)
_HE_W = torch.as_tensor(_he_w / math.sqrt(2.0 * math.pi), dtype=torch.float64)
_gl_x, _gl_w = np.polynomial.legendre.leggauss(_N_LEGENDRE)
_GL_T = torch.as_tensor((_gl_x + 1.0) / 2.0, dtype=torch.float64)  # nodes on [0, 1]
_GL_W = torch.as_tensor(_gl_w / 2.0, dtype=torch.float64)


def _hermite_rule(n: int) -> list[tuple[float, float]]:
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return [(float(a), float(b)) for a, b in zip(z, w / math.sqrt(2.0 * math.pi), strict=True)]


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


def _std_normal(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(Phi(a), phi(a))`` in ``a``'s dtype (erfc keeps the lower tail accurate)."""
    cdf = torch.erfc(a * -_INV_SQRT2).mul_(0.5)
    pdf = torch.exp((a * a).mul_(-0.5).add_(_LOG_INV_SQRT_2PI))
    return cdf, pdf


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
