"""The baselines every comparison needs.

The bare net (MAP) and temperature scaling (:mod:`skuq.baselines.map_temperature`),
MC dropout (:mod:`skuq.baselines.mc_dropout`) and deep ensembles
(:mod:`skuq.baselines.ensembles`); each module holds a family's torch core and
its scikit-learn estimators.
"""

from .ensembles import DeepEnsembleClassifier, DeepEnsembleRegressor, EnsembleModule
from .map_temperature import (
    FITTED_ROWS_LOSS_RATIO,
    FITTED_ROWS_MAX_TEMPERATURE,
    LOG_TEMPERATURE_BOUNDS,
    MAPClassifier,
    MAPRegressor,
    TemperatureScalingClassifier,
    fit_temperature,
)
from .mc_dropout import (
    DropoutSampler,
    MCDropoutClassifier,
    MCDropoutRegressor,
    dropout_modules,
    mc_dropout_mode,
    mc_dropout_samples,
)

__all__ = [
    "MAPClassifier",
    "MAPRegressor",
    "TemperatureScalingClassifier",
    "fit_temperature",
    "LOG_TEMPERATURE_BOUNDS",
    "FITTED_ROWS_MAX_TEMPERATURE",
    "FITTED_ROWS_LOSS_RATIO",
    "MCDropoutClassifier",
    "MCDropoutRegressor",
    "DeepEnsembleClassifier",
    "DeepEnsembleRegressor",
    "dropout_modules",
    "mc_dropout_mode",
    "mc_dropout_samples",
    "DropoutSampler",
    "EnsembleModule",
]
