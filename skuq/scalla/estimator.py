"""ScaLLA's scikit-learn face: :class:`ScaLLAClassifier`.

Trains the surrogate kernel (:func:`~skuq.scalla.fit_surrogate`, kept in a
cache keyed on the net, the data and the options), then the feature-space
Laplace posterior; see :mod:`skuq.scalla` for the method.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from .._cache import CACHE, clear_cache, fingerprint
from .._utils import (
    check_option,
    check_positive,
    check_positive_int,
    iter_batches,
    make_generator,
    seeded_global_rng,
)
from ..base import BaseUQEstimator, PriorPrecisionMixin, UQClassifierMixin
from ..curvature import select_weights
from ..outputs import LINKS, OutputDistribution
from ..posterior import augment_centered
from ..predictive import gaussian_predictive
from .features import feature_posterior, scalla_predictive
from .probes import PROBES
from .surrogate import SURROGATES, SurrogateFit, default_surrogate, fit_surrogate

__all__ = ["ScaLLAClassifier", "clear_surrogate_cache"]

#: the surrogate's training options, parameters ``surrogate__<option>``
_SURROGATE_OPTIONS = ("width", "epochs", "lr", "batch_size")
_SURROGATE_PARAMS = tuple(f"surrogate__{option}" for option in _SURROGATE_OPTIONS)


def clear_surrogate_cache() -> None:
    """Forget the surrogate kernels kept in memory by :class:`ScaLLAClassifier`.

    A fitted surrogate is kept, keyed on the net (architecture and weights),
    the rows of ``X`` and ``context`` and every option that shapes the
    surrogate (and the seed), so that refitting with another
    ``prior_precision`` or ``link_approx`` -- a grid search -- trains it once.
    Surrogates share one cache with the Laplace curvatures
    (:func:`skuq._cache.clear_cache`), which this clears as a whole.

    Examples
    --------
    >>> from skuq.scalla import clear_surrogate_cache
    >>> clear_surrogate_cache()
    """
    clear_cache()


class ScaLLAClassifier(PriorPrecisionMixin, UQClassifierMixin, BaseUQEstimator):
    """Linearized Laplace at scale through a learned surrogate of the NTK (ScaLLA).

    A small network ``g`` (the surrogate) is trained so that ``g(x) g(x')^T``
    (``C x C`` per pair of rows, ``g(x)`` of shape ``C x m``) matches the
    neural tangent kernel ``J(x) J(x')^T`` of the trained net, from
    Jacobian-vector products with random probes only (the Jacobian is never
    formed). Laplace then runs in the ``m``-dimensional feature space:
    ``A = tau I + sum_n g_n^T Lambda_n g_n``, ``Var f(x) = g(x) A^-1
    g(x)^T``, ``tau`` by marginal likelihood or given. Prediction costs one
    forward pass of the net and one of the surrogate -- no Jacobian, no JVP.
    See :mod:`skuq.scalla` for the estimator of the loss and the evidence.
    The trained surrogate is kept (see :func:`clear_surrogate_cache`), so a
    grid search over ``prior_precision`` or ``link_approx`` with a fixed
    ``random_state`` trains it once per fold.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        The network (see :class:`skuq.base.BaseUQEstimator`).
    n_features : int, default=128
        ``m``, the surrogate's features per output. With ``m`` at least the
        rank of the training Jacobian (and enough training) the kernel and
        the predictive match the full linearized Laplace.
    probe : {"rademacher", "gaussian"}, default="rademacher"
        Distribution of the probe vectors of the JVPs.
    n_probes : int, default=16
        Probes per training step (>= 2); more lowers the gradient noise.
    surrogate : {"auto", "mlp", "cnn"}, torch.nn.Module or callable, default="auto"
        The surrogate network. ``"auto"`` builds one from the net's input
        shape (a CNN for ``(channels, H, W)`` rows, an MLP otherwise, see
        :func:`default_surrogate`); a module (copied, then trained) or a
        callable ``(input_shape, n_outputs * n_features) -> nn.Module`` must
        map a batch of rows to ``(batch, n_outputs * n_features)``.
    surrogate__width : int, default=256
        Hidden width of the default surrogates.
    surrogate__epochs : int, default=50
        Passes over the training (and context) rows.
    surrogate__lr : float, default=1e-3
        Adam's learning rate (cosine-decayed to 0).
    surrogate__batch_size : int, default=128
        Rows per step; the loss covers all pairs of them.

        The ``surrogate__`` options are named as skorch names a module's
        options (``module__<name>``), so that a grid search or a pipeline
        reaches them as ``surrogate__epochs`` (``scalla__surrogate__epochs``).
    surrogate_width, surrogate_epochs, surrogate_lr, surrogate_batch_size : deprecated
        The former names of the four options above: still used when given,
        with a FutureWarning in ``fit``; they will be removed in a future
        release. Give either name of an option, not both.
    context_weight : float, default=1.0
        Weight of the context rows (``fit(..., context=...)``) in the kernel fit.
    prior_precision : float, "marglik" or "heldout", default="heldout"
        ``tau``. ``"heldout"`` scores a log grid (1e-4..1e6) by NLL on a
        held-out split (see ``calibration_fraction``; the features of the
        split are computed once) and takes the widest posterior within 5 %
        of the best (:func:`skuq.base.heldout_choice`); ``"marglik"``
        maximizes the Laplace evidence in feature space (no pass over data,
        but 1.4-3.5x the bare net's in-distribution NLL on the tasks of
        ``benchmarks/shift.py``); a float is used as is and can be
        grid-searched without retraining the net.
    calibration_fraction : float, default=0.2
        Share of the rows held out for ``prior_precision="heldout"`` when the
        net is trained in ``fit`` (the net, the surrogate and the curvature
        then use the rest); an already trained net uses all of ``fit``'s data,
        or pass ``X_cal``, ``y_cal`` to ``fit``.
    link_approx : {"probit", "centered_probit", "mc", "bridge"}, default="centered_probit"
        From the Gaussian over logits to probabilities (see
        :meth:`skuq.outputs.OutputDistribution.probabilities`). The default
        drops the variance of the shift shared by all logits, which softmax
        ignores (:func:`~skuq.outputs.centered_probit_probabilities`).
    n_samples : int, default=100
        Logit draws for ``link_approx="mc"``.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    classes_ : ndarray
    surrogate_ : SurrogateKernel
        The trained feature map ``x -> (B, C, m)``.
    surrogate_loss_ : ndarray
        Relative kernel error per epoch (unbiased JVP estimate; 1 = ``g = 0``).
    kernel_scale_ : float
        Mean diagonal of the NTK on the training rows (the surrogate's scale).
    posterior_ : FeaturePosterior
    prior_precision_ : float
    heldout_nll_ : dict
        Mean held-out NLL per grid value (``prior_precision="heldout"`` only).
    n_params_ : int
        Weights of the net (the kernel's ``P``).

    Notes
    -----
    Kernel biasing: ``fit(X, y, context=X_ctx)`` adds the rows ``X_ctx``
    (for instance an OOD proxy set, no labels) to the kernel fit so that the
    features also represent the NTK there; the Laplace curvature uses the
    training rows only. It helps OOD detection to the extent that the context
    set resembles the OOD inputs met later (the paper's stated limitation).

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import ScaLLAClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = ScaLLAClassifier(net, n_features=16, surrogate__epochs=3, random_state=0)
    >>> est = est.fit(d.X_train, d.y_train, context=1 - d.X_train[:50])  # inverted digits
    >>> est.predict_proba(d.X_test).shape == (len(d.X_test), 5)
    True
    """

    _extra_fit_params = ("context",)
    _per_layer_prior = False

    def __init__(
        self,
        estimator,
        *,
        n_features=128,
        probe="rademacher",
        n_probes=16,
        surrogate="auto",
        surrogate__width=256,
        surrogate__epochs=50,
        surrogate__lr=1e-3,
        surrogate__batch_size=128,
        surrogate_width="deprecated",
        surrogate_epochs="deprecated",
        surrogate_lr="deprecated",
        surrogate_batch_size="deprecated",
        context_weight=1.0,
        prior_precision="heldout",
        link_approx="centered_probit",
        n_samples=100,
        calibration_fraction=0.2,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.n_features = n_features
        self.probe = probe
        self.n_probes = n_probes
        self.surrogate = surrogate
        self.surrogate__width = surrogate__width
        self.surrogate__epochs = surrogate__epochs
        self.surrogate__lr = surrogate__lr
        self.surrogate__batch_size = surrogate__batch_size
        self.surrogate_width = surrogate_width
        self.surrogate_epochs = surrogate_epochs
        self.surrogate_lr = surrogate_lr
        self.surrogate_batch_size = surrogate_batch_size
        self.context_weight = context_weight
        self.prior_precision = prior_precision
        self.link_approx = link_approx
        self.n_samples = n_samples
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    # ------------------------------------------------------------------ options
    def set_params(self, **params):
        """Set parameters; ``surrogate__<name>`` are this estimator's own.

        scikit-learn would route ``surrogate__<name>`` to a ``surrogate``
        sub-estimator; here ``surrogate`` is a name or a torch module, and the
        ``surrogate__`` options are parameters of the estimator itself.

        Parameters
        ----------
        **params
            Parameter names and values, as ``get_params`` names them.

        Returns
        -------
        self
        """
        own = {key: params.pop(key) for key in list(params) if key in _SURROGATE_PARAMS}
        super().set_params(**params)
        for key, value in own.items():
            setattr(self, key, value)
        return self

    def _surrogate_options(self) -> dict[str, tuple[str, object]]:
        """``{option: (parameter name, value)}`` for the surrogate's training options.

        A deprecated flat name (``surrogate_epochs``) that was given wins, with
        a FutureWarning; given together with its ``surrogate__`` name set away
        from the default, it is an error.
        """
        defaults = inspect.signature(type(self).__init__).parameters
        options = {}
        for option in _SURROGATE_OPTIONS:
            new, old = f"surrogate__{option}", f"surrogate_{option}"
            value, flat = getattr(self, new), getattr(self, old)
            if isinstance(flat, str) and flat == "deprecated":
                options[option] = (new, value)
                continue
            if value != defaults[new].default:
                raise ValueError(f"{old} is the deprecated name of {new}: give only {new}")
            warnings.warn(
                f"{old} is deprecated and will be removed in a future release; use {new}",
                FutureWarning,
                stacklevel=5,
            )
            options[option] = (old, flat)
        return options

    def _validate_options(self) -> None:
        check_positive_int("n_features", self.n_features)
        check_option("probe", self.probe, PROBES)
        check_positive_int("n_probes", self.n_probes)
        if self.n_probes < 2:
            raise ValueError(
                f"n_probes must be >= 2 (the kernel loss pairs distinct probes), got "
                f"{self.n_probes!r}"
            )
        s = self.surrogate
        if isinstance(s, str):
            check_option("surrogate", s, SURROGATES)
        elif not (isinstance(s, nn.Module) or callable(s)):
            raise TypeError(
                f"surrogate must be one of {SURROGATES}, a torch.nn.Module or a callable "
                f"(input_shape, n_outputs) -> nn.Module; got {type(s).__name__}"
            )
        opts = self._surrogate_options()
        check_positive_int(*opts["width"])
        check_positive_int(*opts["epochs"])
        check_positive(*opts["lr"])
        check_positive_int(*opts["batch_size"])
        self._surrogate_settings = {option: value for option, (_, value) in opts.items()}
        check_positive("context_weight", self.context_weight)
        self._validate_prior_precision()
        check_option("link_approx", self.link_approx, LINKS)
        check_positive_int("n_samples", self.n_samples)

    # ---------------------------------------------------------------------- fit
    def fit(self, X, y, **fit_params):
        """Train the wrapped net (unless trained), the surrogate kernel, then the posterior.

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
        y : array-like of shape (n_samples,)
        context : array-like of shape (n_context, ...), optional
            Unlabelled rows shaped like ``X`` (e.g. an OOD proxy set) added to
            the kernel fit (kernel biasing); checked before the net is trained.

        Returns
        -------
        self
        """
        context = fit_params.get("context")
        if context is not None:
            ctx_shape = np.shape(context)
            x_shape = np.shape(X)
            if len(ctx_shape) < 2 or ctx_shape[0] == 0 or ctx_shape[1:] != x_shape[1:]:
                raise ValueError(
                    f"context must be a non-empty array of rows shaped like X's "
                    f"{tuple(x_shape[1:])}; got an array of shape {tuple(ctx_shape)}"
                )
        return super().fit(X, y, **fit_params)

    def _build_surrogate(self, n_out: int) -> nn.Module:
        s = self.surrogate
        if isinstance(s, str):
            width = self._surrogate_settings["width"]
            return default_surrogate(self._input_shape, n_out, kind=s, width=width)
        if isinstance(s, nn.Module):
            return copy.deepcopy(s)
        module = s(self._input_shape, n_out)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"the surrogate callable must return a torch.nn.Module, got {type(module).__name__}"
            )
        return module

    def _fit_uq(self, X, y, X_cal=None, y_cal=None, context=None) -> None:
        ctx = None
        if context is not None:
            try:
                ctx = self._validate_predict_data(context, what="context")
            except ValueError as exc:
                raise ValueError(f"context: {exc}") from exc
        weights = select_weights(self.model_, "all")
        fit = self._surrogate_fit(weights, X, ctx)
        theta_sq = sum(float(torch.linalg.vector_norm(p.detach())) ** 2 for p in weights.params())
        batches = iter_batches(X, y, batch_size=self.batch_size, device=self.device_)
        pp = self.prior_precision
        if not isinstance(pp, str):
            pp = float(pp)
        self.posterior_ = feature_posterior(
            self.model_,
            fit.kernel,
            batches,
            theta_sq_norm=theta_sq,
            prior_precision=1.0 if pp == "heldout" else pp,
        )
        self.surrogate_ = fit.kernel
        if pp == "heldout":
            self._choose_heldout_prior(self.posterior_, X_cal, y_cal, self._heldout_batch_nll())
        self.surrogate_loss_ = np.asarray(fit.loss_history)
        self.kernel_scale_ = float(fit.kernel.scale)
        self.prior_precision_ = float(self.posterior_.prior_precision)
        self.n_params_ = weights.n_params

    def _surrogate_fit(self, weights, X, ctx) -> SurrogateFit:
        """The trained surrogate, from the cache when the same one was trained before."""
        m = int(self.n_features)
        opts = self._surrogate_settings
        options = dict(
            n_features=m,
            probe=self.probe,
            n_probes=int(self.n_probes),
            surrogate=self.surrogate,
            surrogate_width=int(opts["width"]),
            surrogate_epochs=int(opts["epochs"]),
            surrogate_lr=float(opts["lr"]),
            surrogate_batch_size=int(opts["batch_size"]),
            context_weight=float(self.context_weight),
            seed=self._seed,
            device=str(self.device_),
            n_outputs=self.n_outputs_,
        )
        key = None
        if isinstance(self.surrogate, str):  # modules and callables are not keyed
            context = np.zeros(0, dtype=np.float32) if ctx is None else ctx
            key = fingerprint(weights, X, context, options)
            cached = CACHE.get(key)
            if cached is not None:
                return copy.deepcopy(cached)
        with seeded_global_rng(self._seed):
            net = self._build_surrogate(self.n_outputs_ * m)
        fit = fit_surrogate(
            weights,
            net.to(self.device_),
            X,
            n_outputs=self.n_outputs_,
            n_features=m,
            context=ctx,
            context_weight=float(self.context_weight),
            probe=self.probe,
            n_probes=int(self.n_probes),
            epochs=int(opts["epochs"]),
            lr=float(opts["lr"]),
            batch_size=int(opts["batch_size"]),
            generator=make_generator(self._seed, torch.device("cpu")),
            probe_generator=self._generator(),
            verbose=self.verbose,
        )
        if key is not None:
            CACHE.put(key, copy.deepcopy(fit))
        return fit

    def _heldout_batch_nll(self):
        """``batch_nll(xb, yb, grid)`` for the held-out search: features computed once a batch."""
        post = self.posterior_
        gen = self._generator()  # one stream over every batch and grid value

        def batch_nll(xb: Tensor, yb: Tensor, grid: list[float]) -> np.ndarray:
            with torch.no_grad():
                mean, G = self.model_(xb).float(), self.surrogate_(xb).double()
            center = self._centered_link()
            G = augment_centered(G) if center else G
            rows = torch.arange(len(yb), device=yb.device)
            nll = np.zeros(len(grid))
            for i, tau in enumerate(grid):
                post.set_hyperparameters(prior_precision=tau)
                dist = gaussian_predictive(mean, post.functional_variance(G), center)
                p = dist.probabilities(self.link_approx, self.n_samples, gen)
                nll[i] -= float(torch.log(p.double().clamp_min(1e-12)[rows, yb.long()]).sum())
            return nll

        return batch_nll

    # ------------------------------------------------------------------ predict
    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        return scalla_predictive(
            self.model_, self.surrogate_, self.posterior_, x, center=self._centered_link()
        )
