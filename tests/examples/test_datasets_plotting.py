"""Offline data sets and array-based plots."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from skuq import datasets  # noqa: E402
from skuq.plotting import reliability_diagram, risk_coverage_plot  # noqa: E402


def test_digits_ood_split_separates_classes():
    d = datasets.load_digits_ood()
    assert set(np.unique(d.y_train)) == set(range(5)) == set(np.unique(d.y_test))
    assert set(np.unique(d.y_ood)) == set(range(5, 10))
    assert len(d.X_train) + len(d.X_test) + len(d.X_ood) == 1797
    assert d.X_train.dtype == np.float32 and 0 <= d.X_train.min() and d.X_train.max() <= 1


def test_gap_regression_has_no_training_points_in_the_gap():
    d = datasets.make_gap_regression(n_samples=100, gap=(-0.5, 0.5))
    assert len(d.X) == 100
    assert not np.any((d.X[:, 0] > -0.5) & (d.X[:, 0] < 0.5))
    assert d.in_gap.sum() > 0 and d.X_test.shape == (301, 1)


def test_two_moons_ood_points_lie_far_away():
    d = datasets.make_two_moons(n_samples=100, n_ood=50)
    centre = np.array([0.5, 0.25])
    assert np.linalg.norm(d.X_ood - centre, axis=1).min() >= 3.0 - 1e-6
    assert np.linalg.norm(d.X - centre, axis=1).max() < 2.5


def test_synthetic_images_are_learnable_by_a_linear_probe():
    from sklearn.linear_model import LogisticRegression

    d = datasets.make_synthetic_images(n_samples=600, n_classes=4, size=16, random_state=0)
    assert d.X.shape == (600, 1, 16, 16) and d.X_ood.shape == (150, 1, 16, 16)
    feats = np.abs(np.fft.rfft2(d.X[:, 0])).reshape(600, -1)  # phase-invariant features
    clf = LogisticRegression(max_iter=2000).fit(feats[:400], d.y[:400])
    assert clf.score(feats[400:], d.y[400:]) > 0.8


def test_datasets_are_reproducible():
    a = datasets.make_synthetic_images(n_samples=20, random_state=3)
    b = datasets.make_synthetic_images(n_samples=20, random_state=3)
    np.testing.assert_array_equal(a.X, b.X)


def test_reliability_diagram_points_are_bin_accuracies():
    y = [0, 0, 1, 1]
    p = [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.55, 0.45]]
    ax = reliability_diagram(y, p, n_bins=3)
    xs, ys = ax.lines[1].get_data()
    np.testing.assert_allclose(xs, [0.575, 0.85])
    np.testing.assert_allclose(ys, [0.5, 0.5])
    assert "ECE" in ax.get_legend().get_texts()[0].get_text()


def test_risk_coverage_plot_draws_the_curve():
    ax = risk_coverage_plot([0, 1, 0], [0.9, 0.5, 0.7], label="m")
    xs, ys = ax.lines[0].get_data()
    np.testing.assert_allclose(xs, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(ys, [0.0, 0.0, 1 / 3])


def test_plot_input_is_checked():
    with pytest.raises(ValueError, match="rows"):
        reliability_diagram([0, 1], [[1.0, 0.0]])
