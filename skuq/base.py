"""The shared scikit-learn plumbing of every skuq estimator.

An estimator in skuq is thin: it names its options, validates them, and
implements two hooks --

* ``_fit_uq(X, y, X_cal, y_cal, **fit_params)``: fit the method's posterior on
  the trained network ``self.model_`` (a ``torch.nn.Module`` returning logits
  for classification, or the regression mean);
* ``_predict_batch(x)``: map one batch of inputs (a tensor on ``self.device_``)
  to an :class:`~skuq.outputs.OutputDistribution`.

Everything else -- data validation, label encoding, resolving and training the
wrapped net once (with ``memory`` caching), devices, batching, seeds, links,
uncertainty measures, regression bands, refusing to return NaN -- lives here.
"""

from __future__ import annotations

import copy
import copyreg
from abc import abstractmethod

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_memory, validate_data
from torch import Tensor, nn

from ._skorch import criterion_outputs, is_skorch_net, takes_n_outputs, train_net
from ._utils import (
    check_finite,
    check_positive,
    check_positive_int,
    iter_batches,
    make_generator,
    progress,
    resolve_device,
    seed_from_random_state,
)
from .outputs import (
    CLASSIFICATION_UNCERTAINTIES,
    OutputDistribution,
    classification_uncertainty,
)

REGRESSION_UNCERTAINTIES = ("std", "variance", "epistemic_variance", "aleatoric_variance")

__all__ = [
    "BaseUQEstimator",
    "UQClassifierMixin",
    "UQRegressorMixin",
    "logit_model",
    "REGRESSION_UNCERTAINTIES",
    "all_estimators",
]


# --------------------------------------------------------------------------- nets
class _LogOfProbabilities(nn.Module):
    """Turns a module that outputs probabilities into one that outputs logits."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        # one named input (not *args), so that torch.fx can trace it (CVP); CVP
        # fuses log(softmax(.).clamp_min(eps)) into one log-softmax
        return torch.log(self.module(x).clamp_min(1e-30))


def logit_model(module: nn.Module, outputs: str) -> nn.Module:
    """The model whose outputs are logits, sharing ``module``'s parameters.

    ``outputs="probabilities"`` is skorch's convention for ``NLLLoss`` nets (the
    module ends in a softmax and skorch takes the log in its loss). A trailing
    ``nn.Softmax`` in an ``nn.Sequential`` is dropped, which recovers the exact
    pre-softmax logits; otherwise the log of the probabilities is used
    (``softmax(log p) = p``, so those are valid logits too).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.base import logit_model
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Softmax(dim=-1))
    >>> f = logit_model(net, "probabilities")
    >>> x = torch.ones(1, 2)
    >>> torch.allclose(f(x), net[0](x))
    True
    """
    if outputs == "logits":
        return module
    if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Softmax):
        # a plain Sequential: slicing a subclass would call its own __init__
        return nn.Sequential(*list(module.children())[:-1])
    return _LogOfProbabilities(module)


def _writable_float32(X: np.ndarray) -> np.ndarray:
    """float32 for the net; a copy when read-only (pandas), as torch wants to own it."""
    X = X.astype(np.float32, copy=False)
    return X if X.flags.writeable else X.copy()


def _n_rows(a) -> int:
    """Rows of an array-like (a list, a pandas object, an array)."""
    return len(a) if hasattr(a, "__len__") else len(np.asarray(a))


# ---------------------------------------------------------------------- the base
class BaseUQEstimator(BaseEstimator):
    """Plumbing shared by every skuq estimator (not for direct use).

    Subclasses define ``__init__`` with their parameters (scikit-learn's rule:
    store them unchanged), the ``_fit_uq`` and ``_predict_batch`` hooks, and
    ``_validate_options`` for their own option checks.

    Shared parameters, present in every estimator:

    estimator : skorch net, FrozenEstimator or torch.nn.Module
        The network. An unfitted skorch net is cloned and trained in ``fit``;
        a skorch net wrapped in :class:`sklearn.frozen.FrozenEstimator` is used
        as trained and never retrained; a ``torch.nn.Module`` is used as is
        (assumed trained, returning logits or regression means). A trained
        net is put in eval mode; it is copied, never moved, when it lives on
        another device than ``device``.
    device : str or torch.device, default="auto"
        ``"auto"`` uses CUDA when available, else the CPU; a net trained in
        ``fit`` is trained there.
    batch_size : int, default=256
        Rows per pass in every loop over data, so memory stays flat in N.
    random_state : int, RandomState or None
        Seeds net training and every stochastic step of the method.
    verbose : int, default=0
        Progress bars (tqdm) on long loops when > 0.
    memory : None, str or joblib.Memory
        Caches the trained net keyed on the net's parameters and the data, as
        ``sklearn.pipeline.Pipeline(memory=...)`` does, so that a grid search
        over posterior-only parameters trains the net once per fold.

    Examples
    --------
    >>> from skuq import MAPClassifier, MAPRegressor
    >>> from skuq.base import BaseUQEstimator
    >>> issubclass(MAPClassifier, BaseUQEstimator), issubclass(MAPRegressor, BaseUQEstimator)
    (True, True)
    >>> MAPClassifier(estimator=None).get_params()["batch_size"]
    256
    """

    #: whether this estimator fits something on a held-out split of ``fit``'s data
    _uses_calibration_split = False
    #: extra keyword arguments ``fit`` accepts and passes to ``_fit_uq``
    _extra_fit_params: tuple[str, ...] = ()

    # ------------------------------------------------------------------ hooks
    def _validate_options(self) -> None:
        """Check the estimator's own options; raise ValueError naming allowed values."""

    @abstractmethod
    def _fit_uq(self, X, y, X_cal=None, y_cal=None, **fit_params) -> None:
        """Fit the method on the trained net ``self.model_``."""

    @abstractmethod
    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        """Distribution over outputs for one batch on ``self.device_``."""

    # ------------------------------------------------------------------- fit
    def fit(self, X, y, **fit_params):
        """Train the wrapped net (unless already trained), then fit the method.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            Inputs; n-d arrays (images) are allowed. Cast to float32 for the net.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Class labels of any type, or regression targets.
        **fit_params
            ``X_cal`` and ``y_cal`` (a user-given calibration split) for
            estimators that calibrate on held-out data, and the method's own
            extra data where documented.

        Returns
        -------
        self
        """
        unknown = set(fit_params) - set(self._extra_fit_params) - (
            {"X_cal", "y_cal"} if self._uses_calibration_split else set()
        )
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.fit got unexpected keyword arguments {sorted(unknown)}"
            )
        self._validate_shared_options()
        self._validate_options()
        X, y = self._validate_fit_data(X, y)
        self.device_ = resolve_device(self.device)
        self._seed = seed_from_random_state(self.random_state)

        X_cal, y_cal = fit_params.pop("X_cal", None), fit_params.pop("y_cal", None)
        if (X_cal is None) != (y_cal is None):
            raise ValueError("give both X_cal and y_cal, or neither")
        if X_cal is not None:
            X_cal = self._validate_predict_data(X_cal, what="X_cal")
            if len(X_cal) != _n_rows(y_cal):
                raise ValueError(
                    f"X_cal has {len(X_cal)} rows but y_cal has {_n_rows(y_cal)}; "
                    "give one target per calibration row"
                )
            y_cal = self._encode_target(np.asarray(y_cal), fitting=False)
        elif self._uses_calibration_split:
            X, y, X_cal, y_cal = self._calibration_split(X, y)

        self._resolve_net(X, y)
        self._fit_uq(X, y, X_cal, y_cal, **fit_params)
        return self

    def _validate_shared_options(self) -> None:
        check_positive_int("batch_size", self.batch_size)
        if not (
            is_skorch_net(self.estimator)
            or isinstance(self.estimator, (FrozenEstimator, nn.Module))
        ):
            raise TypeError(
                "estimator must be a skorch net (e.g. NeuralNetClassifier), a trained "
                "skorch net wrapped in sklearn.frozen.FrozenEstimator, or a trained "
                f"torch.nn.Module; got {type(self.estimator).__name__}"
            )

    def _validate_fit_data(self, X, y):
        X, y = validate_data(
            self,
            X,
            y,
            allow_nd=True,
            dtype=[np.float32, np.float64],
            multi_output=not self._is_classifier(),
            y_numeric=not self._is_classifier(),
        )
        self._input_shape = tuple(X.shape[1:])  # per row; n_features_in_ sees only shape[1]
        return _writable_float32(X), self._encode_target(y, fitting=True)

    def _validate_predict_data(self, X, what: str = "X") -> np.ndarray:
        X = validate_data(self, X, reset=False, allow_nd=True, dtype=[np.float32, np.float64])
        expected = getattr(self, "_input_shape", None)
        if expected is not None and tuple(X.shape[1:]) != expected:
            raise ValueError(
                f"{what} has rows of shape {tuple(X.shape[1:])} but {type(self).__name__} was "
                f"fitted on rows of shape {expected}; give inputs shaped like the training data"
            )
        return _writable_float32(X)

    def _is_classifier(self) -> bool:
        return isinstance(self, UQClassifierMixin)

    def _centered_link(self) -> bool:
        """Whether predictives should also form ``Cov[P f]`` precisely (the centered probit)."""
        return getattr(self, "link_approx", None) == "centered_probit"

    def _calibration_split(self, X, y):
        """Held-out data for post-hoc fitting.

        A net that still has to be trained gets ``1 - calibration_fraction`` of
        the rows and the rest is held out (stratified for classifiers). An
        already trained net (``FrozenEstimator`` or ``nn.Module``) never sees
        ``fit``'s data in training, so all of it is used for calibration, as
        ``CalibratedClassifierCV(FrozenEstimator(...))`` does.
        """
        if self._net_is_prefit():
            return X, y, X, y
        fraction = self.calibration_fraction
        check_positive("calibration_fraction", fraction)
        if fraction >= 1:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction!r}")
        n_cal = int(round(fraction * len(X)))
        n_classes = len(self.classes_) if self._is_classifier() else 0
        if n_cal < max(n_classes, 2) or len(X) - n_cal < max(n_classes, 2):
            raise ValueError(
                f"calibration_fraction={fraction} of {len(X)} rows leaves too few rows for "
                "training or calibration; give more data, change calibration_fraction, or "
                "pass X_cal and y_cal to fit"
            )
        stratify = y if self._is_classifier() and np.bincount(y).min() >= 2 else None
        X_tr, X_cal, y_tr, y_cal = train_test_split(
            X, y, test_size=n_cal, random_state=self._seed, stratify=stratify
        )
        return X_tr, y_tr, X_cal, y_cal

    # ------------------------------------------------------------------- nets
    def _net_is_prefit(self) -> bool:
        return isinstance(self.estimator, (FrozenEstimator, nn.Module))

    def _resolve_net(self, X: np.ndarray, y: np.ndarray) -> None:
        """Set ``net_`` (what was wrapped, trained) and ``model_`` (logit module)."""
        est = self.estimator
        if isinstance(est, FrozenEstimator):
            est = est.estimator
            if is_skorch_net(est):
                check_is_fitted(est, "module_")
        if isinstance(est, nn.Module):
            net, module, outputs = est, est, "logits"
        elif is_skorch_net(est):
            outputs = criterion_outputs(est) if self._is_classifier() else "logits"
            if isinstance(self.estimator, FrozenEstimator):
                net = est
            else:
                net = self._train_skorch(est, X, y)
            module = net.module_
        else:
            raise TypeError(f"cannot use a FrozenEstimator around {type(est).__name__}")
        if not any(True for _ in module.parameters()):
            raise ValueError("the wrapped network has no parameters")
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if dtypes - {torch.float32}:
            raise TypeError(
                f"the network's parameters are {', '.join(sorted(map(str, dtypes)))}, but "
                "skuq feeds it float32 inputs: convert the module with module.float()"
            )
        if self._net_is_prefit() and next(module.parameters()).device != self.device_:
            # the user's trained net stays where it is (a skorch net keeps its own
            # device setting); the copy moves
            module = copy.deepcopy(module)
        module.to(self.device_)
        module.eval()
        self.net_ = net
        self.model_ = logit_model(module, outputs) if self._is_classifier() else module
        self._check_output_width(X[: min(len(X), 2)])

    def _prepare_skorch(self, net):
        """An unfitted clone of ``net`` set to train on ``device_`` with ``n_outputs_`` outputs."""
        net = clone(net)
        params = {"device": str(self.device_)}
        module = net.module
        if takes_n_outputs(module) and "module__n_outputs" not in net.get_params():
            params["module__n_outputs"] = self.n_outputs_
        net.set_params(**params)
        return net

    def _net_target(self, y: np.ndarray) -> np.ndarray:
        """``y`` in the shape the skorch net trains on (2-d for regression)."""
        return y.reshape(len(y), -1) if not self._is_classifier() else y

    def _train_skorch(self, net, X, y):
        seed = None if self.random_state is None else self._seed
        train = check_memory(self.memory).cache(train_net)
        return train(self._prepare_skorch(net), X, self._net_target(y), seed)

    def _check_output_width(self, x: np.ndarray) -> None:
        with torch.no_grad():
            out = self.model_(torch.as_tensor(x).to(self.device_))
        if out.ndim != 2 or out.shape[1] != self.n_outputs_:
            what = "classes" if self._is_classifier() else "regression targets"
            raise ValueError(
                f"the network outputs shape {tuple(out.shape)} per batch but there are "
                f"{self.n_outputs_} {what}; it must output (batch, {self.n_outputs_}). "
                "Set the module's output size (skuq.nets.MLP does this from n_outputs)."
            )

    # ----------------------------------------------------------------- predict
    def _generator(self) -> torch.Generator:
        """A fresh generator per call, so that predictions are reproducible."""
        check_is_fitted(self, "model_")  # NotFittedError, not AttributeError, before fit
        return make_generator(self._seed, self.device_)

    def _iter_distributions(self, X):
        check_is_fitted(self, "model_")
        X = self._validate_predict_data(X)
        n_batches = -(-len(X) // self.batch_size)
        batches = iter_batches(X, batch_size=self.batch_size, device=self.device_)
        for (xb,) in progress(batches, self.verbose, "predict", n_batches):
            yield self._predict_batch(xb)

    def predict_distribution(self, X) -> OutputDistribution:
        """Distribution over the network outputs (logits, or regression means).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)

        Returns
        -------
        OutputDistribution
            On the CPU; Gaussian (mean and covariance) or samples.
        """
        dist = OutputDistribution.concatenate([d.to("cpu") for d in self._iter_distributions(X)])
        check_finite(dist.output_mean, "the predicted output mean")
        check_finite(dist.variance, "the predicted output variance")
        return dist

    # ------------------------------------------------------------- persistence
    def __getstate__(self):
        """State for ``skops.io``: tensors as numpy arrays, objects as class + attributes.

        skops cannot rebuild torch tensors, and a fitted skorch net would carry
        its module as ``torch.save`` bytes; see :mod:`skuq._persist`. Pickle and
        ``copy`` keep the plain attribute dict (``__reduce_ex__``).
        """
        from ._persist import to_portable

        return to_portable(super().__getstate__())

    def __reduce_ex__(self, protocol):
        # pickle, joblib and copy.deepcopy: the plain state, as BaseEstimator gives it
        return copyreg.__newobj__, (type(self),), BaseEstimator.__getstate__(self)

    def __setstate__(self, state):
        from ._persist import PORTABLE_KEY, from_portable

        if isinstance(state, dict) and PORTABLE_KEY in state:
            state = from_portable(state)
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = self.random_state is None
        if not self._is_classifier():
            tags.target_tags.multi_output = True
        return tags


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
        parts = [
            d.probabilities(self._link(), self._n_link_samples(), self._generator()).cpu()
            for d in self._iter_distributions(X)
        ]
        proba = check_finite(torch.cat(parts), "predict_proba").double()
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
        parts = [
            classification_uncertainty(
                d, kind, self._link(), self._n_link_samples(), self._generator()
            ).cpu()
            for d in self._iter_distributions(X)
        ]
        return check_finite(torch.cat(parts), "predict_uncertainty").double().numpy()


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
        dist = self.predict_distribution(X)
        # a variance is >= 0; float error can leave a tiny negative one (-1e-9), which
        # sqrt would turn into NaN
        return dist.output_mean, dist.variance.clamp_min(0.0)

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



def all_estimators(kind: str | None = None) -> list[tuple[str, type]]:
    """Every public skuq estimator as ``(name, class)``, sorted by name.

    The registry benchmarks and tests iterate over: a new method is found as
    soon as it is exported from ``skuq``.

    Parameters
    ----------
    kind : {"classifier", "regressor"} or None
        Only classifiers or only regressors.

    Examples
    --------
    >>> from skuq.base import all_estimators
    >>> "MAPClassifier" in dict(all_estimators("classifier"))
    True
    """
    import skuq

    mixin = {"classifier": UQClassifierMixin, "regressor": UQRegressorMixin, None: object}[kind]
    found = []
    for name in skuq.__all__:
        obj = getattr(skuq, name)
        if isinstance(obj, type) and issubclass(obj, BaseUQEstimator) and issubclass(obj, mixin):
            found.append((name, obj))
    return sorted(found)
