"""Uncertainty metrics on arrays, and scorers for scikit-learn's model selection.

All functions take arrays (never estimators). Probability matrices have one
column per class in sorted label order -- the order of ``classes_`` and of
``predict_proba`` -- exactly as :func:`sklearn.metrics.log_loss` expects: when
``y_true`` lacks a class (a small batch), pass ``labels=`` (e.g. ``classes_``);
it is never guessed. Rows must be probabilities (in [0, 1], summing to 1), not
logits.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import get_scorer as _sklearn_get_scorer
from sklearn.metrics import roc_auc_score

__all__ = [
    "expected_calibration_error",
    "negative_log_likelihood",
    "gaussian_negative_log_likelihood",
    "brier_score",
    "risk_coverage_curve",
    "aurc",
    "coverage_at_risk",
    "ood_auroc",
    "fpr_at_95_tpr",
    "get_scorer",
    "SCORERS",
]


#: how far a row of ``y_proba`` may sum from 1, and a value stray outside [0, 1]
_SUM_TOL, _RANGE_TOL = 1e-3, 1e-6


def _check_proba(y_true, y_proba, labels=None):
    """Validate ``(y_true, y_proba)`` and return class indices and probabilities.

    Column ``k`` of ``y_proba`` is the ``k``-th label in sorted order: of
    ``labels`` when given, else of the distinct labels in ``y_true``. Without
    ``labels`` every column's class must therefore occur in ``y_true``; when a
    class is missing (a small batch, labels 1..C) which column is which class
    is ambiguous, and ``labels=`` is required rather than guessed.
    """
    y_true = np.asarray(y_true)
    y_proba = np.asarray(y_proba, dtype=np.float64)
    if y_proba.ndim != 2:
        raise ValueError(f"y_proba must be 2-d (n_samples, n_classes), got shape {y_proba.shape}")
    if len(y_true) != len(y_proba):
        raise ValueError(f"y_true has {len(y_true)} rows but y_proba has {len(y_proba)}")
    if not np.all(np.isfinite(y_proba)):
        raise ValueError("y_proba contains NaN or inf")
    if len(y_proba) and (y_proba.min() < -_RANGE_TOL or y_proba.max() > 1 + _RANGE_TOL):
        raise ValueError(
            f"y_proba has values in [{y_proba.min():.4g}, {y_proba.max():.4g}], outside "
            "[0, 1]: these are not probabilities; pass predict_proba output, not logits"
        )
    sums = y_proba.sum(axis=1)
    bad = np.abs(sums - 1) > _SUM_TOL
    if np.any(bad):
        row = int(np.argmax(bad))
        raise ValueError(
            f"{int(bad.sum())} rows of y_proba do not sum to 1 (row {row} sums to "
            f"{sums[row]:.6g}); pass predict_proba output, not logits or unnormalized scores"
        )
    if labels is None:
        labels = np.unique(y_true)
        if len(labels) != y_proba.shape[1]:
            raise ValueError(
                f"y_true has {len(labels)} distinct labels {labels.tolist()[:10]} but y_proba "
                f"has {y_proba.shape[1]} columns, so which column is which class is "
                "ambiguous; pass labels= (e.g. the estimator's classes_, or "
                f"list(range({y_proba.shape[1]})) when y_true holds column indices)"
            )
    labels = np.asarray(labels)
    if len(np.unique(labels)) != len(labels) or np.any(np.sort(labels) != labels):
        raise ValueError(f"labels must be sorted and distinct, got {labels.tolist()}")
    if y_proba.shape[1] != len(labels):
        raise ValueError(
            f"y_proba has {y_proba.shape[1]} columns but there are {len(labels)} labels "
            f"{labels.tolist()}; pass labels= (e.g. the estimator's classes_)"
        )
    index = np.searchsorted(labels, y_true)
    if np.any(index >= len(labels)) or np.any(labels[np.minimum(index, len(labels) - 1)] != y_true):
        raise ValueError("y_true contains labels that are not in labels")
    return index, y_proba


def expected_calibration_error(
    y_true, y_proba, *, n_bins: int = 15, labels=None, kind: str = "top_label"
) -> float:
    """Expected calibration error with equal-width bins: top-label (default) or positive-class.

    ``ECE = sum_b (n_b / N) |acc_b - conf_b|``, bin ``b`` holding confidences in
    ``(b/B, (b+1)/B]`` (the first bin also holds 0). Two readings differ for
    two classes:

    * ``kind="top_label"`` (default, any number of classes): a row's confidence
      is ``max_k p_k`` and ``acc_b`` is the fraction of correct argmax
      predictions in the bin -- "when the model says 80 %, is it right 80 % of
      the time?". For two classes the confidences lie in ``[0.5, 1]``.
    * ``kind="positive_class"`` (two classes only): the confidence is
      ``p_1``, the probability of the second label (``labels[1]``, or the
      larger of the two sorted labels), over ``[0, 1]``, and ``acc_b`` is the
      fraction of rows of that label -- a reliability diagram of ``p_1``.
      netcal's ``ECE`` reports this one for binary inputs.

    For more than two classes ``top_label`` is the usual ECE (netcal's too).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
    y_proba : array-like of shape (n_samples, n_classes)
    n_bins : int, default=15
    labels : array-like, optional
        The class of each column (default: the sorted labels of ``y_true``).
    kind : {"top_label", "positive_class"}, default="top_label"

    Returns
    -------
    float

    Examples
    --------
    >>> from skuq.metrics import expected_calibration_error
    >>> expected_calibration_error([0, 1], [[0.9, 0.1], [0.8, 0.2]])  # doctest: +ELLIPSIS
    0.45...
    >>> expected_calibration_error([0, 1], [[0.9, 0.1], [0.8, 0.2]], kind="positive_class")
    0.45
    """
    if kind not in ("top_label", "positive_class"):
        raise ValueError(f"kind must be 'top_label' or 'positive_class', got {kind!r}")
    index, proba = _check_proba(y_true, y_proba, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if kind == "positive_class":
        if proba.shape[1] != 2:
            raise ValueError(
                f"kind='positive_class' needs two classes, got {proba.shape[1]}; "
                "use kind='top_label' for more"
            )
        conf = proba[:, 1]
        correct = (index == 1).astype(np.float64)
    else:
        conf = proba.max(axis=1)
        correct = (proba.argmax(axis=1) == index).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        mask = bins == b
        ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def negative_log_likelihood(y_true, y_proba, *, labels=None, eps: float = 1e-12) -> float:
    """Mean negative log probability of the true class (probabilities clipped at ``eps``).

    Examples
    --------
    >>> import numpy as np
    >>> from skuq.metrics import negative_log_likelihood
    >>> bool(np.isclose(negative_log_likelihood([0, 1], [[0.5, 0.5], [0.25, 0.75]]),
    ...                 -(np.log(0.5) + np.log(0.75)) / 2))
    True
    """
    index, proba = _check_proba(y_true, y_proba, labels)
    p = proba[np.arange(len(index)), index]
    return float(-np.mean(np.log(np.clip(p, eps, None))))


def gaussian_negative_log_likelihood(y_true, y_mean, y_std) -> float:
    """Mean Gaussian negative log likelihood of regression targets.

    ``0.5 * log(2 pi s^2) + (y - m)^2 / (2 s^2)``, averaged over rows (and outputs).

    Examples
    --------
    >>> import numpy as np
    >>> from skuq.metrics import gaussian_negative_log_likelihood
    >>> nll = gaussian_negative_log_likelihood([0.0], [0.0], [1.0])
    >>> bool(np.isclose(nll, 0.5 * np.log(2 * np.pi)))
    True
    """
    y, m, s = (np.asarray(a, dtype=np.float64) for a in (y_true, y_mean, y_std))
    if np.any(s <= 0):
        raise ValueError("y_std must be > 0")
    return float(np.mean(0.5 * np.log(2 * np.pi * s**2) + (y - m) ** 2 / (2 * s**2)))


def brier_score(y_true, y_proba, *, labels=None) -> float:
    """Multiclass Brier score: mean over rows of ``sum_k (p_k - 1[y = k])^2``.

    Ranges from 0 (perfect) to 2. For two classes it is twice the binary
    :func:`sklearn.metrics.brier_score_loss` of the positive class.

    Examples
    --------
    >>> from skuq.metrics import brier_score
    >>> brier_score([0, 1], [[1.0, 0.0], [0.5, 0.5]])
    0.25
    """
    index, proba = _check_proba(y_true, y_proba, labels)
    onehot = np.zeros_like(proba)
    onehot[np.arange(len(index)), index] = 1.0
    return float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))


def risk_coverage_curve(errors, confidence):
    """Selective risk against coverage when answering the most confident rows first.

    Rows are sorted by decreasing ``confidence``. A cut never separates rows of
    equal confidence: the curve has one point per distinct confidence value,
    at which all rows with at least that confidence are answered.

    Parameters
    ----------
    errors : array-like of shape (n_samples,)
        Loss per row (0/1 errors for classification).
    confidence : array-like of shape (n_samples,)
        Higher means more confident.

    Returns
    -------
    coverage : ndarray
        Fraction of rows answered, increasing, ending at 1.
    risk : ndarray
        Mean error over the answered rows.
    thresholds : ndarray
        The confidence at each cut (answer rows with ``confidence >= threshold``).

    Examples
    --------
    >>> from skuq.metrics import risk_coverage_curve
    >>> coverage, risk, thresholds = risk_coverage_curve([0, 1, 0, 1], [0.9, 0.2, 0.8, 0.5])
    >>> coverage.tolist(), risk.tolist()
    ([0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 0.3333333333333333, 0.5])
    """
    errors = np.asarray(errors, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if errors.shape != confidence.shape or errors.ndim != 1 or len(errors) == 0:
        raise ValueError("errors and confidence must be non-empty 1-d arrays of equal length")
    order = np.argsort(-confidence, kind="stable")
    c, e = confidence[order], errors[order]
    ends = np.r_[np.nonzero(np.diff(c))[0], len(c) - 1]  # last row of each tie group
    answered = ends + 1
    return answered / len(c), np.cumsum(e)[ends] / answered, c[ends]


def _selective_inputs(y_true, y_proba, labels):
    index, proba = _check_proba(y_true, y_proba, labels)
    return (proba.argmax(axis=1) != index).astype(np.float64), proba.max(axis=1)


def aurc(y_true, y_proba, *, labels=None) -> float:
    """Area under the risk-coverage curve (lower is better), confidence = max p.

    Normalization: ``AURC = sum_j (coverage_j - coverage_{j-1}) * risk_j`` over
    the points of :func:`risk_coverage_curve` (coverage_0 = 0). Without ties
    this is the usual ``(1/N) sum_{k=1}^{N} risk(k)`` of Geifman et al. (2019);
    with ties each tie group is answered together.

    Examples
    --------
    >>> from skuq.metrics import aurc
    >>> aurc([0, 0], [[0.9, 0.1], [0.4, 0.6]], labels=[0, 1])  # row 2 wrong: (0 + 1/2) / 2
    0.25
    """
    coverage, risk, _ = risk_coverage_curve(*_selective_inputs(y_true, y_proba, labels))
    return float(np.sum(np.diff(np.r_[0.0, coverage]) * risk))


def coverage_at_risk(y_true, y_proba, *, risk: float = 0.01, labels=None) -> float:
    """Largest coverage whose selective risk is at most ``risk`` (NaN if none).

    Confidence is ``max p``; cuts fall only between different confidences
    (see :func:`risk_coverage_curve`).

    Examples
    --------
    >>> from skuq.metrics import coverage_at_risk
    >>> coverage_at_risk([0, 0, 0], [[.9, .1], [.8, .2], [.3, .7]], risk=0.0, labels=[0, 1])
    0.6666666666666666
    """
    if not 0 <= risk <= 1:
        raise ValueError(f"risk must be in [0, 1], got {risk}")
    coverage, sel_risk, _ = risk_coverage_curve(*_selective_inputs(y_true, y_proba, labels))
    ok = sel_risk <= risk + 1e-12
    return float(coverage[ok].max()) if ok.any() else float("nan")


def _check_scores(scores_in, scores_out):
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if len(s_in) == 0 or len(s_out) == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    if not (np.all(np.isfinite(s_in)) and np.all(np.isfinite(s_out))):
        raise ValueError("scores contain NaN or inf")
    return s_in, s_out


def ood_auroc(scores_in, scores_out) -> float:
    """AUROC of telling OOD rows (positive) from in-distribution rows by their score.

    Scores are uncertainties: higher means more likely OOD (e.g.
    ``predict_uncertainty``). Ties count one half. 0.5 is chance, 1 perfect.

    Examples
    --------
    >>> from skuq.metrics import ood_auroc
    >>> ood_auroc([0.1, 0.2], [0.3, 0.2])
    0.875
    """
    s_in, s_out = _check_scores(scores_in, scores_out)
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    return float(roc_auc_score(y, np.r_[s_in, s_out]))


def fpr_at_95_tpr(scores_in, scores_out, *, tpr: float = 0.95) -> float:
    """Fraction of in-distribution rows flagged when 95 % of OOD rows are flagged.

    OOD is the positive class and a row is flagged when its score is at least
    the threshold ``t``; ``t`` is the largest score that flags at least ``tpr``
    of the OOD rows. Lower is better.

    Examples
    --------
    >>> from skuq.metrics import fpr_at_95_tpr
    >>> fpr_at_95_tpr([0.1, 0.2, 0.5, 0.6], [0.4, 0.7, 0.8, 0.9], tpr=0.75)
    0.0
    """
    s_in, s_out = _check_scores(scores_in, scores_out)
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    desc = np.sort(s_out)[::-1]
    k = int(np.ceil(tpr * len(desc) - 1e-12))  # OOD rows that must be flagged
    threshold = desc[k - 1]
    return float(np.mean(s_in >= threshold))


class _ProbaScorer:
    """``scorer(estimator, X, y)`` for a metric of ``(y_true, y_proba, labels=...)``.

    Passing the estimator's ``classes_`` as labels keeps the columns right when
    a cross-validation fold lacks a class.
    """

    def __init__(self, metric, sign: float = 1.0, nan_value: float | None = None, **kwargs):
        self.metric, self.sign, self.nan_value, self.kwargs = metric, sign, nan_value, kwargs

    def __call__(self, estimator, X, y, sample_weight=None) -> float:
        if sample_weight is not None:
            raise ValueError("skuq scorers do not support sample_weight")
        value = self.metric(y, estimator.predict_proba(X), labels=estimator.classes_, **self.kwargs)
        if self.nan_value is not None and np.isnan(value):
            value = self.nan_value
        return self.sign * value

    def __repr__(self) -> str:
        prefix = "neg_" if self.sign < 0 else ""
        return f"<skuq scorer {prefix}{self.metric.__name__}>"


SCORERS = {
    "neg_expected_calibration_error": _ProbaScorer(expected_calibration_error, -1.0),
    "neg_negative_log_likelihood": _ProbaScorer(negative_log_likelihood, -1.0),
    "neg_brier_score": _ProbaScorer(brier_score, -1.0),
    "neg_aurc": _ProbaScorer(aurc, -1.0),
    "coverage_at_1pct_risk": _ProbaScorer(coverage_at_risk, nan_value=0.0, risk=0.01),
}


def get_scorer(name: str):
    """A scorer by name: skuq's (see ``SCORERS``) or any of scikit-learn's.

    Higher is always better, following scikit-learn (hence the ``neg_``
    prefixes); ``"coverage_at_1pct_risk"`` counts no qualifying cut as 0.

    Examples
    --------
    >>> from skuq.metrics import get_scorer
    >>> get_scorer("neg_expected_calibration_error")
    <skuq scorer neg_expected_calibration_error>
    """
    if name in SCORERS:
        return SCORERS[name]
    return _sklearn_get_scorer(name)
