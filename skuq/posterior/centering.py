"""Centered outputs: covariances of ``(P f, mean f)`` for softmax predictives.

``P = I - 11^T / C`` removes the shift shared by all logits, which softmax
ignores; the helpers here form and read covariances from centered factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["center_outputs", "augment_centered", "split_centered"]


def center_outputs(t: Tensor, dim: int = 1) -> Tensor:
    """``P t``: ``t`` less its mean over the output (class) axis ``dim`` (``P = I - 11^T/C``).

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import center_outputs
    >>> center_outputs(torch.tensor([[[1.0], [3.0]]])).flatten().tolist()
    [-1.0, 1.0]
    """
    return t - t.mean(dim=dim, keepdim=True)


def augment_centered(t: Tensor, dim: int = 1) -> Tensor:
    """``[P t; 1^T t / C]`` along the output axis ``dim``: ``C + 1`` entries.

    Applied to the output side of a Jacobian (or of any factor of ``J Sigma
    J^T``), the contraction gives ``Cov[(P f, mean f)]``, from which
    :func:`split_centered` reads both the covariance of ``f`` and that of the
    centered logits ``P f``. Softmax ignores a shift shared by all logits, so
    ``P f`` carries the probabilities; forming its covariance from centered
    factors, rather than projecting the finished covariance, keeps the
    shared-shift variance (which only the prior bounds, and can exceed the
    rest by orders of magnitude) out of its sums: rounding errors enter
    squared, not linearly.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import augment_centered
    >>> augment_centered(torch.tensor([[[1.0], [3.0]]])).flatten().tolist()
    [-1.0, 1.0, 2.0]
    """
    return torch.cat([center_outputs(t, dim), t.mean(dim=dim, keepdim=True)], dim=dim)


def split_centered(M: Tensor) -> tuple[Tensor, Tensor]:
    """``(Cov f, Cov P f)`` from ``M = Cov[(P f, mean f)]`` of shape (N, C+1, C+1).

    ``f = P f + 1 mean(f)``, so ``Cov f = S_c + u 1^T + 1 u^T + s 11^T`` with
    ``S_c = M[:C, :C]``, ``u = M[:C, C]`` and ``s = M[C, C]``.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import augment_centered, split_centered
    >>> J = torch.randn(1, 3, 4, dtype=torch.float64)
    >>> Ja = augment_centered(J)
    >>> S, S_c = split_centered(Ja @ Ja.transpose(1, 2))
    >>> P = torch.eye(3, dtype=J.dtype) - 1 / 3
    >>> torch.allclose(S, J @ J.transpose(1, 2)), torch.allclose(S_c, P @ S @ P)
    (True, True)
    """
    C = M.shape[-1] - 1
    S_c, u, s = M[:, :C, :C], M[:, :C, C], M[:, C, C]
    S = S_c + u[:, :, None] + u[:, None, :] + s[:, None, None]
    return S, S_c
