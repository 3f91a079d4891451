"""Rules of the layers with weights shared over a batch: Linear (module and
``F.linear``) and 1-d/2-d convolutions, exact for independent inputs and weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Moments, PropagationContext, register_rule
from ._common import _derive, _sq, _sq_plus_var, _weight_sq

__all__ = ["linear_moments"]


def linear_moments(
    x: Moments,
    weight: Tensor,
    bias: Tensor | None = None,
    weight_var: Tensor | None = None,
    bias_var: Tensor | None = None,
) -> Moments:
    """Moments of ``x W^T + b`` with independent Gaussian ``x``, ``W`` and ``b``.

    ``mean = mu W^T + b``, ``var = mu^2 s_W^T + v (W^2 + s_W)^T + s_b``: exact
    for independent inputs and weights (``s`` = variances).

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp import Moments
    >>> from skuq.cvp.rules import linear_moments
    >>> out = linear_moments(Moments(torch.ones(1, 2), torch.ones(1, 2)),
    ...                      torch.ones(1, 2), None, torch.ones(1, 2), None)
    >>> out.mean, out.var  # 2, 2 * (1 * 1 + 1 * (1 + 1))
    (tensor([[2.]]), tensor([[6.]]))
    """
    b = None if bias is None else Moments(bias, bias_var)
    return _linear_fn(None, F.linear, x, Moments(weight, weight_var), b)


def _matmul_var(
    x_sq: Tensor,
    x_var: Tensor | None,
    w_var: Tensor,
    w_sq_var: Tensor | None,
    bias_var: Tensor | None,
) -> Tensor:
    """``mu^2 s_W^T + v (W^2 + s_W)^T (+ s_b)`` over the last dim, as (add)mm calls."""
    lead = x_sq.shape[:-1]
    a = x_sq.reshape(-1, x_sq.shape[-1])
    if bias_var is not None:
        out = torch.addmm(bias_var, a, w_var.t())
    else:
        out = torch.mm(a, w_var.t())
    if x_var is not None:
        out = out.addmm_(x_var.reshape(-1, x_var.shape[-1]), w_sq_var.t())
    return out.view(*lead, out.shape[-1])


@register_rule(nn.Linear)
def _linear(ctx: PropagationContext, m: nn.Linear, x: Moments) -> Moments:
    return _linear_fn(ctx, F.linear, x, ctx.param(m.weight), ctx.param(m.bias))


@register_rule(F.linear)
def _linear_fn(ctx, fn, x: Moments, weight, bias=None) -> Moments:
    """``x W^T + b``, all independent: ``var = mu^2 s_W^T + v (W^2 + s_W)^T + s_b``.

    The weight-side tensors (``W^2 + s_W``, ``W^2``) are computed once and
    cached by the propagator; the variance is two matrix products (one when
    the input or the weight is deterministic).
    """
    w = weight if isinstance(weight, Moments) else Moments(weight)
    b = bias if isinstance(bias, Moments) or bias is None else Moments(bias)
    mean = F.linear(x.mean, w.mean, None if b is None else b.mean)
    b_var = None if b is None else b.var
    if x.var is not None and w.var is not None:
        var = _matmul_var(_sq(x.mean), x.var, w.var, _sq_plus_var(ctx, w), b_var)
    elif w.var is not None:
        var = _matmul_var(_sq(x.mean), None, w.var, None, b_var)
    elif x.var is not None:
        var = F.linear(x.var, _weight_sq(ctx, w.mean), b_var)
    else:
        var = None if b_var is None else b_var.expand_as(mean)
    return Moments(mean, var)


@register_rule(nn.Conv1d, nn.Conv2d)
def _conv(ctx: PropagationContext, m: nn.Module, x: Moments) -> Moments:
    """Convolution, exact like Linear: ``var = conv(v, W^2 + s_W) + conv(mu^2, s_W) + s_b``.

    With ``groups=1`` and both variances present, the two variance
    convolutions are one, over the inputs ``[v, mu^2]`` stacked on the channel
    axis against the cached kernel ``[W^2 + s_W, s_W]``.
    """
    w, wv = m.weight, ctx.param_var(m.weight)
    b, bv = m.bias, ctx.param_var(m.bias)

    def conv(inp, weight):
        return m._conv_forward(inp, weight, None)

    mean = m._conv_forward(x.mean, w, b)
    shape = (1, -1) + (1,) * (mean.ndim - 2)
    if x.var is not None and wv is not None and m.groups == 1:
        kernel = _derive(
            ctx, w, "conv[sq+var,var]", lambda: torch.cat([torch.addcmul(wv, w, w), wv], dim=1)
        )
        var = conv(torch.cat([x.var, _sq(x.mean)], dim=1), kernel)
    elif x.var is not None and wv is not None:
        var = conv(x.var, _sq_plus_var(ctx, Moments(w, wv))).add_(conv(_sq(x.mean), wv))
    elif x.var is not None:
        var = conv(x.var, _weight_sq(ctx, w))
    elif wv is not None:
        var = conv(_sq(x.mean), wv)
    else:
        var = None
    if bv is not None:
        var = bv.view(shape).expand_as(mean) if var is None else var.add_(bv.view(shape))
    return Moments(mean, var)
