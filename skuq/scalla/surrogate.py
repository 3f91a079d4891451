"""ScaLLA's surrogate: the learned feature map ``g`` and its training on the kernel loss.

:class:`SurrogateKernel` wraps a small network into ``x -> (B, C, m)``
features; :func:`fit_surrogate` trains it so that ``g(x) g(x')^T`` matches the
net's neural tangent kernel, from Jacobian-vector products only (see
:mod:`skuq.scalla`). Plain torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import check_option, progress
from ..curvature import WeightSubset
from .probes import MAX_PROBE_ELEMENTS, PROBES, kernel_matching_loss, probe_outputs

__all__ = ["SURROGATES", "SurrogateFit", "SurrogateKernel", "default_surrogate", "fit_surrogate"]

SURROGATES = ("auto", "mlp", "cnn")


# --------------------------------------------------------------------- surrogates
class SurrogateKernel(nn.Module):
    """The learned feature map ``g(x)`` of shape (B, C, m).

    ``g(x) = a sqrt(scale / m) * net(x).reshape(B, C, m)``: ``net`` learns on
    the NTK divided by ``scale`` (its mean diagonal, so the targets are of
    order one), the ``1/sqrt(m)`` keeps the kernel of order one whatever
    ``m``, and the gain ``a = exp(log_gain)`` is learned (started so that the
    initial kernel has mean diagonal one).

    Parameters
    ----------
    net : torch.nn.Module
        Maps a batch of inputs to (B, C * m) (or (B, C, m)).
    n_outputs, n_features : int
        ``C`` and ``m``.
    scale : float, default=1.0

    Examples
    --------
    >>> import torch
    >>> from skuq.scalla import SurrogateKernel
    >>> g = SurrogateKernel(torch.nn.Linear(4, 6), n_outputs=2, n_features=3)
    >>> g(torch.zeros(5, 4)).shape
    torch.Size([5, 2, 3])
    """

    def __init__(self, net: nn.Module, n_outputs: int, n_features: int, scale: float = 1.0):
        super().__init__()
        self.net = net
        self.n_outputs = int(n_outputs)
        self.n_features = int(n_features)
        self.register_buffer("scale", torch.tensor(float(scale)))
        # a learned overall gain (log scale), set from data before training
        self.log_gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        shape = (x.shape[0], self.n_outputs, self.n_features)
        if out.numel() != math.prod(shape):
            raise ValueError(
                f"the surrogate network outputs shape {tuple(out.shape)} per batch but "
                f"ScaLLA needs (batch, {self.n_outputs * self.n_features}) = (batch, "
                f"n_outputs * n_features); fix its last layer"
            )
        factor = torch.sqrt(self.scale / self.n_features) * self.log_gain.exp()
        return out.reshape(shape) * factor


def default_surrogate(
    input_shape: tuple[int, ...], n_outputs: int, *, kind: str = "auto", width: int = 256
) -> nn.Module:
    """The default surrogate network for rows of ``input_shape``.

    ``"mlp"``: flatten, two hidden layers of ``width`` (GELU), linear head.
    ``"cnn"`` (rows shaped ``(channels, H, W)``): two 3x3 conv layers (32 and
    64 channels, GELU, a 2x2 max-pool between them when H, W >= 8), adaptive
    average pooling to 4x4, a hidden layer of ``width``, linear head.
    ``"auto"``: ``"cnn"`` for 3-d rows, ``"mlp"`` otherwise.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one input row.
    n_outputs : int
        Width of the head, ``C * m``.
    kind : {"auto", "mlp", "cnn"}
    width : int, default=256

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> from skuq.scalla import default_surrogate
    >>> default_surrogate((1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    check_option("surrogate", kind, SURROGATES)
    shape = tuple(int(s) for s in input_shape)
    if kind == "auto":
        kind = "cnn" if len(shape) == 3 else "mlp"
    if kind == "cnn":
        if len(shape) != 3:
            raise ValueError(
                f"surrogate='cnn' needs rows shaped (channels, H, W); got rows of shape {shape}"
            )
        c, h, w = shape
        layers: list[nn.Module] = [nn.Conv2d(c, 32, 3, padding=1), nn.GELU()]
        if min(h, w) >= 8:
            layers.append(nn.MaxPool2d(2))
        layers += [
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, width),
            nn.GELU(),
            nn.Linear(width, n_outputs),
        ]
        return nn.Sequential(*layers)
    d = math.prod(shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, n_outputs),
    )


@dataclass
class SurrogateFit:
    """What :func:`fit_surrogate` returns.

    Attributes
    ----------
    kernel : SurrogateKernel
        The trained feature map (in eval mode).
    loss_history : list of float
        Per epoch, the relative kernel error ``sum L_hat / sum ||K||^2_hat``
        over its steps (1 is the error of ``g = 0``).
    n_steps : int

    Examples
    --------
    >>> from torch import nn
    >>> from skuq.scalla import SurrogateFit, SurrogateKernel
    >>> fit = SurrogateFit(SurrogateKernel(nn.Linear(2, 6), n_outputs=2, n_features=3))
    >>> fit.loss_history, fit.n_steps
    ([], 0)
    """

    kernel: SurrogateKernel
    loss_history: list[float] = field(default_factory=list)
    n_steps: int = 0


def _rows(X, idx: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(X[idx]).to(device=device, dtype=dtype)


def fit_surrogate(
    weights: WeightSubset,
    surrogate: nn.Module,
    X,
    *,
    n_outputs: int,
    n_features: int,
    context=None,
    context_weight: float = 1.0,
    probe: str = "rademacher",
    n_probes: int = 16,
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    probe_generator: torch.Generator | None = None,
    max_probe_elements: int = MAX_PROBE_ELEMENTS,
    verbose: int = 0,
) -> SurrogateFit:
    """Train ``g`` so that ``g(x) g(x')^T`` matches the NTK of ``weights``' model.

    Adam on :func:`kernel_matching_loss` with fresh probes every step and a
    cosine learning-rate decay to 0 (the probe noise does not vanish at the
    optimum, the decay averages it out). Batches are drawn from the rows of
    ``X`` and ``context`` together, context rows weighted by
    ``context_weight``. The NTK is first divided by its mean diagonal
    (estimated on up to 512 rows), which ``SurrogateKernel.scale`` restores.

    Parameters
    ----------
    weights : WeightSubset
        Weights (of the trained net, in eval mode) whose Jacobian defines ``K``.
    surrogate : torch.nn.Module
        Maps a batch of rows to (B, C * m); trained in place (on the weights' device).
    X : ndarray or Tensor of shape (N, ...)
        Training inputs.
    n_outputs, n_features : int
        ``C`` and ``m``.
    context : ndarray or Tensor, optional
        Extra rows for the kernel fit (kernel biasing).
    context_weight : float, default=1.0
    probe : {"rademacher", "gaussian"}
    n_probes : int, default=16
        Probes per step (>= 2).
    epochs : int, default=50
        Passes over the rows of ``X`` and ``context``.
    lr : float, default=1e-3
    batch_size : int, default=128
        Rows per step (the loss covers all their pairs).
    generator : torch.Generator, optional
        CPU generator for the batch order.
    probe_generator : torch.Generator, optional
        Generator on the weights' device for the probes.
    max_probe_elements : int
        See :func:`probe_outputs`.
    verbose : int
        Progress bar over epochs when > 0.

    Returns
    -------
    SurrogateFit

    Raises
    ------
    FloatingPointError
        When the loss or the features become non-finite (a diverged surrogate).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> from skuq.scalla import default_surrogate, fit_surrogate
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> fit = fit_surrogate(select_weights(net), default_surrogate((2,), 3 * 4, width=16),
    ...                     torch.randn(64, 2), n_outputs=3, n_features=4, epochs=2)
    >>> fit.kernel(torch.zeros(5, 2)).shape, len(fit.loss_history)
    (torch.Size([5, 3, 4]), 2)
    """
    check_option("probe", probe, PROBES)
    if n_probes < 2:
        raise ValueError(f"n_probes must be an int >= 2, got {n_probes!r}")
    device, dtype = weights.device, weights.dtype
    if len(X) == 0:
        raise ValueError("the surrogate needs at least one training row")
    prober = _Prober(weights, n_probes, probe, probe_generator, max_probe_elements)
    scale = _ntk_scale(prober, X, n_outputs, batch_size)
    kernel = _start_kernel(surrogate, X, n_outputs, n_features, batch_size, device, dtype)
    rows = _RowUnion(X, context, device, dtype)
    opt, sched = _cosine_adam(kernel, lr, epochs * -(-len(rows) // batch_size))
    weight_all = torch.ones(len(rows), dtype=dtype)
    weight_all[len(X) :] = float(context_weight)
    root_scale = math.sqrt(scale)
    history: list[float] = []
    step = 0
    for _epoch in progress(range(epochs), verbose, "ScaLLA surrogate", epochs):
        perm = torch.randperm(len(rows), generator=generator).numpy()
        loss_sum = ksq_sum = 0.0
        for start in range(0, len(rows), batch_size):
            idx = np.sort(perm[start : start + batch_size])
            wb = weight_all[idx].to(device) if rows.n_context else None
            loss, ksq = _kernel_step(kernel, prober, rows(idx), wb, root_scale, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach())
            ksq_sum += float(ksq)
        history.append(loss_sum / ksq_sum if ksq_sum > 0 else float("nan"))
    kernel.scale.fill_(scale)
    kernel.eval()
    for p in kernel.parameters():
        p.requires_grad_(False)
    return SurrogateFit(kernel, history, step)


@dataclass
class _Prober:
    """Probe outputs ``J(x) V`` of one net: fixed probe settings, one generator."""

    weights: WeightSubset
    n_probes: int
    probe: str
    generator: torch.Generator | None
    max_probe_elements: int

    def __call__(self, x: Tensor) -> Tensor:
        return probe_outputs(
            self.weights,
            x,
            self.n_probes,
            self.probe,
            generator=self.generator,
            max_probe_elements=self.max_probe_elements,
        )


class _RowUnion:
    """The rows of ``[X; context]`` by position, as tensors on ``device``."""

    def __init__(self, X, context, device: torch.device, dtype: torch.dtype):
        self.X, self.context, self.device, self.dtype = X, context, device, dtype
        self.n_train = len(X)
        self.n_context = 0 if context is None else len(context)

    def __len__(self) -> int:
        return self.n_train + self.n_context

    def __call__(self, idx: np.ndarray) -> Tensor:
        """Rows at positions ``idx`` (sorted within each part)."""
        n_train = self.n_train
        tr, cx = idx[idx < n_train], idx[idx >= n_train] - n_train
        parts = [_rows(self.X, tr, self.device, self.dtype)] if len(tr) else []
        if len(cx):
            parts.append(_rows(self.context, cx, self.device, self.dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _ntk_scale(prober: _Prober, X, n_outputs: int, batch_size: int) -> float:
    """The NTK's mean diagonal on up to 512 training rows (``g`` learns targets of order one)."""
    device, dtype = prober.weights.device, prober.weights.dtype
    n_scale, sq = min(len(X), 512), 0.0
    for start in range(0, n_scale, batch_size):
        xb = _rows(X, np.arange(start, min(start + batch_size, n_scale)), device, dtype)
        sq += float(prober(xb).double().square().sum())
    scale = sq / (prober.n_probes * n_scale * n_outputs)
    if not math.isfinite(scale):
        raise FloatingPointError(
            "the network's Jacobian-vector products are not finite on the training rows"
        )
    return max(scale, 1e-30)


def _start_kernel(
    surrogate: nn.Module,
    X,
    n_outputs: int,
    n_features: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> SurrogateKernel:
    """The untrained feature map, its gain set so that the mean diagonal of ``g g^T`` is 1."""
    kernel = SurrogateKernel(surrogate, n_outputs, n_features, scale=1.0).to(device, dtype)
    kernel.train()
    with torch.no_grad():
        g0 = kernel(_rows(X, np.arange(min(len(X), batch_size)), device, dtype))
        diag = float(g0.double().square().sum(-1).mean())
        if math.isfinite(diag) and diag > 0:
            kernel.log_gain.fill_(-0.5 * math.log(diag))
    return kernel


def _cosine_adam(kernel: nn.Module, lr: float, n_steps: int):
    """Adam with the learning rate decayed to 0 over ``n_steps`` by a half cosine."""
    opt = torch.optim.Adam(kernel.parameters(), lr=lr)
    total = max(1, n_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    )
    return opt, sched


def _kernel_step(
    kernel: SurrogateKernel,
    prober: _Prober,
    xb: Tensor,
    wb: Tensor | None,
    root_scale: float,
    step: int,
) -> tuple[Tensor, Tensor]:
    """The kernel loss of one batch on fresh probes (targets divided by the NTK's scale)."""
    Z = prober(xb) / root_scale
    loss, ksq = kernel_matching_loss(kernel(xb), Z, wb)
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"the ScaLLA surrogate diverged at step {step} (non-finite kernel loss): "
            "lower surrogate__lr, or give a smaller or better-conditioned surrogate"
        )
    return loss, ksq
