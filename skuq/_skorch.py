"""Everything in skuq that knows skorch: detection, training, criterion outputs, optimizer state.

Method cores and engines never import this module; estimators do, so that the
knowledge of skorch's attributes (``module_``, ``optimizer_``, ``criterion``,
``history``, ``iterator_train__batch_size``) lives in one place.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from ._utils import seeded_global_rng

__all__: list[str] = []


def is_skorch_net(obj) -> bool:
    """Whether ``obj`` is a skorch ``NeuralNet`` (fitted or not)."""
    try:
        from skorch import NeuralNet
    except ImportError:  # pragma: no cover - skorch is a run-time dependency
        return False
    return isinstance(obj, NeuralNet)


def train_net(net, X: np.ndarray, y: np.ndarray, seed: int | None):
    """Fit a (cloned) skorch net. Module level so that ``joblib.Memory`` can cache it.

    With a ``seed``, training draws from a private copy of torch's global RNG
    seeded with it (:func:`skuq._utils.seeded_global_rng`): the run is
    reproducible, the caller's global RNG state (CPU, and the CUDA device trained
    on) is left as it was, and nets trained from several threads at once (joblib's
    threading backend, a grid search over threads) take turns, so each gets
    exactly the draws of a serial run.
    """
    if seed is None:  # the caller's RNG drives training, as a plain skorch fit would
        return net.fit(X, y)
    with seeded_global_rng(seed, [torch.device(net.device or "cpu")]):
        return net.fit(X, y)


def takes_n_outputs(module) -> bool:
    """Whether a module class (or a base of it) takes ``n_outputs`` in ``__init__``."""
    if not inspect.isclass(module):
        return False
    return any(
        "n_outputs" in inspect.signature(cls.__init__).parameters
        for cls in module.__mro__
        if "__init__" in cls.__dict__ and cls is not object
    )


def criterion_outputs(net) -> str:
    """What a skorch net's module returns, read from its criterion."""
    criterion = net.criterion
    cls = criterion if inspect.isclass(criterion) else type(criterion)
    if issubclass(cls, (nn.BCEWithLogitsLoss, nn.BCELoss)):
        # one output for two classes: the posteriors and links here work on one logit
        # per class, and a constant second logit would defeat the last-layer routes
        raise TypeError(
            f"{type(net).__name__} with {cls.__name__} gives one output for two classes; "
            "skuq's classifiers need one logit per class: use skorch's NeuralNetClassifier "
            "with criterion=torch.nn.CrossEntropyLoss and two outputs (e.g. "
            "skuq.nets.MLP, which sizes its output from the classes)"
        )
    return "probabilities" if issubclass(cls, nn.NLLLoss) else "logits"


def trained_optimizer(net):
    """The optimizer a fitted skorch net trained with (``None`` for anything else)."""
    return getattr(net, "optimizer_", None) if is_skorch_net(net) else None


def training_batch_size(net, n_train: int, default: int) -> int:
    """The mini-batch size a net trained with, at most ``n_train``.

    A skorch net's ``iterator_train__batch_size`` (else its ``batch_size``; ``-1``
    or ``None`` meaning full batch); ``default`` for a plain module.
    """
    if not is_skorch_net(net):
        return min(default, n_train)
    params = net.get_params()
    b = params.get("iterator_train__batch_size", net.batch_size)
    return n_train if b is None or b < 0 else min(int(b), n_train)


def last_epoch_batch_sizes(net) -> list[int] | None:
    """Sizes of the training batches of a skorch net's last epoch (its history), if known."""
    history = getattr(net, "history", None)
    if not history or "batches" not in history[-1]:
        return None
    sizes = [b["train_batch_size"] for b in history[-1]["batches"] if "train_batch_size" in b]
    return sizes or None


#: a loss on some rows within this multiple of a net's last training-epoch loss looks
#: like its training rows (held-out rows of the benchmark nets: 2.8x to 400x)
FITTED_ROWS_LOSS_RATIO = 2.0


def last_training_loss(net) -> float | None:
    """The mean training loss of a skorch net's last epoch, or None when not recorded."""
    history = getattr(net, "history", None)
    try:
        loss = float(history[-1, "train_loss"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return loss if np.isfinite(loss) and loss > 0 else None


def loss_like_training(net, loss: float, criteria: tuple[type, ...]) -> float | None:
    """The net's last training-epoch loss when ``loss`` looks like a loss on its training rows.

    ``loss`` is the mean of the net's own criterion on some rows; rows the net was
    trained on have a loss near its training loss, held-out rows of a net that fits
    its training rows closely sit far above it. Returns the training loss when
    ``loss`` is at most :data:`FITTED_ROWS_LOSS_RATIO` times it, else None (also when
    the net's criterion is not one of ``criteria``, or no training loss is recorded:
    a ``torch.nn.Module``).
    """
    if not isinstance(getattr(net, "criterion_", None), criteria):
        return None
    train = last_training_loss(net)
    if train is None or not np.isfinite(loss) or loss > FITTED_ROWS_LOSS_RATIO * train:
        return None
    return train
