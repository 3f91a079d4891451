"""Low-rank curvature: ``H V`` products without ``H``, and its top eigenpairs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .jacobians import DEFAULT_MAX_ELEMENTS, iter_jacobians, jvp_batch, vjp_batch
from .likelihood import loss_gradient, sum_loss
from .weights import WeightSubset

__all__ = ["ggn_matmul"]


def ggn_matmul(
    weights: WeightSubset,
    batches: Iterable,
    V: Tensor,
    likelihood: str = "classification",
    curvature: str = "ggn",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """``H V`` for a block of directions ``V`` (P, m), one pass over the data.

    GGN: ``sum_n J_n^T Lambda_n (J_n V)`` by JVPs and VJPs, never forming ``J``;
    EF: ``sum_n g_n (g_n^T V)`` from per-sample gradients.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, ggn_matmul
    >>> lin = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    >>> ggn_matmul(select_weights(lin), [(x, y)], torch.eye(8)).shape
    torch.Size([8, 8])
    """
    out = torch.zeros_like(V)
    for x, y in batches:
        if curvature == "ef":
            for rows, J, f in iter_jacobians(weights, x, 16, max_elements):
                g = torch.einsum("bc,bcp->bp", loss_gradient(f, y[rows], likelihood), J)
                out += g.T @ (g @ V)
            continue
        JV, f = jvp_batch(weights, x, V)  # (m, B, C)
        f = f.detach()
        if likelihood == "regression":
            LJV = JV
        else:
            p = torch.softmax(f, dim=-1)
            LJV = p * JV - p * (p * JV).sum(-1, keepdim=True)
        out += vjp_batch(weights, x, LJV)
    return out


def lowrank_curvature(weights, batches, likelihood, curvature, rank, generator, max_elements):
    """Top-``rank`` eigenpairs by a randomized range finder with one power iteration."""
    P = weights.n_params
    k = min(rank, P)
    m = min(P, k + 10)
    # drawn where the generator lives (a CUDA generator cannot fill a CPU tensor), then moved
    draw_device = generator.device if generator is not None else torch.device("cpu")
    omega = torch.randn(P, m, generator=generator, dtype=weights.dtype, device=draw_device)
    omega = omega.to(weights.device)
    data = list(batches) if not callable(batches) else None

    def passes():
        return batches() if data is None else data

    Y = ggn_matmul(weights, passes(), omega, likelihood, curvature, max_elements)
    Q = torch.linalg.qr(Y).Q
    Y = ggn_matmul(weights, passes(), Q, likelihood, curvature, max_elements)  # power step
    Q = torch.linalg.qr(Y).Q
    HQ = ggn_matmul(weights, passes(), Q, likelihood, curvature, max_elements)
    small = Q.T @ HQ
    evals, evecs = torch.linalg.eigh((small + small.T) / 2)
    order = torch.argsort(evals, descending=True)[:k]
    evals = evals[order].clamp_min(0)
    evecs = Q @ evecs[:, order]
    loss, n_data, n_out = 0.0, 0, 0
    with torch.no_grad():
        for x, y in passes():
            f = weights.model(x)
            loss += float(sum_loss(f, y, likelihood))
            n_data += f.shape[0]
            n_out = f.shape[1]
    return dict(eigvals=evals, eigvecs=evecs), loss, n_data, n_out
