"""Moments of any elementwise map: Gauss-Hermite quadrature and the first-order
(linearized) fallback."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._normal import _HE_W, _f64, _gh


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
