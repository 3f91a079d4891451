"""Uncertainty through pipelines, and decision_function for scikit-learn's tools."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV
from sklearn.preprocessing import StandardScaler

from skuq import LaplaceClassifier, LaplaceRegressor, MAPClassifier
from skuq.pipeline import UQPipeline, make_pipeline
from tests._helpers import make_classifier_net, make_regressor_net


@pytest.fixture(scope="module")
def blobs():
    X, y = make_classification(120, 4, n_informative=3, n_redundant=0, random_state=0)
    return (X * 50 + 7).astype(np.float32), y  # badly scaled: the scaler matters


def test_grid_search_over_step_params_then_uncertainty_on_the_best(blobs):
    X, y = blobs
    pipe = make_pipeline(
        StandardScaler(), LaplaceClassifier(make_classifier_net(max_epochs=5), random_state=0)
    )
    assert isinstance(pipe, UQPipeline)
    grid = {
        "laplaceclassifier__prior_precision": [0.1, 10.0],
        "standardscaler__with_mean": [True, False],
    }
    search = GridSearchCV(pipe, grid, cv=2, scoring="neg_log_loss").fit(X, y)
    best = search.best_estimator_
    assert isinstance(best, UQPipeline)
    assert best.get_params()["laplaceclassifier__prior_precision"] in (0.1, 10.0)
    # the pipeline's uncertainty is the final step's on the scaled inputs
    scaled = best[:-1].transform(X[:10])
    for kind in ("entropy", "mutual_information"):
        np.testing.assert_array_equal(
            best.predict_uncertainty(X[:10], kind=kind),
            best[-1].predict_uncertainty(scaled, kind=kind),
        )
    dist = best.predict_distribution(X[:10])
    np.testing.assert_array_equal(
        dist.mean.numpy(), best[-1].predict_distribution(scaled).mean.numpy()
    )
    # clone keeps the class and the parameters
    twin = clone(best)
    assert isinstance(twin, UQPipeline)
    assert (
        twin.get_params()["laplaceclassifier__prior_precision"]
        == best.get_params()["laplaceclassifier__prior_precision"]
    )


def test_regression_pipeline_passes_return_std_and_uncertainty(gap_data):
    X, y = gap_data.X, gap_data.y
    pipe = make_pipeline(
        StandardScaler(), LaplaceRegressor(make_regressor_net(max_epochs=20), random_state=0)
    )
    pipe.fit(X * 1000, y)
    mean, std = pipe.predict(X[:5] * 1000, return_std=True)
    np.testing.assert_allclose(std, pipe.predict_uncertainty(X[:5] * 1000, kind="std"), rtol=1e-12)
    assert mean.shape == std.shape == (5,)


def test_pipeline_without_uncertainty_hides_the_methods():
    from sklearn.linear_model import LogisticRegression

    pipe = make_pipeline(StandardScaler(), LogisticRegression())
    assert not hasattr(pipe, "predict_uncertainty")
    assert not hasattr(pipe, "predict_distribution")


@pytest.mark.parametrize("n_classes", [2, 3])
def test_decision_function_follows_scikit_learn(blobs, n_classes):
    from sklearn.inspection import DecisionBoundaryDisplay

    X, y = make_classification(
        150,
        2,
        n_informative=2,
        n_redundant=0,
        n_classes=n_classes,
        n_clusters_per_class=1,
        random_state=1,
    )
    labels = np.array(["a", "b", "c"])[y]  # string labels: the positive class is classes_[1]
    est = MAPClassifier(make_classifier_net(max_epochs=10), random_state=0).fit(X, labels)
    scores = est.decision_function(X)
    proba = est.predict_proba(X)
    if n_classes == 2:
        assert scores.shape == (len(X),)
        np.testing.assert_allclose(scores, np.log(proba[:, 1] / proba[:, 0]), rtol=1e-10)
        np.testing.assert_array_equal(est.classes_[(scores > 0).astype(int)], est.predict(X))
    else:
        assert scores.shape == (len(X), 3)
        np.testing.assert_allclose(np.exp(scores), proba, rtol=1e-10)
        np.testing.assert_array_equal(est.classes_[scores.argmax(axis=1)], est.predict(X))
    assert np.isfinite(scores).all()
    display = DecisionBoundaryDisplay.from_estimator(
        est, X, response_method="decision_function", grid_resolution=20
    )
    assert np.isfinite(display.response).all()
