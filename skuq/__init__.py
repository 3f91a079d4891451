"""skuq: uncertainty quantification for PyTorch networks with a scikit-learn face."""

from .baselines import MAPClassifier, MAPRegressor, TemperatureScalingClassifier
from .laplace import LaplaceClassifier, LaplaceRegressor
from .outputs import OutputDistribution

__version__ = "0.1.0"

__all__ = [
    "LaplaceClassifier",
    "LaplaceRegressor",
    "MAPClassifier",
    "MAPRegressor",
    "OutputDistribution",
    "TemperatureScalingClassifier",
]
