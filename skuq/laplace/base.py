"""The shared fitting and prediction of the Laplace family (Laplace, subnetwork, L2M).

The engine (:mod:`skuq.curvature`, :mod:`skuq.posterior`,
:mod:`skuq.predictive`) does the work; :class:`_BaseLaplace` maps
scikit-learn options onto it, caches the curvature so that posterior-only
parameters (prior precision, temperature, link) never recompute it, and
chooses the prior precision. The likelihood mixins hold what differs between
classification and regression. The estimators themselves are in
:mod:`skuq.laplace.estimator` and :mod:`skuq.laplace.l2m`.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor

from .._cache import CACHE, clear_cache, fingerprint
from .._utils import (
    check_option,
    check_positive,
    check_positive_int,
    iter_batches,
    make_generator,
)
from ..base import BaseUQEstimator, PriorPrecisionMixin
from ..curvature import (
    CURVATURES,
    STRUCTURES,
    compute_curvature,
    iter_jacobians,
    select_weights,
)
from ..curvature.weights import SUBSETS
from ..outputs import LINKS, OutputDistribution, probit_probabilities
from ..posterior import (
    PRIOR_STRUCTURES,
    CholeskyFullPosterior,
    augment_centered,
    posterior_from_curvature,
    subset_posterior,
)
from ..predictive import gaussian_predictive, glm_predictive, needs_jacobians, nn_predictive
from .selection import SubnetworkSelection, check_subnetwork_size, top_k
from .subnetwork import GivenIndices, LargestVariance, resolve_selection

__all__ = [
    "clear_curvature_cache",
]

PRED_TYPES = ("glm", "nn")
PRIOR_METHODS = ("marglik", "heldout")
#: ``sigma_noise`` options of the regressors: fitted by the evidence, the trained net's
#: RMS residual on held-out rows ("residual"), or "auto": the evidence when the
#: posterior has at most as many weights as there are training targets, else the RMS
#: training residual
SIGMA_METHODS = ("auto", "marglik", "residual")


# ------------------------------------------------------------------ curvature cache
def clear_curvature_cache() -> None:
    """Forget the curvatures kept in memory by Laplace estimators.

    They live in skuq's one shared cache (with ScaLLA's surrogate kernels), which
    this clears as a whole (:func:`skuq._cache.clear_cache`).

    Examples
    --------
    >>> from skuq.laplace import clear_curvature_cache
    >>> clear_curvature_cache()
    """
    clear_cache()


def _cached_curvature(weights, X, y, batch_size, device, **options):
    key = fingerprint(weights, X, y, (options, str(device)))
    curv = CACHE.get(key)
    if curv is not None:
        return curv

    def batches():
        return iter_batches(X, y, batch_size=batch_size, device=device)

    curv = compute_curvature(weights, batches, **options)
    CACHE.put(key, curv)
    return curv


# --------------------------------------------------------------------- the base
class _BaseLaplace(PriorPrecisionMixin, BaseUQEstimator):
    """Shared fitting and prediction of the Laplace-family estimators."""

    _prior_methods = PRIOR_METHODS

    def _validate_options(self) -> None:
        self._validate_curvature_options()
        self._validate_posterior_options()

    def _validate_posterior_options(self) -> None:
        """Options of the prior, the predictive and the likelihood."""
        check_option("pred_type", self.pred_type, PRED_TYPES)
        check_option("prior_structure", self.prior_structure, PRIOR_STRUCTURES)
        check_positive("temperature", self.temperature)
        check_positive_int("n_samples", self.n_samples)
        self._validate_prior_precision()
        self._validate_likelihood_options()

    def _validate_curvature_options(self) -> None:
        """Options of the weight subset and of how its curvature is computed."""
        check_option("subset_of_weights", self.subset_of_weights, SUBSETS)
        check_option("hessian_structure", self.hessian_structure, STRUCTURES)
        check_option("curvature", self.curvature, CURVATURES)
        check_positive_int("rank", self.rank)
        if self.subset_of_weights == "subnetwork":
            if self.hessian_structure != "full":
                raise ValueError(
                    "subset_of_weights='subnetwork' needs hessian_structure='full' (a subnetwork "
                    f"is an arbitrary index set); got hessian_structure={self.hessian_structure!r}"
                )
            self._subnetwork_rule()
        else:
            for name in ("subnetwork_indices", "subnetwork_size"):
                if getattr(self, name, None) is not None:
                    raise ValueError(
                        f"{name} is only used with subset_of_weights='subnetwork'; got "
                        f"subset_of_weights={self.subset_of_weights!r}"
                    )
        if self.hessian_structure == "lowrank" and self.prior_structure != "scalar":
            raise ValueError("hessian_structure='lowrank' supports prior_structure='scalar' only")

    def _validate_likelihood_options(self) -> None:
        pass

    # ------------------------------------------------------------ subnetwork
    def _subnetwork_rule(self) -> SubnetworkSelection:
        """The selection rule of ``subset_of_weights="subnetwork"`` (options checked)."""
        size, sel = self.subnetwork_size, self.subnetwork_selection
        if size is not None and not (isinstance(size, str) and size == "auto"):
            if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
                raise ValueError(f"subnetwork_size must be an int >= 1 or 'auto', got {size!r}")
        if self.subnetwork_indices is not None:
            if not (isinstance(sel, str) and sel == "largest_variance"):
                raise ValueError(
                    "give the subnetwork either as subnetwork_indices or through "
                    "subnetwork_selection, not both"
                )
            return GivenIndices(self.subnetwork_indices)
        options = {}
        if isinstance(sel, str) and sel == "largest_variance":
            pp = self.prior_precision
            options = dict(
                prior_precision=1.0 if isinstance(pp, str) else pp,
                curvature=self.curvature,
                temperature=self.temperature,
            )
        rule = resolve_selection(sel, **options)
        if rule.ranks and size is None:
            raise ValueError(
                "subset_of_weights='subnetwork' needs subnetwork_indices (positions in the "
                "flat vector of the net's trainable parameters) or subnetwork_size=k (the k "
                f"weights chosen by subnetwork_selection={sel!r}; 'auto' for min(1000, P))"
            )
        return rule

    def _select_subnetwork(self, X, y) -> torch.Tensor:
        """Positions of the subnetwork in the trained net (``subnetwork_indices_``)."""
        rule = self._subnetwork_rule()
        if isinstance(rule, LargestVariance):  # its diagonal curvature through the cache
            n_total = sum(p.numel() for p in self.model_.parameters() if p.requires_grad)
            k = check_subnetwork_size(self.subnetwork_size, n_total)
            curv = _cached_curvature(
                select_weights(self.model_, "all"),
                X,
                y,
                self.batch_size,
                self.device_,
                likelihood=self._likelihood,
                structure="diag",
                curvature=rule.curvature,
                rank=self.rank,
                generator=None,
            )
            return top_k(rule.variances_from_curvature(self.model_, curv), k)

        def batches():
            return iter_batches(X, y, batch_size=self.batch_size, device=self.device_)

        gen = make_generator(self._seed, torch.device("cpu"))
        return rule.select(
            self.model_, batches, self.subnetwork_size, likelihood=self._likelihood, generator=gen
        )

    def _weight_subset(self, X, y):
        """The weights the posterior lives on (a subnetwork is chosen here)."""
        x0 = torch.as_tensor(X[: min(len(X), 2)]).to(self.device_)
        idx = None
        if self.subset_of_weights == "subnetwork":
            idx = self._select_subnetwork(X, y)
            self.subnetwork_indices_ = idx.cpu().numpy()
        return select_weights(
            self.model_, self.subset_of_weights, subnetwork_indices=idx, example_input=x0
        )

    def _initial_sigma(self) -> float:
        return 1.0

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        weights = self._weight_subset(X, y)
        curv = self._curvature(weights, X, y)
        pp = self.prior_precision
        post = subset_posterior(
            curv, weights, pp, sigma_noise=self._initial_sigma(), temperature=self.temperature
        )
        self.weights_ = weights
        self.posterior_ = post
        self._fit_hyperparameters(X_cal, y_cal)
        if self.prior_precision == "heldout" and not self._net_is_prefit():
            # the split served to choose delta; the final net is trained on every row
            self._refit_all_rows(X, y, X_cal, y_cal)
        self.prior_precision_ = post.prior_precision.detach().cpu().numpy()
        if self.prior_precision_.ndim == 0:
            self.prior_precision_ = float(self.prior_precision_)
        self.n_params_ = weights.n_params

    def _curvature(self, weights, X, y):
        """The curvature of the summed training loss (a hook: L2M reads it from the optimizer)."""
        gen = self._generator() if self.hessian_structure == "lowrank" else None
        return _cached_curvature(
            weights,
            X,
            y,
            self.batch_size,
            self.device_,
            likelihood=self._likelihood,
            structure=self.hessian_structure,
            curvature=self.curvature,
            rank=self.rank,
            generator=gen,
        )

    def _refit_all_rows(self, X, y, X_cal, y_cal) -> None:
        """Retrain the net on training + held-out rows and rebuild the posterior there."""
        delta = self.posterior_.prior_precision
        sigma = self.posterior_.sigma_noise
        X_all, y_all = np.concatenate([X, X_cal]), np.concatenate([y, y_cal])
        self._resolve_net(X_all, y_all)
        weights = self._weight_subset(X_all, y_all)
        curv = self._curvature(weights, X_all, y_all)
        self.weights_ = weights
        self.posterior_ = posterior_from_curvature(
            curv,
            weights.vector(),
            prior_precision=delta,
            group_sizes=weights.group_sizes(),
            sigma_noise=sigma,
            temperature=self.temperature,
        )

    def _fit_hyperparameters(self, X_cal, y_cal) -> None:
        pp, post = self.prior_precision, self.posterior_
        if pp == "marglik":
            post.optimize_prior_precision(self.prior_structure, fit_sigma_noise=self._fit_sigma())
        elif pp == "heldout":
            post.optimize_prior_precision(fit_prior=False, fit_sigma_noise=self._fit_sigma())
            self._heldout_prior(X_cal, y_cal)
        elif self._fit_sigma():
            post.optimize_prior_precision(fit_prior=False, fit_sigma_noise=True)

    def _fit_sigma(self) -> bool:
        return False

    def _heldout_prior(self, X_cal, y_cal) -> None:
        """The grid prior precision the held-out rule picks (:func:`skuq.base.heldout_choice`)."""
        post = self.posterior_
        if isinstance(post, CholeskyFullPosterior):
            _ = post.eigvecs  # one eigendecomposition serves every grid value; no Cholesky each
        self._choose_heldout_prior(post, X_cal, y_cal, self._batch_nll)

    def _batch_nll(self, xb: Tensor, yb: Tensor, grid: list[float]) -> np.ndarray:
        """The NLL summed over one held-out batch, for each prior precision of ``grid``.

        NLL is a sum over rows, so each chunk of Jacobians is formed once and
        scored under every grid value (a full posterior rotates it into the
        curvature's eigenbasis once, so each value costs ``O(B C^2 k)``).
        """
        post, weights = self.posterior_, self.weights_
        nll = np.zeros(len(grid))
        if self.pred_type == "glm" and needs_jacobians(weights, post, xb):
            with torch.no_grad():
                n_out = self.model_(xb[:1]).shape[1]
            center = self._centered_link()
            for rows, J, f in iter_jacobians(weights, xb, n_out):
                J = J.detach().to(post.mean.dtype)
                variance = post.functional_variance_grid(augment_centered(J) if center else J)
                for i, delta in enumerate(grid):
                    dist = gaussian_predictive(f.detach(), variance(delta), center)
                    nll[i] += self._heldout_nll(dist, yb[rows])
            return nll
        for i, delta in enumerate(grid):
            post.set_hyperparameters(prior_precision=delta)
            nll[i] += self._heldout_nll(self._distribution(xb), yb)
        return nll

    # ---------------------------------------------------------------- predict
    def _distribution(self, x: Tensor) -> OutputDistribution:
        if self.pred_type == "glm":
            return glm_predictive(self.weights_, self.posterior_, x, center=self._centered_link())
        gen = self._generator()  # the same weight draws for every batch
        return nn_predictive(
            self.weights_, self.posterior_, x, n_samples=self.n_samples, generator=gen
        )

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        dist = self._distribution(x)
        if dist.is_sampled:
            return OutputDistribution.from_samples(dist.samples.float())
        return dist.to(torch.float32)


class ClassificationLikelihood:
    """The softmax cross-entropy parts of a Laplace-family estimator."""

    _likelihood = "classification"

    def _validate_likelihood_options(self) -> None:
        check_option("link_approx", self.link_approx, LINKS)

    def _heldout_nll(self, dist: OutputDistribution, y: Tensor) -> float:
        if dist.is_sampled or self.link_approx != "probit":
            p = dist.probabilities(self.link_approx, self.n_samples, self._generator())
        else:
            p = probit_probabilities(dist.mean, dist.variance)
        p = p.double().clamp_min(1e-12)
        return float(-torch.log(p[torch.arange(len(y)), y.long()]).sum())


class RegressionLikelihood:
    """The Gaussian-likelihood parts of a Laplace-family estimator (noise ``sigma_noise``)."""

    _likelihood = "regression"

    @property
    def _held_out_noise(self) -> bool:
        return isinstance(self.sigma_noise, str) and self.sigma_noise == "residual"

    @property
    def _uses_calibration_split(self) -> bool:
        # "residual" reads the noise on held-out rows; the held-out prior needs them too
        return self._held_out_noise or super()._uses_calibration_split

    def _validate_likelihood_options(self) -> None:
        if isinstance(self.sigma_noise, str):
            check_option("sigma_noise", self.sigma_noise, SIGMA_METHODS)
        else:
            check_positive("sigma_noise", self.sigma_noise)

    def _fit_sigma(self) -> bool:
        if self.sigma_noise == "auto":
            # the evidence's noise is trustworthy while the posterior's weights are fewer
            # than the training targets; over all weights of a net its log-determinant
            # term rewards a larger noise (4-41x the residual in benchmarks/compare.py)
            post = self.posterior_
            return post.n_params <= post.n_data * post.n_outputs
        return self.sigma_noise == "marglik"

    def _initial_sigma(self) -> float:
        # "residual" keeps the RMS held-out residual; "marglik" starts from the RMS residual
        return self._rms if isinstance(self.sigma_noise, str) else float(self.sigma_noise)

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        # only the "residual" noise is read on the held-out rows: check them only then
        self._fit_heldout_noise(X, y, X_cal, y_cal, check_rows=self._held_out_noise)
        self._rms = float(np.sqrt(np.mean(np.asarray(self.sigma_noise_) ** 2)))
        super()._fit_uq(X, y, X_cal, y_cal)
        self.sigma_noise_ = self.posterior_.sigma_noise

    def _heldout_nll(self, dist: OutputDistribution, y: Tensor) -> float:
        var = dist.variance.double() + self.posterior_.sigma_noise**2
        r = y.reshape(dist.output_mean.shape).double() - dist.output_mean.double()
        return float(0.5 * (torch.log(2 * np.pi * var) + r**2 / var).sum())
