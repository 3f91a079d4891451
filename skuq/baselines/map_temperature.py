"""The bare net (MAP) and temperature scaling: the first rows of every comparison.

MAP predicts with the trained net as it is; temperature scaling divides its
logits by one temperature fitted on held-out rows (:func:`fit_temperature`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from .._skorch import FITTED_ROWS_LOSS_RATIO, last_training_loss
from .._utils import check_positive, iter_batches
from ..base import BaseUQEstimator, UQClassifierMixin, UQRegressorMixin
from ..outputs import OutputDistribution

__all__ = [
    "MAPClassifier",
    "MAPRegressor",
    "TemperatureScalingClassifier",
    "fit_temperature",
    "LOG_TEMPERATURE_BOUNDS",
    "FITTED_ROWS_MAX_TEMPERATURE",
    "FITTED_ROWS_LOSS_RATIO",
]


class _MAPBase(BaseUQEstimator):
    """Shared part of the MAP classifier and regressor: the net's own outputs."""

    def __init__(
        self,
        estimator,
        *,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            return OutputDistribution.point_mass(self.model_(x).float())


class MAPClassifier(UQClassifierMixin, _MAPBase):
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

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        pass  # the trained net is the whole model


class MAPRegressor(UQRegressorMixin, _MAPBase):
    """The bare network for regression, with a homoscedastic noise level.

    ``sigma_noise_`` is the RMS residual of the trained net on held-out rows:
    ``X_cal``, ``y_cal`` given to ``fit``; else, for a net trained in ``fit``,
    a fifth of the rows, held out of its training; else, for a trained net
    (``FrozenEstimator``, ``nn.Module``), ``fit``'s rows, which it never saw.
    The residual on training rows understates the error on new rows (the
    more, the more the net overfits), and an interval built on it
    under-covers. The epistemic variance is zero, so the predictive std is
    the same on every row.

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

    _uses_calibration_split = True  # the noise level is read on held-out rows

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        self._fit_heldout_noise(X, y, X_cal, y_cal)


_NONFINITE_TEMPERATURE = (
    "cannot fit the temperature: the net's logits on the calibration rows are NaN or "
    "inf. Scale the inputs (e.g. a StandardScaler in a Pipeline), retrain the net with "
    "a lower lr, or pass a fixed temperature="
)
#: the search interval for ``log T``: T in [e^-5, e^5] ~ [0.0067, 148]
LOG_TEMPERATURE_BOUNDS = (-5.0, 5.0)


def fit_temperature(
    logits: Tensor, y: Tensor, max_iter: int = 200, bounds=LOG_TEMPERATURE_BOUNDS
) -> float:
    """The temperature ``T > 0`` minimizing the NLL of ``softmax(logits / T)``.

    A bounded 1-D search (Brent's method, ``scipy.optimize.minimize_scalar``) over
    ``log T`` in ``bounds``. The NLL is convex in ``1/T``, hence unimodal in
    ``log T``, so the search finds the global minimizer on the interval. Data
    that the net separates perfectly pushes ``T`` towards 0 without a finite
    minimum; the bound stops it at ``exp(bounds[0])`` instead of running away.

    Examples
    --------
    >>> import torch
    >>> from skuq.baselines import fit_temperature
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> y = torch.tensor([0, 1, 0, 0])  # one confident mistake in four rows
    >>> fit_temperature(logits, y) > 1  # softens the overconfident logits
    True
    """
    logits, y = logits.double(), torch.as_tensor(y).long()
    if len(logits) == 0:
        raise ValueError("no calibration rows to fit the temperature on")
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(_NONFINITE_TEMPERATURE)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / np.exp(log_t), y))

    res = minimize_scalar(
        nll, bounds=bounds, method="bounded", options={"xatol": 1e-6, "maxiter": max_iter}
    )
    t = float(np.exp(res.x))
    if not (np.isfinite(res.fun) and np.isfinite(t)):
        raise FloatingPointError(_NONFINITE_TEMPERATURE)
    return t


#: the fitted-rows check of temperature scaling: a temperature below this sharpens ...
FITTED_ROWS_MAX_TEMPERATURE = 0.9
#: ... and a calibration loss within FITTED_ROWS_LOSS_RATIO times the last training
#: epoch's loss looks like training rows (skuq._skorch, shared with the held-out priors)
_last_training_loss = last_training_loss


def _criterion_loss(net, logits: Tensor, y: Tensor) -> float | None:
    """The net's own training criterion on ``logits`` (so label smoothing and class
    weights count as in ``train_loss``); None for criteria other than cross-entropy."""
    criterion = getattr(net, "criterion_", None)
    weight = getattr(criterion, "weight", None)
    weight = None if weight is None else weight.detach().double().cpu()
    if isinstance(criterion, torch.nn.CrossEntropyLoss):
        smoothing = float(criterion.label_smoothing)
    elif isinstance(criterion, torch.nn.NLLLoss):  # on log-probabilities: the same loss
        smoothing = 0.0
    else:
        return None
    loss = torch.nn.functional.cross_entropy(
        logits.double(), y.long(), weight=weight, label_smoothing=smoothing
    )
    return float(loss)


class TemperatureScalingClassifier(UQClassifierMixin, BaseUQEstimator):
    """The net's logits divided by one temperature fitted on held-out data by NLL.

    Guo et al. (2017). A net trained inside ``fit`` is trained on
    ``1 - calibration_fraction`` of the rows and the temperature is fitted on
    the rest (stratified); an already trained net (``FrozenEstimator`` or a
    ``torch.nn.Module``) uses all of ``fit``'s rows for the temperature. A
    calibration split can also be given as ``fit(X, y, X_cal=..., y_cal=...)``.

    Rows the net was trained on must not calibrate it: there a trained net is
    more confident and more often right than on new rows, so the fitted
    temperature comes out below 1 and *sharpens* the probabilities, which makes
    the NLL on new and shifted inputs worse (several times the bare net's
    where the net fits its training rows closely). Which rows a trained net
    has seen is not recorded anywhere, so ``fit`` checks for the symptom and
    warns (``UserWarning``, with the fix) when an already trained skorch net

    * gets a fitted temperature below 0.9 (sharpening), and
    * has a loss on the calibration rows (its own criterion at T = 1) at most
      twice the training loss of its last epoch (``net.history``); held-out
      rows of a net that fits its training rows closely sit far above it.

    It also warns, whatever the net, when the net classifies every calibration
    row correctly: the NLL then has no finite minimum, the temperature runs to
    its search bound and the probabilities are pushed to 0 and 1. The check
    cannot prove where rows came from: a net that fits held-out rows as well
    as its training rows (strong regularization, early stopping) can trigger
    it on a real held-out split, where sharpening is then what the data asks
    for; a ``torch.nn.Module`` has no training record, so only the separation
    is checked there.

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
        self,
        estimator,
        *,
        temperature=None,
        calibration_fraction=0.2,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
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
            logits = torch.cat(
                [
                    self.model_(xb).float().cpu()
                    for (xb,) in iter_batches(
                        X_cal, batch_size=self.batch_size, device=self.device_
                    )
                ]
            )
        self.temperature_ = fit_temperature(logits, torch.as_tensor(y_cal))
        self._warn_on_fitted_rows(logits, torch.as_tensor(y_cal))

    def _warn_on_fitted_rows(self, logits: Tensor, y: Tensor) -> None:
        """Warn when the calibration rows look like rows the net was trained on."""
        import warnings

        t = self.temperature_
        fix = (
            "Fit the temperature on rows the net did not train on: "
            "fit(X_heldout, y_heldout) with the trained net, or fit(X, y, X_cal=X_heldout, "
            "y_cal=y_heldout), or give the untrained skorch net so that fit holds out "
            "calibration_fraction of the rows itself."
        )
        train_loss = _last_training_loss(self.net_) if self._net_is_prefit() else None
        if train_loss is not None and t < FITTED_ROWS_MAX_TEMPERATURE:
            cal_loss = _criterion_loss(self.net_, logits, y)
            if cal_loss is not None and cal_loss <= FITTED_ROWS_LOSS_RATIO * train_loss:
                warnings.warn(
                    "TemperatureScalingClassifier: the calibration rows look like rows the "
                    f"net was trained on: the net's loss on them ({cal_loss:.3g}) is within "
                    f"{FITTED_ROWS_LOSS_RATIO:g}x the training loss of its last epoch "
                    f"({train_loss:.3g}), and the fitted temperature {t:.3g} < 1 sharpens "
                    "its probabilities, which makes the NLL on new and shifted inputs "
                    f"worse. {fix} (A net that fits held-out rows as well as its training "
                    "rows can trigger this on a real held-out split; then it is harmless.)",
                    UserWarning,
                    stacklevel=4,
                )
                return
        true = logits.gather(1, y.long()[:, None])
        others = logits.scatter(1, y.long()[:, None], float("-inf"))
        if t < 1 and bool((true[:, 0] > others.max(dim=1).values).all()):
            warnings.warn(
                f"TemperatureScalingClassifier: the net classifies every calibration row "
                "correctly, so the NLL keeps falling as the temperature goes to 0 and has no "
                f"finite minimum; the fitted temperature {t:.3g} only marks where the search "
                "stopped and pushes the probabilities towards 0 and 1. This happens on rows "
                f"the net was trained on, or on too few held-out rows. {fix} Or pass a fixed "
                "temperature=.",
                UserWarning,
                stacklevel=4,
            )

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            return OutputDistribution.point_mass(self.model_(x).float() / self.temperature_)
