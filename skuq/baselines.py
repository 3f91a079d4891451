"""The baselines every comparison needs: the bare net and temperature scaling."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._utils import check_positive, iter_batches
from .base import BaseUQEstimator, UQClassifierMixin, UQRegressorMixin
from .outputs import OutputDistribution

__all__ = ["MAPClassifier", "MAPRegressor", "TemperatureScalingClassifier"]


class MAPClassifier(UQClassifierMixin, BaseUQEstimator):
    """The bare network: softmax of its logits, no epistemic uncertainty.

    The first row of every comparison: its ``predict_uncertainty`` is the
    predictive entropy of ``softmax(f(x))`` (mutual information and logit
    variance are zero).

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        See :class:`skuq.base.BaseUQEstimator` for this and the shared
        parameters ``device``, ``batch_size``, ``random_state``, ``verbose``
        and ``memory``.

    Attributes
    ----------
    classes_ : ndarray
        Class labels.
    net_ : skorch net or torch.nn.Module
        The trained wrapped net.
    model_ : torch.nn.Module
        The module that returns logits.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import MAPClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = MAPClassifier(net, random_state=0).fit(d.X_train, d.y_train)
    >>> est.score(d.X_test, d.y_test) > 0.9
    True
    """

    def __init__(
        self, estimator, *, device="auto", batch_size=256, random_state=None, verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        pass  # the trained net is the whole model

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            return OutputDistribution.point_mass(self.model_(x).float())


class MAPRegressor(UQRegressorMixin, BaseUQEstimator):
    """The bare network for regression, with a homoscedastic noise level.

    ``sigma_noise_`` is the RMS residual of the trained net on the training
    data (a lower bound on the true noise for a net that overfits); the
    epistemic variance is zero.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from skuq import MAPRegressor
    >>> from skuq.datasets import make_gap_regression
    >>> from skuq.nets import MLP
    >>> d = make_gap_regression()
    >>> net = NeuralNetRegressor(MLP, optimizer=torch.optim.Adam, lr=1e-2,
    ...                          max_epochs=50, train_split=None, verbose=0)
    >>> est = MAPRegressor(net, random_state=0).fit(d.X, d.y)
    >>> mean, std = est.predict(d.X_test, return_std=True)
    >>> mean.shape == std.shape == (301,)
    True
    """

    def __init__(
        self, estimator, *, device="auto", batch_size=256, random_state=None, verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        self._fit_noise_from_residuals(X, y)

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            return OutputDistribution.point_mass(self.model_(x).float())


def fit_temperature(logits: Tensor, y: Tensor, max_iter: int = 200) -> float:
    """The temperature ``T > 0`` minimizing the NLL of ``softmax(logits / T)``.

    Optimized over ``log T`` with L-BFGS (the NLL is smooth and, in ``1/T``,
    convex), starting from ``T = 1``.
    """
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    logits, y = logits.double(), y.long()
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t) or t <= 0:
        raise FloatingPointError("temperature fit diverged; check the calibration data")
    return t


class TemperatureScalingClassifier(UQClassifierMixin, BaseUQEstimator):
    """The net's logits divided by one temperature fitted on held-out data by NLL.

    Guo et al. (2017). A net trained inside ``fit`` is trained on
    ``1 - calibration_fraction`` of the rows and the temperature is fitted on
    the rest (stratified); an already trained net (``FrozenEstimator`` or a
    ``torch.nn.Module``) uses all of ``fit``'s rows for the temperature. A
    calibration split can also be given as ``fit(X, y, X_cal=..., y_cal=...)``.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
    temperature : float or None, default=None
        ``None`` fits it; a float > 0 is used as is.
    calibration_fraction : float, default=0.2
        Share of ``fit``'s rows held out to fit the temperature.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    temperature_ : float
        The temperature used.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import TemperatureScalingClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = TemperatureScalingClassifier(net, random_state=0).fit(d.X_train, d.y_train)
    >>> est.temperature_ > 0
    True
    """

    _uses_calibration_split = True

    def __init__(
        self, estimator, *, temperature=None, calibration_fraction=0.2, device="auto",
        batch_size=256, random_state=None, verbose=0, memory=None,
    ):
        self.estimator = estimator
        self.temperature = temperature
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    def _validate_options(self) -> None:
        check_positive("temperature", self.temperature, allow_none=True)
        check_positive("calibration_fraction", self.calibration_fraction)

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        if self.temperature is not None:
            self.temperature_ = float(self.temperature)
            return
        with torch.no_grad():
            logits = torch.cat([
                self.model_(xb).float().cpu()
                for (xb,) in iter_batches(X_cal, batch_size=self.batch_size, device=self.device_)
            ])
        self.temperature_ = fit_temperature(logits, torch.as_tensor(y_cal))

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            return OutputDistribution.point_mass(self.model_(x).float() / self.temperature_)
