"""Rules of the structural operations (exact): indexing, views and reshapes,
concatenation and splitting, means and sums, shape queries."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..registry import Moments, register_rule
from ._common import _as_m, _is_m


@register_rule(operator.getitem)
def _getitem(ctx, fn, a, idx):
    if _is_m(a):
        return a.map(lambda t: t[idx])
    return a[idx]


def _structural(op: Callable):
    def rule(ctx, target, x, *args, **kwargs):
        return x.map(lambda t: op(t, *args, **kwargs))

    return rule


for _name in (
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "unsqueeze",
    "squeeze",
    "expand",
    "expand_as",
    "view_as",
    "reshape_as",
    "unflatten",
    "float",
    "double",
    "to",
    "clone",
):
    register_rule(_name)(_structural(lambda t, *a, _n=_name, **k: getattr(t, _n)(*a, **k)))
for _fn in (
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.unsqueeze,
    torch.squeeze,
    torch.unflatten,
):
    register_rule(_fn)(_structural(_fn))


@register_rule(nn.Flatten)
def _flatten_mod(ctx, m: nn.Flatten, x: Moments) -> Moments:
    return x.map(m)


@register_rule(nn.Unflatten)
def _unflatten_mod(ctx, m: nn.Unflatten, x: Moments) -> Moments:
    return x.map(m)


@register_rule(torch.cat, torch.stack, torch.concat)
def _cat(ctx, fn, tensors, *args, **kwargs) -> Moments:
    ms = [_as_m(t) for t in tensors]
    mean = fn([m.mean for m in ms], *args, **kwargs)
    if all(m.var is None for m in ms):
        return Moments(mean)
    return Moments(mean, fn([m.variance for m in ms], *args, **kwargs))


@register_rule("chunk", "split", torch.chunk, torch.split)
def _chunk(ctx, target, x: Moments, *args, **kwargs):
    op = (
        (lambda t: getattr(t, target)(*args, **kwargs))
        if isinstance(target, str)
        else (lambda t: target(t, *args, **kwargs))
    )
    means = op(x.mean)
    vars_ = op(x.var) if x.var is not None else [None] * len(means)
    return tuple(Moments(m, v) for m, v in zip(means, vars_, strict=True))


def _reduced_count(x: Tensor, dim, keepdim) -> int:
    if dim is None:
        return x.numel()
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return math.prod(x.shape[d] for d in dims)


@register_rule("mean", torch.mean)
def _mean(ctx, target, x: Moments, dim=None, keepdim=False, **kwargs) -> Moments:
    """Mean of independent entries: ``var = sum(v) / n^2`` (exact under independence; a
    global mean after a shared-weight layer also gets the cross-position term of
    :mod:`skuq.cvp.pooled`, added by the propagator)."""

    def red(t):
        return t.mean() if dim is None else t.mean(dim=dim, keepdim=keepdim)

    n = _reduced_count(x.mean, dim, keepdim)
    return Moments(red(x.mean), None if x.var is None else red(x.var) / n)


@register_rule("sum", torch.sum)
def _sum(ctx, target, x: Moments, dim=None, keepdim=False, **kwargs) -> Moments:
    def red(t):
        return t.sum() if dim is None else t.sum(dim=dim, keepdim=keepdim)

    return Moments(red(x.mean), None if x.var is None else red(x.var))


@register_rule(getattr)
def _getattr(ctx, fn, obj, name):
    return getattr(obj.mean if _is_m(obj) else obj, name)


@register_rule("size", "dim", "numel")
def _meta(ctx, name, x, *args):
    return getattr(x.mean, name)(*args)
