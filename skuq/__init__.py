"""skuq: uncertainty quantification for PyTorch networks with a scikit-learn face."""

from .baselines import MAPClassifier, MAPRegressor, TemperatureScalingClassifier
from .cvp import CVPClassifier
from .outputs import OutputDistribution

__version__ = "0.1.0"

__all__ = [
    "CVPClassifier",
    "MAPClassifier",
    "MAPRegressor",
    "OutputDistribution",
    "TemperatureScalingClassifier",
]
