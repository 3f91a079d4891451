"""Amortized RegVar: two lockstep warm-started fine-tunes and the score they give.

Plain torch: no scikit-learn, skorch or estimator here.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import check_positive_int, progress
from .core import (
    LossFn,
    OptimizerFactory,
    _as_data,
    _batches,
    _check_lam,
    _check_loss_value,
    _finite_or_raise,
    _per_param,
    _trainable,
)


def finetune_pair(
    model: nn.Module,
    X: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    loss: LossFn,
    *,
    lam: float,
    optimizer: OptimizerFactory,
    n_epochs: int = 5,
    batch_size: int = 64,
    n_average: int = 100,
    prior_precision: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    verbose: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """The two warm-started fine-tunes of amortized RegVar.

    Both start from copies of ``model`` (in eval mode: no dropout, fixed batch
    statistics) and take the same steps on the same shuffled batches, one
    minimizing ``loss + (lam / N) * mean|f(x_batch)|`` (the output regularizer,
    mean over rows and outputs), the other ``loss`` alone; whatever the
    optimizer does besides the perturbation (drift away from ``model``'s
    weights, SGD noise) is common to both and cancels in their difference.
    Each returns the average of its last ``n_average`` iterates.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network (left unchanged).
    X, y : Tensor or ndarray
        Training inputs and targets, batched onto ``model``'s device.
    loss : callable
        ``loss(model(x_batch), y_batch)``, the mean loss of a batch (the
        objective the net was trained on).
    lam : float
        Size ``lam > 0`` of the perturbation.
    optimizer : callable
        ``optimizer(params) -> torch.optim.Optimizer``; called once per copy
        with its trainable parameters in ``model.parameters()`` order. Its
        weight decay is the prior.
    n_epochs : int, default=5
        Passes over the data of each fine-tune.
    batch_size : int, default=64
    n_average : int, default=100
        Last iterates averaged (at most all steps).
    prior_precision : float, Tensor or None
        ``delta`` of an explicit ``(delta / 2) ||theta||^2`` in the summed
        objective (added to the batch loss as ``delta / (2 N) ||theta||^2``),
        for an optimizer without weight decay.
    generator : torch.Generator, optional
        Shuffles the batches.
    verbose : int, default=0

    Returns
    -------
    (model_lam, model_0) : tuple of torch.nn.Module
        The fine-tuned copies, in eval mode, without gradients.

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar import amortized_variance, finetune_pair
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> adam = lambda params: torch.optim.Adam(params, lr=1e-3, weight_decay=1e-2)
    >>> m_lam, m_0 = finetune_pair(net, X, y, torch.nn.functional.cross_entropy, lam=1e-2,
    ...                            optimizer=adam, n_epochs=2, batch_size=16)
    >>> var = amortized_variance(m_lam, m_0, X[:5], lam=1e-2)
    >>> var.shape, bool((var >= 0).all())
    (torch.Size([5, 2]), True)
    """
    _check_lam(lam)
    check_positive_int("n_epochs", n_epochs)
    check_positive_int("batch_size", batch_size)
    check_positive_int("n_average", n_average)
    first = next(model.parameters())
    X, y = _as_data(X, y, first.device, first.dtype)
    n = len(X)
    models = [copy.deepcopy(model).eval() for _ in range(2)]  # [perturbed, reference]
    params = [_trainable(m) for m in models]
    opts = [optimizer(ps) for ps in params]
    priors = [_per_param(prior_precision, ps) for ps in params]
    total = n_epochs * -(-n // batch_size)
    n_avg = min(n_average, total)
    sums = [[torch.zeros_like(p) for p in ps] for ps in params]
    step = 0
    for _ in progress(range(n_epochs), verbose, "RegVar fine-tune"):
        for idx in _batches(n, batch_size, generator):
            xb, yb = X[idx].to(first.device), y[idx].to(first.device)
            for which in (0, 1):  # the perturbed net, then the reference on the same batch
                _step(
                    models[which],
                    opts[which],
                    params[which],
                    priors[which],
                    loss,
                    xb,
                    yb,
                    lam if which == 0 else None,
                    n,
                )
            step += 1
            if step > total - n_avg:
                _accumulate(sums, params)
    _load_average(params, sums, n_avg)
    _finite_or_raise(
        [p for ps in params for p in ps],
        "the fine-tuned weights",
        "the fine-tune diverged; lower the fine-tuning learning rate or lam",
    )
    for m in models:
        m.requires_grad_(False)
    return models[0], models[1]


def _step(model, opt, params, prior, loss, xb, yb, lam, n) -> None:
    """One optimizer step of one fine-tune on a batch; ``lam=None`` for the reference."""
    opt.zero_grad(set_to_none=True)
    out = model(xb)
    obj = _check_loss_value(loss(out, yb))
    if lam is not None:  # the output regularizer of the perturbed fine-tune
        obj = obj + (lam / n) * out.abs().mean()
    if prior is not None:
        penalty = sum((d * p**2).sum() for d, p in zip(prior, params, strict=True))
        obj = obj + penalty / (2 * n)
    obj.backward()
    opt.step()


def _accumulate(sums: list[list[Tensor]], params: list[list[Tensor]]) -> None:
    """Add the current iterates of both fine-tunes to their running sums."""
    with torch.no_grad():
        for acc, ps in zip(sums, params, strict=True):
            torch._foreach_add_(acc, [p.detach() for p in ps])


def _load_average(params: list[list[Tensor]], sums: list[list[Tensor]], n_avg: int) -> None:
    """Set each fine-tune's weights to the average of its last ``n_avg`` iterates."""
    with torch.no_grad():
        for acc, ps in zip(sums, params, strict=True):
            for a, p in zip(acc, ps, strict=True):
                p.copy_(a / n_avg)


def amortized_variance(model_lam: nn.Module, model_0: nn.Module, x: Tensor, lam: float) -> Tensor:
    """``|f(x; theta_lam) - f(x; theta_0)| / lam`` per row and output.

    Evaluated in the nets' dtype (``x`` is cast to it). The difference is small
    next to the outputs themselves, so float32 rounding of each (which depends on
    the batch shape) is amplified by ``1 / lam``; nets converted to float64 give
    a difference that rounding does not move.

    Parameters
    ----------
    model_lam, model_0 : torch.nn.Module
        The two fine-tuned nets of :func:`finetune_pair`.
    x : Tensor of shape (B, ...)
    lam : float

    Returns
    -------
    Tensor of shape (B, C)

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar import amortized_variance
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> amortized_variance(a, b, torch.zeros(3, 2), lam=0.5).shape
    torch.Size([3, 1])
    """
    _check_lam(lam)
    dtype = next(model_lam.parameters()).dtype
    with torch.no_grad():
        x = x.to(dtype) if x.is_floating_point() else x
        return (model_lam(x) - model_0(x)).abs() / lam
