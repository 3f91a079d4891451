"""Method cores of MC dropout and deep ensembles (plain PyTorch, no scikit-learn).

A PyTorch user can call these directly; the scikit-learn estimators
:class:`skuq.MCDropoutClassifier`, :class:`skuq.DeepEnsembleClassifier` and
their regressors (in :mod:`skuq.baselines`) are thin wrappers around them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["dropout_modules", "mc_dropout_mode", "mc_dropout_samples", "EnsembleModule"]


def dropout_modules(module: nn.Module) -> list[nn.Module]:
    """Every dropout layer of ``module`` with a drop probability ``p > 0``.

    Covers ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout`` and
    ``FeatureAlphaDropout`` (all subclasses of torch's ``_DropoutNd``).

    Examples
    --------
    >>> from torch import nn
    >>> from skuq.ensembles import dropout_modules
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Dropout(0.0))
    >>> len(dropout_modules(net))
    1
    """
    return [m for m in module.modules() if isinstance(m, _DropoutNd) and m.p > 0]


@contextmanager
def mc_dropout_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode except its dropout layers, which sample masks.

    Only dropout is switched on: batch normalization and every other layer
    keep their inference behaviour (BatchNorm uses its running statistics and
    does not update them). The previous ``training`` flags are restored on exit.

    Raises
    ------
    ValueError
        If ``module`` has no dropout layer with ``p > 0``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.ensembles import mc_dropout_mode
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    >>> with mc_dropout_mode(net):
    ...     net[1].training, net[2].training
    (True, False)
    """
    drops = dropout_modules(module)
    if not drops:
        raise ValueError(
            "MC dropout needs a network with dropout layers (nn.Dropout and friends with "
            "p > 0) but this one has none; add dropout to the module, e.g. "
            "skuq.nets.MLP(dropout=0.1) or set the skorch net's module__dropout=0.1"
        )
    flags = {m: m.training for m in module.modules()}
    try:
        module.eval()
        for m in drops:
            m.train()
        yield module
    finally:
        for m, flag in flags.items():
            m.train(flag)


def mc_dropout_samples(module: nn.Module, x: Tensor, n_samples: int) -> Tensor:
    """Outputs of ``n_samples`` forward passes with fresh dropout masks, shape (S, N, C).

    Masks come from torch's global random number generator: seed it (e.g.
    inside :func:`torch.random.fork_rng`) for reproducible draws. Pass ``s``
    uses the masks of the ``s``-th forward pass in that stream.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.ensembles import mc_dropout_samples
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    >>> mc_dropout_samples(net, torch.zeros(5, 3), n_samples=10).shape
    torch.Size([10, 5, 2])
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    with torch.no_grad(), mc_dropout_mode(module):
        return torch.stack([module(x) for _ in range(n_samples)])


class EnsembleModule(nn.Module):
    """A list of trained networks seen as one: ``forward`` is the mean output.

    Parameters
    ----------
    members : sequence of nn.Module
        Networks with the same input and output shapes.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.ensembles import EnsembleModule
    >>> ens = EnsembleModule([nn.Linear(3, 2), nn.Linear(3, 2)])
    >>> ens.member_outputs(torch.zeros(4, 3)).shape
    torch.Size([2, 4, 2])
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def member_outputs(self, x: Tensor) -> Tensor:
        """Every member's output, shape (M, N, C)."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return self.member_outputs(x).mean(dim=0)
