"""CVPClassifier: calibrated variance propagation behind the scikit-learn face."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

from .._utils import check_option, check_positive, iter_batches
from ..base import BaseUQEstimator, UQClassifierMixin, heldout_choice
from ..outputs import OutputDistribution
from .calibration import MULTIPLIER_GRID, fit_layer_scales, multiplier_nll
from .posterior import DiagonalWeightPosterior, variances_from_mapping
from .propagator import MomentPropagator
from .sources import POSTERIOR_SOURCES

__all__ = ["CVPClassifier", "CALIBRATIONS", "SCALE_RULES", "MEANS", "MIN_CALIBRATION_ROWS"]

#: prefix of the parameters passed on to the posterior source
_PREFIX = "posterior__"

CALIBRATIONS = ("per_layer", "global", None)
SCALE_RULES = ("heldout", "nll")
MEANS = ("net", "propagated")
#: fewest held-out rows the variance-scale fit accepts
MIN_CALIBRATION_ROWS = 2


class CVPClassifier(UQClassifierMixin, BaseUQEstimator):
    """Bayesian predictions in one forward pass: calibrated variance propagation.

    A diagonal Gaussian posterior over the weights (``posterior``) is pushed
    through the network in a single pass that carries a mean and a variance
    per activation (:class:`skuq.cvp.MomentPropagator`: torch.fx tracing and a
    registry of moment-matching rules). Per-layer variance scales are then
    fitted on held-out data by the NLL of the probit predictive, network
    frozen, and multiplied by one shared factor chosen by the held-out rule
    (``scale_rule``). Probabilities: ``softmax(mu / sqrt(1 + pi v / 8))``,
    with ``v`` the propagated variance and ``mu`` the net's own logits
    (``mean``).

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        See :class:`skuq.base.BaseUQEstimator`.
    posterior : str, mapping or DiagonalWeightPosterior, default="laplace_diag"
        Where the weight variances come from. ``"laplace_diag"``: the diagonal
        GGN Laplace over all weights of the trained net (marginal-likelihood
        prior), which works for any net, trained in ``fit`` or prefit.
        ``"ivon"``: an unfitted skorch net is trained with the IVON optimizer
        (extra ``pip install skuq[ivon]``) and ``sigma^2 = 1 / (ess (h +
        weight_decay))`` is read from it; a prefit net must have been trained
        with IVON; IVON replaces the net's optimizer and learning rate, so its
        training needs its own tuning (``posterior__lr``...). ``"l2m"``: the
        L2M posterior read from an Adam-family optimizer's state. Other names
        registered with :func:`skuq.cvp.sources.register_posterior_source`
        work the same way. A mapping
        ``{parameter name: variance}`` (float or array) or a
        :class:`~skuq.cvp.posterior.DiagonalWeightPosterior` is used as given
        (parameters not named have zero variance).
    posterior_options : dict or None, default=None
        Deprecated (a ``FutureWarning``): give each option as a
        ``posterior__<option>`` parameter instead, which grid searches can set.
        Options given both ways take the ``posterior__<option>`` value.
    calibration : {"per_layer", "global"} or None, default="per_layer"
        Fit one variance scale per parameterized layer, one shared scale, or
        none (plain variance propagation).
    scale_rule : {"heldout", "nll"}, default="heldout"
        What the calibration does after fitting the scales. ``"heldout"``:
        multiply them all by the widest factor of
        :data:`~skuq.cvp.calibration.MULTIPLIER_GRID` (100 down to 0.01) whose
        held-out NLL is within 5 % of the best factor's
        (:func:`skuq.base.heldout_choice`, the rule of LaplaceClassifier's
        held-out prior): nine more propagations of the calibration rows, no
        retraining. The NLL-fitted scales often sit above the held-out NLL's
        minimum (the fit's prior pulls them toward 1), which costs
        in-distribution NLL and accuracy; the factor mostly narrows them
        (benchmarks/shift.py). ``"nll"``: the NLL-fitted scales as they are.
        Ignored without calibration.
    mean : {"net", "propagated"}, default="net"
        The logits' mean in the predictive. ``"net"``: the trained net's own
        output (as the linearized Laplace predictive); one more plain forward
        pass per batch. (The probit link can still move the argmax where the
        classes' variances differ.) ``"propagated"``: the
        propagated mean, the expectation of the logits under the weight
        posterior by moment matching, which a ReLU net shifts away from the
        net's logits (``E[relu(h)] > relu(E[h])``) as the variance grows; on the
        shift benchmark that shift cost accuracy and OOD AUROC. A net whose
        output is not one tensor of the logits' shape uses the propagated mean.
        The per-layer scales are fitted with the propagated mean either way; the
        held-out factor is chosen with the mean used for predictions.
    calibration_fraction : float, default=0.2
        Share of ``fit``'s rows held out for the scales (stratified), so that
        the scales are never fitted on the rows the net or the posterior was
        fitted on. A prefit net whose posterior is read without data (a
        mapping, a :class:`~skuq.cvp.posterior.DiagonalWeightPosterior`,
        ``"ivon"``) calibrates on all of ``fit``'s rows, as
        :class:`skuq.TemperatureScalingClassifier` does. Or pass ``X_cal,
        y_cal`` to ``fit``: all of ``X`` then goes to the net (unless prefit)
        and the posterior.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.
    **kwargs
        ``posterior__<option>=value``: keyword options for the posterior source,
        set and searched like any other parameter (as skorch's ``module__``).
        ``"laplace_diag"``: ``prior_precision`` (a float, or ``"marglik"``) and
        ``curvature``. ``"ivon"`` when CVP converts the net: ``lr``,
        ``hess_init``, ``beta2``, ``weight_decay``, ``mc_samples``, ``ess`` (see
        :data:`skuq.cvp.ivon.IVON_DEFAULTS`; ``ess`` defaults to the number of
        training rows). ``"l2m"``: see :func:`skuq.cvp.sources.l2m_posterior`.

    Attributes
    ----------
    posterior_ : DiagonalWeightPosterior
    propagator_ : MomentPropagator
    layer_scales_ : dict of str to float
        Variance scale per layer, the shared factor included (empty without
        calibration).
    variance_multiplier_ : float
        The shared factor ``scale_rule="heldout"`` chose (1.0 otherwise).
    heldout_nll_ : dict of float to float
        Mean held-out NLL per factor of the grid (``scale_rule="heldout"`` only,
        else empty).

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import CVPClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = CVPClassifier(net, random_state=0).fit(d.X_train, d.y_train)
    >>> est.score(d.X_test, d.y_test) > 0.9
    True
    >>> sorted(est.layer_scales_)
    ['1', '3', '5']
    """

    _extra_fit_params = ()

    def __init__(
        self,
        estimator,
        *,
        posterior="laplace_diag",
        posterior_options=None,
        calibration="per_layer",
        scale_rule="heldout",
        mean="net",
        calibration_fraction=0.2,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
        **kwargs,
    ):
        self.estimator = estimator
        self.posterior = posterior
        self.posterior_options = posterior_options
        self.calibration = calibration
        self.scale_rule = scale_rule
        self.mean = mean
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory
        # skorch-style prefixed parameters: options of the posterior source, settable
        # one by one (set_params, grid searches); checked in fit, as every parameter
        vars(self).update(kwargs)
        self._kwarg_names = tuple(kwargs)

    # ------------------------------------------------------ prefixed parameters
    def _get_param_names(self):
        # the signature's parameters, the keyword ones given to __init__ and the
        # posterior__<option> ones set since
        return sorted(
            {
                *super()._get_param_names(),
                *getattr(self, "_kwarg_names", ()),
                *(k for k in vars(self) if k.startswith(_PREFIX)),
            }
        )

    def set_params(self, **params):
        """Set parameters, also ``posterior__<option>`` ones the estimator does not have yet.

        Returns
        -------
        self
        """
        for key in [k for k in params if k.startswith(_PREFIX)]:
            setattr(self, key, params.pop(key))
        return super().set_params(**params)

    def _posterior_options(self) -> dict:
        """Keyword options for the posterior source: the ``posterior__<option>``
        parameters over the deprecated ``posterior_options`` dict."""
        options = dict(self.posterior_options or {})
        options.update(
            {k[len(_PREFIX) :]: v for k, v in vars(self).items() if k.startswith(_PREFIX)}
        )
        return options

    @property
    def _uses_calibration_split(self) -> bool:
        return self.calibration is not None

    def _posterior_uses_data(self) -> bool:
        return isinstance(self.posterior, str) and POSTERIOR_SOURCES[self.posterior].uses_data

    def _calibration_split(self, X, y):
        """Held-out rows for the scales; with a prefit net whose posterior is fitted on
        data (``"laplace_diag"``, ``"l2m"``) too, as for a net trained here, so that
        posterior and scales never share rows."""
        if not (self._net_is_prefit() and self._posterior_uses_data()):
            return super()._calibration_split(X, y)
        fraction = self.calibration_fraction
        if fraction >= 1:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction!r}")
        n_cal = int(round(fraction * len(X)))
        n_min = max(len(self.classes_), MIN_CALIBRATION_ROWS)
        if n_cal < n_min or len(X) - n_cal < n_min:
            raise ValueError(
                f"calibration_fraction={fraction} of {len(X)} rows leaves too few rows for "
                "the posterior or the calibration; give more data, change "
                "calibration_fraction, or pass X_cal and y_cal to fit"
            )
        stratify = y if np.bincount(y).min() >= 2 else None
        X_post, X_cal, y_post, y_cal = train_test_split(
            X, y, test_size=n_cal, random_state=self._seed, stratify=stratify
        )
        return X_post, y_post, X_cal, y_cal

    # --------------------------------------------------------------- options
    def _validate_options(self) -> None:
        post = self.posterior
        if isinstance(post, str):
            check_option("posterior", post, tuple(POSTERIOR_SOURCES))
        elif not isinstance(post, (Mapping, DiagonalWeightPosterior)):
            raise ValueError(
                f"posterior must be one of {tuple(POSTERIOR_SOURCES)}, a mapping "
                "{parameter name: variance} or a DiagonalWeightPosterior; got "
                f"{type(post).__name__}"
            )
        if self.calibration is not None:
            check_option("calibration", self.calibration, ("per_layer", "global"))
            check_positive("calibration_fraction", self.calibration_fraction)
        check_option("scale_rule", self.scale_rule, SCALE_RULES)
        check_option("mean", self.mean, MEANS)
        unknown = sorted(k for k in getattr(self, "_kwarg_names", ()) if not k.startswith(_PREFIX))
        if unknown:
            raise TypeError(
                f"CVPClassifier got unexpected keyword arguments {unknown}; options of the "
                f"posterior source are given as {_PREFIX}<option>"
            )
        if self.posterior_options is not None:
            if not isinstance(self.posterior_options, Mapping):
                raise ValueError("posterior_options must be a dict or None")
            warnings.warn(
                "posterior_options is deprecated and will be removed in a future release; "
                "give each option as a parameter of its own: "
                + ", ".join(f"{_PREFIX}{k}=..." for k in self.posterior_options),
                FutureWarning,
                stacklevel=3,
            )

    def _source(self):
        return POSTERIOR_SOURCES[self.posterior] if isinstance(self.posterior, str) else None

    # ------------------------------------------------------------------- fit
    def _train_skorch(self, net, X, y):
        source = self._source()
        if source is not None and source.prepare_net is not None:
            net = source.prepare_net(net, len(X), **self._posterior_options())
        return super()._train_skorch(net, X, y)

    def _resolve_posterior(self, X, y) -> DiagonalWeightPosterior:
        post = self.posterior
        if isinstance(post, DiagonalWeightPosterior):
            return DiagonalWeightPosterior(variances_from_mapping(self.model_, post.variances))
        if isinstance(post, Mapping):
            return DiagonalWeightPosterior(variances_from_mapping(self.model_, post))
        result = self._source().fit(
            self.model_,
            self.net_,
            X,
            y,
            device=self.device_,
            batch_size=self.batch_size,
            **self._posterior_options(),
        )
        if isinstance(result, Mapping):
            result = DiagonalWeightPosterior(dict(result))
        return result

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        self.posterior_ = self._resolve_posterior(X, y)
        self.propagator_ = MomentPropagator(self.model_, self.posterior_.variances)
        self.layer_scales_ = {}
        self.variance_multiplier_, self.heldout_nll_ = 1.0, {}
        if self.calibration is None:
            with torch.no_grad():  # fail in fit, not in predict, on an unsupported layer
                self.propagator_(torch.as_tensor(X[:2]).to(self.device_))
            return
        if len(X_cal) < MIN_CALIBRATION_ROWS:
            raise ValueError(
                f"the calibration split has {len(X_cal)} rows; fitting the variance scales "
                f"needs at least {MIN_CALIBRATION_ROWS}. Give more data, raise "
                "calibration_fraction, pass larger X_cal/y_cal, or use calibration=None"
            )
        batches = list(iter_batches(X_cal, y_cal, batch_size=self.batch_size, device=self.device_))
        scales = fit_layer_scales(self.propagator_, batches, self.calibration)
        if self.scale_rule == "heldout" and scales:
            means = [self._net_mean(xb, None) for xb, _ in batches]
            means = None if any(m is None for m in means) else means
            nll = multiplier_nll(self.propagator_, batches, scales, MULTIPLIER_GRID, means)
            self.heldout_nll_ = dict(zip(MULTIPLIER_GRID, nll, strict=True))
            self.variance_multiplier_ = MULTIPLIER_GRID[heldout_choice(nll)]
            scales = {k: v * self.variance_multiplier_ for k, v in scales.items()}
        self.layer_scales_ = scales

    # --------------------------------------------------------------- predict
    def _net_mean(self, x: Tensor, shape) -> Tensor | None:
        """The net's own logits for ``mean="net"`` (None: use the propagated mean)."""
        if self.mean != "net":
            return None
        with torch.no_grad():
            f = self.model_(x)
        if not isinstance(f, Tensor) or f.ndim != 2 or (shape is not None and f.shape != shape):
            return None
        return f

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            out = self.propagator_(x, layer_scales=self.layer_scales_)
        mu = self._net_mean(x, out.mean.shape)
        mu = out.mean if mu is None else mu
        return OutputDistribution.gaussian(mu.float(), out.variance.float())
