"""skuq: uncertainty quantification for PyTorch networks with a scikit-learn face."""

from .baselines import (
    DeepEnsembleClassifier,
    DeepEnsembleRegressor,
    MAPClassifier,
    MAPRegressor,
    MCDropoutClassifier,
    MCDropoutRegressor,
    TemperatureScalingClassifier,
)
from .outputs import OutputDistribution

__version__ = "0.1.0"

__all__ = [
    "DeepEnsembleClassifier",
    "DeepEnsembleRegressor",
    "MAPClassifier",
    "MAPRegressor",
    "MCDropoutClassifier",
    "MCDropoutRegressor",
    "OutputDistribution",
    "TemperatureScalingClassifier",
]
