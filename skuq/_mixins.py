"""The task mixins of every skuq estimator: classification and regression outputs.

:class:`UQClassifierMixin` turns the method's output distribution into labels,
probabilities, decision scores and uncertainty measures; :class:`UQRegressorMixin`
into means, predictive standard deviations and the aleatoric/epistemic split.
Both rely only on the hooks of :class:`skuq.base.BaseUQEstimator`
(``_iter_distributions``, ``_validate_predict_data``), which they are mixed with.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from torch import Tensor

from ._skorch import FITTED_ROWS_LOSS_RATIO, loss_like_training
from ._utils import check_finite, iter_batches
from .outputs import CLASSIFICATION_UNCERTAINTIES, classification_uncertainty

REGRESSION_UNCERTAINTIES = ("std", "variance", "epistemic_variance", "aleatoric_variance")

__all__ = ["UQClassifierMixin", "UQRegressorMixin", "REGRESSION_UNCERTAINTIES"]


class UQClassifierMixin(ClassifierMixin):
    """Classification face: labels, probabilities through a link, uncertainty.

    Examples
    --------
    >>> from skuq import MAPClassifier
    >>> from skuq.base import UQClassifierMixin
    >>> issubclass(MAPClassifier, UQClassifierMixin)
    True
    >>> callable(MAPClassifier.predict_uncertainty)
    True
    """

    def _encode_target(self, y, fitting: bool):
        if fitting:
            check_classification_targets(y)
            encoder = LabelEncoder().fit(y)
            self.classes_ = encoder.classes_
            if len(self.classes_) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs at least two classes in y; got 1 class "
                    f"({self.classes_.tolist()})"
                )
            self.n_outputs_ = len(self.classes_)
            return encoder.transform(y).astype(np.int64)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if len(unknown):
            raise ValueError(f"y_cal has labels not seen in y: {unknown.tolist()}")
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def _link(self) -> str:
        return getattr(self, "link_approx", "probit")

    def _n_link_samples(self) -> int:
        return getattr(self, "n_samples", 100)

    def predict_proba(self, X) -> np.ndarray:
        """Posterior predictive class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        # a fresh generator per batch: every batch gets the same draws, so a row's
        # probabilities do not depend on the batch it falls in
        (proba,) = self._map_batches(
            X, lambda d: (d.probabilities(self._link(), self._n_link_samples(), self._generator()),)
        )
        proba = check_finite(proba, "predict_proba").double()
        return (proba / proba.sum(dim=1, keepdim=True)).numpy()

    def predict(self, X) -> np.ndarray:
        """Most probable class label under the predictive distribution."""
        proba = self.predict_proba(X)  # raises NotFittedError before classes_ is read
        return self.classes_[proba.argmax(axis=1)]

    def decision_function(self, X) -> np.ndarray:
        """Confidence scores from the predictive probabilities, as scikit-learn reads them.

        Two classes: the log-odds ``log p_1 - log p_0`` of ``classes_[1]`` under
        the posterior predictive (positive means ``classes_[1]`` is predicted).
        More classes: the log predictive probability of each class (its argmax
        is :meth:`predict`). These are the predictive's, not the mean network's
        logits, so they carry the posterior's spread: a wide posterior pulls
        them towards zero (towards ``log(1 / n_classes)``).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)

        Returns
        -------
        ndarray of shape (n_samples,) for two classes, else (n_samples, n_classes)
            Finite: probabilities are clipped at the smallest positive double.

        Examples
        --------
        >>> import numpy as np, torch
        >>> from skuq import MAPClassifier
        >>> module = torch.nn.Linear(2, 2)
        >>> est = MAPClassifier(module, device="cpu").fit(np.eye(2), [0, 1])
        >>> X = np.random.default_rng(0).normal(size=(4, 2))
        >>> scores = est.decision_function(X)
        >>> bool(np.all((scores > 0) == (est.predict(X) == 1)))
        True
        """
        log_proba = np.log(np.clip(self.predict_proba(X), np.finfo(np.float64).tiny, None))
        if log_proba.shape[1] == 2:
            return log_proba[:, 1] - log_proba[:, 0]
        return log_proba

    def predict_uncertainty(self, X, kind: str = "entropy") -> np.ndarray:
        """One uncertainty score per row; higher means less certain.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        kind : {"entropy", "mutual_information", "expected_entropy", "variance", \
"max_prob"}, default="entropy"
            ``"entropy"``: total uncertainty ``H[p]`` of the predictive ``p``;
            ``"mutual_information"``: epistemic part ``H[E p] - E H[p]``;
            ``"expected_entropy"``: aleatoric part ``E H[softmax(f)]``;
            ``"variance"``: ``trace Cov[f]`` of the logits;
            ``"max_prob"``: ``1 - max_k p_k``. See
            :func:`skuq.outputs.classification_uncertainty`.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        if kind not in CLASSIFICATION_UNCERTAINTIES:
            raise ValueError(f"kind must be one of {CLASSIFICATION_UNCERTAINTIES}, got {kind!r}")
        (value,) = self._map_batches(
            X,
            lambda d: (
                classification_uncertainty(
                    d, kind, self._link(), self._n_link_samples(), self._generator()
                ),
            ),
        )
        return check_finite(value, "predict_uncertainty").double().numpy()


class UQRegressorMixin(RegressorMixin):
    """Regression face: mean, epistemic variance and aleatoric noise ``sigma_noise_``.

    Examples
    --------
    >>> from skuq import MAPRegressor
    >>> from skuq.base import UQRegressorMixin
    >>> issubclass(MAPRegressor, UQRegressorMixin)
    True
    >>> callable(MAPRegressor.predict_uncertainty)
    True
    """

    def _encode_target(self, y, fitting: bool):
        y = np.asarray(y, dtype=np.float32)
        if fitting:
            self._y_ndim = y.ndim
            self.n_outputs_ = 1 if y.ndim == 1 else y.shape[1]
        return y

    def _noise_variance(self) -> Tensor:
        """Aleatoric variance per output, shape (C,)."""
        sigma = torch.as_tensor(np.asarray(self.sigma_noise_, dtype=np.float32))
        return (sigma**2).expand(self.n_outputs_)

    def _moments(self, X):
        mean, var = self._map_batches(X, lambda d: (d.output_mean, d.variance))
        check_finite(mean, "the predicted output mean")
        check_finite(var, "the predicted output variance")
        # a variance is >= 0; float error can leave a tiny negative one (-1e-9), which
        # sqrt would turn into NaN
        return mean, var.clamp_min(0.0)

    def _shape(self, a: Tensor) -> np.ndarray:
        out = a.double().numpy()
        return out[:, 0] if self._y_ndim == 1 else out

    def predict(self, X, return_std: bool = False):
        """Predictive mean, and optionally the total predictive standard deviation.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        return_std : bool, default=False
            Also return ``sqrt(epistemic variance + sigma_noise_**2)``, as
            :class:`sklearn.gaussian_process.GaussianProcessRegressor` does.
            For the two parts separately use :meth:`predict_uncertainty`.

        Returns
        -------
        y_mean : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        y_std : ndarray, same shape, only if ``return_std``
        """
        mean, var = self._moments(X)
        if not return_std:
            return self._shape(mean)
        return self._shape(mean), self._shape((var + self._noise_variance()).sqrt())

    def predict_uncertainty(self, X, kind: str = "std") -> np.ndarray:
        """Predictive spread per row; higher means less certain.

        Parameters
        ----------
        kind : {"std", "variance", "epistemic_variance", "aleatoric_variance"}
            ``"std"``/``"variance"``: total (epistemic + ``sigma_noise_**2``);
            ``"epistemic_variance"``: variance of the network output ``f(x)``;
            ``"aleatoric_variance"``: the noise variance ``sigma_noise_**2``.
        """
        if kind not in REGRESSION_UNCERTAINTIES:
            raise ValueError(f"kind must be one of {REGRESSION_UNCERTAINTIES}, got {kind!r}")
        _, var = self._moments(X)
        noise = self._noise_variance().expand_as(var)
        value = {
            "std": (var + noise).sqrt(),
            "variance": var + noise,
            "epistemic_variance": var,
            "aleatoric_variance": noise,
        }[kind]
        return self._shape(value)

    #: the held-out share of ``fit``'s rows when a net trained in ``fit`` leaves rows
    #: aside for the noise level (estimators with a ``calibration_fraction`` parameter
    #: override it); no ``X_cal`` given and a prefit net: all of ``fit``'s rows
    calibration_fraction = 0.2

    def _fit_heldout_noise(
        self, X, y, X_cal=None, y_cal=None, *, net_spread=False, check_rows=True
    ) -> None:
        """``sigma_noise_`` as the RMS residual on held-out rows, training rows only if none.

        A net's residuals on the rows it was trained on understate its error on new
        rows -- the more so, the more it overfits (on a 336-row Friedman #1 task an
        MLP's training RMS is 0.02-0.06 against 0.36-0.39 on test rows) -- so an
        interval from them under-covers. ``X_cal``, ``y_cal`` (given, or set aside by
        :meth:`BaseUQEstimator.fit`) were not trained on: their RMS residual is an
        unbiased estimate of the error a new row meets, noise and fit error together.

        ``net_spread``: the epistemic variance does not depend on the noise (an
        ensemble's spread, MC dropout's), so the noise is what the held-out error
        leaves once that variance is counted -- ``sigma^2 = mean(r^2) - mean(Var f)``
        on the held-out rows, the predictive variance matched to the held-out error
        (else the fit error is counted twice: 97 % coverage for a 95 % band on
        benchmarks/shift.py's regression tasks). Floored at 1 % of ``mean(r^2)`` so
        that a spread which explains all the error leaves a positive noise.

        ``check_rows``: for an already trained net, warn when the rows look like its
        training rows (their mean squared error near its last training loss); off where
        the residual is not the noise the estimator uses.
        """
        held_out = X_cal is not None and len(X_cal) > 0
        self._fit_noise_from_residuals(*((X_cal, y_cal) if held_out else (X, y)))
        if check_rows and self._net_is_prefit():
            self._warn_if_noise_on_training_rows()
        if net_spread and held_out:
            _, var = self._moments(X_cal)
            mse = np.asarray(self.sigma_noise_, dtype=np.float64) ** 2
            spread = var.double().mean(dim=0).numpy().reshape(mse.shape)
            sigma = np.sqrt(np.maximum(mse - spread, 0.01 * mse))
            self.sigma_noise_ = sigma.astype(np.float32) if self.n_outputs_ > 1 else float(sigma)

    def _warn_if_noise_on_training_rows(self) -> None:
        """Warn when an already trained net's noise rows look like its training rows."""
        mse = float(np.mean(np.asarray(self.sigma_noise_, dtype=np.float64) ** 2))
        train = loss_like_training(self.net_, mse, (torch.nn.MSELoss,))
        if train is None:
            return
        warnings.warn(
            f"{type(self).__name__}: the rows the noise level is read on look like rows the "
            f"net was trained on: its mean squared error on them ({mse:.3g}) is within "
            f"{FITTED_ROWS_LOSS_RATIO:g}x the training loss of its last epoch ({train:.3g}). "
            "Residuals on fitted rows understate the error on new rows, so the intervals "
            "under-cover. Read the noise on rows the net did not train on: fit(X, y, "
            "X_cal=X_heldout, y_cal=y_heldout), or give the untrained skorch net so that fit "
            "holds out a share of the rows itself. (A net that fits held-out rows as well as "
            "its training rows can trigger this on a real held-out split; then it is "
            "harmless.)",
            UserWarning,
            stacklevel=5,
        )

    def _fit_noise_from_residuals(self, X, y) -> None:
        """``sigma_noise_`` as the RMS residual of the trained net on ``(X, y)``."""
        sq, n = torch.zeros(self.n_outputs_), 0
        with torch.no_grad():
            for xb, yb in iter_batches(X, y, batch_size=self.batch_size, device=self.device_):
                pred = self.model_(xb).float().cpu()
                sq += ((pred - yb.cpu().reshape(pred.shape)) ** 2).sum(dim=0)
                n += len(xb)
        sigma = (sq / max(n, 1)).sqrt().clamp_min(1e-6)
        if not bool(torch.isfinite(sigma).all()):
            raise FloatingPointError(
                "the trained net gives non-finite residuals on y, so the noise level "
                "sigma_noise_ cannot be estimated: check that y is finite and of moderate "
                "scale (standardize it, e.g. with sklearn.compose.TransformedTargetRegressor) "
                "and that the net trained stably (lower lr, scale the inputs)"
            )
        self.sigma_noise_ = sigma.numpy() if self.n_outputs_ > 1 else float(sigma[0])
