"""The likelihoods' output-space pieces: the loss, its gradient and its Hessian's square root.

Softmax cross-entropy on logits (``"classification"``) or a Gaussian at unit
noise (``"regression"``); every curvature route contracts Jacobians with these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hessian_sqrt", "sum_loss", "LIKELIHOODS"]

LIKELIHOODS = ("classification", "regression")


def hessian_sqrt(f: Tensor, likelihood: str) -> Tensor:
    """``L`` with ``L L^T = Lambda``, the Hessian of the loss in the outputs; (B, C, C).

    Softmax cross-entropy: ``L = diag(sqrt p) - p sqrt(p)^T``; Gaussian at unit
    noise: ``L = I``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import hessian_sqrt
    >>> f = torch.tensor([[0.5, -1.0, 2.0]])
    >>> L = hessian_sqrt(f, "classification")
    >>> p = torch.softmax(f, -1)[0]
    >>> torch.allclose(L[0] @ L[0].T, torch.diag(p) - torch.outer(p, p))
    True
    """
    if likelihood == "regression":
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], -1, -1)
    p = torch.softmax(f, dim=-1)
    sp = p.sqrt()
    return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)


def sum_loss(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """Summed negative log-likelihood (cross-entropy; or ``0.5 * SSE`` at unit noise).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import sum_loss
    >>> float(sum_loss(torch.zeros(2, 1), torch.ones(2), "regression"))
    1.0
    """
    if likelihood == "regression":
        return 0.5 * ((f - y.reshape(f.shape).to(f.dtype)) ** 2).sum()
    return F.cross_entropy(f, y.long(), reduction="sum")


def loss_gradient(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """d loss_n / d f_n per row, (B, C)."""
    if likelihood == "regression":
        return f - y.reshape(f.shape).to(f.dtype)
    return torch.softmax(f, dim=-1) - F.one_hot(y.long(), f.shape[1]).to(f.dtype)


def output_factors(f: Tensor, y: Tensor, likelihood: str, curvature: str) -> Tensor:
    """(B, C, K): ``H_n = J_n^T M_n M_n^T J_n`` with ``M = L`` (GGN) or the loss gradient (EF)."""
    if curvature == "ef":
        return loss_gradient(f, y, likelihood).unsqueeze(2)
    return hessian_sqrt(f, likelihood)
