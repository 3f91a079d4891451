"""Rules of pooling: average pooling (exact for independent entries) and max
pooling (Clark's moment matching folded over the window)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import moments as mom
from ..registry import Moments, UnsupportedLayerError, register_rule
from ._common import _row_sliced


def _avg_pool_var(x: Moments, pool: Callable[[Tensor], Tensor], kernel_numel: int) -> Moments:
    """Average pooling with all weights 1/k: ``var = pool(v) / k`` (exact for
    independent entries)."""
    mean = pool(x.mean)
    return Moments(mean, None if x.var is None else pool(x.var) / kernel_numel)


@register_rule(nn.AvgPool1d, nn.AvgPool2d)
def _avgpool(ctx, m, x: Moments) -> Moments:
    if m.padding not in (0, (0,), (0, 0)) or getattr(m, "divisor_override", None) or m.ceil_mode:
        raise UnsupportedLayerError(
            f"{type(m).__name__} with padding, ceil_mode or divisor_override is not "
            "supported by CVP; register a rule to add it"
        )
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,)
    numel = math.prod(k) if len(k) > 1 or isinstance(m, nn.AvgPool1d) else k[0] ** 2
    return _avg_pool_var(x, m, numel)


def _adaptive_counts(n_in: int, n_out: int, device) -> Tensor:
    i = torch.arange(n_out, device=device)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = -torch.div(-(i + 1) * n_in, n_out, rounding_mode="floor")
    return (end - start).to(torch.float32)


@register_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
def _adaptive_avgpool(ctx, m, x: Moments) -> Moments:
    mean = m(x.mean)
    if x.var is None:
        return Moments(mean)
    spatial_in = x.mean.shape[2:]
    spatial_out = mean.shape[2:]
    count = None
    for axis, (n_in, n_out) in enumerate(zip(spatial_in, spatial_out, strict=True)):
        c = _adaptive_counts(n_in, n_out, mean.device).to(mean.dtype)
        shape = [1] * len(spatial_out)
        shape[axis] = -1
        c = c.view(shape)
        count = c if count is None else count * c
    return Moments(mean, m(x.var) / count)


@register_rule(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def _adaptive_avgpool_fn(ctx, fn, x: Moments, output_size) -> Moments:
    pool = (nn.AdaptiveAvgPool1d if fn is F.adaptive_avg_pool1d else nn.AdaptiveAvgPool2d)(
        output_size
    )
    return _adaptive_avgpool(ctx, pool, x)


@register_rule(nn.MaxPool1d, nn.MaxPool2d)
def _maxpool(ctx, m, x: Moments) -> Moments:
    """Max pooling by Clark's moment matching, folded over the window.

    ``max(a, b)`` of two independent Gaussians is matched exactly (Clark,
    1961); a window of k > 2 values is folded left to right, treating each
    running maximum as Gaussian and independent of the next value (an
    approximation). No padding, dilation or ceil_mode.
    """
    pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
    dil = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,)
    if any(pad) or any(d != 1 for d in dil) or m.ceil_mode or m.return_indices:
        raise UnsupportedLayerError(
            f"{type(m).__name__} with padding, dilation, ceil_mode or return_indices is "
            "not supported by CVP; register a rule to add it"
        )
    if x.var is None:
        return Moments(m(x.mean))
    return _row_sliced(lambda xs: Moments(*_maxpool_fold(m, xs.mean, xs.var)), x, min_ndim=3)


def _maxpool_fold(m, mu: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Clark's rule folded over each pooling window (window entries as strided views)."""
    if isinstance(m, nn.MaxPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
        s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
        h, w = mu.shape[-2:]
        ho, wo = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
        offsets = [(i, j) for i in range(k[0]) for j in range(k[1])]

        def entry(t, off):
            i, j = off
            return t[..., i : i + s[0] * (ho - 1) + 1 : s[0], j : j + s[1] * (wo - 1) + 1 : s[1]]
    else:
        k0 = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s0 = m.stride if isinstance(m.stride, int) else m.stride[0]
        lo = (mu.shape[-1] - k0) // s0 + 1
        offsets = list(range(k0))

        def entry(t, i):
            return t[..., i : i + s0 * (lo - 1) + 1 : s0]

    mean, out_var = entry(mu, offsets[0]), entry(var, offsets[0])
    for off in offsets[1:]:
        mean, out_var = mom.max_moments(mean, out_var, entry(mu, off), entry(var, off))
    return mean, out_var
