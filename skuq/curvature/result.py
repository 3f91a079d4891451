"""What a curvature computation returns: :class:`Curvature` and its K-FAC blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Curvature", "KronBlock"]


@dataclass
class KronBlock:
    """One block of a K-FAC curvature, over ``weights`` slice ``index``.

    ``factors == [G, A]``: the block is ``G (x) A`` over the row-major
    ``(G.shape[0], A.shape[0])`` matrix view of the slice; ``factors == [H]``:
    a dense block (biases).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import KronBlock
    >>> KronBlock(slice(0, 6), [torch.eye(2), torch.eye(3)]).dense().shape
    torch.Size([6, 6])
    """

    index: slice
    factors: list[Tensor]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(f.shape[0] for f in self.factors)

    def dense(self) -> Tensor:
        """The block as a dense matrix (for tests and small layers)."""
        if len(self.factors) == 1:
            return self.factors[0]
        return torch.kron(self.factors[0], self.factors[1])


@dataclass
class Curvature:
    """Curvature of the summed loss over ``n_data`` rows, at unit noise and temperature.

    Exactly one of ``diag`` (P,), ``full`` (P, P), ``kron`` (list of blocks) or
    ``eigvals``/``eigvecs`` (k,), (P, k) is set, according to ``structure``.
    With ``full``, ``spectrum`` (P,) may hold its eigenvalues (float64,
    ascending), when they came cheaply from the Gram matrix of fewer rows than
    weights (:mod:`skuq.curvature.gram`).
    ``loss`` is the summed training loss (cross-entropy, or ``0.5 * SSE``).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, compute_curvature
    >>> lin = torch.nn.Linear(3, 2)
    >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
    >>> c = compute_curvature(select_weights(lin), data)
    >>> c.structure, c.n_data, c.n_outputs
    ('diag', 4, 2)
    """

    structure: str
    curvature: str
    likelihood: str
    n_data: int
    n_outputs: int
    loss: float
    diag: Tensor | None = None
    full: Tensor | None = None
    kron: list[KronBlock] | None = None
    eigvals: Tensor | None = None
    eigvecs: Tensor | None = None
    spectrum: Tensor | None = None
    info: dict = field(default_factory=dict)

    def dense(self) -> Tensor:
        """The curvature as a dense P x P matrix (tests, small P)."""
        if self.full is not None:
            return self.full
        if self.diag is not None:
            return torch.diag(self.diag)
        if self.eigvecs is not None:
            return (self.eigvecs * self.eigvals) @ self.eigvecs.T
        n = max(b.index.stop for b in self.kron)
        out = torch.zeros(n, n, dtype=self.kron[0].factors[0].dtype)
        for b in self.kron:
            out[b.index, b.index] = b.dense()
        return out
