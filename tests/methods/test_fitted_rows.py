"""Held-out defaults of an already trained net warn when its held-out rows are its training rows.

An already trained net (``FrozenEstimator``) uses ``fit``'s rows as the held-out rows of
``prior_precision="heldout"`` and of the regressors' noise level. Rows the net was
trained on make both too small: the prior's NLL is best at the bare net, and the
residuals understate the error on new rows. The check reads the symptom (a loss on those
rows near the net's last training loss), as temperature scaling's does.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_friedman1
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split

from skuq import L2MClassifier, LaplaceClassifier, LaplaceRegressor, MAPRegressor
from tests._helpers import make_classifier_net, make_regressor_net

FITTED = "look like rows the net was trained on"


@pytest.fixture(scope="module")
def classification(digits):
    X_fit, X_held, y_fit, y_held = train_test_split(
        digits.X_train, digits.y_train, test_size=0.3, random_state=0, stratify=digits.y_train
    )
    torch.manual_seed(0)
    net = make_classifier_net(max_epochs=30, lr=1e-2, module__n_outputs=5).fit(X_fit, y_fit)
    return net, X_fit, y_fit, X_held, y_held


@pytest.fixture(scope="module")
def regression():
    X, y = make_friedman1(n_samples=300, noise=1.0, random_state=0)
    X, y = X.astype(np.float32), ((y - y.mean()) / y.std()).astype(np.float32)
    X_fit, X_held, y_fit, y_held = train_test_split(X, y, test_size=0.3, random_state=0)
    torch.manual_seed(0)
    net = make_regressor_net(max_epochs=300, hidden=(64, 64), lr=3e-3, module__n_outputs=1)
    net.fit(X_fit, y_fit[:, None])
    return net, X_fit, y_fit, X_held, y_held


def _no_fitted_rows_warning(fit) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit()
    assert not [w for w in record if FITTED in str(w.message)]


@pytest.mark.parametrize("cls", [LaplaceClassifier, L2MClassifier])
def test_held_out_prior_on_training_rows_warns_and_is_narrower(classification, cls):
    net, X_fit, y_fit, X_held, y_held = classification
    with pytest.warns(UserWarning, match=FITTED) as record:
        on_train = cls(FrozenEstimator(net)).fit(X_fit, y_fit)
    assert "X_cal=X_heldout" in str(record[0].message)
    held = cls(FrozenEstimator(net))
    _no_fitted_rows_warning(lambda: held.fit(X_fit, y_fit, X_cal=X_held, y_cal=y_held))
    # what the warning is for: the rows the net fitted ask for a narrower posterior
    assert on_train.prior_precision_ > held.prior_precision_


def test_a_given_prior_never_checks_the_rows(classification):
    net, X_fit, y_fit, _, _ = classification
    _no_fitted_rows_warning(
        lambda: LaplaceClassifier(FrozenEstimator(net), prior_precision=1.0).fit(X_fit, y_fit)
    )


@pytest.mark.parametrize("cls", [MAPRegressor, LaplaceRegressor])
def test_noise_on_training_rows_warns_and_is_smaller(regression, cls):
    net, X_fit, y_fit, X_held, y_held = regression
    with pytest.warns(UserWarning, match=FITTED) as record:
        on_train = cls(FrozenEstimator(net)).fit(X_fit, y_fit)
    assert "X_cal=X_heldout" in str(record[0].message)
    held = cls(FrozenEstimator(net))
    _no_fitted_rows_warning(lambda: held.fit(X_fit, y_fit, X_cal=X_held, y_cal=y_held))
    assert on_train.sigma_noise_ < 0.5 * held.sigma_noise_


def test_a_given_noise_level_never_checks_the_rows(regression):
    net, X_fit, y_fit, _, _ = regression
    _no_fitted_rows_warning(
        lambda: LaplaceRegressor(FrozenEstimator(net), sigma_noise=0.3).fit(X_fit, y_fit)
    )
