"""The built-in propagation rules (registered on import).

"Exact" below means exact for the model's assumption: independent Gaussian weights
and, per unit, independent Gaussian inputs. That assumption holds for a layer whose
inputs are deterministic or come from independent sources; it fails wherever two
units share a random ancestor -- the outputs of one layer with random weights are
correlated with each other (a convolution's positions, a per-token Linear's tokens,
the hidden units of an MLP two layers below a random layer). A rule that sums or
mixes such units (Linear, convolution, pooling, mean) is then exact *under
independence* only; ``docs/methods/cvp.md`` gives the measured error per source.
One such case is handled: a global average pool reached from a shared-weight layer
through per-position maps gets the cross-position covariance of that layer's weight
noise (:mod:`skuq.cvp.pooled`).

Supported out of the box:

* weights: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``F.linear`` (exact
  for independent inputs and weights); ``nn.BatchNorm1d/2d`` in eval mode
  (affine, exact); ``nn.LayerNorm``, ``F.layer_norm`` and ``nn.RMSNorm`` (the
  expected-statistic rule, approximate); ``nn.MultiheadAttention``,
  ``F.scaled_dot_product_attention``, ``nn.TransformerEncoderLayer`` and
  ``nn.TransformerEncoder`` (attention weights from the means, variance
  through the values and the output projection: approximate);
* activations: ReLU, LeakyReLU (exact), GELU, SiLU, sigmoid, tanh (see
  :mod:`skuq.cvp.moments`), ELU and Softplus (Gauss-Hermite quadrature);
  clamp (exact); softmax, log-softmax and log of a positive tensor by
  linearization (named as such; attention weights stay softmax of the means);
* structure: ``+``/``-`` (variances add: exact for independent operands;
  ``torch.add``'s ``alpha``), products (independent factors; ``h * h`` and
  ``x ** 2`` are exact squares), ``@`` (independent factors), division by
  constants, indexing, flatten, reshape/view, permute/transpose, (un)squeeze,
  cat/stack, chunk/split (exact), mean/sum and average pooling (exact for
  independent entries), max pooling (Clark's moment matching, folded over the
  window: approximate), dropout and identity (eval mode).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import moments as mom
from .engine import Moments, PropagationContext, UnsupportedLayerError, register_rule

__all__ = ["linear_moments", "elementwise_rule", "linearized_rule", "square_moments"]


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
    if (var is None or mu.ndim < min_ndim or var.shape != mu.shape
            or (torch.is_grad_enabled() and (mu.requires_grad or var.requires_grad))):
        return fn(x, *args)
    rows = mom.SLICE_ENTRIES * mu.shape[0] // max(mu.numel(), 1)
    if rows >= mu.shape[0]:
        return fn(x, *args)
    rows = max(rows, 1)
    parts = [fn(Moments(mu[i: i + rows], var[i: i + rows]), *args)
             for i in range(0, mu.shape[0], rows)]
    return Moments(torch.cat([p.mean for p in parts]), torch.cat([p.var for p in parts]))


# ---------------------------------------------------------------- weights
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


def _matmul_var(x_sq: Tensor, x_var: Tensor | None, w_var: Tensor, w_sq_var: Tensor | None,
                bias_var: Tensor | None) -> Tensor:
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
        kernel = _derive(ctx, w, "conv[sq+var,var]",
                         lambda: torch.cat([torch.addcmul(wv, w, w), wv], dim=1))
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


def _affine_moments(a: Moments, gamma: Moments | None, beta: Moments | None) -> Moments:
    """``a * gamma + beta`` elementwise, all independent:
    ``var = v (gamma^2 + s_gamma) + mu^2 s_gamma + s_beta``."""
    mean, var = a.mean, a.var
    if gamma is not None:
        if var is not None:
            g2 = _sq(gamma.mean) if gamma.var is None else torch.addcmul(
                gamma.var, gamma.mean, gamma.mean)
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


def _view(t: Tensor | None, shape) -> Tensor | None:
    return None if t is None else t.view(shape)


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


# ------------------------------------------------------------ activations
def elementwise_rule(moment_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                     fn: Callable[[Tensor], Tensor]):
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
register_rule(nn.ELU)(elementwise_rule(
    lambda m, v: mom.quadrature_moments(F.elu, m, v), F.elu))
register_rule(nn.Softplus)(elementwise_rule(
    lambda m, v: mom.quadrature_moments(F.softplus, m, v), F.softplus))


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


def _softmax_dim(ndim: int, dim):
    # F.softmax(x) without dim: torch's legacy implicit choice
    if dim is not None:
        return dim
    return 0 if ndim in (0, 1, 3) else 1


def _log_softmax_linearized(x: Moments, dim, dtype=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(log_softmax(mu), softmax(mu), Var)`` with the linearized variance of log-softmax.

    ``d log p_k / d x_j = delta_kj - p_j``, so to first order
    ``Var_k = sum_j (delta_kj - p_j)^2 v_j = (1 - 2 p_k) v_k + sum_j p_j^2 v_j``.
    """
    dim = _softmax_dim(x.mean.ndim, dim)
    logp = torch.log_softmax(x.mean, dim=dim, dtype=dtype)
    p = logp.exp()
    if x.var is None:
        return logp, p, None
    v = x.var.to(p.dtype)
    var = ((1.0 - 2.0 * p) * v + (_sq(p) * v).sum(dim=dim, keepdim=True)).clamp_min(0.0)
    return logp, p, var


@register_rule(nn.Softmax, F.softmax, torch.softmax, "softmax")
def _softmax(ctx, target, x: Moments, dim=None, *args, dtype=None, **kwargs) -> Moments:
    """Softmax by linearization (first order, named as such).

    ``mean = softmax(mu)``, ``Var_k = p_k^2 ((1 - 2 p_k) v_k + sum_j p_j^2 v_j)``
    (the diagonal of ``J diag(v) J^T``). A deterministic input gives the exact
    softmax; the built-in attention rules never come here (their weights are
    softmax of the means by convention). The linearization is accurate while
    the logit standard deviations are small against 1; a trailing
    ``log(softmax(x))`` is fused into a log-softmax (see
    :class:`~skuq.cvp.MomentPropagator`).
    """
    if isinstance(target, nn.Softmax):
        dim = target.dim
    dtype = next((a for a in args if isinstance(a, torch.dtype)), dtype)  # positional
    _, p, var = _log_softmax_linearized(x, dim, dtype)
    return Moments(p, None if var is None else _sq(p) * var)


@register_rule(nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax")
def _log_softmax(ctx, target, x: Moments, dim=None, *args, dtype=None, **kwargs) -> Moments:
    """Log-softmax by linearization: ``mean = log_softmax(mu)``,
    ``Var_k = (1 - 2 p_k) v_k + sum_j p_j^2 v_j`` (first order, named as such)."""
    if isinstance(target, nn.LogSoftmax):
        dim = target.dim
    dtype = next((a for a in args if isinstance(a, torch.dtype)), dtype)
    logp, _, var = _log_softmax_linearized(x, dim, dtype)
    return Moments(logp, var)


@register_rule(torch.log, "log")
def _log(ctx, target, x) -> Moments:
    """``log`` of a positive random tensor by linearization: ``(log mu, v / mu^2)``.

    A Gaussian is not positive, so there is no exact rule; the first-order one
    is accurate while ``sd << mu``. A random input whose mean is not positive
    everywhere is refused.
    """
    if not _is_m(x):
        return torch.log(torch.as_tensor(x))
    if x.var is None:
        return Moments(torch.log(x.mean))
    if not bool((x.mean > 0).all()):
        raise UnsupportedLayerError(
            "CVP takes log of a random tensor by linearization, which needs a positive "
            "mean everywhere; this input has a mean <= 0. For log(softmax(x)) use "
            "torch.log_softmax (or log(softmax(x).clamp_min(eps)), which CVP fuses into "
            "one); otherwise register a rule for the module that computes it "
            "(skuq.cvp.register_rule)."
        )
    return Moments(torch.log(x.mean), x.var / _sq(x.mean))


def _bound(b):
    if _is_m(b):
        if b.var is not None:
            raise UnsupportedLayerError("CVP cannot clamp at a random bound (no moment rule)")
        return b.mean
    return b


@register_rule(torch.clamp, torch.clip, "clamp", "clip", torch.clamp_min, "clamp_min",
               torch.clamp_max, "clamp_max")
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


# -------------------------------------------------------------- structure
def _is_m(a) -> bool:
    return isinstance(a, Moments)


def _as_m(a) -> Moments:
    return a if isinstance(a, Moments) else Moments(torch.as_tensor(a))


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


@register_rule(operator.getitem)
def _getitem(ctx, fn, a, idx):
    if _is_m(a):
        return a.map(lambda t: t[idx])
    return a[idx]


def _structural(op: Callable):
    def rule(ctx, target, x, *args, **kwargs):
        return x.map(lambda t: op(t, *args, **kwargs))

    return rule


for _name in ("view", "reshape", "flatten", "permute", "transpose", "contiguous",
              "unsqueeze", "squeeze", "expand", "expand_as", "view_as", "reshape_as",
              "unflatten", "float", "double", "to", "clone"):
    register_rule(_name)(_structural(lambda t, *a, _n=_name, **k: getattr(t, _n)(*a, **k)))
for _fn in (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.unsqueeze,
            torch.squeeze, torch.unflatten):
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
    op = (lambda t: getattr(t, target)(*args, **kwargs)) if isinstance(target, str) else (
        lambda t: target(t, *args, **kwargs))
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


# ---------------------------------------------------------------- pooling
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
        output_size)
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
            return t[..., i: i + s[0] * (ho - 1) + 1: s[0], j: j + s[1] * (wo - 1) + 1: s[1]]
    else:
        k0 = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        s0 = m.stride if isinstance(m.stride, int) else m.stride[0]
        lo = (mu.shape[-1] - k0) // s0 + 1
        offsets = list(range(k0))

        def entry(t, i):
            return t[..., i: i + s0 * (lo - 1) + 1: s0]

    mean, out_var = entry(mu, offsets[0]), entry(var, offsets[0])
    for off in offsets[1:]:
        mean, out_var = mom.max_moments(mean, out_var, entry(mu, off), entry(var, off))
    return mean, out_var


# -------------------------------------------------------------- attention
def _attend(q: Tensor, k: Tensor, v: Moments, attn_mask=None, is_causal=False, scale=None):
    """Attention weights from the means; variance through the values."""
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1)
    if scale is None or scale != 1.0:
        scores = scores * (scale if scale is not None else 1.0 / math.sqrt(d))
    if is_causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    mean = weights @ v.mean
    var = None if v.var is None else _sq(weights) @ v.var
    return Moments(mean, var), weights


@register_rule(F.scaled_dot_product_attention)
def _sdpa(ctx, fn, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
          scale=None, **kwargs) -> Moments:
    q = query.mean if _is_m(query) else query
    k = key.mean if _is_m(key) else key
    mask = attn_mask.mean if _is_m(attn_mask) else attn_mask
    out, _ = _attend(q, k, _as_m(value), mask, is_causal, scale)
    return out


@register_rule(nn.MultiheadAttention)
def _mha(ctx, m: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
         need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    if m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedLayerError(
            "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported by CVP"
        )
    query, key, value = _as_m(query), _as_m(key), _as_m(value)
    if not m.batch_first:  # (L, N, E) -> (N, L, E)
        query, key, value = (t.map(lambda a: a.transpose(0, 1)) for t in (query, key, value))
    e, h = m.embed_dim, m.num_heads
    hd = e // h
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.split(e, dim=0)
        wvar = ctx.param_var(m.in_proj_weight)
        wv_var = None if wvar is None else wvar[2 * e:]
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        wv_var = ctx.param_var(m.v_proj_weight)
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.split(e, dim=0)
        bvar = ctx.param_var(m.in_proj_bias)
        bv_var = None if bvar is None else bvar[2 * e:]
    else:
        bq = bk = bv = bv_var = None
    scale = 1.0 / math.sqrt(hd)  # applied to the query projection, not to the scores
    if m._qkv_same_embed_dim and key.mean is query.mean:  # self-attention: one product
        w = m.in_proj_weight
        w_qk = _derive(ctx, w, "mha_qk", lambda: torch.cat([w[:e] * scale, w[e: 2 * e]]))
        b_qk = None
        if bq is not None:
            b = m.in_proj_bias
            b_qk = _derive(ctx, b, "mha_qk", lambda: torch.cat([b[:e] * scale, b[e: 2 * e]]))
        q, k = F.linear(query.mean, w_qk, b_qk).split(e, dim=-1)
    else:
        q = F.linear(query.mean, wq, bq) * scale
        k = F.linear(key.mean, wk, bk)
    vm = _linear_fn(ctx, F.linear, value, Moments(wv, wv_var),
                    None if bv is None else Moments(bv, bv_var))
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]

    def heads(t, length):
        return t.reshape(n, length, h, hd).transpose(1, 2)

    mask = None
    if attn_mask is not None:
        am = attn_mask.mean if _is_m(attn_mask) else attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros_like(am, dtype=q.dtype).masked_fill(am, float("-inf"))
        mask = am.view(n, h, lq, lk) if am.ndim == 3 else am
    if key_padding_mask is not None:
        kp = key_padding_mask.mean if _is_m(key_padding_mask) else key_padding_mask
        if kp.dtype == torch.bool:
            kp = torch.zeros_like(kp, dtype=q.dtype).masked_fill(kp, float("-inf"))
        kp = kp.view(n, 1, 1, lk)
        mask = kp if mask is None else mask + kp
    out, weights = _attend(heads(q, lq), heads(k, lk), vm.map(lambda t: heads(t, lk)), mask,
                           is_causal and attn_mask is None, scale=1.0)
    out = out.map(lambda t: t.transpose(1, 2).reshape(n, lq, e))
    out = _linear(ctx, m.out_proj, out)
    if not m.batch_first:
        out = out.map(lambda t: t.transpose(0, 1))
    attn = None
    if need_weights:
        attn = Moments(weights.mean(dim=1) if average_attn_weights else weights)
    return out, attn


@register_rule(nn.TransformerEncoderLayer)
def _encoder_layer(ctx, m: nn.TransformerEncoderLayer, src, src_mask=None,
                   src_key_padding_mask=None, is_causal=False):
    def sa(x):
        return ctx.call(m.self_attn, x, x, x, attn_mask=src_mask,
                        key_padding_mask=src_key_padding_mask, need_weights=False,
                        is_causal=is_causal)[0]

    def ff(x):
        act = m.activation
        hdn = ctx.call(m.linear1, x)
        hdn = ctx.call(act, hdn) if isinstance(act, nn.Module) else get_activation_rule(act)(
            ctx, act, hdn)
        return ctx.call(m.linear2, hdn)

    x = _as_m(src)
    if m.norm_first:
        x = _add(ctx, None, x, sa(ctx.call(m.norm1, x)))
        x = _add(ctx, None, x, ff(ctx.call(m.norm2, x)))
    else:
        x = ctx.call(m.norm1, _add(ctx, None, x, sa(x)))
        x = ctx.call(m.norm2, _add(ctx, None, x, ff(x)))
    return x


def get_activation_rule(fn):
    from .engine import get_rule

    rule = get_rule(fn)
    if rule is None:
        raise UnsupportedLayerError(f"CVP has no rule for the activation {fn!r}")
    return rule


@register_rule(nn.TransformerEncoder)
def _encoder(ctx, m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None,
             is_causal=None):
    x = src
    for layer in m.layers:
        x = ctx.call(layer, x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                     is_causal=bool(is_causal))
    if m.norm is not None:
        x = ctx.call(m.norm, x)
    return x
