"""The regressors' default noise level: the RMS residual on rows the net was not trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split

from skuq import (
    DeepEnsembleRegressor,
    LaplaceRegressor,
    MAPRegressor,
    MCDropoutRegressor,
    RegVarRegressor,
)
from skuq._utils import seed_from_random_state
from tests._helpers import make_regressor_net

#: every regressor at its defaults (the ensemble with fewer members, for speed); L2M's
#: held-out prior retrains the net on every row after the split has served, so its noise
#: is the residual of the first net: tests/methods/test_l2m.py checks it on a prefit net
REGRESSORS = {
    "MAPRegressor": (MAPRegressor, {}, {}),
    "RegVarRegressor": (RegVarRegressor, {}, {}),
    "LaplaceRegressor": (LaplaceRegressor, {}, {}),
}
#: the regressors whose epistemic variance does not depend on the noise level
SPREAD_REGRESSORS = {
    "DeepEnsembleRegressor": (DeepEnsembleRegressor, {"n_estimators": 2}, {}),
    "MCDropoutRegressor": (MCDropoutRegressor, {}, {"module__dropout": 0.1}),
}


def _rms_residual(est, X, y) -> float:
    """RMS residual of the fitted estimator's deterministic net (dropout off) on (X, y)."""
    with torch.no_grad():
        pred = est.model_.eval()(torch.as_tensor(X, device=est.device_)).cpu().numpy()
    return float(np.sqrt(np.mean((pred[:, 0] - y) ** 2)))


@pytest.fixture(scope="module")
def split():
    rng = np.random.RandomState(0)
    X = rng.uniform(-2, 2, (160, 1)).astype(np.float32)
    y = (np.sin(2 * X[:, 0]) + 0.1 * rng.randn(160)).astype(np.float32)
    return X[:120], y[:120], X[120:], y[120:]


@pytest.mark.parametrize("name", list(REGRESSORS))
def test_noise_is_the_rms_residual_on_the_given_held_out_rows(name, split):
    cls, params, net_params = REGRESSORS[name]
    X, y, X_cal, y_cal = split
    est = cls(make_regressor_net(max_epochs=40, **net_params), random_state=0, **params)
    est.fit(X, y, X_cal=X_cal, y_cal=y_cal)
    assert float(est.sigma_noise_) == pytest.approx(_rms_residual(est, X_cal, y_cal), rel=1e-4)
    assert float(est.sigma_noise_) != pytest.approx(_rms_residual(est, X, y), rel=1e-2)


@pytest.mark.parametrize("name", list(SPREAD_REGRESSORS))
def test_a_spread_that_ignores_the_noise_is_counted_once(name, split):
    """Ensemble and MC dropout: noise variance + mean spread = held-out mean squared error."""
    cls, params, net_params = SPREAD_REGRESSORS[name]
    X, y, X_cal, y_cal = split
    est = cls(make_regressor_net(max_epochs=40, **net_params), random_state=0, **params)
    est.fit(X, y, X_cal=X_cal, y_cal=y_cal)
    spread = float(np.mean(est.predict_uncertainty(X_cal, "epistemic_variance")))
    assert spread > 0
    mse = _rms_residual(est, X_cal, y_cal) ** 2
    assert float(est.sigma_noise_) ** 2 == pytest.approx(max(mse - spread, 0.01 * mse), rel=1e-4)


def test_a_net_trained_in_fit_leaves_the_calibration_rows_out(split):
    """Without ``X_cal``, a fifth of the rows is held out of training for the noise level."""
    X, y, _, _ = split
    est = MAPRegressor(make_regressor_net(max_epochs=40), random_state=0).fit(X, y)
    _, X_cal, _, y_cal = train_test_split(
        X, y, test_size=round(0.2 * len(X)), random_state=seed_from_random_state(0)
    )
    assert est.sigma_noise_ == pytest.approx(_rms_residual(est, X_cal, y_cal), rel=1e-4)


def test_a_prefit_net_reads_the_noise_on_fits_rows(split):
    """A trained net never saw ``fit``'s data, so those rows are the held-out ones."""
    X, y, X_new, y_new = split
    net = make_regressor_net(max_epochs=40, module__n_outputs=1).fit(X, y.reshape(-1, 1))
    est = MAPRegressor(FrozenEstimator(net)).fit(X_new, y_new)
    assert est.sigma_noise_ == pytest.approx(_rms_residual(est, X_new, y_new), rel=1e-4)


def test_a_given_noise_level_sets_no_rows_aside():
    assert not RegVarRegressor(None, sigma_noise=0.1, prior_precision=1.0)._uses_calibration_split
    # RegVar's default prior is chosen on held-out rows: they are set aside for it
    assert RegVarRegressor(None, sigma_noise=0.1)._uses_calibration_split
    assert not LaplaceRegressor(None, sigma_noise=0.1)._uses_calibration_split
    assert not LaplaceRegressor(None, sigma_noise="marglik")._uses_calibration_split
    assert RegVarRegressor(None)._uses_calibration_split
    assert LaplaceRegressor(None)._uses_calibration_split
