"""L2M: a diagonal Laplace posterior read from the optimizer's second moment.

Adam-family optimizers keep an average of squared mini-batch gradients for
every weight; near a minimum, scaled by the training rows and the batch size,
it is the diagonal empirical Fisher of the summed loss (Perone et al., 2021;
the derivation and its limits are in :mod:`skuq.curvature.optimizer`). Fitting
reads optimizer state and never passes over the training data again. The
posterior and the predictive are those of the diagonal Laplace
(:class:`skuq.posterior.DiagPosterior`, :mod:`skuq.predictive`).

The core (:func:`~skuq.curvature.optimizer.second_moments`,
:func:`~skuq.curvature.optimizer.l2m_curvature`) is plain torch, in
:mod:`skuq.curvature.optimizer`; the estimators :class:`L2MClassifier` and
:class:`L2MRegressor` here put the scikit-learn face on it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from .._skorch import is_skorch_net, last_epoch_batch_sizes, trained_optimizer
from .._utils import check_option, check_positive, check_positive_int, iter_batches
from ..base import UQClassifierMixin, UQRegressorMixin
from ..curvature import Curvature, sum_loss
from ..curvature.optimizer import SCALES, l2m_curvature
from .base import ClassificationLikelihood, RegressionLikelihood, _BaseLaplace

__all__ = ["L2MClassifier", "L2MRegressor"]


class _BaseL2M(_BaseLaplace):
    """Diagonal Laplace whose curvature is read from the trained net's optimizer."""

    # the weight subset the Laplace machinery reads, fixed for L2M (its curvature hook and
    # option checks are L2M's own)
    subset_of_weights = "all"
    hessian_structure = "diag"
    subnetwork_indices = None

    _extra_fit_params = ("optimizer",)

    def _validate_curvature_options(self) -> None:
        if isinstance(self.scale, str):
            check_option("scale", self.scale, SCALES)
        else:
            check_positive("scale", self.scale)
        if not isinstance(self.bias_correction, (bool, np.bool_)):
            raise ValueError(f"bias_correction must be True or False, got {self.bias_correction!r}")
        if self.train_batch_size is not None:
            check_positive_int("train_batch_size", self.train_batch_size)

    def fit(self, X, y, **fit_params):
        """Train the wrapped net (unless trained), then read its optimizer's second moments.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        optimizer : torch.optim.Optimizer, optional
            For a plain ``torch.nn.Module``: the optimizer that trained it
            (a skorch net's own ``optimizer_`` is used otherwise).
        X_cal, y_cal : array-like, optional
            Held-out rows for ``prior_precision="heldout"`` and, for a
            regressor, the ``"residual"`` noise level.

        Returns
        -------
        self
        """
        self._optimizer_arg = fit_params.pop("optimizer", None)
        try:
            return super().fit(X, y, **fit_params)
        finally:
            del self._optimizer_arg

    def _trained_optimizer(self):
        if self._optimizer_arg is not None:
            return self._optimizer_arg
        opt = trained_optimizer(self.net_)
        if opt is None:
            raise TypeError(
                "L2M reads the optimizer state of the training run; a plain torch.nn.Module "
                "carries none. Pass the optimizer that trained it: fit(X, y, optimizer=opt)"
            )
        return opt

    def _training_batches(self) -> list[int] | None:
        """Sizes of the training batches of the net's last epoch (skorch history), if known."""
        return last_epoch_batch_sizes(self.net_)

    def _n_train(self, n_rows: int) -> int:
        """Rows the net trained on: skorch's validation split keeps some of ``fit``'s rows out."""
        sizes = self._training_batches()
        return int(sum(sizes)) if sizes else n_rows

    def _train_batch_size(self, n_train: int) -> int:
        if self.train_batch_size is not None:
            return min(int(self.train_batch_size), n_train)
        sizes = self._training_batches()
        if sizes:
            return int(max(sizes))
        if not is_skorch_net(self.net_) and self.scale == "fisher":
            raise ValueError(
                "scale='fisher' needs the batch size the net was trained with: set "
                "train_batch_size (a skorch net tells it itself)"
            )
        return 1

    def _check_criterion_reduction(self) -> None:
        reduction = getattr(getattr(self.net_, "criterion_", None), "reduction", "mean")
        if reduction != "mean" and isinstance(self.scale, str):
            raise ValueError(
                f"L2M's scale={self.scale!r} assumes the net minimized the mean loss of a "
                f"batch, but its criterion uses reduction={reduction!r}: train with "
                "reduction='mean' or give scale as a float"
            )

    def _training_loss(self, X, y, n_train: int) -> float:
        """Summed training loss for the evidence.

        Classification: skorch's mean training loss of the last epoch, no pass
        over the data; a plain module has no history, so one forward pass over
        ``X`` gives it. Regression: ``0.5 * SSE`` from the residual noise fitted
        just before.
        """
        if self._likelihood == "regression":
            return 0.5 * n_train * float(np.sum(np.square(self.sigma_noise_)))
        history = getattr(self.net_, "history", None)
        if history and "train_loss" in history[-1]:
            return float(history[-1]["train_loss"]) * n_train
        loss = 0.0
        with torch.no_grad():
            for xb, yb in iter_batches(X, y, batch_size=self.batch_size, device=self.device_):
                loss += float(sum_loss(self.model_(xb).double(), yb, self._likelihood))
        return loss

    def _optimizer_params(self, weights) -> list[Tensor]:
        """The tensors the optimizer keeps state for, in the order of ``weights``.

        ``model_`` may be a copy on another device (or a logit wrapper) of the
        trained module; parameters correspond by position.
        """
        origin = self.net_.module_ if is_skorch_net(self.net_) else self.net_
        names = [n for n, _ in self.model_.named_parameters()]
        by_name = dict(zip(names, origin.parameters(), strict=True))
        return [by_name[n] for n in weights.names]

    def _curvature(self, weights, X, y) -> Curvature:
        optimizer = self._trained_optimizer()
        self._check_criterion_reduction()
        n_train = self._n_train(len(X))
        batch = self._train_batch_size(n_train)
        if self.scale == "fisher" and batch >= n_train:
            warnings.warn(
                "L2M's scale='fisher' reads the optimizer's second moment as the noise of "
                "mini-batch gradients, but this net was trained full-batch (batch size "
                f"{batch} >= {n_train} rows): v_hat is then the square of the full gradient, "
                "(sum_n g_n)^2 / N^2, which vanishes at convergence, not sum_n g_n^2 / N. The "
                "curvature is near zero and the posterior near the prior. Train with "
                "mini-batches, or use LaplaceClassifier/LaplaceRegressor(hessian_structure="
                "'diag')",
                UserWarning,
                stacklevel=4,
            )
        return l2m_curvature(
            weights,
            optimizer,
            n_train=n_train,
            train_batch_size=batch,
            scale=self.scale,
            likelihood=self._likelihood,
            n_outputs=self.n_outputs_,
            loss=self._training_loss(X, y, n_train),
            bias_correction=self.bias_correction,
            params=self._optimizer_params(weights),
        )


_SHARED_DOC = """
    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        A net trained (or to be trained in ``fit``) with one of
        :data:`~skuq.curvature.optimizer.SECOND_MOMENT_OPTIMIZERS` (skorch's
        ``optimizer=torch.optim.Adam`` ...). A ``FrozenEstimator`` keeps its
        net's optimizer state; a plain module needs ``fit(X, y, optimizer=...)``.
    scale : {"fisher", "n_train"} or float, default="fisher"
        Curvature ``h = c * v_hat``. ``"fisher"``: ``c = N B`` with ``B`` the
        training batch size, which makes ``h`` the diagonal empirical Fisher of
        the summed loss once training has converged (the mean gradient is then
        ~0 and ``v`` is the variance of a batch-mean gradient, ``1/B`` of the
        per-row one). ``"n_train"``: ``c = N``, the plain reading of the L2M
        paper, which is ``B`` times less curvature. A float is used as is.
        Grid-searchable without retraining.
    bias_correction : bool, default=True
        Divide Adam's (or RMSprop's) moving average by ``1 - beta2^t``.
    train_batch_size : int or None, default=None
        ``B`` for ``scale="fisher"``; read from the skorch net when None.
    prior_precision : float, array of float, "marglik" or "heldout", \
default="heldout"
        As in :class:`~skuq.LaplaceClassifier`; ``"marglik"`` costs O(P) per
        step and no pass over data, but over all weights it makes the
        predictions far too uncertain in distribution (10-15x the bare net's
        NLL on the digits tasks of ``benchmarks/shift.py``; a regressor's
        95 % band covers 99-100 % of the test targets there); the held-out
        rule (a regressor's: the held-out NLL's minimum) keeps the
        in-distribution fit and costs a held-out split, and a second
        training for a net trained in ``fit``.
    prior_structure, pred_type, n_samples, temperature, calibration_fraction
        As in :class:`~skuq.LaplaceClassifier`.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.
"""


class L2MClassifier(UQClassifierMixin, ClassificationLikelihood, _BaseL2M):
    __doc__ = (
        """Diagonal Laplace for free from the optimizer's second moment (L2M).

    After the net is trained with Adam (or AdamW, NAdam, RAdam, RMSprop,
    Adagrad, Adamax), each weight's average squared gradient ``v`` is read
    from the optimizer, bias-corrected, and scaled into a diagonal curvature
    ``h`` (see ``scale``); the posterior is ``N(theta*, diag(1 / (h + delta)))``
    and predictions use the linearized (``"glm"``) or sampled (``"nn"``) net,
    exactly as :class:`~skuq.LaplaceClassifier` with ``subset_of_weights="all"``
    and ``hessian_structure="diag"``. Fitting makes no pass over the training
    data: the training loss for the evidence comes from skorch's history.
    """
        + _SHARED_DOC
        + """    link_approx : {"probit", "centered_probit", "mc", "bridge"}, \
default="centered_probit"
        As :class:`~skuq.LaplaceClassifier`'s.

    Attributes
    ----------
    classes_ : ndarray
    posterior_ : skuq.posterior.DiagPosterior
    prior_precision_ : float or ndarray
    n_params_ : int

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import L2MClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = L2MClassifier(net, random_state=0).fit(d.X_train, d.y_train)
    >>> est.predict_proba(d.X_test).shape
    (271, 5)
    """
    )

    def __init__(
        self,
        estimator,
        *,
        scale="fisher",
        bias_correction=True,
        train_batch_size=None,
        prior_precision="heldout",
        prior_structure="scalar",
        pred_type="glm",
        link_approx="centered_probit",
        n_samples=100,
        temperature=1.0,
        calibration_fraction=0.2,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.scale = scale
        self.bias_correction = bias_correction
        self.train_batch_size = train_batch_size
        self.prior_precision = prior_precision
        self.prior_structure = prior_structure
        self.pred_type = pred_type
        self.link_approx = link_approx
        self.n_samples = n_samples
        self.temperature = temperature
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory


class L2MRegressor(UQRegressorMixin, RegressionLikelihood, _BaseL2M):
    __doc__ = (
        """L2M for regression nets trained on ``MSELoss`` with an Adam-family optimizer.

    As :class:`L2MClassifier`; the gradient of the mean squared error is
    rescaled to the Gaussian likelihood's (see
    :func:`~skuq.curvature.optimizer.l2m_curvature`), and the noise
    ``sigma_noise_`` is the RMS residual on the held-out rows (one forward
    pass over them).
    """
        + _SHARED_DOC
        + """    sigma_noise : float or str, default="residual"
        Observation noise. ``"residual"``: the RMS residual on the held-out
        rows (``X_cal``, ``y_cal``; ``calibration_fraction`` of the rows for
        a net trained in ``fit``, whose final net is then retrained on every
        row; ``fit``'s rows for a trained net), as in
        :class:`skuq.LaplaceRegressor`. ``"marglik"`` fits it
        with the prior by the marginal likelihood, which over all the weights
        of a net inflates it (several times the residual on the comparison's
        regression tasks: the log-determinant over thousands of weights
        rewards a larger noise), so intervals come out far too wide; ``"auto"``
        as in :class:`skuq.LaplaceRegressor`.

    Attributes
    ----------
    sigma_noise_ : float or ndarray
    posterior_, prior_precision_, n_params_

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from skuq import L2MRegressor
    >>> from skuq.datasets import make_gap_regression
    >>> from skuq.nets import MLP
    >>> d = make_gap_regression()
    >>> net = NeuralNetRegressor(MLP, optimizer=torch.optim.Adam, lr=1e-2,
    ...                          max_epochs=50, train_split=None, verbose=0)
    >>> est = L2MRegressor(net, random_state=0).fit(d.X, d.y)
    >>> mean, std = est.predict(d.X_test, return_std=True)
    >>> mean.shape == std.shape == (len(d.X_test),)
    True
    """
    )

    def __init__(
        self,
        estimator,
        *,
        scale="fisher",
        bias_correction=True,
        train_batch_size=None,
        sigma_noise="residual",
        prior_precision="heldout",
        prior_structure="scalar",
        pred_type="glm",
        n_samples=100,
        temperature=1.0,
        calibration_fraction=0.2,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.scale = scale
        self.bias_correction = bias_correction
        self.train_batch_size = train_batch_size
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        self.prior_structure = prior_structure
        self.pred_type = pred_type
        self.n_samples = n_samples
        self.temperature = temperature
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory
