"""The spectrum of a dense GGN from the Gram matrix of its rows, when they are few.

A dense curvature is accumulated as ``H = R^T R`` from the rows ``R`` of
per-sample gradients (one row per training row and output factor). When there
are fewer rows ``r`` than weights ``P``, ``H`` has rank at most ``r`` and its
nonzero eigenvalues are those of the ``r x r`` Gram matrix ``R R^T``: the
evidence's eigenvalues then cost ``O(r^2 P + r^3)`` instead of the ``O(P^3)``
tridiagonal reduction of ``H`` (bound by memory bandwidth past the caches).
The rows are kept while they fit in a quarter of ``H``'s size.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: rows are kept while their count stays at most this fraction of the weights
#: (their memory is then at most this fraction of the P x P curvature's)
GRAM_MAX_ROW_FRACTION = 0.25


class GramRows:
    """Collects the rows ``R`` of ``H = R^T R`` while they are few enough.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature.gram import GramRows
    >>> R = torch.randn(3, 20, dtype=torch.float64)
    >>> rows = GramRows(20)
    >>> rows.add(R)
    >>> lam = rows.spectrum()
    >>> torch.allclose(lam, torch.linalg.eigvalsh(R.T @ R), atol=1e-10)
    True
    """

    def __init__(self, n_params: int):
        self.n_params = n_params
        self.limit = int(GRAM_MAX_ROW_FRACTION * n_params)
        self.rows: list[Tensor] | None = []
        self.count = 0

    def add(self, R: Tensor) -> None:
        """Keep a chunk of rows (a copy), or give up for good once there are too many."""
        if self.rows is None:
            return
        self.count += R.shape[0]
        if self.count > self.limit:
            self.rows = None  # H has (nearly) full rank: its own spectrum is no dearer
            return
        self.rows.append(R.detach().clone())

    def spectrum(self) -> Tensor | None:
        """``H``'s P eigenvalues (ascending, float64, >= 0), or None when rows were dropped."""
        if not self.rows:
            return None
        R = torch.cat(self.rows)
        self.rows = None
        gram = (R @ R.T).double()  # r x r, in R's dtype: its entries are sums over P
        lam = torch.linalg.eigvalsh(gram).clamp_min(0)
        zeros = torch.zeros(self.n_params - len(lam), dtype=lam.dtype, device=lam.device)
        return torch.cat([zeros, lam]).cpu()
