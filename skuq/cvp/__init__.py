"""CVP: calibrated variance propagation (one forward pass, mean and variance per unit)."""

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .calibration import fit_layer_scales, probit_nll
from .engine import (
    CorrelatedFactorsWarning,
    MomentPropagator,
    Moments,
    PropagationContext,
    UnsupportedLayerError,
    get_rule,
    register_rule,
)
from .estimator import CVPClassifier
from .posterior import (
    DiagonalWeightPosterior,
    IVONTrainingMixin,
    ivon_posterior,
    register_posterior_source,
)
from .rules import elementwise_rule, linear_moments, linearized_rule

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
