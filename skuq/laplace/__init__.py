"""The Laplace family: Laplace, subnetwork and L2M estimators over skuq's Laplace engine.

* :mod:`skuq.laplace.base`: the fitting and prediction the estimators share
  (curvature cache, prior precision, predictive);
* :mod:`skuq.laplace.estimator`: :class:`LaplaceClassifier`,
  :class:`LaplaceRegressor`, :class:`SubnetworkLaplaceClassifier`;
* :mod:`skuq.laplace.l2m`: :class:`L2MClassifier`, :class:`L2MRegressor`, whose
  curvature is read from the optimizer (:mod:`skuq.curvature.optimizer`);
* :mod:`skuq.laplace.subnetwork`: the rules that choose a subnetwork.
"""

from ..base import HELDOUT_GRID
from ..curvature.optimizer import SCALES, SECOND_MOMENT_OPTIMIZERS, l2m_curvature, second_moments
from .base import PRED_TYPES, PRIOR_METHODS, SIGMA_METHODS, clear_curvature_cache
from .estimator import LaplaceClassifier, LaplaceRegressor, SubnetworkLaplaceClassifier
from .l2m import L2MClassifier, L2MRegressor
from .subnetwork import (
    DEFAULT_SUBNETWORK_SIZE,
    SELECTIONS,
    ByName,
    GivenIndices,
    LargestMagnitude,
    LargestVariance,
    LargestVarianceSWAG,
    LastLayerSelection,
    RandomSelection,
    SubnetworkSelection,
    resolve_selection,
    select_subnetwork_indices,
    top_k,
)

__all__ = [
    "DEFAULT_SUBNETWORK_SIZE",
    "HELDOUT_GRID",
    "PRED_TYPES",
    "PRIOR_METHODS",
    "SCALES",
    "SECOND_MOMENT_OPTIMIZERS",
    "SELECTIONS",
    "SIGMA_METHODS",
    "ByName",
    "GivenIndices",
    "L2MClassifier",
    "L2MRegressor",
    "LaplaceClassifier",
    "LaplaceRegressor",
    "LargestMagnitude",
    "LargestVariance",
    "LargestVarianceSWAG",
    "LastLayerSelection",
    "RandomSelection",
    "SubnetworkLaplaceClassifier",
    "SubnetworkSelection",
    "clear_curvature_cache",
    "l2m_curvature",
    "resolve_selection",
    "second_moments",
    "select_subnetwork_indices",
    "top_k",
]
