"""ScaLLA: linearized Laplace through a learned surrogate of the neural tangent kernel.

The linearized Laplace approximation (LLA) of a trained net ``f(x; theta*)``
is a Gaussian process with kernel ``K(x, x') = J(x) J(x')^T`` (the NTK at
``theta*``, ``C x C`` per pair of rows). ScaLLA (arXiv 2601.21835) learns a
small network ``g: x -> R^{C x m}`` whose inner product reproduces it,
``g(x) g(x')^T ~= K(x, x')``, and then does Laplace in the ``m``-dimensional
feature space:

* **Kernel fit from JVPs only.** For random probes ``v`` with
  ``E[v v^T] = I`` (Rademacher or Gaussian), ``z = J(x) v`` is one
  Jacobian-vector product and ``E[z(x) z(x')^T] = K(x, x')``. With ``S``
  probes per step, the stacked batch features ``G`` (``BC x m``) and probe
  outputs ``Z`` (``BC x S``),

      ||G^T G||^2 - (2/S) ||G^T Z||^2 + sum_{s != t} (z_s^T z_t)^2 / (S (S-1))

  is an unbiased estimate of the kernel-matching loss
  ``sum_{ij} ||g_i g_j^T - K_ij||_F^2`` (:func:`kernel_matching_loss`): the
  middle term is linear in ``Z Z^T / S`` and the last is a U-statistic for
  ``||K||_F^2``. The Jacobian is never formed; probes are drawn in chunks of at
  most ``max_probe_elements`` entries, so memory stays flat in ``P`` beyond
  the net itself (about two weight vectors: the one the JVPs take and one
  probe).
* **Feature-space Laplace.** ``A = tau I_m + sum_n g_n^T Lambda_n g_n`` and
  ``Var f(x*) = g(x*) A^-1 g(x*)^T`` (:func:`feature_posterior`), with the
  shared :class:`~skuq.posterior.FullPosterior` engine. The evidence is the
  weight-space Laplace evidence ``log p(D|theta*) - tau ||theta*||^2 / 2 -
  log det(I + G / tau) / 2``: when the learned kernel equals the NTK on the
  training rows and ``m >= rank J``, ``G`` and the GGN ``H`` have the same
  non-zero spectrum, so ``tau`` by marginal likelihood is the full LLA's
  prior precision, and the predictive equals the full LLA's wherever the
  kernel matches (the GP form of the LLA depends on kernel values only).
* **Kernel biasing with context points** (the paper's biased kernel; its
  exact recipe is not in the seed, this is our choice). Rows passed as
  ``context`` (e.g. an OOD proxy set) join the kernel fit, with weight
  ``context_weight`` on their pairs, but not the likelihood. The ``m``
  features then have to represent the NTK at those rows as well, so the
  predictive variance there is not lost to a surrogate that only ever saw
  training inputs. Limitation (as the paper states): this helps only where
  the context set resembles the OOD inputs met at test time; context far from
  them spends feature capacity for nothing.

What the surrogate learns. The Frobenius loss weighs a kernel direction by
its squared eigenvalue, and NTK spectra span many decades, so ``g`` learns
the top directions first -- like a Nystrom or low-rank LLA (laplace-torch's
ELLA). Directions far below the top, which the exact LLA variance still
counts where their eigenvalue exceeds the prior precision, are learned
slowly or not at all; the tests measure this on a tiny net.

Our choices besides: fresh probes every step (memory flat in ``N``), Adam
with a cosine decay, targets divided by the NTK's mean diagonal, a learned
output gain started at that scale, and a default surrogate built from the
input shape (:func:`default_surrogate`).

The core (:func:`draw_probes`, :func:`probe_outputs`,
:func:`kernel_matching_loss`, :func:`default_surrogate`,
:func:`fit_surrogate`, :func:`feature_posterior`, :func:`scalla_predictive`)
is plain torch; :class:`ScaLLAClassifier` is the scikit-learn face.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ._utils import (
    check_option,
    check_positive,
    check_positive_int,
    iter_batches,
    make_generator,
    progress,
    seeded_global_rng,
)
from .base import BaseUQEstimator, UQClassifierMixin
from .curvature import WeightSubset, hessian_sqrt, jvp_batch, select_weights, sum_loss
from .laplace import HELDOUT_GRID, _fingerprint
from .outputs import LINKS, OutputDistribution
from .posterior import FullPosterior, augment_centered
from .predictive import gaussian_predictive

__all__ = [
    "PROBES",
    "SURROGATES",
    "FeaturePosterior",
    "ScaLLAClassifier",
    "SurrogateFit",
    "clear_surrogate_cache",
    "SurrogateKernel",
    "default_surrogate",
    "draw_probes",
    "feature_posterior",
    "fit_surrogate",
    "kernel_matching_loss",
    "probe_outputs",
    "scalla_predictive",
]

PROBES = ("rademacher", "gaussian")
PRIOR_METHODS = ("marglik", "heldout")
SURROGATES = ("auto", "mlp", "cnn")
#: the most probe entries (probes x weights) drawn at once
MAX_PROBE_ELEMENTS = 2**21


# ------------------------------------------------------------------------ probes
def draw_probes(
    n_probes: int,
    n_params: int,
    probe: str = "rademacher",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random weight-space directions ``v`` with ``E[v v^T] = I``, shape (n_probes, P).

    Parameters
    ----------
    n_probes, n_params : int
    probe : {"rademacher", "gaussian"}
        Entries +-1 with probability 1/2 each (lower variance of ``v^T A v``
        than Gaussian: no fourth-moment excess on the diagonal), or N(0, 1).
    generator : torch.Generator, optional
        On ``device``.
    device, dtype

    Returns
    -------
    Tensor of shape (n_probes, n_params)

    Examples
    --------
    >>> import torch
    >>> from skuq.scalla import draw_probes
    >>> v = draw_probes(2, 5, generator=torch.Generator().manual_seed(0))
    >>> v.shape, bool((v.abs() == 1).all())
    (torch.Size([2, 5]), True)
    """
    check_option("probe", probe, PROBES)
    shape = (n_probes, n_params)
    if probe == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    # in place on one float tensor: no integer intermediates the size of the probes
    out = torch.empty(shape, device=device, dtype=dtype)
    return out.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)


def probe_outputs(
    weights: WeightSubset,
    x: Tensor,
    n_probes: int,
    probe: str = "rademacher",
    *,
    generator: torch.Generator | None = None,
    max_probe_elements: int = MAX_PROBE_ELEMENTS,
) -> Tensor:
    """``z_s = J(x) v_s`` for ``n_probes`` fresh random probes, by JVPs only.

    Probes are drawn and pushed forward in chunks of at most
    ``max_probe_elements`` entries (at least one probe), so the memory beyond
    the net is one weight vector, one chunk of probes and the tangents of one
    forward pass -- never a ``B x C x P`` Jacobian.

    Parameters
    ----------
    weights : WeightSubset
        The weights whose Jacobian defines the kernel (usually all of them).
    x : Tensor of shape (B, ...)
    n_probes : int
    probe : {"rademacher", "gaussian"}
    generator : torch.Generator, optional
        On the weights' device.
    max_probe_elements : int

    Returns
    -------
    Tensor of shape (n_probes, B, C)
        ``E[z_s(x_i) z_s(x_j)^T] = J(x_i) J(x_j)^T``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> from skuq.scalla import probe_outputs
    >>> w = select_weights(torch.nn.Linear(3, 2))
    >>> probe_outputs(w, torch.ones(4, 3), 6).shape
    torch.Size([6, 4, 2])
    """
    P = weights.n_params
    chunk = max(1, min(n_probes, int(max_probe_elements) // max(P, 1)))
    parts = []
    with torch.no_grad():
        for start in range(0, n_probes, chunk):
            k = min(chunk, n_probes - start)
            V = draw_probes(k, P, probe, generator=generator, device=weights.device,
                            dtype=weights.dtype)
            jv, _ = jvp_batch(weights, x, V.T)  # rows of V are contiguous probes
            parts.append(jv)
            del V
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def kernel_matching_loss(
    features: Tensor, probes: Tensor, row_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Unbiased JVP estimate of the kernel-matching loss over all pairs of a batch.

    The loss is ``L = sum_{ij} w_i w_j ||g_i g_j^T - K_ij||_F^2 / (sum_i w_i)^2``
    with ``K_ij = J(x_i) J(x_j)^T``; from probe outputs ``Z`` (``E[Z Z^T] = S K``)

        L_hat = ||G^T G||^2 - (2/S) ||G^T Z||^2 + (||Z^T Z||^2 - sum_s ||z_s||^4) / (S(S-1))

    (rows scaled by ``sqrt(w)``) has ``E[L_hat] = L`` exactly: the middle term
    is linear in ``Z Z^T`` and the last is a U-statistic for ``||K||^2`` over
    pairs of distinct, independent probes. Gradients flow through ``features``.

    Parameters
    ----------
    features : Tensor of shape (B, C, m)
        Surrogate features ``g(x_i)``.
    probes : Tensor of shape (S, B, C)
        Probe outputs ``J(x_i) v_s`` (``S >= 2``), see :func:`probe_outputs`.
    row_weights : Tensor of shape (B,), optional
        Non-negative weight per row (context rows); default all ones.

    Returns
    -------
    loss : Tensor, scalar
        The unbiased estimate ``L_hat`` (may be slightly negative by chance).
    kernel_sq : Tensor, scalar
        The unbiased estimate of ``sum_ij w_i w_j ||K_ij||^2 / (sum w)^2``, so
        that ``loss / kernel_sq`` is the relative kernel error.

    Examples
    --------
    >>> import torch
    >>> from skuq.scalla import kernel_matching_loss
    >>> Z = torch.randn(8, 4, 2)
    >>> loss, ksq = kernel_matching_loss(torch.zeros(4, 2, 3), Z)
    >>> torch.allclose(loss, ksq)  # g = 0: the loss is ||K||^2
    True
    """
    B, C, m = features.shape
    S = probes.shape[0]
    if S < 2:
        raise ValueError("the unbiased kernel loss needs at least 2 probes")
    if probes.shape[1:] != (B, C):
        raise ValueError(
            f"probes must have shape (S, {B}, {C}) to match features, got {tuple(probes.shape)}"
        )
    G = features.reshape(B * C, m)
    Z = probes.permute(1, 2, 0).reshape(B * C, S).to(G.dtype)
    if row_weights is None:
        norm = float(B) ** 2
    else:
        w = row_weights.to(G.dtype)
        root = w.clamp_min(0).sqrt().repeat_interleave(C).unsqueeze(1)
        G, Z = G * root, Z * root
        norm = w.sum() ** 2
    gg = (G.T @ G).square().sum()
    gz = (G.T @ Z).square().sum() / S
    ZtZ = Z.T @ Z
    kk = (ZtZ.square().sum() - torch.diagonal(ZtZ).square().sum()) / (S * (S - 1))
    return (gg - 2 * gz + kk) / norm, kk / norm


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
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, width), nn.GELU(), nn.Linear(width, n_outputs),
        ]
        return nn.Sequential(*layers)
    d = math.prod(shape)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
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
    n_train = len(X)
    n_ctx = 0 if context is None else len(context)
    if n_train == 0:
        raise ValueError("the surrogate needs at least one training row")

    def rows(idx: np.ndarray) -> Tensor:
        """Rows of the union [X; context] at positions ``idx`` (sorted within each part)."""
        tr, cx = idx[idx < n_train], idx[idx >= n_train] - n_train
        parts = [_rows(X, tr, device, dtype)] if len(tr) else []
        if len(cx):
            parts.append(_rows(context, cx, device, dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # the NTK's mean diagonal, so that the surrogate learns targets of order one
    n_scale, sq = min(n_train, 512), 0.0
    for start in range(0, n_scale, batch_size):
        xb = _rows(X, np.arange(start, min(start + batch_size, n_scale)), device, dtype)
        z = probe_outputs(weights, xb, n_probes, probe, generator=probe_generator,
                          max_probe_elements=max_probe_elements)
        sq += float(z.double().square().sum())
    scale = sq / (n_probes * n_scale * n_outputs)
    if not math.isfinite(scale):
        raise FloatingPointError(
            "the network's Jacobian-vector products are not finite on the training rows"
        )
    scale = max(scale, 1e-30)
    kernel = SurrogateKernel(surrogate, n_outputs, n_features, scale=1.0).to(device, dtype)
    kernel.train()
    with torch.no_grad():  # start at the right overall scale: mean diagonal of g g^T = 1
        g0 = kernel(_rows(X, np.arange(min(n_train, batch_size)), device, dtype))
        diag = float(g0.double().square().sum(-1).mean())
        if math.isfinite(diag) and diag > 0:
            kernel.log_gain.fill_(-0.5 * math.log(diag))
    opt = torch.optim.Adam(kernel.parameters(), lr=lr)
    n_all = n_train + n_ctx
    steps_per_epoch = -(-n_all // batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    )
    weight_all = torch.ones(n_all, dtype=dtype)
    weight_all[n_train:] = float(context_weight)
    root_scale = math.sqrt(scale)
    history: list[float] = []
    step = 0
    for _epoch in progress(range(epochs), verbose, "ScaLLA surrogate", epochs):
        perm = torch.randperm(n_all, generator=generator).numpy()
        loss_sum = ksq_sum = 0.0
        for start in range(0, n_all, batch_size):
            idx = np.sort(perm[start : start + batch_size])
            xb = rows(idx)
            wb = weight_all[idx].to(device) if n_ctx else None
            Z = probe_outputs(weights, xb, n_probes, probe, generator=probe_generator,
                              max_probe_elements=max_probe_elements) / root_scale
            loss, ksq = kernel_matching_loss(kernel(xb), Z, wb)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"the ScaLLA surrogate diverged at step {step} (non-finite kernel loss): "
                    "lower surrogate_lr, or give a smaller or better-conditioned surrogate"
                )
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


# ------------------------------------------------------------- feature Laplace
class FeaturePosterior(FullPosterior):
    """Gaussian over the ``m`` feature weights: ``N(0, (s G + tau I)^-1)``.

    The linear model ``f(x) = f(x; theta*) + g(x) w`` with prior ``w ~ N(0,
    I / tau)`` has the prior kernel ``g g^T / tau ~= J J^T / tau`` of the
    weight-space LLA, so ``tau`` plays the role of the weight prior precision
    ``delta``. The evidence keeps the weight-space prior term ``tau
    ||theta*||^2 / 2`` (:meth:`scatter`), so that maximizing it reproduces
    the full LLA's ``delta`` when ``G`` has the GGN's non-zero spectrum.

    Parameters
    ----------
    curvature : Tensor of shape (m, m)
        ``G = sum_n g_n^T Lambda_n g_n``.
    theta_sq_norm : float
        ``||theta*||^2`` of the net's weights.
    **kwargs
        See :class:`~skuq.posterior.WeightPosterior` (``prior_precision``,
        ``loss``, ``n_data``, ``n_outputs``...).

    Examples
    --------
    >>> import torch
    >>> from skuq.scalla import FeaturePosterior
    >>> post = FeaturePosterior(torch.eye(2), theta_sq_norm=4.0, prior_precision=1.0, loss=1.0)
    >>> float(post.scatter())
    4.0
    """

    structure = "feature"

    def __init__(self, curvature: Tensor, *, theta_sq_norm: float, **kwargs):
        m = curvature.shape[0]
        self.theta_sq_norm = float(theta_sq_norm)
        super().__init__(torch.zeros(m, dtype=curvature.dtype, device=curvature.device),
                         curvature, **kwargs)

    def scatter(self, prior_precision=None) -> Tensor:
        """``tau ||theta*||^2``: the weight-space prior term at the MAP."""
        d = self.prior_precision if prior_precision is None else prior_precision
        return torch.as_tensor(d, dtype=self.mean.dtype) * self.theta_sq_norm


def feature_posterior(
    model: nn.Module,
    kernel: nn.Module,
    batches,
    *,
    theta_sq_norm: float,
    prior_precision: float | str = "marglik",
) -> FeaturePosterior:
    """Laplace in feature space over the training batches.

    One pass: ``G = sum_n (L_n^T g_n)^T (L_n^T g_n)`` with ``L L^T = Lambda``
    the softmax cross-entropy Hessian at the net's logits
    (:func:`skuq.curvature.hessian_sqrt`), and the summed training loss for
    the evidence; accumulated in float64.

    Parameters
    ----------
    model : torch.nn.Module
        The trained logit net.
    kernel : torch.nn.Module
        The feature map, ``x -> (B, C, m)``.
    batches : iterable of (x, y)
        Training batches on the model's device.
    theta_sq_norm : float
        ``||theta*||^2``.
    prior_precision : float or "marglik", default="marglik"
        ``tau``; ``"marglik"`` maximizes the evidence (see :class:`FeaturePosterior`).

    Returns
    -------
    FeaturePosterior

    Examples
    --------
    >>> import torch
    >>> from skuq.scalla import SurrogateKernel, feature_posterior
    >>> net = torch.nn.Linear(3, 2)
    >>> g = SurrogateKernel(torch.nn.Linear(3, 8), n_outputs=2, n_features=4)
    >>> data = [(torch.randn(10, 3), torch.randint(0, 2, (10,)))]
    >>> post = feature_posterior(net, g, data, theta_sq_norm=1.0, prior_precision=2.0)
    >>> post.functional_variance(g(torch.randn(5, 3)).double()).shape
    torch.Size([5, 2, 2])
    """
    gram, loss, n = None, 0.0, 0
    with torch.no_grad():
        for xb, yb in batches:
            f = model(xb).double()
            G = kernel(xb).double()
            if not (bool(torch.isfinite(G).all()) and bool(torch.isfinite(f).all())):
                raise FloatingPointError(
                    "the surrogate features or the network outputs are not finite on the "
                    "training rows: the surrogate diverged (lower surrogate_lr) or the net did"
                )
            LG = hessian_sqrt(f, "classification").transpose(1, 2) @ G  # (B, C, m)
            part = torch.einsum("bck,bcl->kl", LG, LG)
            gram = part if gram is None else gram + part
            loss += float(sum_loss(f, yb, "classification"))
            n += len(xb)
    if gram is None:
        raise ValueError("feature_posterior needs at least one training batch")
    fit_prior = isinstance(prior_precision, str)
    if fit_prior:
        check_option("prior_precision", prior_precision, ("marglik",))
    post = FeaturePosterior(
        gram, theta_sq_norm=theta_sq_norm, prior_precision=1.0 if fit_prior else prior_precision,
        loss=loss, n_data=n, n_outputs=int(f.shape[1]),
    )
    if fit_prior:
        post.optimize_prior_precision("scalar")
    return post


def scalla_predictive(
    model: nn.Module, kernel: nn.Module, posterior: FullPosterior, x: Tensor,
    center: bool = False,
) -> OutputDistribution:
    """``N(f(x; theta*), g(x) A^-1 g(x)^T)`` for a batch ``x``.

    ``center=True`` also gives the covariance of the centered logits ``P f``,
    from the centered features ``P g(x)`` (see
    :func:`skuq.posterior.augment_centered`), as ``centered_covariance``.

    Examples
    --------
    >>> import torch
    >>> from skuq.scalla import FeaturePosterior, SurrogateKernel, scalla_predictive
    >>> g = SurrogateKernel(torch.nn.Linear(3, 8), n_outputs=2, n_features=4)
    >>> post = FeaturePosterior(torch.eye(4, dtype=torch.float64), theta_sq_norm=1.0)
    >>> scalla_predictive(torch.nn.Linear(3, 2), g, post, torch.zeros(5, 3)).variance.shape
    torch.Size([5, 2])
    """
    with torch.no_grad():
        mean = model(x)
        G = kernel(x).double()
        cov = posterior.functional_variance(augment_centered(G) if center else G)
    return gaussian_predictive(mean.float(), cov, center)


# ------------------------------------------------------------------- estimator
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 8


def clear_surrogate_cache() -> None:
    """Forget the surrogate kernels kept in memory by :class:`ScaLLAClassifier`.

    A fitted surrogate is kept, keyed on the net (architecture and weights),
    the rows of ``X`` and ``context`` and every option that shapes the
    surrogate (and the seed), so that refitting with another
    ``prior_precision`` or ``link_approx`` -- a grid search -- trains it once.

    Examples
    --------
    >>> from skuq.scalla import clear_surrogate_cache
    >>> clear_surrogate_cache()
    """
    _CACHE.clear()


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class ScaLLAClassifier(UQClassifierMixin, BaseUQEstimator):
    """Linearized Laplace at scale through a learned surrogate of the NTK (ScaLLA).

    A small network ``g`` (the surrogate) is trained so that ``g(x) g(x')^T``
    (``C x C`` per pair of rows, ``g(x)`` of shape ``C x m``) matches the
    neural tangent kernel ``J(x) J(x')^T`` of the trained net, from
    Jacobian-vector products with random probes only (the Jacobian is never
    formed). Laplace then runs in the ``m``-dimensional feature space:
    ``A = tau I + sum_n g_n^T Lambda_n g_n``, ``Var f(x) = g(x) A^-1
    g(x)^T``, ``tau`` by marginal likelihood or given. Prediction costs one
    forward pass of the net and one of the surrogate -- no Jacobian, no JVP.
    See :mod:`skuq.scalla` for the estimator of the loss and the evidence.
    The trained surrogate is kept (see :func:`clear_surrogate_cache`), so a
    grid search over ``prior_precision`` or ``link_approx`` with a fixed
    ``random_state`` trains it once per fold.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        The network (see :class:`skuq.base.BaseUQEstimator`).
    n_features : int, default=128
        ``m``, the surrogate's features per output. With ``m`` at least the
        rank of the training Jacobian (and enough training) the kernel and
        the predictive match the full linearized Laplace.
    probe : {"rademacher", "gaussian"}, default="rademacher"
        Distribution of the probe vectors of the JVPs.
    n_probes : int, default=16
        Probes per training step (>= 2); more lowers the gradient noise.
    surrogate : {"auto", "mlp", "cnn"}, torch.nn.Module or callable, default="auto"
        The surrogate network. ``"auto"`` builds one from the net's input
        shape (a CNN for ``(channels, H, W)`` rows, an MLP otherwise, see
        :func:`default_surrogate`); a module (copied, then trained) or a
        callable ``(input_shape, n_outputs * n_features) -> nn.Module`` must
        map a batch of rows to ``(batch, n_outputs * n_features)``.
    surrogate_width : int, default=256
        Hidden width of the default surrogates.
    surrogate_epochs : int, default=50
        Passes over the training (and context) rows.
    surrogate_lr : float, default=1e-3
        Adam's learning rate (cosine-decayed to 0).
    surrogate_batch_size : int, default=128
        Rows per step; the loss covers all pairs of them.
    context_weight : float, default=1.0
        Weight of the context rows (``fit(..., context=...)``) in the kernel fit.
    prior_precision : float, "marglik" or "heldout", default="marglik"
        ``tau``. ``"marglik"`` maximizes the Laplace evidence in feature space
        (no pass over data); ``"heldout"`` picks the value on a log grid
        (1e-4..1e4) with the lowest NLL on a held-out split (see
        ``calibration_fraction``; the features of the split are computed
        once); a float is used as is and can be grid-searched without
        retraining the net.
    calibration_fraction : float, default=0.2
        Share of the rows held out for ``prior_precision="heldout"`` when the
        net is trained in ``fit`` (the net, the surrogate and the curvature
        then use the rest); an already trained net uses all of ``fit``'s data,
        or pass ``X_cal``, ``y_cal`` to ``fit``.
    link_approx : {"probit", "centered_probit", "mc", "bridge"}, default="centered_probit"
        From the Gaussian over logits to probabilities (see
        :meth:`skuq.outputs.OutputDistribution.probabilities`). The default
        drops the variance of the shift shared by all logits, which softmax
        ignores (:func:`~skuq.outputs.centered_probit_probabilities`).
    n_samples : int, default=100
        Logit draws for ``link_approx="mc"``.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    classes_ : ndarray
    surrogate_ : SurrogateKernel
        The trained feature map ``x -> (B, C, m)``.
    surrogate_loss_ : ndarray
        Relative kernel error per epoch (unbiased JVP estimate; 1 = ``g = 0``).
    kernel_scale_ : float
        Mean diagonal of the NTK on the training rows (the surrogate's scale).
    posterior_ : FeaturePosterior
    prior_precision_ : float
    heldout_nll_ : dict
        Mean held-out NLL per grid value (``prior_precision="heldout"`` only).
    n_params_ : int
        Weights of the net (the kernel's ``P``).

    Notes
    -----
    Kernel biasing: ``fit(X, y, context=X_ctx)`` adds the rows ``X_ctx``
    (for instance an OOD proxy set, no labels) to the kernel fit so that the
    features also represent the NTK there; the Laplace curvature uses the
    training rows only. It helps OOD detection to the extent that the context
    set resembles the OOD inputs met later (the paper's stated limitation).

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import ScaLLAClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = ScaLLAClassifier(net, n_features=16, surrogate_epochs=3, random_state=0)
    >>> est = est.fit(d.X_train, d.y_train, context=1 - d.X_train[:50])  # inverted digits
    >>> est.predict_proba(d.X_test).shape == (len(d.X_test), 5)
    True
    """

    _extra_fit_params = ("context",)

    @property
    def _uses_calibration_split(self) -> bool:  # a held-out split only when asked for
        return isinstance(self.prior_precision, str) and self.prior_precision == "heldout"

    def __init__(
        self, estimator, *, n_features=128, probe="rademacher", n_probes=16, surrogate="auto",
        surrogate_width=256, surrogate_epochs=50, surrogate_lr=1e-3, surrogate_batch_size=128,
        context_weight=1.0, prior_precision="marglik", link_approx="centered_probit", n_samples=100,
        calibration_fraction=0.2, device="auto", batch_size=256, random_state=None, verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.n_features = n_features
        self.probe = probe
        self.n_probes = n_probes
        self.surrogate = surrogate
        self.surrogate_width = surrogate_width
        self.surrogate_epochs = surrogate_epochs
        self.surrogate_lr = surrogate_lr
        self.surrogate_batch_size = surrogate_batch_size
        self.context_weight = context_weight
        self.prior_precision = prior_precision
        self.link_approx = link_approx
        self.n_samples = n_samples
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    # ------------------------------------------------------------------ options
    def _validate_options(self) -> None:
        if not (isinstance(self.n_features, numbers.Integral)
                and not isinstance(self.n_features, bool) and self.n_features >= 1):
            raise ValueError(
                f"n_features (m, the surrogate's features per output) must be an int >= 1, "
                f"got {self.n_features!r}"
            )
        check_option("probe", self.probe, PROBES)
        check_positive_int("n_probes", self.n_probes)
        if self.n_probes < 2:
            raise ValueError(
                f"n_probes must be >= 2 (the kernel loss pairs distinct probes), got "
                f"{self.n_probes!r}"
            )
        s = self.surrogate
        if isinstance(s, str):
            check_option("surrogate", s, SURROGATES)
        elif not (isinstance(s, nn.Module) or callable(s)):
            raise TypeError(
                f"surrogate must be one of {SURROGATES}, a torch.nn.Module or a callable "
                f"(input_shape, n_outputs) -> nn.Module; got {type(s).__name__}"
            )
        check_positive_int("surrogate_width", self.surrogate_width)
        check_positive_int("surrogate_epochs", self.surrogate_epochs)
        check_positive("surrogate_lr", self.surrogate_lr)
        check_positive_int("surrogate_batch_size", self.surrogate_batch_size)
        check_positive("context_weight", self.context_weight)
        pp = self.prior_precision
        if isinstance(pp, str):
            check_option("prior_precision", pp, PRIOR_METHODS)
            if pp == "heldout":
                check_positive("calibration_fraction", self.calibration_fraction)
        elif _is_real(pp):
            check_positive("prior_precision", pp)
        else:
            raise ValueError(
                f"prior_precision must be a float > 0 or one of {PRIOR_METHODS}, got {pp!r}"
            )
        check_option("link_approx", self.link_approx, LINKS)
        check_positive_int("n_samples", self.n_samples)

    # ---------------------------------------------------------------------- fit
    def fit(self, X, y, **fit_params):
        """Train the wrapped net (unless trained), the surrogate kernel, then the posterior.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        y : array-like of shape (n_samples,)
        context : array-like of shape (n_context, ...), optional
            Unlabelled rows shaped like ``X`` (e.g. an OOD proxy set) added to
            the kernel fit (kernel biasing); checked before the net is trained.

        Returns
        -------
        self
        """
        context = fit_params.get("context")
        if context is not None:
            ctx_shape = np.shape(context)
            x_shape = np.shape(X)
            if len(ctx_shape) < 2 or ctx_shape[0] == 0 or ctx_shape[1:] != x_shape[1:]:
                raise ValueError(
                    f"context must be a non-empty array of rows shaped like X's "
                    f"{tuple(x_shape[1:])}; got an array of shape {tuple(ctx_shape)}"
                )
        return super().fit(X, y, **fit_params)

    def _build_surrogate(self, n_out: int) -> nn.Module:
        s = self.surrogate
        if isinstance(s, str):
            return default_surrogate(self._input_shape, n_out, kind=s, width=self.surrogate_width)
        if isinstance(s, nn.Module):
            return copy.deepcopy(s)
        module = s(self._input_shape, n_out)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"the surrogate callable must return a torch.nn.Module, got {type(module).__name__}"
            )
        return module

    def _fit_uq(self, X, y, X_cal=None, y_cal=None, context=None) -> None:
        ctx = None
        if context is not None:
            try:
                ctx = self._validate_predict_data(context, what="context")
            except ValueError as exc:
                raise ValueError(f"context: {exc}") from exc
        weights = select_weights(self.model_, "all")
        fit = self._surrogate_fit(weights, X, ctx)
        theta_sq = sum(float(torch.linalg.vector_norm(p.detach())) ** 2 for p in weights.params())
        batches = iter_batches(X, y, batch_size=self.batch_size, device=self.device_)
        pp = self.prior_precision
        if not isinstance(pp, str):
            pp = float(pp)
        self.posterior_ = feature_posterior(
            self.model_, fit.kernel, batches, theta_sq_norm=theta_sq,
            prior_precision=1.0 if pp == "heldout" else pp,
        )
        self.surrogate_ = fit.kernel
        if pp == "heldout":
            self._heldout_prior(X_cal, y_cal)
        self.surrogate_loss_ = np.asarray(fit.loss_history)
        self.kernel_scale_ = float(fit.kernel.scale)
        self.prior_precision_ = float(self.posterior_.prior_precision)
        self.n_params_ = weights.n_params

    def _surrogate_fit(self, weights, X, ctx) -> SurrogateFit:
        """The trained surrogate, from the cache when the same one was trained before."""
        m = int(self.n_features)
        options = dict(
            n_features=m, probe=self.probe, n_probes=int(self.n_probes),
            surrogate=self.surrogate, surrogate_width=int(self.surrogate_width),
            surrogate_epochs=int(self.surrogate_epochs), surrogate_lr=float(self.surrogate_lr),
            surrogate_batch_size=int(self.surrogate_batch_size),
            context_weight=float(self.context_weight), seed=self._seed,
            device=str(self.device_), n_outputs=self.n_outputs_,
        )
        key = None
        if isinstance(self.surrogate, str):  # modules and callables are not keyed
            context = np.zeros(0, dtype=np.float32) if ctx is None else ctx
            key = _fingerprint(weights, X, context, options)
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return copy.deepcopy(_CACHE[key])
        with seeded_global_rng(self._seed):
            net = self._build_surrogate(self.n_outputs_ * m)
        fit = fit_surrogate(
            weights, net.to(self.device_), X, n_outputs=self.n_outputs_, n_features=m,
            context=ctx, context_weight=float(self.context_weight), probe=self.probe,
            n_probes=int(self.n_probes), epochs=int(self.surrogate_epochs),
            lr=float(self.surrogate_lr), batch_size=int(self.surrogate_batch_size),
            generator=make_generator(self._seed, torch.device("cpu")),
            probe_generator=self._generator(), verbose=self.verbose,
        )
        if key is not None:
            _CACHE[key] = copy.deepcopy(fit)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return fit

    def _heldout_prior(self, X_cal, y_cal) -> None:
        """The grid ``tau`` with the lowest NLL on the held-out rows (features computed once)."""
        post = self.posterior_
        grid = [float(v) for v in HELDOUT_GRID]
        nll = np.zeros(len(grid))
        gen = self._generator()
        for xb, yb in iter_batches(X_cal, y_cal, batch_size=self.batch_size, device=self.device_):
            with torch.no_grad():
                mean, G = self.model_(xb).float(), self.surrogate_(xb).double()
            center = self._centered_link()
            G = augment_centered(G) if center else G
            rows = torch.arange(len(yb), device=yb.device)
            for i, tau in enumerate(grid):
                post.set_hyperparameters(prior_precision=tau)
                dist = gaussian_predictive(mean, post.functional_variance(G), center)
                p = dist.probabilities(self.link_approx, self.n_samples, gen)
                nll[i] -= float(torch.log(p.double().clamp_min(1e-12)[rows, yb.long()]).sum())
        best = grid[int(np.argmin(nll))]
        post.set_hyperparameters(prior_precision=best)
        self.heldout_nll_ = dict(zip(grid, nll / len(X_cal), strict=True))

    # ------------------------------------------------------------------ predict
    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        return scalla_predictive(self.model_, self.surrogate_, self.posterior_, x,
                                 center=self._centered_link())

