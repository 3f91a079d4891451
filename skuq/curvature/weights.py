"""Which weights a posterior lives on: all, the last layer, or a subnetwork.

A :class:`WeightSubset` names the parameter tensors of a model that carry a
posterior (and, for subnetworks, which entries of their concatenation), and
turns a flat vector over those weights into a function of the input through
:func:`torch.func.functional_call`. Every curvature routine and posterior in
skuq indexes weights through one of these, so a flat vector always has the
same layout: the selected parameter tensors in ``model.named_parameters()``
order, each flattened row-major (``[vec(W), b]`` for a linear layer), then
restricted to ``indices`` for a subnetwork.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["WeightSubset", "select_weights", "select_subnetwork", "find_last_layer"]

SUBSETS = ("all", "last_layer", "subnetwork")


def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def find_last_layer(model: nn.Module, x: Tensor) -> tuple[str, nn.Module]:
    """The last module with trainable parameters that ``model`` calls on ``x``.

    Found by running ``model`` once with forward hooks on every leaf module that
    owns trainable parameters (the order of calls, not of definition, counts).

    Returns
    -------
    name, module
        The module's qualified name inside ``model`` and the module.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import find_last_layer
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> find_last_layer(net, torch.zeros(1, 3))[0]
    '2'
    """
    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_hook(lambda m, i, o, n=name: order.append(n)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("the network has no trainable parameters that take part in forward")
    name = order[-1]
    return name, model.get_submodule(name)


class WeightSubset:
    """A set of weights of ``model`` and its flat-vector view.

    Parameters
    ----------
    model : torch.nn.Module
        The network (in eval mode); its parameters are read, never changed.
    names : sequence of str
        Qualified names of the selected parameter tensors (a subset of
        ``model.named_parameters()``, kept in that order).
    indices : Tensor of int64, optional
        Positions inside the concatenation of ``names`` (a subnetwork); ``None``
        keeps every entry.
    kind : str
        ``"all"``, ``"last_layer"`` or ``"subnetwork"`` (informational).
    last_layer : nn.Module, optional
        For ``kind="last_layer"``: the layer, so that its input features can be
        used directly.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> w = select_weights(model, "last_layer", example_input=torch.zeros(1, 3))
    >>> w.names, w.n_params
    (['2.weight', '2.bias'], 10)
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        indices: Tensor | None = None,
        kind: str = "all",
        last_layer: nn.Module | None = None,
        last_layer_name: str | None = None,
    ):
        params = dict(model.named_parameters())
        self.model = model
        self.names = list(names)
        self.kind = kind
        self.last_layer = last_layer
        self.last_layer_name = last_layer_name
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [params[n].numel() for n in self.names]
        self.n_full = int(sum(self.numels))
        self.indices = indices
        if indices is not None:
            self.indices = indices.to(params[self.names[0]].device)
        if self.n_params == 0:
            raise ValueError("the weight subset selects no parameters")

    # ------------------------------------------------------------- layout
    @property
    def n_params(self) -> int:
        """Number of weights in the subset (the posterior's dimension P)."""
        return self.n_full if self.indices is None else int(self.indices.numel())

    @property
    def device(self) -> torch.device:
        return self.params()[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params()[0].dtype

    def params(self) -> list[Tensor]:
        """The selected parameter tensors of the model (live, not copies)."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def group_sizes(self) -> list[int]:
        """Entries of the flat vector per parameter tensor (for per-layer priors)."""
        if self.indices is None:
            return list(self.numels)
        bounds = np.cumsum([0, *self.numels])
        idx = self.indices.cpu().numpy()
        pairs = zip(bounds[:-1], bounds[1:], strict=True)
        return [int(((idx >= lo) & (idx < hi)).sum()) for lo, hi in pairs]

    def vector(self) -> Tensor:
        """The current weights as a flat vector of length ``n_params`` (detached)."""
        full = torch.cat([p.detach().reshape(-1) for p in self.params()])
        return full if self.indices is None else full[self.indices]

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """A ``{name: tensor}`` dict for :func:`torch.func.functional_call`."""
        if self.indices is not None:
            base = torch.cat([p.detach().reshape(-1) for p in self.params()])
            theta = base.index_put((self.indices,), theta)
        out, start = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels, strict=True):
            out[name] = theta[start : start + n].reshape(shape)
            start += n
        return out

    def forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """``model(x)`` with the subset's weights replaced by ``theta``."""
        return functional_call(self.model, self.unflatten(theta), (x,))

    def segments(self) -> list[tuple[str, slice]]:
        """``(name, slice)`` of each parameter tensor in the flat vector (no subnetwork)."""
        if self.indices is not None:
            raise ValueError("a subnetwork has no per-tensor segments")
        out, start = [], 0
        for name, n in zip(self.names, self.numels, strict=True):
            out.append((name, slice(start, start + n)))
            start += n
        return out


def select_subnetwork(model: nn.Module, indices=None) -> Tensor:
    """The subnetwork: positions in the flat vector of all trainable parameters.

    The hook through which subnetwork selection strategies plug in. For now it
    accepts an explicit index array (as laplace-torch's ``subnetwork_indices``:
    positions in ``torch.nn.utils.parameters_to_vector(model.parameters())``
    restricted to trainable parameters); strategies (largest variance, largest
    magnitude, random...) are added by the subnetwork module.

    Parameters
    ----------
    model : torch.nn.Module
    indices : array-like of int
        Distinct positions in ``[0, P)``.

    Returns
    -------
    Tensor of int64, sorted

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_subnetwork
    >>> select_subnetwork(torch.nn.Linear(2, 2), [5, 0, 3])
    tensor([0, 3, 5])
    """
    n_total = sum(p.numel() for _, p in _trainable(model))
    if indices is None:
        raise ValueError(
            "subset_of_weights='subnetwork' needs subnetwork_indices: an array of positions "
            f"in the flat vector of the model's {n_total} trainable parameters"
        )
    idx = torch.as_tensor(np.asarray(indices))
    if idx.numel() == 0:
        raise ValueError("subnetwork_indices selects no parameters; give at least one index")
    if idx.ndim != 1 or idx.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
        raise ValueError("subnetwork_indices must be a 1-d array of integer positions")
    idx = idx.long()
    if int(idx.min()) < 0 or int(idx.max()) >= n_total:
        raise ValueError(
            f"subnetwork_indices must lie in [0, {n_total}) (the model's trainable "
            f"parameters); got range [{int(idx.min())}, {int(idx.max())}]"
        )
    idx = torch.unique(idx)  # sorted
    if idx.numel() != len(indices):
        raise ValueError("subnetwork_indices contains repeated positions")
    return idx


def select_weights(
    model: nn.Module,
    subset_of_weights: str = "all",
    *,
    subnetwork_indices=None,
    example_input: Tensor | None = None,
) -> WeightSubset:
    """The :class:`WeightSubset` a posterior lives on.

    Parameters
    ----------
    model : torch.nn.Module
    subset_of_weights : {"all", "last_layer", "subnetwork"}
        ``"last_layer"`` is the last module with trainable parameters that the
        forward pass calls (needs ``example_input``); ``"subnetwork"`` takes
        ``subnetwork_indices`` (see :func:`select_subnetwork`).
    subnetwork_indices : array-like of int, optional
    example_input : Tensor, optional
        One batch of inputs, to find the last layer.

    Returns
    -------
    WeightSubset

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> select_weights(torch.nn.Linear(3, 2)).n_params
    8
    """
    if subset_of_weights not in SUBSETS:
        raise ValueError(f"subset_of_weights must be one of {SUBSETS}, got {subset_of_weights!r}")
    named = _trainable(model)
    if not named:
        raise ValueError(
            "the network has no trainable parameters (all have requires_grad=False); "
            "a Laplace posterior needs at least one"
        )
    if subset_of_weights == "all":
        return WeightSubset(model, [n for n, _ in named], kind="all")
    if subset_of_weights == "subnetwork":
        idx = select_subnetwork(model, subnetwork_indices)
        return WeightSubset(model, [n for n, _ in named], indices=idx, kind="subnetwork")
    if example_input is None:
        raise ValueError("finding the last layer needs example_input (one batch of inputs)")
    name, module = find_last_layer(model, example_input)
    names = [
        f"{name}.{n}" if name else n
        for n, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]
    return WeightSubset(model, names, kind="last_layer", last_layer=module, last_layer_name=name)
