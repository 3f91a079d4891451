"""The SWAG ranking rule: marginal variances of SGD iterates started at the MAP.

Its short training loop is the one part of subnetwork selection that trains;
see :mod:`skuq.laplace.subnetwork` for the other rules.
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .selection import SubnetworkSelection, cpu_generator, data_passes

__all__ = ["LargestVarianceSWAG"]


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
    >>> from skuq.laplace.subnetwork import LargestVarianceSWAG
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
    >>> gen = torch.Generator().manual_seed(0)
    >>> LargestVarianceSWAG(n_epochs=2).select(net, data, 10, generator=gen).shape
    torch.Size([10])
    """

    def __init__(
        self,
        n_epochs: int = 5,
        snapshots_per_epoch: int = 4,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 3e-4,
        batch_size: int = 32,
    ):
        self.n_epochs = n_epochs
        self.snapshots_per_epoch = snapshots_per_epoch
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size

    def scores(self, model, data, *, likelihood="classification", generator=None):
        passes = data_passes(data, "largest_variance_swag")
        for name in ("n_epochs", "snapshots_per_epoch", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        net = copy.deepcopy(model).eval()
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        sizes = [len(x) for x, _ in passes()]
        steps = sum(math.ceil(n / self.batch_size) for n in sizes)
        every = max(1, steps // self.snapshots_per_epoch)
        mean = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        sq = torch.zeros_like(mean)
        n_snap, step = 0, 0
        gen = cpu_generator(generator)
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


def _mean_loss(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    if likelihood == "regression":
        return 0.5 * F.mse_loss(f, y.reshape(f.shape).to(f.dtype))
    return F.cross_entropy(f, y.long())
