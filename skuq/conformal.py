"""Conformal prediction on top of the posterior, with MAPIE (``pip install skuq[conformal]``).

A conformal method turns any score of how badly a label fits an input into
sets or intervals with a guaranteed marginal coverage: on exchangeable
calibration and test rows, ``P(y in set) >= confidence_level``. The score
decides how wide the sets are where; skuq's posteriors give two:

* **Regression: the residual in units of the predictive std**,
  ``|y - mean(x)| / std(x)``, with ``std`` the posterior predictive's (the
  network's epistemic spread plus the noise ``sigma_noise_``). Intervals are
  ``mean(x) +- q std(x)``: wide where the posterior is. MAPIE calls this score
  ``"std_normalized"`` and reads ``std`` from ``predict(X, return_std=True)``,
  which every skuq regressor gives.
* **Classification: the posterior margin**. With the logits
  ``f ~ N(mu, Sigma)`` from :meth:`predict_distribution` (or their samples),
  class ``y`` is scored by how far, in standard deviations of the difference,
  its strongest rival is ahead: ``z_y = max_{k != y} (mu_k - mu_y) /
  sd(f_k - f_y)``. ``Phi(-z_y)`` is (under the Gaussian) the probability that
  ``y`` beats that rival. :class:`PosteriorMarginClassifier` returns the
  weights ``1 / (1 - log Phi(-z_y))``, normalized over the classes, as
  ``predict_proba``, and MAPIE's ``"lac"`` score on it builds the sets. A
  class the posterior cannot rule out (a small gap, or a wide spread) joins
  the set; a confident one does not. The weights fall off like ``2 / z^2``,
  not like ``Phi(-z)``: with ``Phi(-z)`` itself, the rows of an easy task
  (digits) all score exactly 0 in float64, the scores tie and the sets
  over-cover (0.97 at a 0.9 target, ``tests/sklearn/test_conformal.py``).

:func:`split_conformal` and :func:`cross_conformal` set MAPIE's split and
cross conformal up with these scores (``score="posterior"``) or with MAPIE's
own (``"absolute"``, ``"lac"``, ``"aps"``...) for comparison. MAPIE is
imported only when they are called.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone, is_classifier
from sklearn.utils.validation import check_is_fitted

from .outputs import OutputDistribution

__all__ = [
    "PosteriorMarginClassifier",
    "margin_probabilities",
    "split_conformal",
    "cross_conformal",
]

_MIN_SD = 1e-6  # a point mass has no spread: its margins become large, signed z-scores


def _mapie():
    try:
        import mapie  # noqa: F401
        from mapie.classification import CrossConformalClassifier, SplitConformalClassifier
        from mapie.regression import CrossConformalRegressor, SplitConformalRegressor
    except ImportError as err:
        raise ImportError(
            "skuq.conformal needs MAPIE 1.x: pip install 'skuq[conformal]' "
            "(or pip install 'mapie>=1.0')"
        ) from err
    return (
        SplitConformalRegressor,
        CrossConformalRegressor,
        SplitConformalClassifier,
        CrossConformalClassifier,
    )


def margin_probabilities(dist: OutputDistribution) -> torch.Tensor:
    """The posterior margin weights ``1 / (1 - log Phi(-z_y))``, normalized (module doc).

    Parameters
    ----------
    dist : OutputDistribution
        Over the logits, shape (N, C): Gaussian (full or diagonal covariance,
        or a point mass) or samples.

    Returns
    -------
    Tensor of shape (N, C), float64
        Rows sum to one; the largest entry is the class with the largest mean logit.

    Examples
    --------
    >>> import torch
    >>> from skuq.outputs import OutputDistribution
    >>> from skuq.conformal import margin_probabilities
    >>> sure = OutputDistribution.gaussian(torch.tensor([[3.0, 0.0]]), torch.ones(1, 2) * 0.01)
    >>> vague = OutputDistribution.gaussian(torch.tensor([[3.0, 0.0]]), torch.ones(1, 2) * 100)
    >>> bool(margin_probabilities(sure)[0, 1] < margin_probabilities(vague)[0, 1])
    True
    """
    if dist.is_sampled:
        s = dist.samples.double()  # (S, N, C)
        mu = s.mean(dim=0)
        diff = s[:, :, None, :] - s[:, :, :, None]  # [.., y, k] = f_k - f_y
        var = diff.var(dim=0, unbiased=True) if s.shape[0] > 1 else torch.zeros_like(diff[0])
    else:
        mu = dist.mean.double()
        C = mu.shape[1]
        if dist.covariance is None:
            cov = torch.zeros(mu.shape[0], C, C, dtype=torch.float64)
        elif dist.covariance.ndim == 2:
            cov = torch.diag_embed(dist.covariance.double())
        else:
            cov = dist.covariance.double()
        d = torch.diagonal(cov, dim1=1, dim2=2)
        var = d[:, :, None] + d[:, None, :] - cov - cov.transpose(1, 2)
    gap = mu[:, None, :] - mu[:, :, None]  # [n, y, k] = mu_k - mu_y
    z = gap / var.clamp_min(0.0).add(_MIN_SD**2).sqrt()
    C = mu.shape[1]
    z = z.masked_fill(torch.eye(C, dtype=torch.bool), -math.inf).amax(dim=2)  # (N, C)
    # -log Phi(-z): ~0 for a class that surely wins, ~z^2/2 for one surely beaten
    # (log_ndtr stays finite where Phi(-z) underflows)
    surprise = -torch.special.log_ndtr(-z)
    weight = 1.0 / (1.0 + surprise)
    return weight / weight.sum(dim=1, keepdim=True)


class PosteriorMarginClassifier(ClassifierMixin, BaseEstimator):
    """A skuq classifier whose ``predict_proba`` is its posterior margin probabilities.

    The input to MAPIE's ``"lac"`` score for the posterior-margin conformal
    sets (module doc). ``predict`` is the wrapped estimator's.

    Parameters
    ----------
    estimator : skuq classifier
        Trained in :meth:`fit` (a clone). To wrap one already fitted, use
        :meth:`from_fitted`.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skuq import LaplaceClassifier
    >>> from skuq.conformal import PosteriorMarginClassifier
    >>> est = LaplaceClassifier(torch.nn.Linear(2, 2), device="cpu")
    >>> X = np.random.default_rng(0).normal(size=(20, 2)); y = (X[:, 0] > 0).astype(int)
    >>> wrapped = PosteriorMarginClassifier.from_fitted(est.fit(X, y))
    >>> wrapped.predict_proba(X[:2]).sum(axis=1)
    array([1., 1.])
    """

    def __init__(self, estimator=None):
        self.estimator = estimator

    @classmethod
    def from_fitted(cls, estimator) -> PosteriorMarginClassifier:
        """Wrap a fitted skuq classifier without refitting it."""
        check_is_fitted(estimator)
        self = cls(estimator)
        self.estimator_ = estimator
        self.classes_ = estimator.classes_
        return self

    def fit(self, X, y, **fit_params):
        """Fit a clone of ``estimator``; returns self."""
        if self.estimator is None or not hasattr(self.estimator, "predict_distribution"):
            raise TypeError(
                "PosteriorMarginClassifier wraps a skuq classifier (one with "
                f"predict_distribution); got {type(self.estimator).__name__}"
            )
        self.estimator_ = clone(self.estimator).fit(X, y, **fit_params)
        self.classes_ = self.estimator_.classes_
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Posterior margin probabilities, shape (n_samples, n_classes)."""
        check_is_fitted(self, "estimator_")
        return margin_probabilities(self.estimator_.predict_distribution(X)).numpy()

    def predict(self, X) -> np.ndarray:
        """The wrapped estimator's labels."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = True
        return tags


def _resolve(estimator, score: str, fitted: bool):
    """(estimator for MAPIE, MAPIE score name) for ``score``."""
    if score != "posterior":
        return estimator, score
    if is_classifier(estimator):
        if fitted:
            return PosteriorMarginClassifier.from_fitted(estimator), "lac"
        return PosteriorMarginClassifier(estimator), "lac"
    return estimator, "std_normalized"


def split_conformal(estimator, X_cal, y_cal, *, confidence_level=0.9, score: str = "posterior"):
    """Split conformal around a fitted skuq estimator, calibrated on ``(X_cal, y_cal)``.

    Parameters
    ----------
    estimator : fitted skuq estimator
        Fitted on other rows than the calibration rows.
    X_cal, y_cal : array-like
        Calibration rows, exchangeable with the rows to predict.
    confidence_level : float or list of float, default=0.9
    score : str, default="posterior"
        ``"posterior"``: the residual over the predictive std (regressors) or
        the posterior margin (classifiers); any other value is passed to MAPIE
        as its ``conformity_score`` (``"absolute"``, ``"lac"``, ``"aps"``...).

    Returns
    -------
    mapie.regression.SplitConformalRegressor or mapie.classification.SplitConformalClassifier
        Conformalized: call ``predict_interval`` / ``predict_set``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skuq import LaplaceRegressor
    >>> from skuq.conformal import split_conformal
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 1)).astype("float32"); y = X[:, 0] + 0.1 * rng.normal(size=300)
    >>> est = LaplaceRegressor(torch.nn.Linear(1, 1), device="cpu").fit(X[:100], y[:100])
    >>> cp = split_conformal(est, X[100:200], y[100:200], confidence_level=0.9)
    >>> _, bounds = cp.predict_interval(X[200:])
    >>> bounds.shape
    (100, 2, 1)
    """
    SplitReg, _, SplitClf, _ = _mapie()
    base, name = _resolve(estimator, score, fitted=True)
    cls = SplitClf if is_classifier(estimator) else SplitReg
    return cls(
        base, confidence_level=confidence_level, conformity_score=name, prefit=True
    ).conformalize(X_cal, y_cal)


def cross_conformal(
    estimator, X, y, *, confidence_level=0.9, score: str = "posterior", cv=5, **kwargs
):
    """Cross conformal (CV+): ``cv`` clones of an unfitted skuq estimator, each
    scored on the fold it did not see.

    Parameters
    ----------
    estimator : unfitted skuq estimator
    X, y : array-like
    confidence_level : float or list of float, default=0.9
    score : str, default="posterior"
        As for :func:`split_conformal`.
    cv : int or cross-validator, default=5
    **kwargs
        Passed to MAPIE's ``CrossConformalRegressor`` / ``CrossConformalClassifier``
        (e.g. ``method``, ``random_state``).

    Returns
    -------
    mapie.regression.CrossConformalRegressor or mapie.classification.CrossConformalClassifier
        Fitted and conformalized.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skuq import LaplaceRegressor
    >>> from skuq.conformal import cross_conformal
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 1)).astype("float32"); y = X[:, 0] + 0.1 * rng.normal(size=60)
    >>> est = LaplaceRegressor(torch.nn.Linear(1, 1), device="cpu")
    >>> cp = cross_conformal(est, X, y, cv=3, random_state=0)
    >>> cp.predict_interval(X[:4])[1].shape
    (4, 2, 1)
    """
    _, CrossReg, _, CrossClf = _mapie()
    base, name = _resolve(estimator, score, fitted=False)
    cls = CrossClf if is_classifier(estimator) else CrossReg
    return cls(
        base, confidence_level=confidence_level, conformity_score=name, cv=cv, **kwargs
    ).fit_conformalize(X, y)
