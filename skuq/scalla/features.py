"""Laplace in ScaLLA's feature space and the predictive it gives.

``A = tau I_m + sum_n g_n^T Lambda_n g_n`` and ``Var f(x*) = g(x*) A^-1
g(x*)^T`` on the shared :class:`~skuq.posterior.FullPosterior` engine, with
the weight-space evidence (see :mod:`skuq.scalla`). Plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._utils import check_option
from ..curvature import hessian_sqrt, sum_loss
from ..outputs import OutputDistribution
from ..posterior import FullPosterior, augment_centered
from ..predictive import gaussian_predictive

__all__ = ["FeaturePosterior", "feature_posterior", "scalla_predictive"]


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
        super().__init__(
            torch.zeros(m, dtype=curvature.dtype, device=curvature.device), curvature, **kwargs
        )

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
                    "training rows: the surrogate diverged (lower surrogate__lr) or the net did"
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
        gram,
        theta_sq_norm=theta_sq_norm,
        prior_precision=1.0 if fit_prior else prior_precision,
        loss=loss,
        n_data=n,
        n_outputs=int(f.shape[1]),
    )
    if fit_prior:
        post.optimize_prior_precision("scalar")
    return post


def scalla_predictive(
    model: nn.Module,
    kernel: nn.Module,
    posterior: FullPosterior,
    x: Tensor,
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
