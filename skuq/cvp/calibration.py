"""The light calibration step of CVP: per-layer variance scales fitted by NLL, then a
shared multiplier chosen by the held-out rule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .propagator import MomentPropagator

__all__ = ["probit_nll", "fit_layer_scales", "multiplier_nll", "MULTIPLIER_GRID"]

#: shared multipliers of the fitted scales that CVPClassifier's held-out rule searches,
#: widest first (see :func:`multiplier_nll`)
MULTIPLIER_GRID = tuple(float(m) for m in np.logspace(2, -2, 9))


def probit_nll(mean: Tensor, var: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """NLL of the probit predictive ``softmax(mean / sqrt(1 + pi var / 8))``.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.calibration import probit_nll
    >>> float(probit_nll(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0])))  # log 2
    0.6931471824645996
    """
    logits = mean * torch.rsqrt(1.0 + (math.pi / 8.0) * var.clamp_min(0))
    return F.cross_entropy(logits, y, reduction=reduction)


def fit_layer_scales(
    propagator: MomentPropagator,
    batches: Iterable[tuple[Tensor, Tensor]],
    mode: str = "per_layer",
    *,
    max_iter: int = 100,
    prior_std: float = 3.0,
) -> dict[str, float]:
    """Scales ``c_l`` of each layer's output variance minimizing the probit NLL.

    The network is frozen; ``log c`` (one per layer, or one shared for
    ``mode="global"``) is fitted by L-BFGS on the full calibration set, with a
    weak Gaussian prior ``log c ~ N(0, prior_std^2)`` (weight ``1/n``) so that
    a layer the data cannot inform stays near ``c = 1``.

    Parameters
    ----------
    propagator : MomentPropagator
    batches : iterable of (x, y)
        The calibration data (re-iterated at every L-BFGS evaluation); a list
        of tensor pairs.
    mode : {"per_layer", "global"}

    Returns
    -------
    dict of str to float
        ``{layer name: c}``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.cvp import MomentPropagator
    >>> from skuq.cvp.calibration import fit_layer_scales
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> prop = MomentPropagator(net, {"0.weight": 0.01, "2.weight": 0.01})
    >>> x, y = torch.randn(50, 2), torch.randint(0, 2, (50,))
    >>> scales = fit_layer_scales(prop, [(x, y)], "global")
    >>> sorted(scales) == ["0", "2"] and all(c > 0 for c in scales.values())
    True
    """
    if mode not in ("per_layer", "global"):
        raise ValueError(f"mode must be 'per_layer' or 'global', got {mode!r}")
    names = propagator.layer_names
    if not names:
        return {}
    batches = list(batches)
    n = sum(len(yb) for _, yb in batches)
    device = batches[0][0].device
    log_c = torch.zeros(
        1 if mode == "global" else len(names),
        dtype=torch.float64,
        device=device,
        requires_grad=True,
    )
    with _frozen(list(propagator.graph_module.parameters())):
        opt = torch.optim.LBFGS([log_c], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            total = 0.0
            for xb, yb in batches:
                sc = {k: v.float() for k, v in _scales(log_c, names, mode).items()}
                out = propagator(xb, layer_scales=sc)
                loss = probit_nll(out.mean.double(), out.variance.double(), yb, "sum") / n
                loss.backward()
                total += float(loss.detach())
            prior = (log_c**2).sum() / (2 * prior_std**2 * n)
            prior.backward()
            return torch.tensor(total + float(prior.detach()), dtype=torch.float64)

        opt.step(closure)
    out = {k: float(v.detach()) for k, v in _scales(log_c, names, mode).items()}
    if not all(math.isfinite(v) and v > 0 for v in out.values()):
        raise FloatingPointError("the variance-scale fit diverged; check the calibration data")
    return out


def multiplier_nll(
    propagator: MomentPropagator,
    batches: Iterable[tuple[Tensor, Tensor]],
    scales: dict[str, float],
    grid: Iterable[float] = MULTIPLIER_GRID,
    means: list[Tensor] | None = None,
) -> list[float]:
    """Mean probit NLL of ``batches`` with every layer scale times each multiplier of ``grid``.

    One propagation of the rows per multiplier, network frozen. ``means``: one
    tensor of logits per batch to use instead of the propagated mean (the
    variance is always the propagated one). CVPClassifier
    takes the widest multiplier within a few percent of the best of these
    (:func:`skuq.base.heldout_choice`, the held-out rule of the Laplace family).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.cvp import MomentPropagator
    >>> from skuq.cvp.calibration import multiplier_nll
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> prop = MomentPropagator(net, {"0.weight": 0.01, "2.weight": 0.01})
    >>> x, y = torch.randn(50, 2), torch.randint(0, 2, (50,))
    >>> nll = multiplier_nll(prop, [(x, y)], {"0": 1.0, "2": 1.0}, grid=(10.0, 1.0, 0.1))
    >>> len(nll)
    3
    """
    batches = list(batches)
    n = sum(len(yb) for _, yb in batches)
    out = []
    with torch.no_grad():
        for m in grid:
            sc = {k: v * m for k, v in scales.items()}
            total = 0.0
            for i, (xb, yb) in enumerate(batches):
                pred = propagator(xb, layer_scales=sc)
                mu = pred.mean if means is None else means[i]
                total += float(probit_nll(mu.double(), pred.variance.double(), yb, "sum"))
            out.append(total / n)
    return out


def _scales(log_c: Tensor, names: list[str], mode: str) -> dict[str, Tensor]:
    """``{layer name: c}`` from the fitted ``log c`` (one shared for ``mode="global"``)."""
    c = log_c.clamp(-20.0, 20.0).exp()
    return {name: c[0 if mode == "global" else i] for i, name in enumerate(names)}


@contextmanager
def _frozen(params: list[Tensor]):
    """The parameters without gradients while the block runs (the network is frozen)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
