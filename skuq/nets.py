"""Small reference networks for examples, tests and benchmarks, and the logit view of a net."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "logit_model"]


class MLP(nn.Sequential):
    """A multilayer perceptron that infers its input width on the first batch.

    Parameters
    ----------
    n_outputs : int, default=2
        Output width: classes (logits) or regression targets. skuq estimators
        set it from ``y`` when the net is trained inside ``fit``.
    hidden : sequence of int, default=(64, 64)
        Hidden layer widths.
    activation : type of nn.Module, default=nn.ReLU
    dropout : float, default=0.0
        Dropout after each hidden activation (needed by MC dropout).

    Examples
    --------
    >>> import torch
    >>> from skuq.nets import MLP
    >>> MLP(n_outputs=3, hidden=(8,))(torch.zeros(5, 4)).shape
    torch.Size([5, 3])
    """

    def __init__(
        self,
        n_outputs: int = 2,
        hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.LazyLinear(width), activation()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.LazyLinear(n_outputs))
        super().__init__(*layers)


class SmallCNN(nn.Sequential):
    """Two conv blocks and a linear head, for ``(N, channels, H, W)`` images.

    Parameters
    ----------
    n_outputs : int, default=10
    channels : tuple of int, default=(16, 32)
    hidden : int, default=128
    batch_norm : bool, default=False
    dropout : float, default=0.0

    Examples
    --------
    >>> import torch
    >>> from skuq.nets import SmallCNN
    >>> SmallCNN(n_outputs=4)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 4])
    """

    def __init__(
        self,
        n_outputs: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = []
        for c in channels:
            layers.append(nn.LazyConv2d(c, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, n_outputs))
        super().__init__(*layers)


class _LogOfProbabilities(nn.Module):
    """Turns a module that outputs probabilities into one that outputs logits."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        # one named input (not *args), so that torch.fx can trace it (CVP); CVP
        # fuses log(softmax(.).clamp_min(eps)) into one log-softmax
        return torch.log(self.module(x).clamp_min(1e-30))


def logit_model(module: nn.Module, outputs: str) -> nn.Module:
    """The model whose outputs are logits, sharing ``module``'s parameters.

    ``outputs="probabilities"`` is skorch's convention for ``NLLLoss`` nets (the
    module ends in a softmax and skorch takes the log in its loss). A trailing
    ``nn.Softmax`` in an ``nn.Sequential`` is dropped, which recovers the exact
    pre-softmax logits; otherwise the log of the probabilities is used
    (``softmax(log p) = p``, so those are valid logits too).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.nets import logit_model
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=-1))
    >>> f = logit_model(net, "probabilities")
    >>> x = torch.ones(1, 2)
    >>> torch.allclose(f(x), net[0](x))
    True
    """
    if outputs == "logits":
        return module
    if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Softmax):
        # a plain Sequential: slicing a subclass would call its own __init__
        return nn.Sequential(*list(module.children())[:-1])
    return _LogOfProbabilities(module)
