"""Rules of the normalization layers: eval-mode BatchNorm (affine, exact),
LayerNorm and RMSNorm (the expected-statistic rule, approximate)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Moments, PropagationContext, UnsupportedLayerError, register_rule
from ._common import _add_var, _row_sliced, _sq

__all__: list[str] = []


def _affine_moments(a: Moments, gamma: Moments | None, beta: Moments | None) -> Moments:
    """``a * gamma + beta`` elementwise, all independent:
    ``var = v (gamma^2 + s_gamma) + mu^2 s_gamma + s_beta``."""
    mean, var = a.mean, a.var
    if gamma is not None:
        if var is not None:
            g2 = (
                _sq(gamma.mean)
                if gamma.var is None
                else torch.addcmul(gamma.var, gamma.mean, gamma.mean)
            )
            var = var * g2
        if gamma.var is not None:
            var = _add_var(var, _sq(a.mean) * gamma.var)
        mean = mean * gamma.mean
    if beta is not None:
        mean = mean + beta.mean
        if beta.var is not None:
            var = beta.var.expand_as(mean) if var is None else var + beta.var
    return Moments(mean, var)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(ctx: PropagationContext, m: nn.modules.batchnorm._BatchNorm, x: Moments):
    """Eval-mode BatchNorm, exact: ``y = gamma a + beta`` with ``a = (x - m_run) / s_run``,
    ``var = v (gamma^2 + s_gamma) / s_run^2 + a_mean^2 s_gamma + s_beta``."""
    if m.training or m.running_mean is None:
        raise UnsupportedLayerError(
            f"{type(m).__name__} must be in eval mode with running statistics "
            "(track_running_stats=True) to be propagated exactly"
        )
    return _row_sliced(lambda xs: _batchnorm_rows(ctx, m, xs), x)


def _batchnorm_rows(ctx, m, x: Moments) -> Moments:
    shape = (1, -1) + (1,) * (x.mean.ndim - 2)
    inv = torch.rsqrt(m.running_var + m.eps)
    g_var = b_var = None
    if m.affine:
        g, bt = m.weight, m.bias
        g_var, b_var = ctx.param_var(m.weight), ctx.param_var(m.bias)
        scale, shift = g * inv, bt - m.running_mean * g * inv
        g2 = g * g if g_var is None else torch.addcmul(g_var, g, g)
    else:
        scale, shift = inv, -m.running_mean * inv
        g2 = torch.ones_like(inv)
    mean = torch.addcmul(shift.view(shape), x.mean, scale.view(shape))
    var = None if x.var is None else x.var * (g2 * inv * inv).view(shape)
    if g_var is not None:
        a = torch.addcmul((-m.running_mean * inv).view(shape), x.mean, inv.view(shape))
        a_term = (a * a).mul_(g_var.view(shape))
        var = a_term if var is None else var.add_(a_term)
    if b_var is not None:
        var = b_var.view(shape).expand_as(mean) if var is None else var.add_(b_var.view(shape))
    return Moments(mean, var)


def layer_norm_moments(x: Moments, normalized_shape, eps: float) -> Moments:
    """The expected-statistic LayerNorm rule (without the affine part).

    ``E[s^2] = Var_d(mu) + (1 - 1/D) mean_d(v)``; mean ``(mu - mean_d mu) /
    sqrt(E[s^2] + eps)``, variance ``v / (E[s^2] + eps)``.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    d = math.prod(normalized_shape)
    centred = x.mean - x.mean.mean(dim=dims, keepdim=True)
    s2 = _sq(centred).mean(dim=dims, keepdim=True)
    if x.var is not None:
        s2 = s2.add_(x.var.mean(dim=dims, keepdim=True), alpha=1.0 - 1.0 / d)
    inv = torch.rsqrt(s2 + eps)
    return Moments(centred * inv, None if x.var is None else x.var * _sq(inv))


@register_rule(nn.LayerNorm)
def _layernorm(ctx: PropagationContext, m: nn.LayerNorm, x: Moments) -> Moments:
    def rows(xs):
        a = layer_norm_moments(xs, m.normalized_shape, m.eps)
        return _affine_moments(a, ctx.param(m.weight), ctx.param(m.bias))

    return _row_sliced(rows, x, min_ndim=len(m.normalized_shape) + 1)


@register_rule(F.layer_norm)
def _layernorm_fn(ctx, fn, x: Moments, normalized_shape, weight=None, bias=None, eps=1e-5):
    w = weight if isinstance(weight, Moments) or weight is None else Moments(weight)
    b = bias if isinstance(bias, Moments) or bias is None else Moments(bias)
    shape = tuple(normalized_shape)

    def rows(xs):
        return _affine_moments(layer_norm_moments(xs, shape, eps), w, b)

    return _row_sliced(rows, x, min_ndim=len(shape) + 1)


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    def _rmsnorm(ctx: PropagationContext, m: nn.Module, x: Moments) -> Moments:
        dims = tuple(range(-len(m.normalized_shape), 0))
        eps = m.eps if m.eps is not None else torch.finfo(x.mean.dtype).eps

        def rows(xs):
            ms = _sq(xs.mean).mean(dim=dims, keepdim=True)
            if xs.var is not None:
                ms = ms + xs.var.mean(dim=dims, keepdim=True)
            inv = torch.rsqrt(ms + eps)
            a = Moments(xs.mean * inv, None if xs.var is None else xs.var * _sq(inv))
            return _affine_moments(a, ctx.param(m.weight), None)

        return _row_sliced(rows, x, min_ndim=len(m.normalized_shape) + 1)
