"""CVP: calibrated variance propagation (one forward pass, mean and variance per unit)."""

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .calibration import fit_layer_scales, probit_nll
from .estimator import CVPClassifier
from .ivon import IVONTrainingMixin, ivon_posterior
from .posterior import DiagonalWeightPosterior
from .propagator import MomentPropagator
from .registry import (
    CorrelatedFactorsWarning,
    Moments,
    PropagationContext,
    UnsupportedLayerError,
    get_rule,
    register_rule,
)
from .rules import elementwise_rule, linear_moments, linearized_rule
from .sources import register_posterior_source

__all__ = [
    "CVPClassifier",
    "CorrelatedFactorsWarning",
    "DiagonalWeightPosterior",
    "IVONTrainingMixin",
    "fit_layer_scales",
    "ivon_posterior",
    "probit_nll",
    "register_posterior_source",
    "Moments",
    "MomentPropagator",
    "PropagationContext",
    "UnsupportedLayerError",
    "elementwise_rule",
    "get_rule",
    "linear_moments",
    "linearized_rule",
    "register_rule",
]
