"""CVPClassifier's default scale rule: NLL-fitted scales times a held-out multiplier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.frozen import FrozenEstimator

from skuq import CVPClassifier
from skuq._prior import HELDOUT_TOLERANCE
from skuq.base import heldout_choice
from skuq.cvp.calibration import MULTIPLIER_GRID, multiplier_nll
from tests._helpers import make_classifier_net


@pytest.fixture(scope="module")
def fitted_pair(digits):
    """The same prefit net and posterior, fitted with each scale rule."""
    net = FrozenEstimator(
        make_classifier_net(max_epochs=10, module__n_outputs=5).fit(digits.X_train, digits.y_train)
    )
    X_cal, y_cal = digits.X_test[:150], digits.y_test[:150]
    fits = {}
    for rule in ("heldout", "nll"):
        est = CVPClassifier(net, scale_rule=rule, random_state=0)
        fits[rule] = est.fit(digits.X_train, digits.y_train, X_cal=X_cal, y_cal=y_cal)
    return fits, X_cal, y_cal


def test_default_scale_rule_is_heldout():
    assert CVPClassifier(make_classifier_net()).get_params()["scale_rule"] == "heldout"


def test_heldout_rule_takes_the_widest_multiplier_within_tolerance_of_the_best(fitted_pair):
    """The specification of the default: the per-layer scales fitted by NLL, all times
    the widest multiplier of the grid whose held-out NLL is within 5 % of the best one."""
    fits, X_cal, y_cal = fitted_pair
    est, plain = fits["heldout"], fits["nll"]
    grid = list(est.heldout_nll_)
    assert grid == list(MULTIPLIER_GRID) and grid == sorted(grid, reverse=True)
    nll = np.array(list(est.heldout_nll_.values()))
    m = est.variance_multiplier_
    i = grid.index(m)
    assert i == heldout_choice(nll)
    best = nll.min()
    assert nll[i] <= best * (1 + HELDOUT_TOLERANCE)
    if i > 0:  # the next wider multiplier is out of tolerance
        assert nll[i - 1] > best * (1 + HELDOUT_TOLERANCE)
    # the NLLs are those of the calibration rows at each multiplier of the fitted scales
    # (with the net's own logits as the mean, the default ``mean="net"``)
    x = torch.as_tensor(X_cal)
    with torch.no_grad():
        logits = est.model_(x)
    again = multiplier_nll(
        est.propagator_, [(x, torch.as_tensor(y_cal))], plain.layer_scales_, grid, [logits]
    )
    np.testing.assert_allclose(again, nll, rtol=1e-5)
    assert est.layer_scales_ == pytest.approx({k: v * m for k, v in plain.layer_scales_.items()})
    assert plain.variance_multiplier_ == 1.0 and plain.heldout_nll_ == {}


def test_heldout_rule_never_costs_more_than_tolerance_on_the_calibration_rows(fitted_pair):
    """The held-out NLL at the chosen multiplier is within 5 % of the grid's best, hence
    at most 5 % above the NLL-fitted scales' own (multiplier 1 is on the grid)."""
    fits, _, _ = fitted_pair
    nll = fits["heldout"].heldout_nll_
    assert nll[fits["heldout"].variance_multiplier_] <= (1 + HELDOUT_TOLERANCE) * nll[1.0]


def test_scale_rule_is_checked_and_ignored_without_calibration(digits):
    X, y = digits.X_train, digits.y_train
    with pytest.raises(ValueError, match="scale_rule must be one of"):
        CVPClassifier(make_classifier_net(max_epochs=1), scale_rule="best").fit(X, y)
    est = CVPClassifier(
        make_classifier_net(max_epochs=1), posterior={"1.weight": 1e-3}, calibration=None
    ).fit(X, y)
    assert est.layer_scales_ == {} and est.variance_multiplier_ == 1.0


def test_default_mean_is_the_nets_own_logits(fitted_pair, digits):
    """``mean="net"``: the predictive is the probit of the net's logits with the propagated
    variance; ``mean="propagated"`` uses the propagated mean, which the weight variance
    moves away from the logits."""
    fits, X_cal, y_cal = fitted_pair
    est = fits["heldout"]
    assert est.get_params()["mean"] == "net"
    x = torch.as_tensor(digits.X_test)
    with torch.no_grad():
        logits = est.model_(x)
        out = est.propagator_(x, layer_scales=est.layer_scales_)
    want = torch.softmax(logits / torch.sqrt(1 + torch.pi / 8 * out.variance), 1)
    np.testing.assert_allclose(est.predict_proba(digits.X_test), want.numpy(), atol=1e-5)
    other = CVPClassifier(est.estimator, mean="propagated", random_state=0)
    other.fit(digits.X_train, digits.y_train, X_cal=X_cal, y_cal=y_cal)
    with torch.no_grad():
        prop = other.propagator_(x, layer_scales=other.layer_scales_)
    moved = prop.mean
    want = torch.softmax(moved / torch.sqrt(1 + torch.pi / 8 * prop.variance), 1)
    np.testing.assert_allclose(other.predict_proba(digits.X_test), want.numpy(), atol=1e-5)
    assert not torch.allclose(moved, logits, atol=1e-3)
    with pytest.raises(ValueError, match="mean must be one of"):
        CVPClassifier(est.estimator, mean="map").fit(digits.X_train, digits.y_train)
