"""CVP: calibrated variance propagation (one forward pass, mean and variance per unit)."""

from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .engine import (
    Moments,
    MomentPropagator,
    PropagationContext,
    UnsupportedLayerError,
    get_rule,
    register_rule,
)
from .rules import elementwise_rule, linear_moments, linearized_rule

__all__ = [
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
