"""The documented import path of L2M's names; they live in :mod:`skuq.laplace.l2m`
(the estimators) and :mod:`skuq.curvature.optimizer` (reading optimizer state)."""

from .curvature.optimizer import SCALES, SECOND_MOMENT_OPTIMIZERS, l2m_curvature, second_moments
from .laplace.l2m import L2MClassifier, L2MRegressor

__all__ = [
    "L2MClassifier",
    "L2MRegressor",
    "SCALES",
    "SECOND_MOMENT_OPTIMIZERS",
    "l2m_curvature",
    "second_moments",
]
