"""The shared estimator base: scikit-learn workflows, nets, devices and bad input."""

import pickle

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier
from torch import nn

import skuq
from skuq import MAPClassifier, MAPRegressor, TemperatureScalingClassifier
from skuq._utils import check_finite
from skuq.baselines import LOG_TEMPERATURE_BOUNDS, fit_temperature
from skuq.metrics import get_scorer
from skuq.nets import MLP
from skuq.outputs import OutputDistribution
from tests._helpers import (
    CountingMLP,
    assert_heldout_rule,
    make_classifier_net,
    make_regressor_net,
)


@pytest.fixture(scope="module")
def small(digits):
    return digits.X_train[:300], digits.y_train[:300]


@pytest.fixture(scope="module")
def fitted_map(small):
    X, y = small
    return MAPClassifier(make_classifier_net(max_epochs=10), random_state=0).fit(X, y)


def test_fit_sets_the_fitted_attributes(fitted_map, small):
    X, y = small
    np.testing.assert_array_equal(fitted_map.classes_, np.unique(y))
    assert fitted_map.n_features_in_ == X.shape[1]
    assert isinstance(fitted_map.model_, torch.nn.Module)
    assert fitted_map.device_.type in ("cpu", "cuda")


def test_predict_proba_equals_the_skorch_net(fitted_map, small):
    X, _ = small
    np.testing.assert_allclose(
        fitted_map.predict_proba(X[:50]), fitted_map.net_.predict_proba(X[:50]), atol=1e-6
    )


def test_batch_size_does_not_change_predictions(fitted_map, small):
    X, _ = small
    other = clone(fitted_map).set_params(batch_size=7)
    other.__dict__.update({k: v for k, v in fitted_map.__dict__.items() if k.endswith("_")})
    other._seed = fitted_map._seed
    np.testing.assert_allclose(other.predict_proba(X), fitted_map.predict_proba(X), atol=1e-6)


def test_clone_keeps_params_and_drops_fit(fitted_map):
    c = clone(fitted_map)
    assert c.get_params()["random_state"] == 0
    assert not hasattr(c, "model_")
    assert c.get_params()["estimator__lr"] == fitted_map.get_params()["estimator__lr"]


def test_pickle_round_trip_keeps_predictions(fitted_map, small, tmp_path):
    X, _ = small
    path = tmp_path / "est.joblib"
    joblib.dump(fitted_map, path)
    loaded = joblib.load(path)
    np.testing.assert_allclose(loaded.predict_proba(X), fitted_map.predict_proba(X))
    np.testing.assert_allclose(
        pickle.loads(pickle.dumps(fitted_map)).predict_uncertainty(X),
        fitted_map.predict_uncertainty(X),
    )


def test_string_labels_and_pandas_input(small):
    X, y = small
    names = np.array(["zero", "one", "two", "three", "four"])[y]
    frame = pd.DataFrame(X, columns=[f"px{i}" for i in range(X.shape[1])])
    est = MAPClassifier(make_classifier_net(max_epochs=5), random_state=0).fit(frame, names)
    assert set(est.predict(frame)) <= set(names)
    np.testing.assert_array_equal(est.classes_, np.sort(np.unique(names)))
    np.testing.assert_array_equal(est.feature_names_in_, frame.columns)
    assert est.score(frame, names) > 0.5


def test_pipeline_with_scaler(small):
    X, y = small
    pipe = Pipeline([("scale", StandardScaler()), ("uq", MAPClassifier(make_classifier_net(5)))])
    pipe.fit(X, y)
    assert pipe.predict_proba(X).shape == (len(X), 5)


def test_cross_val_score_and_grid_search_with_skuq_scorers(small):
    X, y = small
    est = TemperatureScalingClassifier(make_classifier_net(max_epochs=5), random_state=0)
    scores = cross_val_score(est, X, y, cv=3, scoring=get_scorer("neg_expected_calibration_error"))
    assert scores.shape == (3,) and np.all(scores <= 0)
    grid = GridSearchCV(
        est,
        {"temperature": [0.5, 1.0, 2.0]},
        cv=2,
        scoring=get_scorer("neg_negative_log_likelihood"),
    ).fit(X, y)
    assert grid.best_params_["temperature"] in (0.5, 1.0, 2.0)
    assert np.all(np.isfinite(grid.cv_results_["mean_test_score"]))


def test_frozen_estimator_is_never_retrained(small):
    X, y = small
    net = make_classifier_net(max_epochs=5, module=CountingMLP, module__n_outputs=5).fit(X, y)
    before = CountingMLP.n_built
    weights = [p.detach().clone() for p in net.module_.parameters()]
    est = TemperatureScalingClassifier(FrozenEstimator(net)).fit(X, y)
    assert CountingMLP.n_built == before
    for w, p in zip(weights, net.module_.parameters(), strict=True):
        torch.testing.assert_close(w, p.detach())
    # a trained net is not trained on fit's data, so all rows calibrate
    assert est.temperature_ > 0


def test_plain_torch_module_is_used_as_is(small):
    X, y = small
    module = make_classifier_net(max_epochs=5, module__n_outputs=5).fit(X, y).module_
    est = MAPClassifier(module).fit(X, y)
    with torch.no_grad():
        expected = torch.softmax(module(torch.as_tensor(X[:20])), -1).numpy()
    np.testing.assert_allclose(est.predict_proba(X[:20]), expected, atol=1e-6)


def test_memory_trains_the_net_once_per_fold_in_a_grid_search(small, tmp_path):
    X, y = small
    est = TemperatureScalingClassifier(
        make_classifier_net(max_epochs=3, module=CountingMLP),
        random_state=0,
        memory=str(tmp_path),
    )
    CountingMLP.n_built = 0
    GridSearchCV(est, {"temperature": [0.5, 1.0, 2.0, 4.0]}, cv=3).fit(X, y)
    assert CountingMLP.n_built == 3 + 1  # one per fold, plus the final refit
    CountingMLP.n_built = 0
    GridSearchCV(est.set_params(memory=None), {"temperature": [0.5, 1.0]}, cv=3).fit(X, y)
    assert CountingMLP.n_built == 3 * 2 + 1  # without memory, once per candidate and fold


def test_fit_leaves_the_callers_global_torch_rng_untouched(small):
    X, y = small
    torch.manual_seed(123)
    before = torch.get_rng_state()
    MAPClassifier(make_classifier_net(max_epochs=2), random_state=0).fit(X, y)
    assert torch.equal(torch.get_rng_state(), before)
    # and the caller's stream goes on as if fit had not run
    expected = torch.randn(3, generator=torch.Generator().set_state(before))
    torch.testing.assert_close(torch.randn(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_fit_on_cuda_leaves_the_callers_cuda_rng_untouched(small):
    X, y = small
    torch.cuda.manual_seed(123)
    before_cpu, before_cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    a = MAPClassifier(make_classifier_net(max_epochs=2), device="cuda", random_state=0).fit(X, y)
    assert torch.equal(torch.get_rng_state(), before_cpu)
    assert torch.equal(torch.cuda.get_rng_state(), before_cuda)
    b = MAPClassifier(make_classifier_net(max_epochs=2), device="cuda", random_state=0).fit(X, y)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-6)


def test_random_state_makes_training_reproducible(small):
    X, y = small
    a = MAPClassifier(make_classifier_net(max_epochs=3), random_state=3).fit(X, y)
    b = MAPClassifier(make_classifier_net(max_epochs=3), random_state=3).fit(X, y)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-6)


def test_softmax_output_nets_get_their_exact_logits(small):
    X, y = small

    class SoftmaxMLP(torch.nn.Sequential):
        def __init__(self, n_outputs=2):
            super().__init__(
                torch.nn.Flatten(),
                torch.nn.LazyLinear(16),
                torch.nn.ReLU(),
                torch.nn.LazyLinear(n_outputs),
                torch.nn.Softmax(dim=-1),
            )

    net = NeuralNetClassifier(  # skorch's default criterion: NLLLoss on probabilities
        SoftmaxMLP,
        optimizer=torch.optim.Adam,
        lr=1e-2,
        max_epochs=5,
        train_split=None,
        verbose=0,
    )
    est = TemperatureScalingClassifier(net, temperature=2.0, random_state=0).fit(X, y)
    x = torch.as_tensor(X[:10])
    with torch.no_grad():
        logits = torch.nn.Sequential(*list(est.net_.module_.children())[:-1])(x)
    np.testing.assert_allclose(
        est.predict_proba(X[:10]), torch.softmax(logits / 2.0, -1).numpy(), atol=1e-6
    )


def test_regressor_band_and_uncertainty_parts(gap_data):
    est = MAPRegressor(make_regressor_net(max_epochs=30), random_state=0)
    X_cal, y_cal = gap_data.X[150:], gap_data.y[150:]
    est.fit(gap_data.X[:150], gap_data.y[:150], X_cal=X_cal, y_cal=y_cal)
    mean, std = est.predict(gap_data.X_test, return_std=True)
    assert mean.shape == std.shape == (len(gap_data.X_test),)
    np.testing.assert_allclose(std, est.sigma_noise_)
    np.testing.assert_allclose(est.predict_uncertainty(gap_data.X_test, "epistemic_variance"), 0)
    np.testing.assert_allclose(
        est.predict_uncertainty(gap_data.X_test, "variance"), est.sigma_noise_**2, rtol=1e-6
    )
    residual = est.predict(X_cal) - y_cal  # the noise is read on the held-out rows
    assert est.sigma_noise_ == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-4)


class _RoundingRegressor(MAPRegressor):
    """A MAP regressor whose epistemic variance came out as -1e-9 (float rounding)."""

    def _predict_batch(self, x):
        with torch.no_grad():
            mean = self.model_(x).float()
        return OutputDistribution.gaussian(mean, torch.full_like(mean, -1e-9))


def test_tiny_negative_variance_gives_zero_not_nan(gap_data):
    est = _RoundingRegressor(make_regressor_net(max_epochs=2), random_state=0)
    est.fit(gap_data.X, gap_data.y)
    est.sigma_noise_ = 1e-6  # a net that fits its data exactly: noise variance 1e-12
    _, std = est.predict(gap_data.X_test, return_std=True)
    assert np.all(np.isfinite(std)) and np.all(std >= 0)
    for kind in ("std", "variance", "epistemic_variance"):
        u = est.predict_uncertainty(gap_data.X_test, kind)
        assert np.all(np.isfinite(u)) and np.all(u >= 0), kind
    np.testing.assert_array_equal(
        est.predict_uncertainty(gap_data.X_test, "epistemic_variance"), 0.0
    )


def test_multi_output_regression(gap_data):
    y2 = np.c_[gap_data.y, -gap_data.y]
    est = MAPRegressor(make_regressor_net(max_epochs=5), random_state=0).fit(gap_data.X, y2)
    mean, std = est.predict(gap_data.X_test, return_std=True)
    assert mean.shape == std.shape == (len(gap_data.X_test), 2)


# ------------------------------------------------------------------ bad input
def test_nan_and_inf_inputs_are_refused(small):
    X, y = small
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MAPClassifier(make_classifier_net(2)).fit(bad, y)
    est = MAPClassifier(make_classifier_net(2)).fit(X, y)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        est.predict_proba(bad)


def test_wrong_number_of_features_at_predict(fitted_map, small):
    X, _ = small
    with pytest.raises(ValueError, match="features"):
        fitted_map.predict(X[:, :10])


def test_image_inputs_of_another_shape_are_refused_naming_both_shapes(small):
    X, y = small
    images = X.reshape(-1, 1, 8, 8)
    est = MAPClassifier(make_classifier_net(max_epochs=2), random_state=0).fit(images, y)
    assert est.predict_proba(images[:5]).shape == (5, 5)
    bigger = np.zeros((5, 1, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match=r"shape \(1, 16, 16\).*\(1, 8, 8\)"):
        est.predict(bigger)
    # same number of pixels, so a flattening net would silently give garbage
    with pytest.raises(ValueError, match=r"shape \(1, 4, 16\).*\(1, 8, 8\)"):
        est.predict_proba(X[:5].reshape(-1, 1, 4, 16))


def test_calibration_images_of_another_shape_are_refused(small):
    X, y = small
    images = X.reshape(-1, 1, 8, 8)
    est = TemperatureScalingClassifier(make_classifier_net(max_epochs=2), random_state=0)
    with pytest.raises(ValueError, match=r"X_cal has rows of shape \(1, 4, 16\)"):
        est.fit(images, y, X_cal=X[:50].reshape(-1, 1, 4, 16), y_cal=y[:50])


def test_x_cal_and_y_cal_of_different_lengths_are_refused(small):
    X, y = small
    est = TemperatureScalingClassifier(make_classifier_net(max_epochs=2), random_state=0)
    with pytest.raises(ValueError, match="X_cal has 50 rows but y_cal has 40"):
        est.fit(X, y, X_cal=X[:50], y_cal=y[:40])


def test_non_finite_outputs_are_explained_with_advice_that_can_be_followed():
    with pytest.raises(FloatingPointError) as info:
        check_finite(torch.tensor([0.0, float("nan")]), "the predicted output variance")
    message = str(info.value)
    assert "the predicted output variance contains NaN or inf" in message
    assert "scale the inputs" in message and "prior_precision" in message
    assert "float64" not in message  # inputs are cast to float32: not advice one can follow


def test_non_finite_residuals_say_what_to_do(small):
    X, _ = small
    module = torch.nn.Sequential(torch.nn.Linear(64, 1))
    y = np.full(len(X), 1e30)  # float32 can hold it, its square overflows
    with pytest.raises(FloatingPointError, match="non-finite residuals.*standardize"):
        MAPRegressor(module).fit(X, y)


def test_a_single_class_is_refused(small):
    X, _ = small
    with pytest.raises(ValueError, match="at least two classes"):
        MAPClassifier(make_classifier_net(2)).fit(X, np.zeros(len(X), dtype=int))


def test_predict_before_fit():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        MAPClassifier(make_classifier_net(2)).predict(np.zeros((2, 64)))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
        ({"calibration_fraction": 0.0}, "calibration_fraction"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_bad_options_are_named(small, params, message):
    X, y = small
    est = TemperatureScalingClassifier(make_classifier_net(2), **params)
    with pytest.raises(ValueError, match=message):
        est.fit(X, y)


def test_unknown_uncertainty_kind(fitted_map, small):
    with pytest.raises(ValueError, match="kind must be one of"):
        fitted_map.predict_uncertainty(small[0], kind="confusion")


def test_not_a_net_is_refused(small):
    with pytest.raises(TypeError, match="skorch net"):
        MAPClassifier(object()).fit(*small)


def test_net_with_wrong_output_width_is_explained(small):
    X, y = small
    module = torch.nn.Sequential(torch.nn.Linear(64, 3))  # 5 classes in y
    with pytest.raises(ValueError, match="must output"):
        MAPClassifier(module).fit(X, y)


def test_a_network_in_another_precision_is_refused_saying_how_to_convert(small):
    X, y = small
    for dtype in (torch.float64, torch.bfloat16):
        module = nn.Linear(X.shape[1], 5).to(dtype)
        with pytest.raises(TypeError, match=r"module\.float\(\)"):
            MAPClassifier(module).fit(X, y)


@pytest.mark.parametrize("name", ["MAPClassifier", "LaplaceClassifier", "DeepEnsembleClassifier"])
def test_a_binary_skorch_net_is_refused_before_training_saying_what_to_use(small, name):
    """NeuralNetBinaryClassifier (one BCE logit) would fail inside skorch's training
    with a dtype error; it is refused up front, naming the net to use instead."""
    X, y = small
    X, y = X[y < 2], y[y < 2]
    net = NeuralNetBinaryClassifier(
        MLP, module__n_outputs=1, max_epochs=1, verbose=0, train_split=None
    )
    with pytest.raises(TypeError, match="NeuralNetClassifier with criterion"):
        getattr(skuq, name)(net).fit(X, y)


def test_unexpected_fit_params_are_refused(small):
    with pytest.raises(TypeError, match="unexpected keyword"):
        MAPClassifier(make_classifier_net(2)).fit(*small, context=np.zeros((3, 64)))


def test_too_small_calibration_split_is_explained(small):
    X, y = small
    with pytest.raises(ValueError, match="too few rows"):
        TemperatureScalingClassifier(make_classifier_net(2), calibration_fraction=0.01).fit(
            X[:40], y[:40]
        )


def test_cuda_device_when_available(small):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    est = MAPClassifier(make_classifier_net(3), device="cuda").fit(*small)
    assert next(est.model_.parameters()).is_cuda
    assert est.predict_proba(small[0]).shape == (len(small[0]), 5)


# --------------------------------------------------------- temperature scaling
def _grid_temperature(logits: torch.Tensor, y: np.ndarray):
    """The NLL minimizer over a dense grid of log T (step 1e-3 on the search interval)."""
    log_t = torch.arange(*LOG_TEMPERATURE_BOUNDS, 1e-3, dtype=torch.float64)
    z = logits.double()[None] / log_t.exp()[:, None, None]
    target = torch.as_tensor(y).long().expand(len(log_t), -1)
    nll = torch.nn.functional.cross_entropy(z.transpose(1, 2), target, reduction="none")
    nll = nll.mean(dim=1)
    best = int(nll.argmin())
    return float(log_t[best].exp()), float(nll[best])


def _nll(logits, y, t):
    return float(torch.nn.functional.cross_entropy(logits.double() / t, torch.as_tensor(y)))


@pytest.fixture(scope="module")
def trained_module(digits):
    net = make_classifier_net(max_epochs=10, module__n_outputs=5)
    return net.fit(digits.X_train[:300], digits.y_train[:300]).module_


def test_fitted_temperature_is_the_nll_minimizer_on_x_cal(trained_module, digits):
    X_cal, y_cal = digits.X_test[:200], digits.y_test[:200].copy()
    y_cal[::3] = (y_cal[::3] + 1) % 5  # a third mislabelled: T must differ from fit's X
    est = TemperatureScalingClassifier(trained_module).fit(
        digits.X_train[:300], digits.y_train[:300], X_cal=X_cal, y_cal=y_cal
    )
    with torch.no_grad():
        logits = trained_module(torch.as_tensor(X_cal))
    t_grid, nll_grid = _grid_temperature(logits, y_cal)
    assert est.temperature_ == pytest.approx(t_grid, rel=2e-3)
    assert _nll(logits, y_cal, est.temperature_) <= nll_grid + 1e-9
    # the temperature is the one of X_cal, not of fit's X (which all calibrate otherwise)
    with torch.no_grad():
        train_logits = trained_module(torch.as_tensor(digits.X_train[:300]))
    t_train, _ = _grid_temperature(train_logits, digits.y_train[:300])
    assert abs(np.log(est.temperature_) - np.log(t_train)) > 0.5
    np.testing.assert_allclose(
        est.predict_proba(X_cal),
        torch.softmax(logits / est.temperature_, -1).numpy(),
        atol=1e-6,
    )


@pytest.mark.parametrize("margin", [1.0, 5.0, 20.0])
def test_separable_calibration_data_gets_a_bounded_nll_minimizing_temperature(margin):
    # every row right by a wide margin: the NLL falls monotonically as T -> 0
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(100, 5, generator=gen, dtype=torch.float64)
    y = logits.argmax(1)
    logits[torch.arange(100), y] += 3
    logits = logits * margin
    t = fit_temperature(logits, y)
    low, high = np.exp(LOG_TEMPERATURE_BOUNDS)
    assert low * (1 - 1e-6) <= t <= high * (1 + 1e-6)
    _, nll_grid = _grid_temperature(logits, y.numpy())
    assert _nll(logits, y, t) <= nll_grid + 1e-9


def test_nll_of_random_logits_is_minimized_against_a_grid():
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(300, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (300,), generator=gen)  # labels unrelated: T large
    t_grid, nll_grid = _grid_temperature(logits, y.numpy())
    t = fit_temperature(logits, y)
    assert t == pytest.approx(t_grid, rel=2e-3)
    assert _nll(logits, y, t) <= nll_grid + 1e-9


def test_non_finite_calibration_logits_say_what_to_do():
    logits = torch.tensor([[0.0, float("inf")], [1.0, 0.0]])
    with pytest.raises(FloatingPointError, match="Scale the inputs.*fixed temperature="):
        fit_temperature(logits, torch.tensor([0, 1]))


# ------------------------------------------------------------- held-out prior rule
def test_heldout_choice_walks_to_the_widest_posterior_within_the_tolerance():
    from skuq.base import heldout_choice

    # grid increasing: index 0 is the widest posterior
    nll = [0.90, 0.40, 0.208, 0.21, 0.20, 0.25]
    assert heldout_choice(nll, 0.05) == 2  # 0.208 and 0.21 are within 0.21; 0.40 is not
    assert heldout_choice(nll, 0.0) == 4  # no tolerance: the minimum
    assert heldout_choice(nll, 10.0) == 0  # everything within: the grid's widest end
    # the walk stops at the first value outside, even if a wider one is back inside
    assert heldout_choice([0.205, 0.50, 0.205, 0.20], 0.05) == 2
    # a value whose predictive failed (NaN) is never chosen and stops the walk
    assert heldout_choice([0.205, float("nan"), 0.20], 0.05) == 2
    with pytest.raises(FloatingPointError, match="not finite at any prior precision"):
        heldout_choice([float("nan"), float("inf")])
    # a negative NLL (a regression density) widens by a share of its magnitude
    assert heldout_choice([-0.80, -0.96, -1.0], 0.05) == 1


def test_classifiers_widen_and_regressors_take_the_best_held_out_prior():
    from sklearn.frozen import FrozenEstimator

    from skuq import LaplaceClassifier, LaplaceRegressor
    from skuq.datasets import load_digits_ood

    d = load_digits_ood()
    net = make_classifier_net(max_epochs=5, module__n_outputs=5)
    net.fit(d.X_train[:300], d.y_train[:300])
    clf = LaplaceClassifier(FrozenEstimator(net), random_state=0).fit(
        d.X_train[:300], d.y_train[:300], X_cal=d.X_test[:100], y_cal=d.y_test[:100]
    )
    assert_heldout_rule(clf, tolerance=0.05)
    # here the walk matters: the plain minimum would be a far narrower posterior
    assert clf.prior_precision_ < 0.01 * min(clf.heldout_nll_, key=clf.heldout_nll_.get)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=200)).astype(np.float32)
    module = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    reg = LaplaceRegressor(module, prior_precision="heldout", random_state=0).fit(X, y)
    assert_heldout_rule(reg, tolerance=0.0)  # the best held-out value
