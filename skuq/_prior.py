"""The prior-precision option of the Laplace family and ScaLLA: validation and the held-out rule.

Estimators mix :class:`PriorPrecisionMixin` in before
:class:`~skuq.base.BaseUQEstimator` (and import it from :mod:`skuq.base`).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from torch import nn

from ._skorch import FITTED_ROWS_LOSS_RATIO, loss_like_training
from ._utils import check_option, check_positive, iter_batches

__all__ = ["heldout_choice"]


#: log10 grid of prior precisions searched by ``prior_precision="heldout"``; it reaches
#: 1e6 because all-weights posteriors of well-fitted nets can need a very narrow prior
#: before they tie the bare net on held-out rows
HELDOUT_GRID = np.logspace(-4, 6, 41)
#: a classifier's ``prior_precision="heldout"`` takes the widest posterior whose held-out
#: NLL is within this share of the grid's best (see :func:`heldout_choice`)
HELDOUT_TOLERANCE = 0.05


def heldout_choice(nll, tolerance: float = HELDOUT_TOLERANCE) -> int:
    """Index of the prior precision to use, from held-out NLLs along an increasing grid.

    From the grid's best value, walk toward smaller precisions (wider posteriors)
    while the held-out NLL stays within ``tolerance`` (a share of the best NLL's
    magnitude) of the best; stop at the first value outside. The held-out rows
    come from the training distribution, where a well-fitted net is already
    calibrated and the plain minimum sits at an almost-MAP posterior; the widest
    posterior that costs at most a few percent of held-out NLL keeps that fit and
    is markedly more uncertain on shifted and OOD inputs (benchmarks/shift.py).

    Examples
    --------
    >>> from skuq.base import heldout_choice
    >>> heldout_choice([0.50, 0.30, 0.21, 0.20, 0.20])  # 0.21 <= 1.05 * 0.20; 0.30 is not
    2
    >>> heldout_choice([0.50, 0.30, 0.21, 0.20, 0.20], tolerance=0.0)
    3
    """
    nll = np.asarray(nll, dtype=float)
    nll = np.where(np.isnan(nll), np.inf, nll)  # a value whose predictive failed: never chosen
    if not np.isfinite(nll).any():
        raise FloatingPointError(
            "the held-out NLL is not finite at any prior precision of the grid: check that the "
            "held-out rows and the network's outputs are finite, or give prior_precision a float"
        )
    best = int(np.argmin(nll))
    limit = nll[best] + tolerance * abs(nll[best])
    chosen = best
    while chosen > 0 and nll[chosen - 1] <= limit:
        chosen -= 1
    return chosen


class PriorPrecisionMixin:
    """The prior-precision option shared by the Laplace family and ScaLLA (mix in first).

    ``prior_precision`` is a number > 0, an array of per-layer numbers > 0 (where
    ``_per_layer_prior``), or the name of a rule in ``_prior_methods``:
    ``"marglik"`` (the method's evidence) or ``"heldout"``: the NLL of each value of
    :data:`HELDOUT_GRID` on a held-out split, which :meth:`BaseUQEstimator.fit`
    sets aside (``calibration_fraction`` of the rows, or ``X_cal``/``y_cal``),
    then for classifiers the widest posterior within :data:`HELDOUT_TOLERANCE`
    of the best (:func:`heldout_choice`), for regressors the best.
    """

    _prior_methods: tuple[str, ...] = ("marglik", "heldout")
    _per_layer_prior = True

    @property
    def _uses_calibration_split(self) -> bool:  # a held-out split only when asked for
        return isinstance(self.prior_precision, str) and self.prior_precision == "heldout"

    def _validate_prior_precision(self) -> None:
        pp, methods = self.prior_precision, self._prior_methods
        if isinstance(pp, str):
            check_option("prior_precision", pp, methods)
            if pp == "heldout":
                check_positive("calibration_fraction", self.calibration_fraction)
            return
        if isinstance(pp, numbers.Real) and not isinstance(pp, bool):
            check_positive("prior_precision", pp)
            return
        if not self._per_layer_prior:
            raise ValueError(f"prior_precision must be a float > 0 or one of {methods}, got {pp!r}")
        arr = np.asarray(pp, dtype=float) if not isinstance(pp, bool) else np.array([])
        if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr) & (arr > 0)):
            raise ValueError(
                "prior_precision must be a float > 0, an array of per-layer floats > 0, "
                f"or one of {methods}; got {pp!r}"
            )

    def _choose_heldout_prior(self, posterior, X_cal, y_cal, batch_nll) -> float:
        """Set ``posterior`` to the grid prior precision :func:`heldout_choice` picks.

        ``batch_nll(xb, yb, grid)`` returns the NLL summed over one batch's rows
        for each value of ``grid`` (an array); sharing the per-batch work (the
        Jacobians, the features) across the grid is up to the method. Records the
        mean NLL per grid value in ``heldout_nll_`` and returns the chosen value.
        """
        grid = [float(v) for v in HELDOUT_GRID]
        nll = np.zeros(len(grid))
        for xb, yb in iter_batches(X_cal, y_cal, batch_size=self.batch_size, device=self.device_):
            nll += np.asarray(batch_nll(xb, yb, grid), dtype=float)
        tolerance = HELDOUT_TOLERANCE if self._is_classifier() else 0.0
        best = grid[heldout_choice(nll, tolerance)]
        posterior.set_hyperparameters(prior_precision=best)
        self.heldout_nll_ = dict(zip(grid, nll / len(X_cal), strict=True))
        if self._is_classifier() and self._net_is_prefit():
            # the narrowest posterior's NLL is the net's own cross-entropy on the rows
            self._warn_if_training_rows(float(nll[-1] / len(X_cal)))
        return best

    def _warn_if_training_rows(self, loss: float) -> None:
        """Warn when the held-out rows of an already trained net look like its training rows."""
        train = loss_like_training(self.net_, loss, (nn.CrossEntropyLoss, nn.NLLLoss))
        if train is None:
            return
        warnings.warn(
            f"{type(self).__name__}: the held-out rows for prior_precision='heldout' look like "
            f"rows the net was trained on: its NLL on them ({loss:.3g}) is within "
            f"{FITTED_ROWS_LOSS_RATIO:g}x the training loss of its last epoch ({train:.3g}). "
            "On rows it has fitted the net is already confident, so the prior chosen there is "
            "too narrow and the posterior stays close to the bare net. Choose it on rows the net "
            "did not train on: fit(X, y, X_cal=X_heldout, y_cal=y_heldout), or give the "
            "untrained skorch net so that fit holds out calibration_fraction of the rows itself. "
            "(A net that fits held-out rows as well as its training rows can trigger this on a "
            "real held-out split; then it is harmless.)",
            UserWarning,
            stacklevel=4,
        )
