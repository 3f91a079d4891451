"""Helpers the rule families share: summed variances, row slicing, cached
weight-derived tensors, and moments-or-plain-value checks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import moments as mom
from ..registry import Moments, PropagationContext


def _add_var(*terms: Tensor | None) -> Tensor | None:
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _row_sliced(fn: Callable[..., Moments], x: Moments, *args, min_ndim: int = 2) -> Moments:
    """``fn(x, *args)`` for a rule whose rows (dim 0) are independent, evaluated on
    slices of rows when no gradient is needed: a slice's temporaries stay in cache
    (see :data:`skuq.cvp.moments.SLICE_ENTRIES`). Same values."""
    mu, var = x.mean, x.var
    if (
        var is None
        or mu.ndim < min_ndim
        or var.shape != mu.shape
        or (torch.is_grad_enabled() and (mu.requires_grad or var.requires_grad))
    ):
        return fn(x, *args)
    rows = mom.SLICE_ENTRIES * mu.shape[0] // max(mu.numel(), 1)
    if rows >= mu.shape[0]:
        return fn(x, *args)
    rows = max(rows, 1)
    parts = [
        fn(Moments(mu[i : i + rows], var[i : i + rows]), *args) for i in range(0, mu.shape[0], rows)
    ]
    return Moments(torch.cat([p.mean for p in parts]), torch.cat([p.var for p in parts]))


def _derive(ctx: PropagationContext | None, p: Tensor, tag: str, fn: Callable[[], Tensor]):
    """``fn()`` (a tensor computed from parameter ``p``), cached by the context."""
    return fn() if ctx is None else ctx.derived(p, tag, fn)


def _sq_plus_var(ctx, w: Moments) -> Tensor:
    """``W^2 + sigma^2_W`` (cached per parameter)."""
    return _derive(ctx, w.mean, "sq+var", lambda: torch.addcmul(w.var, w.mean, w.mean))


def _sq(t: Tensor) -> Tensor:
    return t * t


def _weight_sq(ctx, w: Tensor) -> Tensor:
    """``W^2`` (cached per parameter)."""
    return _derive(ctx, w, "sq", lambda: w * w)


def _is_m(a) -> bool:
    return isinstance(a, Moments)


def _as_m(a) -> Moments:
    return a if isinstance(a, Moments) else Moments(torch.as_tensor(a))
