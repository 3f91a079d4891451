"""skuq: uncertainty quantification for PyTorch networks with a scikit-learn face."""

from .baselines import MAPClassifier, MAPRegressor, TemperatureScalingClassifier
from .cvp import CVPClassifier
from .laplace import LaplaceClassifier, LaplaceRegressor
from .outputs import OutputDistribution

__version__ = "0.1.0"

__all__ = [
    "CVPClassifier",
    "LaplaceClassifier",
    "LaplaceRegressor",
    "MAPClassifier",
    "MAPRegressor",
    "OutputDistribution",
    "TemperatureScalingClassifier",
]
