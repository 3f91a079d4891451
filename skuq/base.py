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
import inspect
from abc import abstractmethod

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from sklearn.utils.validation import check_is_fitted, check_memory, validate_data
from torch import Tensor, nn

from ._mixins import REGRESSION_UNCERTAINTIES, UQClassifierMixin, UQRegressorMixin
from ._persist import PortableStateMixin
from ._prior import HELDOUT_GRID as HELDOUT_GRID  # re-exported: the documented home
from ._prior import HELDOUT_TOLERANCE as HELDOUT_TOLERANCE
from ._prior import PriorPrecisionMixin as PriorPrecisionMixin
from ._prior import heldout_choice as heldout_choice
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
from .nets import logit_model
from .outputs import OutputDistribution

__all__ = [
    "BaseUQEstimator",
    "UQClassifierMixin",
    "UQRegressorMixin",
    "logit_model",
    "REGRESSION_UNCERTAINTIES",
    "all_estimators",
    "heldout_choice",
]


# ---------------------------------------------------------------------------- data
def _writable_float32(X: np.ndarray) -> np.ndarray:
    """float32 for the net; a copy when read-only (pandas), as torch wants to own it."""
    X = X.astype(np.float32, copy=False)
    return X if X.flags.writeable else X.copy()


def _n_rows(a) -> int:
    """Rows of an array-like (a list, a pandas object, an array)."""
    return len(a) if hasattr(a, "__len__") else len(np.asarray(a))


# ---------------------------------------------------------------------- the base
class BaseUQEstimator(PortableStateMixin, BaseEstimator):
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
        unknown = (
            set(fit_params)
            - set(self._extra_fit_params)
            - ({"X_cal", "y_cal"} if self._uses_calibration_split else set())
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
                f"calibration_fraction={fraction} of n_samples={len(X)} rows leaves too few "
                "rows for training or calibration; give more data, change calibration_fraction, or "
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
        self.net_ = net
        self.model_ = self._logit_module(module, outputs)
        self._check_output_width(X[: min(len(X), 2)])

    def _logit_module(self, module: nn.Module, outputs: str) -> nn.Module:
        """``module`` on ``device_``, in eval mode, returning logits (classifiers)."""
        module.to(self.device_)
        module.eval()
        return logit_model(module, outputs) if self._is_classifier() else module

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

    def _net_trainer(self):
        """``train_net`` cached in ``memory`` (a plain function, so joblib can ship it)."""
        return check_memory(self.memory).cache(train_net)

    def _train_skorch(self, net, X, y):
        seed = None if self.random_state is None else self._seed
        return self._net_trainer()(self._prepare_skorch(net), X, self._net_target(y), seed)

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
        yield from self._batch_distributions(self._validate_predict_data(X))

    def _batch_distributions(self, X: np.ndarray):
        """The distribution of each batch of the validated rows ``X``."""
        n_batches = -(-len(X) // self.batch_size)
        batches = iter_batches(X, batch_size=self.batch_size, device=self.device_)
        for (xb,) in progress(batches, self.verbose, "predict", n_batches):
            yield self._predict_batch(xb)

    def _map_batches(self, X, fn) -> tuple[Tensor, ...]:
        """``fn(distribution)`` (a tuple of tensors with one row per input row) over the
        batches of ``X``, each gathered into one CPU tensor allocated once.

        Keeping many small per-batch results alive between the large transient
        allocations of every batch fragments the heap: the peak memory of a
        prediction then grows with the rows predicted (an all-weights full posterior:
        84 MB above the start for 20,000 rows against 24 MB with one output buffer).
        """
        check_is_fitted(self, "model_")
        X = self._validate_predict_data(X)
        outs: list[Tensor] = []
        start = 0
        for d in self._batch_distributions(X):
            parts = fn(d)
            if not outs:
                outs = [torch.empty((len(X), *a.shape[1:]), dtype=a.dtype) for a in parts]
            for out, a in zip(outs, parts, strict=True):
                out[start : start + len(a)] = a
            start += len(parts[0])
        return tuple(outs)

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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = self.random_state is None
        if not self._is_classifier():
            tags.target_tags.multi_output = True
        return tags


def all_estimators(kind: str | None = None) -> list[tuple[str, type]]:
    """Every public skuq estimator as ``(name, class)``, sorted by name.

    The registry benchmarks and tests iterate over: a new method is found as
    soon as its estimator class (public name, defined in skuq) is imported,
    which ``import skuq`` does for every method.

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
    tasks = {"classifier": UQClassifierMixin, "regressor": UQRegressorMixin}
    mixin = tasks[kind] if kind is not None else tuple(tasks.values())
    found, stack = {}, [BaseUQEstimator]
    while stack:  # every subclass, however deep
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        public = not cls.__name__.startswith("_") and cls.__module__.split(".")[0] == "skuq"
        if public and issubclass(cls, mixin) and not inspect.isabstract(cls):
            found[cls.__name__] = cls
    return sorted(found.items())
