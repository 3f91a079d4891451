"""RegVar's scikit-learn face: :class:`RegVarClassifier` and :class:`RegVarRegressor`.

They read the wrapped net (its criterion, optimizer and batch size) and call
the torch core of :mod:`skuq.regvar` through :class:`~skuq.regvar.base._BaseRegVar`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._skorch import is_skorch_net
from .._utils import check_option, check_positive, check_positive_int
from ..base import UQClassifierMixin, UQRegressorMixin
from ..outputs import LINKS, OutputDistribution
from .base import _BaseRegVar


class RegVarClassifier(UQClassifierMixin, _BaseRegVar):
    """Uncertainty from the variation of the logits when regularization is perturbed.

    RegVar (McInerney & Kallus, AISTATS 2025) fine-tunes the trained net --
    every layer, with its own loss, optimizer class and weight decay (the
    prior) -- under a slightly perturbed objective and reads how far the
    logits move, divided by the perturbation ``lam``. In the limit
    ``lam -> 0`` of ``mode="exact"`` this is the linearized Laplace covariance
    ``J H^-1 J^T`` with the true Hessian ``H`` of the regularized objective
    (see :mod:`skuq.regvar`). The mean is the trained net's logits; the
    variance goes through the shared links (``link_approx``).

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        The network. A skorch net gives its criterion (reduction ``"mean"``),
        optimizer class, hyperparameters and trained optimizer state (the
        fine-tunes start from it); a plain ``torch.nn.Module`` is fine-tuned on
        the mean cross-entropy with Adam (``finetune_lr``, default 1e-3) and
        no weight decay.
    mode : {"exact", "amortized"}, default="exact"
        ``"exact"``: one fine-tune per predicted row and class (costly; keeps
        the training data); the linearized-Laplace covariance with the true
        Hessian as ``lam -> 0``. ``"amortized"``: two fine-tunes in ``fit``,
        two forward passes per row to predict -- cheap, but not a variance:
        ``|f_lam - f_0| / lam`` tends to ``|J(x) H^-1 u|`` for one fixed
        direction ``u`` (the gradient of the output regularizer), linear in
        ``J(x)`` and zero on a whole hyperplane of inputs; an uncalibrated
        sensitivity score (see :mod:`skuq.regvar`).
    lam : float, default=1e-2
        Perturbation size ``> 0``. Amortized: the output regularizer
        ``(lam / N) mean|f(x_batch)|``; exact: ``R - lam f_k(x*)``.
    finetune_epochs : int, default=5
        Passes over the training data of each amortized fine-tune (and of
        each ``exact_solver="optimizer"`` fine-tune).
    finetune_lr : float or None, default=None
        Learning rate of the fine-tunes; ``None`` keeps the net's.
    n_average : int, default=100
        Last iterates averaged in each fine-tune.
    variance_scale : float, default=1.0
        Multiplies the variance; read at predict time, so changing it on a
        fitted estimator needs no refit. The amortized scale is not
        calibrated: set it on held-out data (NLL over a log grid), or
        grid-search it (``GridSearchCV`` with ``memory=`` trains the net once
        per fold; the fine-tunes are redone).
    prior_precision : float, "heldout" or None, default=None
        ``None``: the prior is the optimizer's weight decay (``delta = N *
        weight_decay`` per parameter group; 0 for a plain module). Decoupled
        decay (AdamW) is not an L2 term: its implied prior is
        ``delta_i = N wd (sqrt(v_hat_i) + eps)`` per weight, from the trained
        optimizer's second moments; other optimizers with decoupled decay are
        refused (pass a prior here). A float
        replaces it by an explicit ``(delta / 2) ||theta||^2`` (the
        optimizer's decay is then switched off in the fine-tunes).
        ``"heldout"``: the value of a log grid (1e-4 to 1e6) whose exact
        predictive has the lowest NLL on held-out rows (``X_cal``, ``y_cal``,
        or a fifth of ``fit``'s rows held out of a net trained in ``fit``;
        for a classifier the widest within 5 % of it, as in
        :class:`skuq.LaplaceClassifier`), all values from one
        eigendecomposition of the objective's Hessian (so the Hessian must
        fit in memory, in any ``mode``). The exact mode needs a prior > 0: a
        net trained without weight decay needs a float or ``"heldout"``.
    exact_solver : {"auto", "hessian", "lbfgs", "optimizer"}, default="auto"
        ``mode="exact"``: ``"hessian"`` computes the limit ``lam -> 0`` itself,
        ``J (H + delta I)^-1 J^T``, from the Hessian of the objective (``P``
        Hessian-vector products and one eigendecomposition in ``fit``, then
        a Jacobian per predicted row; see :mod:`skuq.regvar.hessian`);
        ``"lbfgs"`` fine-tunes once per row and output in full-batch float64
        (the paper's procedure), ``"optimizer"`` with the net's optimizer on
        mini-batches (larger nets), see :func:`exact_covariance`. ``"auto"``
        takes ``"hessian"`` up to
        :data:`~skuq.regvar.hessian.HESSIAN_AUTO_MAX_PARAMS` weights, or
        whenever ``prior_precision="heldout"`` has formed the Hessian, and
        ``"lbfgs"`` otherwise.
    exact_max_iter : int, default=500
        L-BFGS iterations per chunk of problems.
    link_approx : {"probit", "centered_probit", "mc", "bridge"}, default="centered_probit"
        From the Gaussian over logits to probabilities (see
        :meth:`skuq.outputs.OutputDistribution.probabilities`); the default
        drops the variance of the shift shared by all logits, which softmax
        ignores (:func:`~skuq.outputs.centered_probit_probabilities`).
    n_samples : int, default=100
        Logit draws for ``link_approx="mc"`` and sampled uncertainties.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`; ``random_state`` also fixes
        the fine-tunes' batch order.

    Attributes
    ----------
    classes_ : ndarray
    finetuned_ : tuple of torch.nn.Module or None
        The perturbed and the reference fine-tuned nets (amortized mode), in
        float64 so that their small difference is free of rounding.
    prior_precision_ : float or ndarray
        ``delta`` of the summed objective (one per weight when not uniform).
    heldout_nll_ : dict
        ``prior_precision="heldout"``: the mean held-out NLL of each grid value.
    exact_solver_ : str
        The solver ``exact_solver`` resolved to.
    posterior_ : FullPosterior or None
        ``"hessian"`` solver in exact mode: ``N(theta*, (H + delta I)^-1)``,
        whose ``J Sigma J^T`` is the predicted covariance.
    variance_factor_ : float
        Likelihood scale applied to the variance (1 for classification).
    n_params_ : int
        Number of weights fine-tuned.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import RegVarClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=64,
    ...                           module__out_features=5, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, optimizer__weight_decay=1e-2,
    ...                           lr=1e-2, max_epochs=20, train_split=None, verbose=0)
    >>> est = RegVarClassifier(net, random_state=0).fit(d.X_train, d.y_train)
    >>> est.predict_proba(d.X_test[:2]).shape  # exact mode, from the Hessian (325 weights)
    (2, 5)
    >>> est.exact_solver_
    'hessian'
    """

    def __init__(
        self,
        estimator,
        *,
        mode="exact",
        lam=1e-2,
        finetune_epochs=5,
        finetune_lr=None,
        n_average=100,
        variance_scale=1.0,
        prior_precision=None,
        exact_solver="auto",
        exact_max_iter=500,
        link_approx="centered_probit",
        n_samples=100,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.mode = mode
        self.lam = lam
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.n_average = n_average
        self.variance_scale = variance_scale
        self.prior_precision = prior_precision
        self.exact_solver = exact_solver
        self.exact_max_iter = exact_max_iter
        self.link_approx = link_approx
        self.n_samples = n_samples
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    def _validate_likelihood_options(self) -> None:
        check_option("link_approx", self.link_approx, LINKS)
        check_positive_int("n_samples", self.n_samples)

    @staticmethod
    def _default_loss(f: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(f, y.long())

    def _heldout_nll(self, dist: OutputDistribution, y: Tensor) -> float:
        p = dist.probabilities(self._link(), self._n_link_samples(), self._generator())
        p = p.double().clamp_min(1e-12)
        return float(-torch.log(p[torch.arange(len(y)), y.long()]).sum())


class RegVarRegressor(UQRegressorMixin, _BaseRegVar):
    """RegVar for regression nets: epistemic variance from perturbed fine-tunes.

    As :class:`RegVarClassifier`, on the regression mean. A net trained on
    ``MSELoss`` (mean over rows and the ``C`` outputs) minimizes the Gaussian
    negative log posterior times ``2 sigma^2 / C``, so its RegVar variance is
    multiplied by that (``variance_factor_``) to be the variance of ``f(x)``
    under the Gaussian likelihood with noise ``sigma_noise_`` (for other
    criteria the net's own objective is read as the negative log likelihood:
    factor 1). The noise is the RMS residual on held-out rows unless given.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        A plain module is fine-tuned on ``MSELoss`` with Adam.
    sigma_noise : float or None, default=None
        Observation noise; ``None``: the RMS residual of the trained net on
        held-out rows, as in :class:`skuq.MAPRegressor` (``X_cal``, ``y_cal``
        given to ``fit``, or a fifth of ``fit``'s rows held out of a net
        trained in ``fit``).
    prior_precision : float, "heldout" or None, default="heldout"
        As in :class:`RegVarClassifier`; by default the grid value with the
        best held-out NLL. Regression nets are commonly trained without
        weight decay, whose implied prior (``None``) is then 0 and leaves the
        exact variance unbounded; with the held-out prior the 95 % interval
        covers 95.0 % and 95.7 % of in-distribution targets and the
        predictive std separates extrapolation rows (AUROC 0.988 and 1.000)
        on ``benchmarks/shift.py``'s two regression tasks.
    mode, lam, finetune_epochs, finetune_lr, n_average, variance_scale, \
exact_solver, exact_max_iter
        As in :class:`RegVarClassifier`.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    sigma_noise_ : float or ndarray
    finetuned_, prior_precision_, heldout_nll_, exact_solver_, posterior_, \
variance_factor_, n_params_
        As in :class:`RegVarClassifier`.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from skuq import RegVarRegressor
    >>> from skuq.datasets import make_gap_regression
    >>> d = make_gap_regression()
    >>> net = NeuralNetRegressor(torch.nn.Linear, module__in_features=1,
    ...                          module__out_features=1, optimizer=torch.optim.Adam, lr=1e-2,
    ...                          optimizer__weight_decay=1e-2, max_epochs=50,
    ...                          train_split=None, verbose=0)
    >>> est = RegVarRegressor(net, random_state=0).fit(d.X, d.y)
    >>> mean, std = est.predict(d.X_test[:3], return_std=True)
    >>> mean.shape == std.shape == (3,)
    True
    """

    def __init__(
        self,
        estimator,
        *,
        sigma_noise=None,
        mode="exact",
        lam=1e-2,
        finetune_epochs=5,
        finetune_lr=None,
        n_average=100,
        variance_scale=1.0,
        prior_precision="heldout",
        exact_solver="auto",
        exact_max_iter=500,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.sigma_noise = sigma_noise
        self.mode = mode
        self.lam = lam
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.n_average = n_average
        self.variance_scale = variance_scale
        self.prior_precision = prior_precision
        self.exact_solver = exact_solver
        self.exact_max_iter = exact_max_iter
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    @property
    def _uses_calibration_split(self) -> bool:  # rows held out for the noise and the prior
        return self.sigma_noise is None or super()._uses_calibration_split

    def _validate_likelihood_options(self) -> None:
        check_positive("sigma_noise", self.sigma_noise, allow_none=True)

    @staticmethod
    def _default_loss(f: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(f, y.reshape(f.shape).to(f.dtype))

    def _heldout_nll(self, dist: OutputDistribution, y: Tensor) -> float:
        var = dist.variance.double() + self._noise_variance().double().to(dist.variance.device)
        r = y.reshape(dist.output_mean.shape).double() - dist.output_mean.double()
        return float(0.5 * (torch.log(2 * np.pi * var) + r**2 / var).sum())

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        if self.sigma_noise is None:
            self._fit_heldout_noise(X, y, X_cal, y_cal)
        else:
            self.sigma_noise_ = float(self.sigma_noise)
        super()._fit_uq(X, y, X_cal, y_cal)

    def _variance_factor(self) -> float:
        criterion = getattr(self.net_, "criterion_", None) if is_skorch_net(self.net_) else None
        if criterion is not None and not isinstance(criterion, nn.MSELoss):
            return 1.0
        sigma2 = float(np.mean(np.asarray(self.sigma_noise_, dtype=float) ** 2))
        return 2.0 * sigma2 / self.n_outputs_
