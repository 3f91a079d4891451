"""skuq.metrics against values computed by hand, including ties and edge cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from skuq import metrics


def test_ece_by_hand_three_bins():
    # confidences 0.9 (correct), 0.8 (wrong), 0.6 (correct), 0.55 (wrong); 3 bins
    y = [0, 0, 1, 1]
    p = [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.55, 0.45]]
    # bin (2/3, 1]: rows 0, 1 -> acc 0.5, conf 0.85 ; bin (1/3, 2/3]: rows 2, 3 -> acc .5 conf .575
    expected = 0.5 * abs(0.5 - 0.85) + 0.5 * abs(0.5 - 0.575)
    assert metrics.expected_calibration_error(y, p, n_bins=3) == pytest.approx(expected)


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.5 with 2 bins falls in the first bin (0, 0.5]
    y, p = [0, 1], [[0.5, 0.5], [0.0, 1.0]]
    # row 0: conf .5, predicted class 0 (argmax picks first), correct -> bin 0: |1 - .5|
    # row 1: conf 1, correct -> bin 1: |1 - 1| = 0
    assert metrics.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.25)


def test_ece_is_zero_for_a_perfectly_calibrated_predictor():
    y = [0, 1, 0, 0]
    p = [[0.75, 0.25]] * 4  # accuracy 3/4 at confidence 3/4
    assert metrics.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)


def test_nll_and_brier_match_sklearn():
    rng = np.random.RandomState(0)
    p = rng.dirichlet(np.ones(4), size=50)
    y = rng.randint(0, 4, size=50)
    assert metrics.negative_log_likelihood(y, p, labels=[0, 1, 2, 3]) == pytest.approx(
        log_loss(y, p, labels=[0, 1, 2, 3])
    )
    # binary: our multiclass Brier is twice sklearn's positive-class Brier
    p2 = rng.dirichlet(np.ones(2), size=50)
    y2 = rng.randint(0, 2, size=50)
    assert metrics.brier_score(y2, p2) == pytest.approx(2 * brier_score_loss(y2, p2[:, 1]))


def test_string_labels_use_sorted_order():
    p = [[0.8, 0.2], [0.3, 0.7]]
    assert metrics.negative_log_likelihood(["cat", "dog"], p) == pytest.approx(
        -(math.log(0.8) + math.log(0.7)) / 2
    )


def test_a_batch_lacking_a_class_needs_labels_and_is_never_guessed():
    # labels 1 and 2 with three columns: columns 0..2 or classes 1..3? Refuse to guess.
    p = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]]
    for metric in (
        metrics.negative_log_likelihood,
        metrics.expected_calibration_error,
        metrics.brier_score,
        metrics.aurc,
    ):
        with pytest.raises(ValueError, match="pass labels="):
            metric([1, 2], p)
    with pytest.raises(ValueError, match="pass labels="):
        metrics.negative_log_likelihood([0, 0], p)
    # with labels= each reading gives its own, right answer
    assert metrics.negative_log_likelihood([1, 2], p, labels=[1, 2, 3]) == pytest.approx(
        -math.log(0.9)
    )
    assert metrics.negative_log_likelihood([1, 2], p, labels=[0, 1, 2]) == pytest.approx(
        -math.log(0.05)
    )


def test_labels_must_be_sorted_like_the_columns():
    with pytest.raises(ValueError, match="sorted"):
        metrics.negative_log_likelihood([0, 1], [[0.9, 0.1], [0.2, 0.8]], labels=[1, 0])


def test_integer_labels_all_present_map_to_columns_in_sorted_order():
    # labels 1..3, all present: column k is the k-th smallest label, as log_loss reads it
    p = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6]]
    expected = -(math.log(0.7) + math.log(0.8) + math.log(0.6)) / 3
    assert metrics.negative_log_likelihood([1, 2, 3], p) == pytest.approx(expected)
    assert expected == pytest.approx(log_loss([1, 2, 3], p))


@pytest.mark.parametrize(
    "y_proba",
    [
        [[2.0, -1.0], [0.5, 0.5]],  # logits: outside [0, 1]
        [[0.3, 0.3], [0.5, 0.5]],  # in [0, 1] but a row sums to 0.6
        [[0.6, 0.6], [0.5, 0.5]],  # a row sums to 1.2
    ],
)
def test_inputs_that_are_not_probabilities_are_refused(y_proba):
    for metric in (
        metrics.negative_log_likelihood,
        metrics.expected_calibration_error,
        metrics.brier_score,
        metrics.coverage_at_risk,
    ):
        with pytest.raises(ValueError, match="pass predict_proba output, not logits"):
            metric([0, 1], y_proba)


def test_float32_rounding_in_row_sums_is_accepted():
    p = np.array([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], dtype=np.float32) * (1 + 1e-5)
    assert np.isfinite(metrics.negative_log_likelihood([0, 1], p, labels=[0, 1, 2]))


def test_nll_clips_zero_probabilities():
    value = metrics.negative_log_likelihood([0], [[0.0, 1.0]], labels=[0, 1])
    assert value == pytest.approx(-math.log(1e-12))


def test_risk_coverage_curve_never_cuts_ties():
    errors = [0, 1, 0, 1, 0]
    conf = [0.9, 0.8, 0.8, 0.5, 0.4]
    cov, risk, thr = metrics.risk_coverage_curve(errors, conf)
    np.testing.assert_allclose(cov, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 3, 0.5, 0.4])
    np.testing.assert_allclose(thr, [0.9, 0.8, 0.5, 0.4])


def test_aurc_without_ties_is_mean_selective_risk():
    rng = np.random.RandomState(1)
    p = rng.dirichlet(np.ones(3), size=40)
    y = rng.randint(0, 3, size=40)
    err = (p.argmax(1) != y).astype(float)[np.argsort(-p.max(1))]
    expected = np.mean(np.cumsum(err) / np.arange(1, 41))
    assert metrics.aurc(y, p) == pytest.approx(expected)


def test_aurc_with_ties_answers_groups_together():
    # all four rows tie: one cut at coverage 1 with risk 1/2
    y = [0, 1, 0, 1]
    p = [[0.6, 0.4]] * 4
    assert metrics.aurc(y, p) == pytest.approx(0.5)


def test_coverage_at_risk_by_hand_and_nan_when_impossible():
    y = [0, 0, 1, 1]
    p = [[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]  # third row wrong
    assert metrics.coverage_at_risk(y, p, risk=0.0) == pytest.approx(0.5)
    assert metrics.coverage_at_risk(y, p, risk=0.25) == pytest.approx(1.0)
    wrong_first = [[0.05, 0.95], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]
    assert np.isnan(metrics.coverage_at_risk([0, 0, 1, 1], wrong_first, risk=0.0))


def test_ood_auroc_and_ties():
    assert metrics.ood_auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert metrics.ood_auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert metrics.ood_auroc([0.5], [0.5]) == 0.5


def test_fpr_at_95_tpr_by_hand():
    s_out = np.arange(100, 120)  # 20 OOD scores: 95 % of them -> the 19 largest, t = 101
    s_in = np.array([50, 100, 101, 150])  # 101 and 150 are >= 101
    assert metrics.fpr_at_95_tpr(s_in, s_out) == pytest.approx(0.5)
    assert metrics.fpr_at_95_tpr([0.0], [1.0, 2.0]) == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.expected_calibration_error([0, 1], [[0.5, 0.5]]), "rows"),
        (lambda: metrics.expected_calibration_error([0, 1, 2], [[1, 0], [0, 1], [1, 0]]), "labels"),
        (lambda: metrics.negative_log_likelihood([0, 1], [[np.nan, 1.0]] * 2), "NaN"),
        (lambda: metrics.ood_auroc([], [1.0]), "at least one"),
        (lambda: metrics.coverage_at_risk([0], [[1.0, 0.0]], risk=2), "risk must be"),
        (lambda: metrics.expected_calibration_error([0, 1], [[1, 0], [0, 1]], n_bins=0), "n_bins"),
        (lambda: metrics.brier_score([0, 1, 5], [[1, 0], [0, 1], [1, 0]]), "labels"),
        (lambda: metrics.gaussian_negative_log_likelihood([0.0], [0.0], [0.0]), "y_std"),
    ],
)
def test_bad_input_is_refused_with_a_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_gaussian_nll_by_hand():
    value = metrics.gaussian_negative_log_likelihood([1.0, 0.0], [0.0, 0.0], [1.0, 2.0])
    expected = np.mean([0.5 * np.log(2 * np.pi) + 0.5, 0.5 * np.log(2 * np.pi * 4)])
    assert value == pytest.approx(expected)


def test_get_scorer_knows_skuq_and_sklearn_names():
    assert "neg_expected_calibration_error" in metrics.SCORERS
    assert metrics.get_scorer("accuracy") is not None
    with pytest.raises(ValueError):
        metrics.get_scorer("no_such_scorer")


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_ece_matches_netcal(n_classes):
    """netcal (a test-only oracle): positive-class ECE for two classes, top-label for more."""
    netcal = pytest.importorskip("netcal.metrics")
    rng = np.random.default_rng(n_classes)
    logits = rng.normal(size=(400, n_classes)) * 2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # labels drawn from a sharpened p: a miscalibrated predictor, so the ECE is not ~0
    sharp = p**2 / (p**2).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(n_classes, p=row) for row in sharp])
    ref = netcal.ECE(bins=15).measure(p, y)
    kind = "positive_class" if n_classes == 2 else "top_label"
    ours = metrics.expected_calibration_error(y, p, n_bins=15, kind=kind)
    assert ref > 0.02
    assert ours == pytest.approx(ref, abs=1e-12)


def test_top_label_and_positive_class_ece_bin_differently():
    # p_1 = 0.2 and 0.8 share the top-label bin (confidence 0.8), not a p_1 bin
    p, y = [[0.8, 0.2], [0.2, 0.8]], [0, 0]
    assert metrics.expected_calibration_error(y, p, labels=[0, 1]) == pytest.approx(0.3)
    positive = metrics.expected_calibration_error(y, p, labels=[0, 1], kind="positive_class")
    assert positive == pytest.approx(0.5 * 0.2 + 0.5 * 0.8)


def test_positive_class_ece_needs_two_classes_and_a_known_kind():
    p = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="needs two classes"):
        metrics.expected_calibration_error([0, 1, 2], p, kind="positive_class")
    with pytest.raises(ValueError, match="kind must be"):
        metrics.expected_calibration_error([0, 1, 2], p, kind="binary")
