"""The contract of the subnetwork selection rules, and what the rules share.

A rule's ``select(model, data, n_params)`` returns sorted, distinct positions
in the flat vector of the model's trainable parameters (see
:mod:`skuq.laplace.subnetwork`, which holds the rules and documents them).
No scikit-learn here.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "SELECTIONS",
    "DEFAULT_SUBNETWORK_SIZE",
    "SubnetworkSelection",
    "check_subnetwork_size",
    "top_k",
]

#: the named rules, usable as strings
SELECTIONS = (
    "largest_variance",
    "largest_variance_swag",
    "largest_magnitude",
    "random",
    "last_layer",
)
#: ``n_params="auto"`` keeps ``min(DEFAULT_SUBNETWORK_SIZE, P)`` weights
DEFAULT_SUBNETWORK_SIZE = 1000

Data = Iterable | Callable[[], Iterable] | None


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def data_passes(data: Data, who: str) -> Callable[[], Iterable]:
    """A callable returning a fresh pass over ``data`` (a list, or a callable)."""
    if data is None:
        raise ValueError(f"{who} needs data: an iterable of (x, y) batches or a callable")
    if callable(data):
        return data
    data = list(data)
    return lambda: data


def top_k(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest scores, sorted; ties go to the lower position.

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import top_k
    >>> top_k(torch.tensor([0.1, 3.0, 2.0, 3.0]), 2)
    tensor([1, 3])
    """
    order = torch.argsort(scores.detach().double().cpu(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def check_subnetwork_size(n_params, n_total: int) -> int:
    """``n_params`` as an int in ``[1, n_total]`` (``"auto"``: ``min(1000, n_total)``).

    Examples
    --------
    >>> from skuq.laplace.subnetwork import check_subnetwork_size
    >>> check_subnetwork_size("auto", 300), check_subnetwork_size(20, 300)
    (300, 20)
    """
    if isinstance(n_params, str) and n_params == "auto":
        return min(DEFAULT_SUBNETWORK_SIZE, n_total)
    if not isinstance(n_params, numbers.Integral) or isinstance(n_params, bool):
        raise ValueError(f"subnetwork_size must be an int >= 1 or 'auto', got {n_params!r}")
    if n_params < 1:
        raise ValueError(f"subnetwork_size must be >= 1, got {n_params}")
    if n_params > n_total:
        raise ValueError(
            f"subnetwork_size={n_params} is larger than the network's {n_total} trainable "
            "parameters; use at most that many (or subset_of_weights='all')"
        )
    return int(n_params)


class SubnetworkSelection:
    """Base class of the selection rules (not for direct use).

    Subclasses define ``scores`` (ranking rules) or ``candidates`` (set rules).

    Examples
    --------
    >>> import torch
    >>> from skuq.laplace.subnetwork import LargestMagnitude
    >>> net = torch.nn.Linear(3, 2)
    >>> LargestMagnitude().select(net, n_params=4).shape
    torch.Size([4])
    """

    #: whether the rule ranks all weights (True) or names a fixed set (False)
    ranks = True

    def select(
        self,
        model: nn.Module,
        data: Data = None,
        n_params: int | str | None = None,
        *,
        likelihood: str = "classification",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The subnetwork: sorted distinct positions in the flat trainable-parameter vector.

        Parameters
        ----------
        model : torch.nn.Module
            The trained network (eval mode); it is not changed.
        data : iterable of (x, y) batches, or a callable returning one, optional
            Training data on the model's device (rules that need it say so).
        n_params : int, "auto" or None
            ``k``. Ranking rules need it (``"auto"``: ``min(1000, P)``); set
            rules take their whole set when it is None or ``"auto"``, and
            otherwise check it equals the set's size.
        likelihood : {"classification", "regression"}
        generator : torch.Generator, optional
            Randomness (random selection, SWAG's data order).

        Returns
        -------
        Tensor of int64, shape (k,)
        """
        n_total = n_trainable(model)
        if n_total == 0:
            raise ValueError("the network has no trainable parameters")
        if self.ranks:
            if n_params is None:
                raise ValueError(
                    f"{type(self).__name__} ranks the weights and needs the subnetwork size "
                    "(subnetwork_size=k, or 'auto')"
                )
            k = check_subnetwork_size(n_params, n_total)
            scores = self.scores(model, data, likelihood=likelihood, generator=generator)
            if scores.shape != (n_total,):
                raise ValueError(f"scores must have shape ({n_total},), got {tuple(scores.shape)}")
            return top_k(scores, k)
        idx = self.candidates(model, data)
        if n_params is not None and not (isinstance(n_params, str) and n_params == "auto"):
            k = check_subnetwork_size(n_params, n_total)
            if k != idx.numel():
                raise ValueError(
                    f"{type(self).__name__} selects {idx.numel()} weights, but "
                    f"subnetwork_size={k}; leave subnetwork_size=None (or 'auto') or give "
                    f"{idx.numel()}"
                )
        return idx

    __call__ = select

    def scores(
        self, model: nn.Module, data: Data, *, likelihood: str, generator
    ) -> Tensor:  # pragma: no cover - abstract
        """One score per trainable weight; the largest are kept."""
        raise NotImplementedError

    def candidates(self, model: nn.Module, data: Data) -> Tensor:  # pragma: no cover
        """The fixed set of positions (set rules)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator (index permutations live on the CPU) drawn from ``generator``."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)
