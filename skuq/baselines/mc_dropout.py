"""MC dropout: dropout kept on at prediction, one network per sample.

The torch core (:func:`dropout_modules`, :func:`mc_dropout_mode`,
:class:`DropoutSampler`, :func:`mc_dropout_samples`) is plain PyTorch that a
PyTorch user can call directly; :class:`MCDropoutClassifier` and
:class:`MCDropoutRegressor` are the scikit-learn estimators around it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from .._utils import check_positive_int
from ..base import BaseUQEstimator, UQClassifierMixin, UQRegressorMixin
from ..outputs import OutputDistribution

__all__ = [
    "dropout_modules",
    "mc_dropout_mode",
    "mc_dropout_samples",
    "DropoutSampler",
    "MCDropoutClassifier",
    "MCDropoutRegressor",
]


def dropout_modules(module: nn.Module) -> list[nn.Module]:
    """Every dropout layer of ``module`` with a drop probability ``p > 0``.

    Covers ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout`` and
    ``FeatureAlphaDropout`` (all subclasses of torch's ``_DropoutNd``).

    Examples
    --------
    >>> from torch import nn
    >>> from skuq.baselines import dropout_modules
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
    >>> from skuq.baselines import mc_dropout_mode
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
    >>> from skuq.baselines import DropoutSampler
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
    >>> from skuq.baselines import mc_dropout_samples
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    >>> gen = torch.Generator().manual_seed(0)
    >>> mc_dropout_samples(net, torch.zeros(5, 3), n_samples=10, generator=gen).shape
    torch.Size([10, 5, 2])
    """
    return DropoutSampler(module, n_samples, generator)(x)


class _MCDropoutBase(BaseUQEstimator):
    """Shared part of the MC dropout classifier and regressor."""

    def __init__(
        self,
        estimator,
        *,
        n_samples=50,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.n_samples = n_samples
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    def _validate_options(self) -> None:
        check_positive_int("n_samples", self.n_samples)

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        with mc_dropout_mode(self.model_):  # raises the clear error for a net without dropout
            pass
        self.n_dropout_layers_ = len(dropout_modules(self.model_))
        if isinstance(self, UQRegressorMixin):
            self._fit_heldout_noise(X, y, X_cal, y_cal, net_spread=True)

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        # a fresh generator per batch draws the same masks for every batch: each
        # sample is one network applied to every row of the call
        sampler = DropoutSampler(self.model_, self.n_samples, self._generator())
        return OutputDistribution.from_samples(sampler(x).float())


class MCDropoutClassifier(UQClassifierMixin, _MCDropoutBase):
    """MC dropout (Gal & Ghahramani, 2016): dropout kept on at prediction.

    ``predict_proba`` averages ``softmax`` over ``n_samples`` networks, each
    with its own dropout masks; a network's masks are shared by every row, so
    a row's prediction never depends on the other rows of the call. Only the
    dropout layers sample; batch normalization and every other layer stay in
    inference mode. The network must contain dropout (e.g.
    ``skuq.nets.MLP(dropout=0.1)``); one without gets a ``ValueError`` in
    ``fit``.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        A net with dropout layers.
    n_samples : int, default=50
        Forward passes per prediction.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    classes_ : ndarray
    net_ : skorch net or torch.nn.Module
    model_ : torch.nn.Module
        The module that returns logits.
    n_dropout_layers_ : int
        Dropout layers that sample at prediction.

    Notes
    -----
    Masks are drawn from a generator seeded from ``random_state`` at each
    prediction call (torch's global generator is not touched), so repeated
    calls return the same numbers, whatever the batch size and row order.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import MCDropoutClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, module__dropout=0.1,
    ...                           criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = MCDropoutClassifier(net, n_samples=20, random_state=0)
    >>> est.fit(d.X_train, d.y_train).score(d.X_test, d.y_test) > 0.9
    True
    >>> est.predict_distribution(d.X_test[:3]).samples.shape
    torch.Size([20, 3, 5])
    """


class MCDropoutRegressor(UQRegressorMixin, _MCDropoutBase):
    """MC dropout for regression: mean and variance over dropout forward passes.

    The epistemic variance is the (unbiased) sample variance of the outputs of
    ``n_samples`` networks with their own dropout masks (shared by every
    row); the aleatoric ``sigma_noise_`` comes from held-out rows, as in
    :class:`MAPRegressor`: its square is the mean squared residual of the
    deterministic (dropout-off) net there less the mean dropout variance (at
    least 1 % of the former), so that the spread is not counted twice.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        A net with dropout layers.
    n_samples : int, default=50
        Forward passes per prediction.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    sigma_noise_ : float or ndarray
        Aleatoric noise standard deviation per output.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from skuq import MCDropoutRegressor
    >>> from skuq.datasets import make_gap_regression
    >>> from skuq.nets import MLP
    >>> d = make_gap_regression()
    >>> net = NeuralNetRegressor(MLP, module__dropout=0.1, optimizer=torch.optim.Adam,
    ...                          lr=1e-2, max_epochs=50, train_split=None, verbose=0)
    >>> est = MCDropoutRegressor(net, random_state=0).fit(d.X, d.y)
    >>> mean, std = est.predict(d.X_test, return_std=True)
    >>> bool((std > est.sigma_noise_).all())
    True
    """

    _uses_calibration_split = True  # the noise level is read on held-out rows
