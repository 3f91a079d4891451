"""Subnetwork selection: which ``k`` weights get a full-covariance Laplace posterior.

Subnetwork inference (Daxberger et al., "Bayesian Deep Learning via Subnetwork
Inference", ICML 2021) keeps a full-covariance Gaussian over a subset ``S`` of
the weights and every other weight at the MAP ``theta*``. This module holds the
rules that choose ``S``. Each is a small class with one contract,
``rule.select(model, data, n_params) -> LongTensor``: sorted, distinct
positions in the flat vector of the model's trainable parameters
(``torch.nn.utils.parameters_to_vector`` over the parameters with
``requires_grad``, in ``named_parameters()`` order -- laplace-torch's
``subnetwork_indices`` layout).

Ranking rules score every weight and keep the ``n_params`` best (ties go to
the lower position):

* :class:`LargestVariance` (``"largest_variance"``, the paper's default): the
  weights with the largest marginal variance under a diagonal Laplace
  posterior over all weights. Among masks ``m`` with ``sum(m) = k``, these
  minimize the 2-Wasserstein distance to that posterior from the posterior
  that keeps only the masked variances, ``W2^2 = sum_d sigma_d^2 (1 - m_d)``.
* :class:`LargestVarianceSWAG` (``"largest_variance_swag"``): the same with
  diagonal SWAG variances (moments of SGD iterates started at ``theta*``).
* :class:`LargestMagnitude` (``"largest_magnitude"``): largest ``|theta*|``.
* :class:`RandomSelection` (``"random"``): uniformly at random (seeded).

Set rules name a fixed set (``n_params`` may be omitted, or must equal its size):

* :class:`LastLayerSelection` (``"last_layer"``): the last layer's weights;
* :class:`ByName`: parameter tensors or modules by name;
* :class:`GivenIndices`: a user-given index array.

No scikit-learn here: a plain PyTorch user can call these directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..curvature import compute_curvature, find_last_layer, select_subnetwork, select_weights
from ..curvature.ggn import Curvature
from ..posterior import DiagPosterior
from .selection import (
    DEFAULT_SUBNETWORK_SIZE,
    SELECTIONS,
    Data,
    SubnetworkSelection,
    check_subnetwork_size,
    cpu_generator,
    data_passes,
    n_trainable,
    top_k,
)
from .swag import LargestVarianceSWAG

__all__ = [
    "SELECTIONS",
    "DEFAULT_SUBNETWORK_SIZE",
    "SubnetworkSelection",
    "LargestVariance",
    "LargestVarianceSWAG",
    "LargestMagnitude",
    "RandomSelection",
    "LastLayerSelection",
    "ByName",
    "GivenIndices",
    "check_subnetwork_size",
    "resolve_selection",
    "select_subnetwork_indices",
    "top_k",
]


# ------------------------------------------------------------------ ranking rules
class LargestVariance(SubnetworkSelection):
    """The weights of largest marginal variance under a diagonal Laplace posterior.

    ``sigma_d^2 = 1 / (h_d / T + delta_d)`` with ``h`` the diagonal GGN (or
    empirical Fisher) of the summed training loss over all weights -- one pass
    over the data. Keeping the ``k`` largest minimizes the Wasserstein
    criterion ``sum_d sigma_d^2 (1 - m_d)`` of Daxberger et al. With a scalar
    prior the ranking is that of the smallest ``h_d`` whatever ``delta`` and
    ``T`` are; a per-layer prior changes it. Weights with ``h_d = 0`` (never
    used on the training data: dead units, always-zero inputs) have the
    largest variance of all, and are chosen first (ties: lower position).

    Parameters
    ----------
    prior_precision : float or array of float, default=1.0
        ``delta``: scalar, or one per trainable parameter tensor.
    curvature : {"ggn", "ef"}, default="ggn"
    temperature : float, default=1.0

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import LargestVariance
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    >>> LargestVariance().select(net, data, n_params=10).shape
    torch.Size([10])
    """

    def __init__(self, prior_precision=1.0, curvature: str = "ggn", temperature: float = 1.0):
        self.prior_precision = prior_precision
        self.curvature = curvature
        self.temperature = temperature

    def variances_from_curvature(self, model: nn.Module, curvature: Curvature) -> Tensor:
        """Marginal variances of the diagonal posterior over all trainable weights."""
        weights = select_weights(model, "all")
        post = DiagPosterior(
            weights.vector(),
            curvature.diag,
            prior_precision=torch.as_tensor(np.asarray(self.prior_precision, dtype=float)),
            group_sizes=weights.group_sizes(),
            temperature=self.temperature,
        )
        return post.marginal_variance()

    def scores(self, model, data, *, likelihood="classification", generator=None):
        curv = compute_curvature(
            select_weights(model, "all"),
            data_passes(data, "largest_variance"),
            likelihood=likelihood,
            structure="diag",
            curvature=self.curvature,
        )
        return self.variances_from_curvature(model, curv)


class LargestMagnitude(SubnetworkSelection):
    """The weights of largest magnitude ``|theta*_d|`` (needs no data).

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import LargestMagnitude
    >>> net = torch.nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[0.1, -5.0]])); _ = net.bias.fill_(1.0)
    >>> LargestMagnitude().select(net, n_params=2)
    tensor([1, 2])
    """

    def scores(self, model, data=None, *, likelihood="classification", generator=None):
        return torch.cat(
            [p.detach().reshape(-1).abs().cpu() for p in model.parameters() if p.requires_grad]
        )


class RandomSelection(SubnetworkSelection):
    """``k`` weights uniformly at random (reproducible through ``generator``).

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import RandomSelection
    >>> net = torch.nn.Linear(10, 3)
    >>> a = RandomSelection().select(net, n_params=5, generator=torch.Generator().manual_seed(0))
    >>> b = RandomSelection().select(net, n_params=5, generator=torch.Generator().manual_seed(0))
    >>> bool((a == b).all())
    True
    """

    def scores(self, model, data=None, *, likelihood="classification", generator=None):
        return torch.rand(
            n_trainable(model), generator=cpu_generator(generator), dtype=torch.float64
        )


# ------------------------------------------------------------------ set rules
def _offsets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``name -> (start, stop)`` of each trainable tensor in the flat vector."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = (start, start + p.numel())
            start += p.numel()
    return out


def _positions(model: nn.Module, names: Iterable[str]) -> Tensor:
    offsets = _offsets(model)
    parts = [torch.arange(*offsets[n]) for n in names]
    return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)


class LastLayerSelection(SubnetworkSelection):
    """Every trainable weight of the last layer the forward pass calls.

    Needs ``data`` (one batch, to run the net once and find that layer).

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import LastLayerSelection
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> LastLayerSelection().select(net, [(torch.zeros(1, 3), torch.zeros(1))])
    tensor([16, 17, 18, 19, 20, 21, 22, 23, 24, 25])
    """

    ranks = False

    def candidates(self, model, data):
        x = next(iter(data_passes(data, "last_layer")()))[0]
        name, module = find_last_layer(model, x[:2])
        prefix = f"{name}." if name else ""
        return _positions(
            model,
            [prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad],
        )


class ByName(SubnetworkSelection):
    """Every trainable weight of the named parameter tensors or modules.

    Parameters
    ----------
    names : sequence of str
        Qualified names from ``model.named_parameters()`` (e.g. ``"2.weight"``)
        or ``model.named_modules()`` (e.g. ``"2"``: all of its parameters).

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import ByName
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> ByName(["0.bias", "2"]).select(net).numel()
    14
    """

    ranks = False

    def __init__(self, names: Sequence[str]):
        self.names = names

    def candidates(self, model, data=None):
        if isinstance(self.names, str) or not all(isinstance(n, str) for n in self.names):
            raise ValueError(f"names must be a list of str, got {self.names!r}")
        offsets = _offsets(model)
        modules = dict(model.named_modules())
        chosen: list[str] = []
        for n in self.names:
            if n in offsets:
                chosen.append(n)
            elif n in modules:
                prefix = f"{n}." if n else ""
                chosen += [
                    prefix + m
                    for m, p in modules[n].named_parameters()
                    if p.requires_grad and prefix + m in offsets
                ]
            else:
                raise ValueError(
                    f"{n!r} names no trainable parameter or module of the network; "
                    f"parameters: {list(offsets)}"
                )
        idx = _positions(model, chosen)
        if idx.numel() == 0:
            raise ValueError(f"the names {list(self.names)} select no trainable parameters")
        return idx


class GivenIndices(SubnetworkSelection):
    """A user-given index array (checked: 1-d integers, in range, no repeats).

    Parameters
    ----------
    indices : array-like of int
        Positions in the flat vector of the trainable parameters.

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import GivenIndices
    >>> GivenIndices([4, 0, 2]).select(torch.nn.Linear(3, 2))
    tensor([0, 2, 4])
    """

    ranks = False

    def __init__(self, indices):
        self.indices = indices

    def candidates(self, model, data=None):
        idx = self.indices
        if isinstance(idx, Tensor):
            idx = idx.detach().cpu().numpy()
        return select_subnetwork(model, np.asarray(idx)).cpu()


# ------------------------------------------------------------------ resolving
_NAMED = {
    "largest_variance": LargestVariance,
    "largest_variance_swag": LargestVarianceSWAG,
    "largest_magnitude": LargestMagnitude,
    "random": RandomSelection,
    "last_layer": LastLayerSelection,
}


def resolve_selection(selection, **options) -> SubnetworkSelection:
    """The rule object for ``selection``.

    Parameters
    ----------
    selection : str, SubnetworkSelection, sequence of str, or array-like of int
        One of :data:`SELECTIONS`; a rule object (used as is); parameter or
        module names (:class:`ByName`); or positions (:class:`GivenIndices`).
    **options
        Constructor arguments for a rule named by a string (e.g.
        ``prior_precision`` for ``"largest_variance"``); ignored otherwise.

    Examples
    --------
    >>> from skuq.laplace.subnetwork import resolve_selection
    >>> resolve_selection("largest_magnitude")
    LargestMagnitude()
    >>> resolve_selection(["fc.weight"])
    ByName(names=['fc.weight'])
    """
    if isinstance(selection, SubnetworkSelection):
        return selection
    if isinstance(selection, str):
        if selection not in _NAMED:
            raise ValueError(
                f"subnetwork_selection must be one of {SELECTIONS}, a SubnetworkSelection, a "
                "list of parameter/module names or an array of indices; got "
                f"{selection!r} (to select by name, pass a list: [{selection!r}])"
            )
        return _NAMED[selection](**options)
    if isinstance(selection, Tensor):
        return GivenIndices(selection)
    if isinstance(selection, (list, tuple, np.ndarray)):
        arr = np.asarray(selection, dtype=object) if len(selection) else np.asarray(selection)
        if arr.size and all(isinstance(v, str) for v in arr.ravel()):
            return ByName(list(selection))
        return GivenIndices(selection)
    raise ValueError(
        f"subnetwork_selection must be one of {SELECTIONS}, a SubnetworkSelection, a list of "
        f"names or an array of indices; got {type(selection).__name__}"
    )


def select_subnetwork_indices(
    model: nn.Module,
    data: Data = None,
    selection="largest_variance",
    n_params: int | str | None = None,
    *,
    likelihood: str = "classification",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose a subnetwork of ``model`` with a named rule (functional form).

    Parameters
    ----------
    model : torch.nn.Module
    data : iterable of (x, y) batches, or a callable returning one, optional
    selection : str, SubnetworkSelection, names or indices, default="largest_variance"
        See :func:`resolve_selection`.
    n_params : int, "auto" or None
        ``k`` (see :meth:`SubnetworkSelection.select`).
    likelihood : {"classification", "regression"}
    generator : torch.Generator, optional

    Returns
    -------
    Tensor of int64, sorted, distinct

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import select_subnetwork_indices
    >>> from skuq.curvature import select_weights
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    >>> idx = select_subnetwork_indices(net, data, "largest_variance", 12)
    >>> select_weights(net, "subnetwork", subnetwork_indices=idx).n_params
    12
    """
    rule = resolve_selection(selection)
    return rule.select(model, data, n_params, likelihood=likelihood, generator=generator)
