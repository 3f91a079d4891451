"""Pieces shared by RegVar's torch solvers: options, checks, data batching, the vmapped pass.

Plain torch: no scikit-learn, skorch or estimator here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

MODES = ("amortized", "exact")
EXACT_SOLVERS = ("lbfgs", "optimizer")

#: ``loss(outputs, targets) -> scalar``: the MEAN loss over a batch's rows
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``optimizer(params) -> torch.optim.Optimizer`` over the given tensors
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


class RegVarConvergenceWarning(UserWarning):
    """An exact-mode fine-tune stopped before its gradient reached the tolerance.

    Examples
    --------
    >>> from skuq.regvar import RegVarConvergenceWarning
    >>> issubclass(RegVarConvergenceWarning, UserWarning)
    True
    """


# ----------------------------------------------------------------- helpers
def _check_lam(lam) -> None:
    if not (
        isinstance(lam, numbers.Real)
        and not isinstance(lam, (bool, np.bool_))
        and math.isfinite(lam)
        and lam > 0
    ):
        raise ValueError(
            f"lam must be a finite number > 0 (the size of the regularization "
            f"perturbation; RegVar divides by it), got {lam!r}"
        )


def _check_loss_value(value, what: str = "the loss") -> Tensor:
    """A loss RegVar can fine-tune on: a finite scalar tensor with a gradient."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(
            f"RegVar fine-tunes the network on its training loss, but {what} returned "
            f"{shape} instead of a scalar tensor: use a criterion with reduction='mean'"
        )
    if not value.requires_grad:
        raise TypeError(
            f"RegVar fine-tunes the network on its training loss, but {what} is not "
            "differentiable in the network's weights (it carries no gradient: a criterion "
            "that detaches, rounds or thresholds the outputs). Train the net with a "
            "differentiable criterion such as torch.nn.CrossEntropyLoss or MSELoss"
        )
    return value.reshape(())


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _per_param(prior_precision, params: Sequence[Tensor]) -> list[Tensor] | None:
    """A prior precision (float, or a flat tensor over ``params``) cut per tensor."""
    if prior_precision is None:
        return None
    if not isinstance(prior_precision, Tensor):
        if float(prior_precision) == 0.0:
            return None
        return [torch.full_like(p, float(prior_precision)) for p in params]
    flat = prior_precision.reshape(-1)
    n = sum(p.numel() for p in params)
    if flat.numel() == 1:
        return _per_param(float(flat), params)
    if flat.numel() != n:
        raise ValueError(f"prior_precision has {flat.numel()} entries, the weights {n}")
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape).to(p))
        start += p.numel()
    return out


def _flat_prior(prior_precision, n_params: int, like: Tensor) -> Tensor:
    """The prior precision as a flat (P,) tensor (zeros for None)."""
    if prior_precision is None:
        return torch.zeros(n_params, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(prior_precision, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        return t.expand(n_params).clone()
    if t.numel() != n_params:
        raise ValueError(f"prior_precision has {t.numel()} entries, the weights {n_params}")
    return t


def _as_data(X, y, device, dtype) -> tuple[Tensor, Tensor]:
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if X.is_floating_point():
        X = X.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    return X, y


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    """One epoch of shuffled row indices (on the CPU), from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(n, generator=generator, device=device).cpu()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _stacked(fn: Callable[..., tuple[Tensor, Tensor]], *args: Tensor) -> tuple[Tensor, Tensor]:
    """``fn`` over the rows of ``args``, vectorized with ``vmap`` where it can be."""
    try:
        return vmap(fn)(*args)
    except (RuntimeError, NotImplementedError):  # an op torch.func cannot batch: a loop
        parts = [fn(*row) for row in zip(*args, strict=True)]
        return tuple(torch.stack(p) for p in zip(*parts, strict=True))


def _loss_and_query_output(weights, loss, xb, yb):
    """``(t, x*, e_k) -> (loss of the batch, f_k(x*))`` at weights ``t``, in ONE forward pass
    (the query row rides along with the batch; the net acts on rows independently)."""

    def fn(t: Tensor, xq: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        out = weights.forward(t, torch.cat([xb, xq.unsqueeze(0)]))
        return loss(out[:-1], yb), (out[-1] * onehot).sum()

    return fn


def _finite_or_raise(tensors, what: str, hint: str) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"{what} contains NaN or inf: {hint}")


def _nearest_psd(cov: Tensor) -> Tensor:
    """Eigenvalues clipped at zero: finite-lam estimates can be slightly indefinite."""
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs * evals.clamp_min(0).unsqueeze(-2)) @ evecs.transpose(-1, -2)
