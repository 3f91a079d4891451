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
from .cvp import CVPClassifier
from .laplace import (
    L2MClassifier,
    L2MRegressor,
    LaplaceClassifier,
    LaplaceRegressor,
    SubnetworkLaplaceClassifier,
)
from .outputs import OutputDistribution
from .regvar import RegVarClassifier, RegVarRegressor
from .scalla import ScaLLAClassifier

__version__ = "0.1.0"

__all__ = [
    "CVPClassifier",
    "DeepEnsembleClassifier",
    "DeepEnsembleRegressor",
    "L2MClassifier",
    "L2MRegressor",
    "LaplaceClassifier",
    "LaplaceRegressor",
    "MAPClassifier",
    "MAPRegressor",
    "MCDropoutClassifier",
    "MCDropoutRegressor",
    "OutputDistribution",
    "RegVarClassifier",
    "RegVarRegressor",
    "ScaLLAClassifier",
    "SubnetworkLaplaceClassifier",
    "TemperatureScalingClassifier",
]
