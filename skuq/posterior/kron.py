"""K-FAC posterior: Kronecker-factored blocks ``s G (x) A + delta I``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..curvature import KronBlock
from .base import WeightPosterior
from .centering import augment_centered
from .linalg import _eigh64

__all__ = ["KronPosterior"]


class KronPosterior(WeightPosterior):
    """K-FAC posterior: blocks ``s G (x) A + delta I`` (or dense ``s B + delta I`` for biases).

    Each factor is eigendecomposed once; a block's precision eigenvalues are
    ``s lambda_G lambda_A^T + delta``. The prior precision must be constant
    within a block (per-layer priors are per parameter tensor, which is per
    block).

    Parameters
    ----------
    mean : Tensor of shape (P,)
    blocks : list of KronBlock
        Covering ``0..P`` (see :class:`skuq.curvature.KronBlock`).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import KronBlock
    >>> from skuq.posterior import KronPosterior
    >>> G, A = torch.eye(2), 2 * torch.eye(3)
    >>> post = KronPosterior(torch.zeros(6), [KronBlock(slice(0, 6), [G, A])])
    >>> post.marginal_variance()
    tensor([0.3333, 0.3333, 0.3333, 0.3333, 0.3333, 0.3333])
    """

    structure = "kron"

    def __init__(self, mean: Tensor, blocks: list[KronBlock], **kwargs):
        self.blocks = sorted(blocks, key=lambda b: b.index.start)
        self.eig, self._eig64 = [], []
        for b in self.blocks:
            pairs, evs = [], []
            for F in b.factors:
                F = F.detach()
                ev, Q = _eigh64((F + F.T) / 2)
                pairs.append((ev.clamp_min(0).to(mean.dtype), Q.to(mean.dtype)))
                evs.append(ev.clamp_min(0))  # float64, for the evidence
            self.eig.append(pairs)
            self._eig64.append(evs[0] if len(evs) == 1 else torch.outer(evs[0], evs[1]))
        if kwargs.get("group_sizes") is None:
            kwargs["group_sizes"] = [b.index.stop - b.index.start for b in self.blocks]
        super().__init__(mean, **kwargs)

    def _block_eigvals(self, i: int) -> Tensor:
        pairs = self.eig[i]
        if len(pairs) == 1:
            return pairs[0][0]
        return torch.outer(pairs[0][0], pairs[1][0])

    def _block_deltas(self, delta: Tensor) -> list[Tensor]:
        if delta.ndim == 0:
            return [delta] * len(self.blocks)
        dv = self._delta_vector(delta)
        out = []
        for b in self.blocks:
            seg = dv[b.index]
            if not bool((seg == seg[0]).all()):
                raise ValueError(
                    "hessian_structure='kron' needs the prior precision to be constant "
                    "within each layer block"
                )
            out.append(seg[0])
        return out

    def _log_det(self, delta, s):
        return sum(
            torch.log(s * self._eig64[i] + d).sum() for i, d in enumerate(self._block_deltas(delta))
        )

    def inverse_eigvals(self) -> list[Tensor]:
        """Per block, ``1 / (s lambda + delta)`` in the eigenbasis of its factors (cached).

        A Kronecker block's entry ``(o, i)`` pairs the ``o``-th eigenvector of
        ``G`` with the ``i``-th of ``A`` (``self.eig[block]``); a dense block's
        is a vector.

        Examples
        --------
        >>> import torch
        >>> from skuq.curvature import KronBlock
        >>> from skuq.posterior import KronPosterior
        >>> G, A = torch.eye(2), 3 * torch.eye(2)
        >>> post = KronPosterior(torch.zeros(4), [KronBlock(slice(0, 4), [G, A])])
        >>> post.inverse_eigvals()[0]
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]])
        """
        if "inv" not in self._cache:
            s = self.curvature_scale
            deltas = self._block_deltas(self.prior_precision)
            self._cache["inv"] = [
                1.0 / (s * self._block_eigvals(i) + d) for i, d in enumerate(deltas)
            ]
        return self._cache["inv"]

    def marginal_variance(self):
        out = torch.empty(self.n_params, dtype=self.mean.dtype, device=self.mean.device)
        for b, pairs, inv in zip(self.blocks, self.eig, self.inverse_eigvals(), strict=True):
            if len(pairs) == 1:
                out[b.index] = (pairs[0][1] ** 2) @ inv
            else:
                QG, QA = pairs[0][1], pairs[1][1]
                out[b.index] = ((QG**2) @ inv @ (QA**2).T).reshape(-1)
        return out

    def functional_variance(self, J):
        B, C, _ = J.shape
        out = torch.zeros(B, C, C, dtype=J.dtype, device=J.device)
        for b, pairs, inv in zip(self.blocks, self.eig, self.inverse_eigvals(), strict=True):
            Jb = J[:, :, b.index]
            if len(pairs) == 1:
                T = Jb @ pairs[0][1].to(J.dtype)
                out += torch.einsum("bcp,p,bdp->bcd", T, inv.to(J.dtype), T)
            else:
                QG, QA = pairs[0][1].to(J.dtype), pairs[1][1].to(J.dtype)
                T = QG.T @ Jb.reshape(B, C, QG.shape[0], QA.shape[0]) @ QA
                out += torch.einsum("bcoi,oi,bdoi->bcd", T, inv.to(J.dtype), T)
        return out

    def sample(self, n_samples, generator=None):
        out = self.mean.expand(n_samples, -1).clone()
        for b, pairs, inv in zip(self.blocks, self.eig, self.inverse_eigvals(), strict=True):
            if len(pairs) == 1:
                z = self._randn((n_samples, inv.numel()), generator) * inv.sqrt()
                out[:, b.index] += z @ pairs[0][1].T
            else:
                QG, QA = pairs[0][1], pairs[1][1]
                z = self._randn((n_samples, *inv.shape), generator) * inv.sqrt()
                out[:, b.index] += (QG @ z @ QA.T).reshape(n_samples, -1)
        return out

    def functional_variance_last_layer(self, phi, n_out, has_bias, augment=False):
        """``augment=True``: the (B, C+1, C+1) covariance of ``(P f, mean f)``."""
        out = 0
        for _b, pairs, inv in zip(self.blocks, self.eig, self.inverse_eigvals(), strict=True):
            if len(pairs) == 1:  # the bias block: the same for every row
                Q = pairs[0][1].to(phi.dtype)
                Q = augment_centered(Q, 0) if augment else Q
                out = out + ((Q * inv.to(phi.dtype)) @ Q.T).expand(phi.shape[0], -1, -1)
            else:
                QG, QA = pairs[0][1].to(phi.dtype), pairs[1][1].to(phi.dtype)
                QG = augment_centered(QG, 0) if augment else QG
                s = ((phi @ QA) ** 2) @ inv.to(phi.dtype).T  # (B, out)
                out = out + torch.einsum("co,no,eo->nce", QG, s, QG)
        return out
