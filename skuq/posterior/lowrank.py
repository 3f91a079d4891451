"""Low-rank posterior: top-k eigenpairs of ``H`` plus a scalar prior ``delta I``."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import WeightPosterior

__all__ = ["LowRankPosterior"]


class LowRankPosterior(WeightPosterior):
    """``H ~= U diag(lambda) U^T`` (top-k eigenpairs) plus a scalar prior ``delta I``.

    ``Sigma = (I - U diag(s lambda / (s lambda + delta)) U^T) / delta``.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import LowRankPosterior
    >>> U = torch.eye(3)[:, :1]
    >>> post = LowRankPosterior(torch.zeros(3), torch.tensor([3.0]), U, prior_precision=1.0)
    >>> post.marginal_variance()
    tensor([0.2500, 1.0000, 1.0000])
    """

    structure = "lowrank"

    def __init__(self, mean: Tensor, eigvals: Tensor, eigvecs: Tensor, **kwargs):
        self.eigvals = eigvals.detach().to(mean.dtype).clamp_min(0)
        self.eigvecs = eigvecs.detach().to(mean.dtype)
        super().__init__(mean, **kwargs)

    def _check_delta(self, value):
        d = super()._check_delta(value)
        if d.ndim != 0:
            raise ValueError("hessian_structure='lowrank' supports a scalar prior precision only")
        return d

    def _log_det(self, delta, s):
        if delta.ndim != 0:
            raise ValueError("hessian_structure='lowrank' supports a scalar prior precision only")
        k = self.eigvals.numel()
        return torch.log(s * self._stored64("eigvals") + delta).sum() + (
            self.n_params - k
        ) * torch.log(delta)

    def _shrink(self) -> Tensor:
        s, d = self.curvature_scale, self.prior_precision
        return s * self.eigvals / (s * self.eigvals + d)

    def marginal_variance(self):
        return (1 - (self.eigvecs**2) @ self._shrink()) / self.prior_precision

    def functional_variance(self, J):
        JU = J @ self.eigvecs.to(J.dtype)
        D = self._shrink().to(J.dtype)
        return (J @ J.transpose(1, 2) - (JU * D) @ JU.transpose(1, 2)) / self.prior_precision

    def sample(self, n_samples, generator=None):
        s, d = self.curvature_scale, self.prior_precision
        E = 1 - torch.sqrt(d / (s * self.eigvals + d))
        z = self._randn((n_samples, self.n_params), generator)
        return self.mean + (z - ((z @ self.eigvecs) * E) @ self.eigvecs.T) / d.sqrt()
