"""Rules of the elementwise activations (moment matching, :mod:`skuq.cvp.moments`),
clamp, dropout and identity, and the builders of elementwise rules."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import moments as mom
from ..registry import Moments, UnsupportedLayerError, register_rule
from ._common import _is_m

__all__ = ["elementwise_rule", "linearized_rule"]


def elementwise_rule(
    moment_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], fn: Callable[[Tensor], Tensor]
):
    """A rule for an elementwise map from a function of ``(mean, var)``.

    Parameters
    ----------
    moment_fn : callable
        ``moment_fn(mean, var) -> (mean, var)`` of the output for Gaussian
        input (e.g. from :mod:`skuq.cvp.moments`).
    fn : callable
        The map itself, applied to deterministic inputs.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.cvp import register_rule, elementwise_rule
    >>> from skuq.cvp.moments import quadrature_moments
    >>> class Cube(nn.Module):
    ...     def forward(self, x):
    ...         return x ** 3
    >>> _ = register_rule(Cube)(elementwise_rule(
    ...     lambda m, v: quadrature_moments(lambda t: t ** 3, m, v), lambda t: t ** 3))
    """

    def rule(ctx, target, x: Moments, *args, **kwargs) -> Moments:
        if x.var is None:
            return Moments(fn(x.mean))
        return Moments(*mom._in_slices(moment_fn, x.mean, x.var))

    return rule


def linearized_rule(fn: Callable[[Tensor], Tensor]):
    """The first-order (linearization) fallback rule for an elementwise ``fn``.

    ``mean = fn(mu)``, ``var = fn'(mu)^2 v``: cheap, biased for curved ``fn``
    under large variance. Register it only where no moment-matching rule exists.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.cvp import register_rule, linearized_rule
    >>> class Square(nn.Module):
    ...     def forward(self, x):
    ...         return x * x
    >>> _ = register_rule(Square)(linearized_rule(lambda t: t * t))
    """
    return elementwise_rule(lambda m, v: mom.linearized_moments(fn, m, v), fn)


def _inplace_free(rule):
    """Activation modules and functions ignore ``inplace`` in propagation."""

    def wrapped(ctx, target, x, *args, **kwargs):
        kwargs.pop("inplace", None)
        return rule(ctx, target, x, *args, **kwargs)

    return wrapped


register_rule(nn.ReLU, F.relu, torch.relu, "relu")(
    _inplace_free(elementwise_rule(mom.relu_moments, torch.relu))
)
register_rule(nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid")(
    elementwise_rule(mom.sigmoid_moments, torch.sigmoid)
)
register_rule(nn.Tanh, torch.tanh, F.tanh, "tanh")(elementwise_rule(mom.tanh_moments, torch.tanh))
register_rule(nn.SiLU, F.silu)(_inplace_free(elementwise_rule(mom.silu_moments, F.silu)))
register_rule(nn.ELU)(elementwise_rule(lambda m, v: mom.quadrature_moments(F.elu, m, v), F.elu))
register_rule(nn.Softplus)(
    elementwise_rule(lambda m, v: mom.quadrature_moments(F.softplus, m, v), F.softplus)
)


@register_rule(nn.GELU)
def _gelu_mod(ctx, m: nn.GELU, x: Moments) -> Moments:
    return _gelu_fn(ctx, F.gelu, x, approximate=m.approximate)


@register_rule(F.gelu)
def _gelu_fn(ctx, fn, x: Moments, approximate: str = "none") -> Moments:
    # the tanh form differs from the erf form by < 1e-3 (moments use the erf form)
    if x.var is None:
        return Moments(F.gelu(x.mean, approximate=approximate))
    return Moments(*mom._in_slices(mom.gelu_moments, x.mean, x.var))


@register_rule(nn.LeakyReLU)
def _leaky_mod(ctx, m: nn.LeakyReLU, x: Moments) -> Moments:
    return _leaky_fn(ctx, F.leaky_relu, x, m.negative_slope)


@register_rule(F.leaky_relu)
def _leaky_fn(ctx, fn, x: Moments, negative_slope: float = 0.01, inplace: bool = False):
    if x.var is None:
        return Moments(F.leaky_relu(x.mean, negative_slope))
    return Moments(*mom._in_slices(mom.leaky_relu_moments, x.mean, x.var, negative_slope))


def _bound(b):
    if _is_m(b):
        if b.var is not None:
            raise UnsupportedLayerError("CVP cannot clamp at a random bound (no moment rule)")
        return b.mean
    return b


@register_rule(
    torch.clamp,
    torch.clip,
    "clamp",
    "clip",
    torch.clamp_min,
    "clamp_min",
    torch.clamp_max,
    "clamp_max",
)
def _clamp(ctx, target, x, *args, **kwargs) -> Moments:
    """``clamp`` of a Gaussian: exact moments (:func:`skuq.cvp.moments.clamp_moments`)."""
    name = target if isinstance(target, str) else target.__name__
    if name in ("clamp_min", "clamp_max"):
        key = name[-3:]
        bounds = {key: args[0] if args else kwargs[key]}
    else:
        pos = dict(zip(("min", "max"), args, strict=False))
        bounds = {k: kwargs.get(k, pos.get(k)) for k in ("min", "max")}
    lo, hi = _bound(bounds.get("min")), _bound(bounds.get("max"))
    if not _is_m(x):
        return torch.clamp(torch.as_tensor(x), lo, hi)
    if x.var is None:
        return Moments(torch.clamp(x.mean, lo, hi))
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):  # bounds broadcast: whole tensor
        return Moments(*mom.clamp_moments(x.mean, x.var, lo, hi))
    return Moments(*mom._in_slices(mom.clamp_moments, x.mean, x.var, lo, hi))


@register_rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AlphaDropout)
def _identity(ctx, m, x, *args, **kwargs):
    return x


@register_rule(F.dropout)
def _dropout_fn(ctx, fn, x, *args, **kwargs):
    return x
