"""Rules of arithmetic: sums, differences, negation, products, squares, powers,
division by constants and matrix products."""

from __future__ import annotations

import operator

import torch

from ..registry import Moments, UnsupportedLayerError, register_rule
from ._common import _add_var, _as_m, _is_m, _sq

__all__ = ["square_moments"]


def _scaled(a, c):
    """``c * a`` for moments or plain values."""
    if c == 1:
        return a
    if _is_m(a) and c == 0:
        return Moments(torch.zeros_like(a.mean))
    if _is_m(a):
        return Moments(c * a.mean, None if a.var is None else (c * c) * a.var)
    return c * a


@register_rule(operator.add, torch.add, "add", operator.iadd)
def _add(ctx, fn, a, b, *, alpha=1) -> Moments:
    """``a + alpha b`` (``torch.add``'s ``alpha`` scales the second operand);
    variances add for independent operands, the same tensor twice is exact."""
    if not _is_m(a) and not _is_m(b):  # plain numbers (sizes, shapes)
        return a + alpha * b
    if a is b:
        return _scaled(a, 1 + alpha)
    b = _scaled(b, alpha)
    if not _is_m(a):
        a, b = b, a
    if not _is_m(b):
        return Moments(a.mean + b, a.var)
    var = _add_var(a.var, b.var)
    mean = a.mean + b.mean
    return Moments(mean, None if var is None else var.expand_as(mean))


@register_rule(operator.sub, torch.sub, "sub")
def _sub(ctx, fn, a, b, *, alpha=1) -> Moments:
    return _add(ctx, fn, a, b, alpha=-alpha)


@register_rule(operator.neg, torch.neg, "neg")
def _neg(ctx, fn, a) -> Moments:
    if not _is_m(a):
        return -a
    return Moments(-a.mean, a.var)


def square_moments(x: Moments) -> Moments:
    """``x * x`` (one tensor, not two factors), exact for Gaussian ``x``:
    ``E = mu^2 + v``, ``Var = 4 mu^2 v + 2 v^2``.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp import Moments
    >>> from skuq.cvp.rules import square_moments
    >>> y = square_moments(Moments(torch.tensor([1.0]), torch.tensor([2.0])))
    >>> y.mean, y.var
    (tensor([3.]), tensor([16.]))
    """
    if x.var is None:
        return Moments(_sq(x.mean))
    return Moments(_sq(x.mean) + x.var, 4.0 * _sq(x.mean) * x.var + 2.0 * _sq(x.var))


@register_rule(operator.mul, torch.mul, "mul", operator.imul)
def _mul(ctx, fn, a, b) -> Moments:
    """Product of independent factors: ``Var = v_a v_b + v_a mu_b^2 + v_b mu_a^2``.

    The same tensor on both sides (``h * h``) is an exact square
    (:func:`square_moments`). Products of two functions of one tensor
    (``x * torch.sigmoid(x)``) are recognised by :class:`~skuq.cvp.MomentPropagator`
    before this rule is reached; other factors that share a random ancestor
    are correlated, and the propagator warns about them.
    """
    if not _is_m(a) and not _is_m(b):  # plain numbers (sizes, shapes)
        return a * b
    if a is b:
        return square_moments(a)
    if not _is_m(a):
        a, b = b, a
    if not _is_m(b):
        return Moments(a.mean * b, None if a.var is None else a.var * b * b)
    mean = a.mean * b.mean
    terms = []
    if a.var is not None:
        terms.append(a.var * _sq(b.mean))
    if b.var is not None:
        terms.append(b.var * _sq(a.mean))
    if a.var is not None and b.var is not None:
        terms.append(a.var * b.var)
    return Moments(mean, _add_var(*terms))


@register_rule(operator.pow, torch.pow, "pow")
def _pow(ctx, fn, a, exponent) -> Moments:
    """``x ** 2`` exactly (:func:`square_moments`); other powers of a random tensor
    need a registered rule."""
    if _is_m(exponent):
        if exponent.var is not None:
            raise UnsupportedLayerError("CVP cannot raise to a random power (no moment rule)")
        exponent = exponent.mean
    if not _is_m(a):
        return a**exponent
    if a.var is None:
        return Moments(a.mean**exponent)
    if isinstance(exponent, (int, float)) and exponent == 2:
        return square_moments(a)
    if isinstance(exponent, (int, float)) and exponent == 1:
        return a
    raise UnsupportedLayerError(
        f"CVP has a rule for x ** 2 only, not x ** {exponent!r}; wrap the power in a module "
        "and register a rule for it (skuq.cvp.register_rule(ThatModule) with "
        "skuq.cvp.elementwise_rule and skuq.cvp.moments.quadrature_moments)."
    )


@register_rule(operator.truediv, torch.div, "div", operator.itruediv)
def _div(ctx, fn, a, b) -> Moments:
    if not _is_m(a) and not _is_m(b):  # plain numbers (sizes, shapes)
        return a / b
    if _is_m(b) and b.var is not None:
        raise UnsupportedLayerError("CVP cannot divide by a random tensor (no moment rule)")
    b = b.mean if _is_m(b) else b
    a = a if _is_m(a) else Moments(torch.as_tensor(a, dtype=b.dtype, device=b.device))
    return Moments(a.mean / b, None if a.var is None else a.var / (b * b))


@register_rule(operator.matmul, torch.matmul, "matmul", torch.bmm)
def _matmul(ctx, fn, a, b) -> Moments:
    """``a @ b`` with independent entries: exact mean and variance."""
    a, b = _as_m(a), _as_m(b)
    mean = a.mean @ b.mean
    terms = []
    if a.var is not None:
        terms.append(a.var @ (_sq(b.mean) if b.var is None else _sq(b.mean) + b.var))
    if b.var is not None:
        terms.append(_sq(a.mean) @ b.var)
    return Moments(mean, _add_var(*terms))
