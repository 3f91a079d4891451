"""Rules of softmax, log-softmax and log of a positive tensor, by linearization
(named as such)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Moments, UnsupportedLayerError, register_rule
from ._common import _is_m, _sq


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
