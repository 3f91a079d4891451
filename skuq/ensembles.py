"""Method cores of MC dropout and deep ensembles (plain PyTorch, no scikit-learn).

A PyTorch user can call these directly; the scikit-learn estimators
:class:`skuq.MCDropoutClassifier`, :class:`skuq.DeepEnsembleClassifier` and
their regressors (in :mod:`skuq.baselines`) are thin wrappers around them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = [
    "dropout_modules",
    "mc_dropout_mode",
    "mc_dropout_samples",
    "DropoutSampler",
    "EnsembleModule",
]


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


#: SELU's negative saturation value, which alpha dropout sets dropped units to
_ALPHA_PRIME = 1.7580993408473766
#: the channel-wise dropouts: one mask entry per channel (dim 1), shared over the rest
_CHANNEL_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
#: masks are applied through forward hooks on a shared module: one sampler at a time
_HOOK_LOCK = threading.RLock()


class DropoutSampler:
    """``n_samples`` networks drawn from a dropout net, each one applied to every row.

    A sample of MC dropout is one network: each dropout layer's mask is drawn
    once per sample (over a row's features, or its channels for the
    channel-wise dropouts) and shared by every row, so a row's outputs depend on
    that row alone -- not on the other rows of the call, their order or the
    batch size. Masks are drawn from ``generator`` on the first call, in a
    fixed order (sample by sample, layer by layer), and kept: later calls (the
    next batches) see the same networks. The rest of the module runs in
    inference mode (batch normalization uses its running statistics).

    Parameters
    ----------
    module : nn.Module
        A network with dropout layers (see :func:`dropout_modules`).
    n_samples : int
        Networks to draw.
    generator : torch.Generator, optional
        Source of the masks, on the device the inputs live on; ``None`` uses
        torch's global generator.

    Raises
    ------
    ValueError
        If ``module`` has no dropout layer with ``p > 0``.

    Notes
    -----
    A dropout layer that sees a tensor whose first dimension is not the batch
    (a sequence-first recurrent layout) cannot share a mask over rows; it gets
    a fresh mask per call over its whole input instead.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.ensembles import DropoutSampler
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    >>> x = torch.randn(5, 3)
    >>> sampler = DropoutSampler(net, 10, torch.Generator().manual_seed(0))
    >>> out = sampler(x)
    >>> out.shape
    torch.Size([10, 5, 2])
    >>> torch.allclose(sampler(x[3:4])[:, 0], out[:, 3])  # a row's draws are its own
    True
    """

    def __init__(self, module: nn.Module, n_samples: int, generator: torch.Generator | None = None):
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        with mc_dropout_mode(module):  # raises the clear error for a net without dropout
            pass
        self.module = module
        self.n_samples = int(n_samples)
        self.generator = generator
        self._layers = dropout_modules(module)
        self._masks: dict[tuple[int, int, tuple[int, ...]], Tensor] = {}

    def _mask(self, index: int, sample: int, layer: nn.Module, x: Tensor, rows: int) -> Tensor:
        if x.ndim < 2 or x.shape[0] != rows:  # no batch dimension first: per call
            return self._draw(layer, x.shape, x)
        shape = tuple(x.shape[1:])
        if isinstance(layer, _CHANNEL_DROPOUTS):
            shape = (shape[0],) + (1,) * (len(shape) - 1)
        key = (index, sample, shape)
        if key not in self._masks:
            self._masks[key] = self._draw(layer, shape, x)
        return self._masks[key]

    def _draw(self, layer: nn.Module, shape, x: Tensor) -> Tensor:
        keep = torch.empty(shape, dtype=x.dtype, device=x.device)
        return keep.bernoulli_(1.0 - layer.p, generator=self.generator)

    @staticmethod
    def _apply(layer: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
        p = float(layer.p)
        if isinstance(layer, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
            # dropped units go to SELU's saturation value, then an affine map keeps
            # the mean and variance (as torch's alpha dropout does)
            if p >= 1:
                return torch.zeros_like(x)
            a = 1.0 / math.sqrt((_ALPHA_PRIME**2 * p + 1) * (1 - p))
            return x * (keep * a) + (keep - 1) * (_ALPHA_PRIME * a) + _ALPHA_PRIME * a * p
        return x * keep * (0.0 if p >= 1 else 1.0 / (1.0 - p))

    def __call__(self, x: Tensor) -> Tensor:
        """Outputs of the ``n_samples`` networks on ``x``, shape (S, N, ...)."""
        rows, sample = len(x), 0
        index = {id(layer): i for i, layer in enumerate(self._layers)}

        def hook(layer, inputs, output):
            keep = self._mask(index[id(layer)], sample, layer, inputs[0], rows)
            return self._apply(layer, inputs[0], keep)

        with _HOOK_LOCK, torch.no_grad():
            flags = {m: m.training for m in self.module.modules()}
            handles = [layer.register_forward_hook(hook) for layer in self._layers]
            try:
                self.module.eval()  # dropout layers pass through; the hooks drop
                outs = []
                for sample in range(self.n_samples):  # noqa: B007 - read by the hook
                    outs.append(self.module(x))
            finally:
                for handle in handles:
                    handle.remove()
                for m, flag in flags.items():
                    m.train(flag)
        return torch.stack(outs)


def mc_dropout_samples(
    module: nn.Module, x: Tensor, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Outputs of ``n_samples`` dropout networks, shape (S, N, C).

    Each sample is one network: its masks are drawn once and applied to every
    row (see :class:`DropoutSampler`), so a row's outputs do not depend on the
    other rows. Masks come from ``generator`` (torch's global generator when
    ``None``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.ensembles import mc_dropout_samples
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    >>> gen = torch.Generator().manual_seed(0)
    >>> mc_dropout_samples(net, torch.zeros(5, 3), n_samples=10, generator=gen).shape
    torch.Size([10, 5, 2])
    """
    return DropoutSampler(module, n_samples, generator)(x)


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
