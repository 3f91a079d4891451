"""Diagonal posterior: ``N(theta*, diag(1 / (s h + delta)))``."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import WeightPosterior
from .centering import augment_centered

__all__ = ["DiagPosterior"]


class DiagPosterior(WeightPosterior):
    """``N(theta*, diag(1 / (s h + delta)))`` from a diagonal curvature ``h``.

    Parameters
    ----------
    mean : Tensor of shape (P,)
    curvature_diag : Tensor of shape (P,)
        Non-negative diagonal curvature of the summed loss (GGN, Fisher, or an
        optimizer's scaled second moments).
    **kwargs
        See :class:`WeightPosterior`.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import DiagPosterior
    >>> post = DiagPosterior(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), prior_precision=1.0)
    >>> post.marginal_variance()
    tensor([0.5000, 0.3333, 0.2500])
    """

    structure = "diag"

    def __init__(self, mean: Tensor, curvature_diag: Tensor, **kwargs):
        self.h = curvature_diag.detach().to(mean.dtype)
        if self.h.shape != mean.shape:
            raise ValueError("curvature_diag must have the shape of mean")
        super().__init__(mean, **kwargs)

    def _precision(self, delta=None, s=None) -> Tensor:
        delta = self.prior_precision if delta is None else delta
        s = self.curvature_scale if s is None else s
        return s * self.h + self._delta_vector(delta)

    def _log_det(self, delta, s):
        return (s * self._stored64("h") + self._delta_vector(delta)).log().sum()

    def marginal_variance(self):
        return 1.0 / self._precision()

    def functional_variance(self, J):
        return torch.einsum("bcp,p,bdp->bcd", J, self.marginal_variance().to(J.dtype), J)

    def sample(self, n_samples, generator=None):
        eps = self._randn((n_samples, self.n_params), generator)
        return self.mean + eps * self.marginal_variance().sqrt()

    def functional_variance_last_layer(
        self, phi: Tensor, n_out: int, has_bias: bool, augment: bool = False
    ) -> Tensor:
        """``J Sigma J^T`` of a last Linear layer from its input features ``phi`` (B, D).

        ``augment=True``: the (B, C+1, C+1) covariance of ``(P f, mean f)``
        (see :func:`augment_centered`), mapped from the logits' own variances:
        they are independent here, so no large entries cancel.
        """
        var = self.marginal_variance().to(phi.dtype)
        d = phi.shape[1]
        vw = var[: n_out * d].reshape(n_out, d)
        out = (phi**2) @ vw.T
        if has_bias:
            out = out + var[n_out * d :]
        if not augment:
            return torch.diag_embed(out)
        eye = torch.eye(n_out, dtype=out.dtype, device=out.device)
        A = augment_centered(eye, 0)  # (C+1, C): the map f -> (P f, mean f)
        return torch.einsum("ic,nc,jc->nij", A, out, A)
