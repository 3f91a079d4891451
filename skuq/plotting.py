"""Plots on arrays (matplotlib is the optional ``plot`` extra)."""

from __future__ import annotations

import numpy as np

from .metrics import _check_proba, expected_calibration_error, risk_coverage_curve

__all__ = ["reliability_diagram", "risk_coverage_plot", "uncertainty_histogram"]


def _axes(ax):
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'skuq[plot]'") from exc
    return plt.subplots(figsize=(4, 4))[1]


def reliability_diagram(y_true, y_proba, *, n_bins: int = 15, labels=None, ax=None, label=None):
    """Accuracy against confidence in equal-width bins (top label), with the ECE.

    Returns the matplotlib ``Axes``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> from skuq.plotting import reliability_diagram
    >>> ax = reliability_diagram([0, 1, 1], [[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], n_bins=5)
    >>> isinstance(ax, matplotlib.axes.Axes)
    True
    >>> plt.close("all")
    """
    index, proba = _check_proba(y_true, y_proba, labels)
    ax = _axes(ax)
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == index
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    centers, accs = [], []
    for b in np.unique(bins):
        mask = bins == b
        centers.append(conf[mask].mean())
        accs.append(correct[mask].mean())
    ece = expected_calibration_error(y_true, y_proba, n_bins=n_bins, labels=labels)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.plot(centers, accs, marker="o", label=f"{label or 'model'} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (max p)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return ax


def risk_coverage_plot(errors, confidence, *, ax=None, label=None):
    """Selective risk against coverage (see :func:`skuq.metrics.risk_coverage_curve`).

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> from skuq.plotting import risk_coverage_plot
    >>> ax = risk_coverage_plot([0, 1, 0, 1], [0.9, 0.2, 0.8, 0.5])
    >>> isinstance(ax, matplotlib.axes.Axes)
    True
    >>> plt.close("all")
    """
    ax = _axes(ax)
    coverage, risk, _ = risk_coverage_curve(errors, confidence)
    ax.step(coverage, risk, where="post", label=label)
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk")
    if label:
        ax.legend()
    return ax


def uncertainty_histogram(
    scores_in, scores_out, *, bins: int = 30, ax=None, label=None, xlabel="uncertainty"
):
    """Overlaid histograms of an uncertainty score on in-distribution and OOD rows.

    Both histograms share the bin edges and are normalized to unit area, so
    sets of different sizes compare; the title carries the OOD AUROC (see
    :func:`skuq.metrics.ood_auroc`). Returns the matplotlib ``Axes``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skuq.plotting import uncertainty_histogram
    >>> ax = uncertainty_histogram([0.1, 0.2, 0.3], [0.5, 0.6, 0.9], label="MAP")
    >>> ax.get_title()
    'MAP (OOD AUROC 1.000)'
    """
    from .metrics import _check_scores, ood_auroc

    s_in, s_out = _check_scores(scores_in, scores_out)
    ax = _axes(ax)
    lo, hi = min(s_in.min(), s_out.min()), max(s_in.max(), s_out.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    ax.hist(s_in, bins=edges, density=True, alpha=0.55, label="in-distribution")
    ax.hist(s_out, bins=edges, density=True, alpha=0.55, label="OOD")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    auroc = ood_auroc(s_in, s_out)
    ax.set_title(f"{label or 'model'} (OOD AUROC {auroc:.3f})")
    ax.legend()
    return ax
