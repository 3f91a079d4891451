"""Gaussian posteriors over weights: ``N(theta*, (s H + diag(delta))^-1)``.

One class per structure of the curvature ``H``: :class:`DiagPosterior`,
:class:`KronPosterior`, :class:`FullPosterior` (and :class:`CholeskyFullPosterior`,
the one :func:`posterior_from_curvature` builds: eigenvalues only, a Cholesky
factor per ``delta``), :class:`LowRankPosterior`.
``s = 1 / (sigma_noise^2 * temperature)`` scales the curvature (computed at
unit noise; for an empirical Fisher of a regression, a sum of squared loss
gradients that carry ``1 / sigma_noise^2`` each, ``s = 1 / (sigma_noise^4 *
temperature)``) and ``delta`` is the prior precision: a scalar, or one value per
parameter tensor ("per layer"). Each class caches an eigendecomposition of
``H`` once, so a new ``delta`` or ``s`` costs O(P) for the log-determinant
and the marginal likelihood -- no pass over data, no refactorization. The
evidence is evaluated in float64 whatever the weights' dtype (its terms are
sums of O(P) logarithms that cancel to a small difference near the optimum;
in float32 the optimum of ``delta`` would be found only to ~1e-3).

Each posterior offers ``sample``, ``log_det_posterior_precision``,
``marginal_variance``, ``functional_variance(J) = J Sigma J^T`` for a batch of
Jacobians, the Laplace ``log_marginal_likelihood`` and
``optimize_prior_precision``. They are pure torch and can be built from any
curvature: :func:`posterior_from_curvature` from skuq's engine, or directly
(e.g. a :class:`DiagPosterior` from an optimizer's second moments).
"""

from __future__ import annotations

from .base import PRIOR_STRUCTURES, WeightPosterior
from .centering import augment_centered, center_outputs, split_centered
from .diag import DiagPosterior
from .factory import posterior_from_curvature, subset_posterior
from .full import CholeskyFullPosterior, FullPosterior
from .kron import KronPosterior
from .lowrank import LowRankPosterior

__all__ = [
    "WeightPosterior",
    "DiagPosterior",
    "KronPosterior",
    "FullPosterior",
    "CholeskyFullPosterior",
    "LowRankPosterior",
    "posterior_from_curvature",
    "subset_posterior",
    "center_outputs",
    "augment_centered",
    "split_centered",
    "PRIOR_STRUCTURES",
]
