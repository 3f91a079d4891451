"""ScaLLA's probes: Jacobian-vector products with random directions and the kernel loss.

For random probes ``v`` with ``E[v v^T] = I``, ``z = J(x) v`` is one
Jacobian-vector product and ``E[z(x) z(x')^T] = K(x, x')``, the neural tangent
kernel; :func:`kernel_matching_loss` turns a batch of such outputs into an
unbiased estimate of the kernel-matching loss (see :mod:`skuq.scalla`).
Plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import check_option
from ..curvature import WeightSubset, jvp_batch

__all__ = ["MAX_PROBE_ELEMENTS", "PROBES", "draw_probes", "kernel_matching_loss", "probe_outputs"]

PROBES = ("rademacher", "gaussian")
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
            V = draw_probes(
                k, P, probe, generator=generator, device=weights.device, dtype=weights.dtype
            )
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
