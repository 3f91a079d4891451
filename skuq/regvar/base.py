"""The shared core of RegVar's estimators: options, the prior, fitting and prediction.

:class:`_BaseRegVar` reads the wrapped net (its criterion, optimizer and batch
size) and calls the torch core of :mod:`skuq.regvar`; the public estimators
(:mod:`skuq.regvar.estimator`) add the likelihood.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor

from .._skorch import criterion_outputs, is_skorch_net, trained_optimizer, training_batch_size
from .._utils import check_option, check_positive, check_positive_int
from ..base import BaseUQEstimator, PriorPrecisionMixin
from ..curvature import iter_jacobians, select_weights
from ..outputs import OutputDistribution
from ..posterior import center_outputs
from .core import (
    EXACT_SOLVERS,
    MODES,
    LossFn,
    OptimizerFactory,
    _check_lam,
    _check_loss_value,
    _nearest_psd,
    _trainable,
)
from .exact import exact_covariance
from .finetune import amortized_variance, finetune_pair
from .hessian import (
    HESSIAN_AUTO_MAX_PARAMS,
    hessian_covariance,
    hessian_posterior,
    objective_hessian,
)
from .optim import implied_prior, optimizer_factory, optimizer_spec

#: ``exact_solver`` of the estimators: the Hessian's closed form, or a fine-tune per problem
ESTIMATOR_SOLVERS = ("auto", "hessian", *EXACT_SOLVERS)


class _BaseRegVar(PriorPrecisionMixin, BaseUQEstimator):
    """Shared fitting and prediction of the RegVar estimators."""

    _prior_methods = ("heldout",)
    _per_layer_prior = False
    #: share of an untrained net's rows held out for prior_precision="heldout"
    calibration_fraction = 0.2

    def _validate_options(self) -> None:
        check_option("mode", self.mode, MODES)
        _check_lam(self.lam)
        check_positive_int("finetune_epochs", self.finetune_epochs)
        check_positive("finetune_lr", self.finetune_lr, allow_none=True)
        check_positive_int("n_average", self.n_average)
        check_positive("variance_scale", self.variance_scale)
        if isinstance(self.prior_precision, str):
            self._validate_prior_precision()
        else:  # 0 is allowed: no prior (the L-BFGS and optimizer fine-tunes accept it)
            check_positive("prior_precision", self.prior_precision, allow_none=True, strict=False)
        check_option("exact_solver", self.exact_solver, ESTIMATOR_SOLVERS)
        check_positive_int("exact_max_iter", self.exact_max_iter)
        self._validate_likelihood_options()

    @property
    def _heldout_prior(self) -> bool:
        return isinstance(self.prior_precision, str)

    # ---------------------------------------------------- the net's objective
    def _loss(self) -> LossFn:
        """The mean batch loss the net trained on, as a function of ``model_``'s outputs."""
        if not is_skorch_net(self.net_):
            return self._default_loss
        net = self.net_
        reduction = getattr(net.criterion_, "reduction", "mean")
        if reduction != "mean":
            raise ValueError(
                f"RegVar reads the net's criterion as the mean loss of a batch, but it uses "
                f"reduction={reduction!r}; train with reduction='mean' (torch's default)"
            )
        probabilities = self._is_classifier() and criterion_outputs(net) == "probabilities"

        def loss(f: Tensor, y: Tensor) -> Tensor:
            # model_ outputs logits; an NLLLoss net's own module outputs their softmax
            pred = torch.softmax(f, dim=-1) if probabilities else f
            if not self._is_classifier():
                y = y.reshape(pred.shape)
            return net.get_loss(pred, y, training=True)

        return loss

    def _optimizer_spec(self) -> tuple[type, list[dict], list[dict]]:
        """Optimizer class, hyperparameter groups and state per weight (:func:`optimizer_spec`)."""
        return optimizer_spec(
            _trainable(self.model_),
            trained_optimizer(self.net_),
            lr=self.finetune_lr,
            drop_weight_decay=self.prior_precision is not None,
        )

    def _optimizer_factory(self, stacked: bool = False) -> OptimizerFactory:
        """``make(params)``: the net's optimizer over fine-tuned copies of its weights.

        The copies start from the trained optimizer's state (Adam's moments...),
        so a fine-tune continues training rather than restarting it. With
        ``stacked``, ``params`` is one ``(problems, P)`` tensor of flat weight
        vectors (:func:`exact_covariance`'s ``"optimizer"`` solver).
        """
        cls, groups, state = self._optimizer_spec()
        return optimizer_factory(cls, groups, state, _trainable(self.model_), stacked=stacked)

    def _weight_decay_prior(self, n_train: int) -> Tensor:
        """``delta`` per weight: the prior the optimizer's weight decay implies, or the given one.

        See :func:`skuq.regvar.optim.implied_prior`.
        """
        trainable = _trainable(self.model_)
        sizes = [p.numel() for p in trainable]
        if self.prior_precision is not None:
            return torch.full((sum(sizes),), float(self.prior_precision), dtype=torch.float64)
        return implied_prior(*self._optimizer_spec(), trainable, n_train)

    def _prior(self) -> Tensor:
        """The fitted ``delta`` per weight, float64 (P,)."""
        return torch.as_tensor(self.prior_precision_, dtype=torch.float64).expand(self.n_params_)

    def _explicit_prior(self) -> float | None:
        """The fitted ``delta`` when it replaces the optimizer's weight decay, else None."""
        return None if self.prior_precision is None else float(self.prior_precision_)

    def _train_batch_size(self, n_train: int) -> int:
        return training_batch_size(self.net_, n_train, self.batch_size)

    def _check_differentiable(self, X, y, loss) -> None:
        rows = slice(0, min(len(X), 8))
        xb = torch.as_tensor(X[rows]).to(self.device_)
        yb = torch.as_tensor(y[rows]).to(self.device_)
        value = _check_loss_value(loss(self.model_(xb), yb), "the net's loss")
        grads = torch.autograd.grad(value, _trainable(self.model_), allow_unused=True)
        if all(g is None for g in grads):
            raise TypeError(
                "RegVar fine-tunes the network on its training loss, but the loss does not "
                "depend on any trainable weight; train with a differentiable criterion"
            )

    def _resolve_solver(self) -> str:
        """The exact-mode solver: ``"auto"`` takes the Hessian when it is at hand or small."""
        if self.exact_solver != "auto":
            return self.exact_solver
        small = self.n_params_ <= HESSIAN_AUTO_MAX_PARAMS
        return "hessian" if self._heldout_prior or small else "lbfgs"

    # ------------------------------------------------------------------- fit
    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        y_net = self._net_target(y)
        loss = self._loss()
        self._check_differentiable(X, y_net, loss)
        n = len(X)
        self.n_params_ = sum(p.numel() for p in _trainable(self.model_))
        self.variance_factor_ = self._variance_factor()
        self.exact_solver_ = self._resolve_solver()
        hessian = self.mode == "exact" and self.exact_solver_ == "hessian"
        self.posterior_ = None
        if self._heldout_prior or hessian:
            H = objective_hessian(self.model_, X, y_net, loss, batch_size=self.batch_size)
            theta = torch.cat([p.detach().reshape(-1) for p in _trainable(self.model_)])
            theta = theta.to(torch.float64)
            if self._heldout_prior:
                post = hessian_posterior(theta, H, 1.0)
                best = self._choose_heldout_prior(post, X_cal, y_cal, self._grid_nll(post))
                delta = torch.tensor(best, dtype=torch.float64)
            else:
                delta = self._weight_decay_prior(n)
                post = hessian_posterior(theta, H, delta)
            self.posterior_ = post if hessian else None  # the δ choice alone needs no more
        else:
            delta = self._weight_decay_prior(n)
        uniform = bool((delta == delta.reshape(-1)[0]).all())
        self.prior_precision_ = float(delta.reshape(-1)[0]) if uniform else delta.numpy()
        self.finetuned_ = None
        # the L-BFGS and optimizer solvers fine-tune on the training rows at predict time
        self._train_data = (X, y_net) if self.mode == "exact" and not hessian else None
        if self.mode == "amortized":
            pair = finetune_pair(
                self.model_,
                torch.as_tensor(X),
                torch.as_tensor(y_net),
                loss,
                lam=self.lam,
                optimizer=self._optimizer_factory(),
                n_epochs=self.finetune_epochs,
                batch_size=self._train_batch_size(n),
                n_average=self.n_average,
                prior_precision=self._explicit_prior(),
                generator=self._generator(),
                verbose=self.verbose,
            )
            # the difference of two nearby nets, taken in float64 (see amortized_variance)
            self.finetuned_ = tuple(m.double() for m in pair)

    def _variance_factor(self) -> float:
        return 1.0

    def _grid_nll(self, post):
        """``batch_nll(xb, yb, grid)``: held-out NLL of ``post`` at each ``delta`` of ``grid``.

        One Jacobian per batch, rotated once into the Hessian's eigenbasis
        (``functional_variance_grid``); each grid value then costs ``O(B C^2 P)``.
        """
        weights = select_weights(copy.deepcopy(self.model_).double().eval(), "all")

        def batch_nll(xb: Tensor, yb: Tensor, grid: list[float]) -> np.ndarray:
            nll = np.zeros(len(grid))
            xb = xb.double()
            with torch.no_grad():
                n_out = weights.model(xb[:1]).shape[1]
            for rows, J, f in iter_jacobians(weights, xb, n_out):
                variance = post.functional_variance_grid(J.detach())
                for i, delta in enumerate(grid):
                    dist = self._gaussian(f.detach(), variance(delta))
                    nll[i] += self._heldout_nll(dist, yb[rows])
            return nll

        return batch_nll

    # --------------------------------------------------------------- predict
    def _gaussian(self, mean: Tensor, cov: Tensor) -> OutputDistribution:
        """The predictive over outputs, from RegVar's covariance ``cov`` (Q, C, C)."""
        cov = cov.to(torch.float64) * (self.variance_scale * self.variance_factor_)
        centered = None
        if self._centered_link() and cov.ndim == 3:
            centered = center_outputs(center_outputs(cov, 1), 2).float()  # before rounding
        if not bool(torch.isfinite(cov).all()):
            raise FloatingPointError(
                "RegVar's predicted variance contains NaN or inf on these inputs (the two "
                "fine-tuned nets' outputs overflow or differ by inf): the inputs are far out of "
                "the training range, or the fine-tune was unstable. Scale the inputs, lower "
                "finetune_lr or lam; no variance is returned"
            )
        return OutputDistribution.gaussian(mean.float(), cov.float(), centered)

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            mean = self.model_(x)
        if self.mode == "amortized":
            cov = amortized_variance(*self.finetuned_, x, self.lam)
        elif self.posterior_ is not None:
            cov = hessian_covariance(self.model_, self.posterior_, x, mean.shape[1])
        else:
            cov = self._exact(x)
        return self._gaussian(mean, cov)

    def _exact(self, x: Tensor) -> Tensor:
        X, y = self._train_data
        common = dict(lam=self.lam, batch_size=self.batch_size, verbose=self.verbose)
        if self.exact_solver_ == "lbfgs":
            cov = exact_covariance(
                self.model_,
                X,
                y,
                x,
                self._loss(),
                prior_precision=self._prior(),
                max_iter=self.exact_max_iter,
                **common,
            )
        else:
            cov = exact_covariance(
                self.model_,
                X,
                y,
                x,
                self._loss(),
                prior_precision=self._explicit_prior(),
                solver="optimizer",
                optimizer=self._optimizer_factory(stacked=True),
                n_epochs=self.finetune_epochs,
                train_batch_size=self._train_batch_size(len(X)),
                n_average=self.n_average,
                generator=self._generator(),
                **common,
            )
        return _nearest_psd(cov)
