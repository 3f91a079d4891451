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

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .curvature import compute_curvature, find_last_layer, select_subnetwork, select_weights
from .curvature.ggn import Curvature
from .posterior import DiagPosterior

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
    "resolve_selection",
    "select_subnetwork_indices",
    "top_k",
]

#: the named rules, usable as strings
SELECTIONS = (
    "largest_variance", "largest_variance_swag", "largest_magnitude", "random", "last_layer"
)
#: ``n_params="auto"`` keeps ``min(DEFAULT_SUBNETWORK_SIZE, P)`` weights
DEFAULT_SUBNETWORK_SIZE = 1000

Data = Iterable | Callable[[], Iterable] | None


def _n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _passes(data: Data, who: str) -> Callable[[], Iterable]:
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
    >>> from skuq.subnetwork import top_k
    >>> top_k(torch.tensor([0.1, 3.0, 2.0, 3.0]), 2)
    tensor([1, 3])
    """
    order = torch.argsort(scores.detach().double().cpu(), descending=True, stable=True)
    return torch.sort(order[:k]).values


def check_subnetwork_size(n_params, n_total: int) -> int:
    """``n_params`` as an int in ``[1, n_total]`` (``"auto"``: ``min(1000, n_total)``).

    Examples
    --------
    >>> from skuq.subnetwork import check_subnetwork_size
    >>> check_subnetwork_size("auto", 300), check_subnetwork_size(20, 300)
    (300, 20)
    """
    if isinstance(n_params, str) and n_params == "auto":
        return min(DEFAULT_SUBNETWORK_SIZE, n_total)
    if not isinstance(n_params, numbers.Integral) or isinstance(n_params, bool):
        raise ValueError(
            f"subnetwork_size must be an int >= 1 or 'auto', got {n_params!r}"
        )
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
    >>> from skuq.subnetwork import LargestMagnitude
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
        n_total = _n_trainable(model)
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
    >>> from skuq.subnetwork import LargestVariance
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
            weights.vector(), curvature.diag, prior_precision=torch.as_tensor(
                np.asarray(self.prior_precision, dtype=float)
            ), group_sizes=weights.group_sizes(), temperature=self.temperature,
        )
        return post.marginal_variance()

    def scores(self, model, data, *, likelihood="classification", generator=None):
        curv = compute_curvature(
            select_weights(model, "all"), _passes(data, "largest_variance"),
            likelihood=likelihood, structure="diag", curvature=self.curvature,
        )
        return self.variances_from_curvature(model, curv)


class LargestVarianceSWAG(SubnetworkSelection):
    """The weights of largest marginal variance under diagonal SWAG.

    A short SGD run (momentum, weight decay) starts at ``theta*`` on a copy of
    the model; the variance of each weight over ``n_epochs *
    snapshots_per_epoch`` snapshots of the iterates is its score (Maddox et
    al. 2019, as in laplace-torch's ``LargestVarianceSWAGSubnetMask``). Our
    choices: the copy stays in eval mode (the posterior is over the eval-mode
    net; batch norm statistics do not move); each batch of the data is split
    into shuffled mini-batches of ``batch_size`` rows (the batches themselves
    come in their order, so only one is held at a time).

    Parameters
    ----------
    n_epochs : int, default=5
    snapshots_per_epoch : int, default=4
    lr : float, default=1e-2
    momentum : float, default=0.9
    weight_decay : float, default=3e-4
    batch_size : int, default=32

    Examples
    --------
    >>> import torch
    >>> from skuq.subnetwork import LargestVarianceSWAG
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> gen = torch.Generator().manual_seed(0)
    >>> LargestVarianceSWAG(n_epochs=2).select(net, data, 10, generator=gen).shape
    torch.Size([10])
    """

    def __init__(
        self, n_epochs: int = 5, snapshots_per_epoch: int = 4, lr: float = 1e-2,
        momentum: float = 0.9, weight_decay: float = 3e-4, batch_size: int = 32,
    ):
        self.n_epochs = n_epochs
        self.snapshots_per_epoch = snapshots_per_epoch
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size

    def scores(self, model, data, *, likelihood="classification", generator=None):
        passes = _passes(data, "largest_variance_swag")
        for name in ("n_epochs", "snapshots_per_epoch", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        net = copy.deepcopy(model).eval()
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        sizes = [len(x) for x, _ in passes()]
        steps = sum(math.ceil(n / self.batch_size) for n in sizes)
        every = max(1, steps // self.snapshots_per_epoch)
        mean = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        sq = torch.zeros_like(mean)
        n_snap, step = 0, 0
        gen = _cpu(generator)
        with torch.enable_grad():
            for _ in range(self.n_epochs):
                for x, y in passes():  # one batch on the device at a time
                    rows = torch.randperm(len(x), generator=gen).to(x.device)
                    for s in range(0, len(x), self.batch_size):
                        r = rows[s : s + self.batch_size]
                        opt.zero_grad()
                        _mean_loss(net(x[r]), y[r], likelihood).backward()
                        opt.step()
                        step += 1
                        if step % every == 0:
                            theta = torch.cat([p.detach().reshape(-1) for p in params])
                            theta = theta.double().cpu()
                            if not bool(torch.isfinite(theta).all()):
                                raise FloatingPointError(
                                    "SWAG's SGD run diverged (NaN or inf weights); lower "
                                    f"its lr (now {self.lr})"
                                )
                            n_snap += 1
                            mean += (theta - mean) / n_snap
                            sq += (theta**2 - sq) / n_snap
        return (sq - mean**2).clamp_min(0)


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator (index permutations live on the CPU) drawn from ``generator``."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def _mean_loss(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    if likelihood == "regression":
        return 0.5 * F.mse_loss(f, y.reshape(f.shape).to(f.dtype))
    return F.cross_entropy(f, y.long())


class LargestMagnitude(SubnetworkSelection):
    """The weights of largest magnitude ``|theta*_d|`` (needs no data).

    Examples
    --------
    >>> import torch
    >>> from skuq.subnetwork import LargestMagnitude
    >>> net = torch.nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[0.1, -5.0]])); _ = net.bias.fill_(1.0)
    >>> LargestMagnitude().select(net, n_params=2)
    tensor([1, 2])
    """

    def scores(self, model, data=None, *, likelihood="classification", generator=None):
        return torch.cat([p.detach().reshape(-1).abs().cpu()
                          for p in model.parameters() if p.requires_grad])


class RandomSelection(SubnetworkSelection):
    """``k`` weights uniformly at random (reproducible through ``generator``).

    Examples
    --------
    >>> import torch
    >>> from skuq.subnetwork import RandomSelection
    >>> net = torch.nn.Linear(10, 3)
    >>> a = RandomSelection().select(net, n_params=5, generator=torch.Generator().manual_seed(0))
    >>> b = RandomSelection().select(net, n_params=5, generator=torch.Generator().manual_seed(0))
    >>> bool((a == b).all())
    True
    """

    def scores(self, model, data=None, *, likelihood="classification", generator=None):
        return torch.rand(_n_trainable(model), generator=_cpu(generator), dtype=torch.float64)


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
    >>> from skuq.subnetwork import LastLayerSelection
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> LastLayerSelection().select(net, [(torch.zeros(1, 3), torch.zeros(1))])
    tensor([16, 17, 18, 19, 20, 21, 22, 23, 24, 25])
    """

    ranks = False

    def candidates(self, model, data):
        x = next(iter(_passes(data, "last_layer")()))[0]
        name, module = find_last_layer(model, x[:2])
        prefix = f"{name}." if name else ""
        return _positions(model, [prefix + n for n, p in module.named_parameters(recurse=False)
                                  if p.requires_grad])


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
    >>> from skuq.subnetwork import ByName
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
                chosen += [prefix + m for m, p in modules[n].named_parameters()
                           if p.requires_grad and prefix + m in offsets]
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
    >>> from skuq.subnetwork import GivenIndices
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
    >>> from skuq.subnetwork import resolve_selection
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
    >>> from skuq.subnetwork import select_subnetwork_indices
    >>> from skuq.curvature import select_weights
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    >>> idx = select_subnetwork_indices(net, data, "largest_variance", 12)
    >>> select_weights(net, "subnetwork", subnetwork_indices=idx).n_params
    12
    """
    rule = resolve_selection(selection)
    return rule.select(model, data, n_params, likelihood=likelihood, generator=generator)
