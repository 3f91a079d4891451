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
from skorch import NeuralNetClassifier

from skuq import MAPClassifier, MAPRegressor, TemperatureScalingClassifier
from skuq.metrics import get_scorer
from skuq.nets import MLP
from tests.conftest import make_classifier_net, make_regressor_net


class CountingMLP(MLP):
    """An MLP that counts how often a net is built (= trained, for skorch)."""

    n_built = 0

    def __init__(self, **kwargs):
        type(self).n_built += 1
        super().__init__(**kwargs)


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
        est, {"temperature": [0.5, 1.0, 2.0]}, cv=2,
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
        make_classifier_net(max_epochs=3, module=CountingMLP), random_state=0,
        memory=str(tmp_path),
    )
    CountingMLP.n_built = 0
    GridSearchCV(est, {"temperature": [0.5, 1.0, 2.0, 4.0]}, cv=3).fit(X, y)
    assert CountingMLP.n_built == 3 + 1  # one per fold, plus the final refit
    CountingMLP.n_built = 0
    GridSearchCV(est.set_params(memory=None), {"temperature": [0.5, 1.0]}, cv=3).fit(X, y)
    assert CountingMLP.n_built == 3 * 2 + 1  # without memory, once per candidate and fold


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
                torch.nn.Flatten(), torch.nn.LazyLinear(16), torch.nn.ReLU(),
                torch.nn.LazyLinear(n_outputs), torch.nn.Softmax(dim=-1),
            )

    net = NeuralNetClassifier(  # skorch's default criterion: NLLLoss on probabilities
        SoftmaxMLP, optimizer=torch.optim.Adam, lr=1e-2, max_epochs=5, train_split=None,
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
    est.fit(gap_data.X, gap_data.y)
    mean, std = est.predict(gap_data.X_test, return_std=True)
    assert mean.shape == std.shape == (len(gap_data.X_test),)
    np.testing.assert_allclose(std, est.sigma_noise_)
    np.testing.assert_allclose(est.predict_uncertainty(gap_data.X_test, "epistemic_variance"), 0)
    np.testing.assert_allclose(
        est.predict_uncertainty(gap_data.X_test, "variance"), est.sigma_noise_**2, rtol=1e-6
    )
    residual = est.predict(gap_data.X) - gap_data.y
    assert est.sigma_noise_ == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-4)


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
