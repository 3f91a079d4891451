"""Temperature scaling warns when its calibration rows are rows the net was trained on."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from torch import nn

from skuq import MAPClassifier, TemperatureScalingClassifier
from skuq.baselines.map_temperature import _criterion_loss, _last_training_loss
from skuq.metrics import negative_log_likelihood
from tests._helpers import make_classifier_net

FITTED = "look like rows the net was trained on"


@pytest.fixture(scope="module")
def split(digits):
    X_fit, X_held, y_fit, y_held = train_test_split(
        digits.X_train, digits.y_train, test_size=0.3, random_state=0, stratify=digits.y_train
    )
    torch.manual_seed(0)
    net = make_classifier_net(max_epochs=30, lr=1e-2, module__n_outputs=5).fit(X_fit, y_fit)
    return net, X_fit, y_fit, X_held, y_held


def test_training_rows_warn_with_the_fix_and_the_harm_is_real(split, digits):
    net, X_fit, y_fit, _, _ = split
    with pytest.warns(UserWarning, match=FITTED) as record:
        est = TemperatureScalingClassifier(FrozenEstimator(net)).fit(X_fit, y_fit)
    message = str(record[0].message)
    assert "X_cal=X_heldout" in message and "fit(X_heldout, y_heldout)" in message
    assert est.temperature_ < 0.9  # sharpened
    # what the warning is for: the test NLL is worse than the bare net's
    bare = MAPClassifier(FrozenEstimator(net)).fit(X_fit, y_fit)
    nll_bare = negative_log_likelihood(digits.y_test, bare.predict_proba(digits.X_test))
    nll_ts = negative_log_likelihood(digits.y_test, est.predict_proba(digits.X_test))
    assert nll_ts > 1.5 * nll_bare


def test_training_rows_given_as_x_cal_warn_too(split):
    net, X_fit, y_fit, X_held, y_held = split
    with pytest.warns(UserWarning, match=FITTED):
        TemperatureScalingClassifier(FrozenEstimator(net)).fit(
            X_held, y_held, X_cal=X_fit, y_cal=y_fit
        )


@pytest.mark.parametrize("how", ["fit", "x_cal"])
def test_a_real_held_out_split_does_not_warn(split, digits, how):
    net, X_fit, y_fit, X_held, y_held = split
    est = TemperatureScalingClassifier(FrozenEstimator(net))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if how == "fit":
            est.fit(X_held, y_held)
        else:
            est.fit(X_fit, y_fit, X_cal=X_held, y_cal=y_held)
    bare = MAPClassifier(FrozenEstimator(net)).fit(X_fit, y_fit)
    nll_bare = negative_log_likelihood(digits.y_test, bare.predict_proba(digits.X_test))
    nll_ts = negative_log_likelihood(digits.y_test, est.predict_proba(digits.X_test))
    assert nll_ts < 1.1 * nll_bare


def test_a_net_trained_inside_fit_calibrates_on_its_own_held_out_rows_without_warning(digits):
    est = TemperatureScalingClassifier(make_classifier_net(max_epochs=30, lr=1e-2), random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.fit(digits.X_train, digits.y_train)


def test_a_fixed_temperature_never_warns(split):
    net, X_fit, y_fit, _, _ = split
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TemperatureScalingClassifier(FrozenEstimator(net), temperature=0.5).fit(X_fit, y_fit)


def test_a_module_on_perfectly_separated_rows_warns_of_the_bound():
    # no training record: only the bound is checked; every row right by a wide margin
    rng = np.random.RandomState(0)
    X = rng.randn(60, 3).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    X[:, 0] += np.where(y == 1, 1.0, -1.0)
    module = nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[-5.0, 0, 0], [5.0, 0, 0]]))
        module.bias.zero_()
    with pytest.warns(UserWarning, match="classifies every calibration row correctly") as record:
        est = TemperatureScalingClassifier(module).fit(X, y)
    assert "fixed temperature=" in str(record[0].message)
    assert est.temperature_ < 1  # where the search stopped on a flat NLL


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_calibration_loss_is_the_nets_own_training_loss(smoothing, weighted):
    """Like for like: on the training batch, with lr = 0 (weights unchanged), the loss the
    check computes equals the one skorch recorded, label smoothing and class weights
    included."""
    rng = np.random.RandomState(1)
    X = rng.randn(50, 4).astype(np.float32)
    y = rng.randint(0, 3, 50)
    weight = torch.tensor([1.0, 2.0, 0.5]) if weighted else None
    net = make_classifier_net(
        max_epochs=1,
        lr=0.0,
        batch_size=50,
        module__n_outputs=3,
        criterion__label_smoothing=smoothing,
        criterion__weight=weight,
    )
    torch.manual_seed(0)
    net.fit(X, y)
    with torch.no_grad():
        logits = net.module_(torch.as_tensor(X))
    got = _criterion_loss(net, logits, torch.as_tensor(y))
    assert got == pytest.approx(_last_training_loss(net), rel=1e-5)


def test_no_training_record_means_no_fingerprint():
    assert _last_training_loss(nn.Linear(2, 2)) is None
    net = make_classifier_net(criterion=nn.MultiMarginLoss)
    net.initialize()
    assert _criterion_loss(net, torch.zeros(3, 2), torch.tensor([0, 1, 0])) is None
