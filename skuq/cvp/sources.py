"""The posterior sources of CVP: the table of named sources and the built-in ones.

A *posterior source* is a function

    source(model, net, X, y, *, device, batch_size, **options) -> DiagonalWeightPosterior

where ``model`` is the trained logit module (``torch.nn.Module``), ``net`` is
what was trained (a skorch net, or the module itself), ``X, y`` the training
rows (float32 array, integer-encoded labels) and ``options`` the estimator's
``posterior__<option>`` parameters. It returns per-parameter variances keyed by the names
of ``model.named_parameters()``; the means are the trained weights.

A source may also provide ``prepare_net(net, n_train, **options) -> net``,
which changes how an unfitted skorch net is trained (IVON swaps the optimizer).

Built in: ``"laplace_diag"`` (the diagonal GGN Laplace of skuq's engine),
``"ivon"`` (:mod:`skuq.cvp.ivon`) and ``"l2m"`` (L2M's curvature read from the
optimizer state, :func:`skuq.curvature.optimizer.l2m_curvature`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._skorch import is_skorch_net, last_epoch_batch_sizes, trained_optimizer
from .._utils import check_option, check_positive, check_positive_int, iter_batches
from ..curvature import compute_curvature, select_weights, sum_loss
from ..curvature.optimizer import SCALES, l2m_curvature
from ..posterior import PRIOR_STRUCTURES, posterior_from_curvature, subset_posterior
from .ivon import ivon_posterior, prepare_ivon_net
from .posterior import DiagonalWeightPosterior

__all__ = [
    "POSTERIOR_SOURCES",
    "register_posterior_source",
    "laplace_diag_posterior",
    "l2m_posterior",
]


@dataclass
class _Source:
    fit: Callable[..., DiagonalWeightPosterior]
    prepare_net: Callable | None = None
    #: whether ``fit`` reads the rows it is given (a prefit net then keeps the
    #: calibration rows apart from them)
    uses_data: bool = True


POSTERIOR_SOURCES: dict[str, _Source] = {}


def register_posterior_source(
    name: str,
    source: Callable[..., DiagonalWeightPosterior],
    prepare_net: Callable | None = None,
    *,
    uses_data: bool = True,
) -> None:
    """Make ``CVPClassifier(posterior=name)`` use ``source``.

    Parameters
    ----------
    name : str
    source : callable
        ``source(model, net, X, y, *, device, batch_size, **options)`` returning
        a :class:`DiagonalWeightPosterior` (or a plain ``{name: variance}`` dict).
    prepare_net : callable, optional
        ``prepare_net(net, n_train, **options)`` returning the skorch net to train.
    uses_data : bool, default=True
        Whether ``source`` fits on the rows it is given. With a prefit net,
        ``CVPClassifier`` then holds a calibration split out of ``fit``'s rows,
        so that the posterior and the variance scales see different rows;
        ``False`` (the posterior is read from the trained net, as IVON's is)
        lets the calibration use all of them.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.posterior import DiagonalWeightPosterior
    >>> from skuq.cvp.sources import register_posterior_source
    >>> def fixed(model, net, X, y, *, device, batch_size, variance=1e-4):
    ...     return DiagonalWeightPosterior(
    ...         {n: torch.full_like(p, variance) for n, p in model.named_parameters()})
    >>> register_posterior_source("fixed_example", fixed)
    """
    POSTERIOR_SOURCES[name] = _Source(source, prepare_net, uses_data)


def laplace_diag_posterior(
    model: nn.Module,
    net,
    X,
    y,
    *,
    device,
    batch_size,
    prior_precision="marglik",
    curvature: str = "ggn",
) -> DiagonalWeightPosterior:
    """Diagonal Laplace over all weights of the trained (MAP) net, from skuq's engine.

    Variance ``1 / (diag GGN + delta)`` of the summed cross-entropy; ``delta``
    maximizes the Laplace marginal likelihood unless given as a float.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.sources import laplace_diag_posterior
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(20, 3).numpy(), torch.randint(0, 2, (20,)).numpy()
    >>> post = laplace_diag_posterior(model, model, X, y, device="cpu", batch_size=8)
    >>> sorted(post.variances)
    ['bias', 'weight']
    """
    weights = select_weights(model, "all", example_input=torch.as_tensor(X[:2]).to(device))
    curv = compute_curvature(
        weights,
        lambda: iter_batches(X, y, batch_size=batch_size, device=device),
        likelihood="classification",
        structure="diag",
        curvature=curvature,
    )
    fixed = not isinstance(prior_precision, str)
    post = posterior_from_curvature(
        curv,
        weights.vector(),
        prior_precision=float(prior_precision) if fixed else 1.0,
        group_sizes=weights.group_sizes(),
    )
    if not fixed:
        post.optimize_prior_precision("scalar")
    return DiagonalWeightPosterior(weights.unflatten(post.marginal_variance().detach()))


def l2m_posterior(
    model: nn.Module,
    net,
    X,
    y,
    *,
    device,
    batch_size,
    optimizer=None,
    scale="fisher",
    bias_correction=True,
    train_batch_size=None,
    prior_precision="marglik",
    prior_structure="scalar",
    temperature=1.0,
) -> DiagonalWeightPosterior:
    """L2M's diagonal Laplace over all weights, its curvature read from the optimizer state.

    The same posterior as :class:`skuq.L2MClassifier` on the trained net: the
    curvature ``h = c * v_hat`` from the second moments its Adam-family optimizer
    kept (:func:`skuq.curvature.optimizer.l2m_curvature`), no pass over the data (a plain module
    without a training history gets its training loss, for the evidence, from one
    forward pass over ``X``), and the prior precision maximizing the marginal
    likelihood unless given as a float (or one per parameter tensor).

    Parameters
    ----------
    model, net, X, y, device, batch_size
        See :func:`register_posterior_source`.
    optimizer : torch.optim.Optimizer, optional
        The optimizer that trained a plain ``torch.nn.Module`` (a skorch net's own
        ``optimizer_`` is used otherwise).
    scale, bias_correction, train_batch_size, prior_structure, temperature
        As in :class:`skuq.L2MClassifier`.
    prior_precision : float, array of float or "marglik", default="marglik"
        As in :class:`skuq.L2MClassifier`, without ``"heldout"``: CVP fits its
        variance scales on held-out rows itself.

    Returns
    -------
    DiagonalWeightPosterior

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.sources import l2m_posterior
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> X, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    >>> for xb, yb in zip(X.split(8), y.split(8)):
    ...     opt.zero_grad()
    ...     torch.nn.functional.cross_entropy(model(xb), yb).backward()
    ...     opt.step()
    >>> post = l2m_posterior(model, model, X.numpy(), y.numpy(), device="cpu", batch_size=8,
    ...                      optimizer=opt, train_batch_size=8)
    >>> sorted(post.variances)
    ['bias', 'weight']
    """
    _check_l2m_options(
        scale, bias_correction, train_batch_size, prior_precision, prior_structure, temperature
    )
    x0 = torch.as_tensor(X[: min(len(X), 2)]).to(device)
    weights = select_weights(model, "all", example_input=x0)
    opt = optimizer
    if opt is None:
        opt = trained_optimizer(net)
    if opt is None:
        raise TypeError(
            "L2M reads the optimizer state of the training run; a plain torch.nn.Module "
            "carries none. Pass the optimizer that trained it: posterior__optimizer=opt"
        )
    _check_criterion_reduction(net, scale)
    n_train, batch = _l2m_batches(net, len(X), train_batch_size, scale)
    origin = net.module_ if is_skorch_net(net) else model
    by_name = dict(zip([n for n, _ in model.named_parameters()], origin.parameters(), strict=True))
    curv = l2m_curvature(
        weights,
        opt,
        n_train=n_train,
        train_batch_size=batch,
        scale=scale,
        likelihood="classification",
        n_outputs=len(np.unique(y)),
        loss=_training_loss(model, net, X, y, n_train, batch_size, device),
        bias_correction=bias_correction,
        params=[by_name[n] for n in weights.names],
    )
    post = subset_posterior(curv, weights, prior_precision, temperature=temperature)
    if isinstance(prior_precision, str):  # "marglik"
        post.optimize_prior_precision(prior_structure, fit_sigma_noise=False)
    return DiagonalWeightPosterior(weights.unflatten(post.marginal_variance().detach()))


def _check_l2m_options(
    scale, bias_correction, train_batch_size, prior_precision, prior_structure, temperature
) -> None:
    if isinstance(scale, str):
        check_option("scale", scale, SCALES)
    else:
        check_positive("scale", scale)
    if not isinstance(bias_correction, (bool, np.bool_)):
        raise ValueError(f"bias_correction must be True or False, got {bias_correction!r}")
    if train_batch_size is not None:
        check_positive_int("train_batch_size", train_batch_size)
    check_option("prior_structure", prior_structure, PRIOR_STRUCTURES)
    check_positive("temperature", temperature)
    pp = prior_precision
    if isinstance(pp, str):
        check_option("prior_precision", pp, ("marglik",))
    elif not isinstance(pp, bool) and np.ndim(pp) == 0:
        check_positive("prior_precision", pp)
    else:
        arr = np.asarray(pp, dtype=float) if not isinstance(pp, bool) else np.array([])
        if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr) & (arr > 0)):
            raise ValueError(
                "prior_precision must be a float > 0, an array of per-layer floats > 0, "
                f"or 'marglik'; got {pp!r}"
            )


def _check_criterion_reduction(net, scale) -> None:
    reduction = getattr(getattr(net, "criterion_", None), "reduction", "mean")
    if reduction != "mean" and isinstance(scale, str):
        raise ValueError(
            f"L2M's scale={scale!r} assumes the net minimized the mean loss of a "
            f"batch, but its criterion uses reduction={reduction!r}: train with "
            "reduction='mean' or give scale as a float"
        )


def _l2m_batches(net, n_rows: int, train_batch_size, scale) -> tuple[int, int]:
    """``(N, B)``: the rows the net trained on (skorch's validation split keeps some of
    ``fit``'s rows out) and its training batch size, read from a skorch net's history."""
    sizes = last_epoch_batch_sizes(net)
    n_train = int(sum(sizes)) if sizes else n_rows
    if train_batch_size is not None:
        batch = min(int(train_batch_size), n_train)
    elif sizes:
        batch = int(max(sizes))
    elif not is_skorch_net(net) and scale == "fisher":
        raise ValueError(
            "scale='fisher' needs the batch size the net was trained with: set "
            "posterior__train_batch_size (a skorch net tells it itself)"
        )
    else:
        batch = 1
    if scale == "fisher" and batch >= n_train:
        warnings.warn(
            "L2M's scale='fisher' reads the optimizer's second moment as the noise of "
            "mini-batch gradients, but this net was trained full-batch (batch size "
            f"{batch} >= {n_train} rows): v_hat is then the square of the full gradient, "
            "which vanishes at convergence. The curvature is near zero and the posterior "
            "near the prior. Train with mini-batches, or use posterior='laplace_diag'",
            UserWarning,
            stacklevel=4,
        )
    return n_train, batch


def _training_loss(model, net, X, y, n_train: int, batch_size: int, device) -> float:
    """Summed training cross-entropy for the evidence: skorch's mean training loss of the
    last epoch (no pass over the data), else one forward pass over ``X``."""
    history = getattr(net, "history", None)
    if history and "train_loss" in history[-1]:
        return float(history[-1]["train_loss"]) * n_train
    loss = 0.0
    with torch.no_grad():
        for xb, yb in iter_batches(X, y, batch_size=batch_size, device=device):
            loss += float(sum_loss(model(xb).double(), yb, "classification"))
    return loss


register_posterior_source("ivon", ivon_posterior, prepare_ivon_net, uses_data=False)
register_posterior_source("laplace_diag", laplace_diag_posterior)
register_posterior_source("l2m", l2m_posterior)
