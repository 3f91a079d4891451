"""LaplaceClassifier, LaplaceRegressor and SubnetworkLaplaceClassifier: the estimators.

Thin scikit-learn classes: their parameters and documentation. The fitting and
prediction they share live in :mod:`skuq.laplace.base`.
"""

from __future__ import annotations

from ..base import UQClassifierMixin, UQRegressorMixin
from .base import ClassificationLikelihood, RegressionLikelihood, _BaseLaplace

__all__ = ["LaplaceClassifier", "LaplaceRegressor", "SubnetworkLaplaceClassifier"]


class LaplaceClassifier(UQClassifierMixin, ClassificationLikelihood, _BaseLaplace):
    """Laplace approximation over a trained classification network.

    Fits ``N(theta*, (H / T + delta I)^-1)`` over a subset of the weights, with
    ``H`` the generalized Gauss-Newton (or empirical Fisher) of the summed
    cross-entropy, and predicts with the linearized (``"glm"``) or sampled
    (``"nn"``) network. The curvature is computed once per trained net and
    data and kept (see :func:`clear_curvature_cache`), so a grid search over
    ``prior_precision``, ``temperature`` or ``link_approx`` costs one curvature
    per fold. Nets trained with ``NLLLoss`` (probability outputs) are turned
    into logit nets first (see :func:`skuq.base.logit_model`).

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        The network (see :class:`skuq.base.BaseUQEstimator`).
    subset_of_weights : {"all", "last_layer", "subnetwork"}, default="all"
        Weights that get a posterior; the others stay at the MAP. The default,
        all weights with a diagonal curvature and the held-out prior, is the
        one that beat the bare net on most tasks of ``benchmarks/shift.py``
        (in-distribution, shifted and OOD inputs, from ``fit``'s data alone);
        a last layer is cheaper (one forward pass for its features), but its
        widened posterior lowered the OOD AUROC on the tabular and 1-D tasks.
        ``"last_layer"``: the last layer the forward pass calls;
        ``"subnetwork"``: a full-covariance posterior over ``subnetwork_size``
        weights chosen by ``subnetwork_selection`` (or the positions
        ``subnetwork_indices``); needs ``hessian_structure="full"`` (see
        :class:`SubnetworkLaplaceClassifier`, which sets it).
    hessian_structure : {"diag", "kron", "full", "lowrank"}, default="diag"
        Curvature structure. ``"kron"`` is K-FAC (Linear and Conv2d layers).
        ``"diag"`` works on every layer type (per-row Jacobians where no
        layer-wise route exists, e.g. Conv1d: slower).
    prior_precision : float, array of float, "marglik" or "heldout", default="heldout"
        ``delta`` of the isotropic Gaussian prior. A float (or one per
        parameter tensor) is used as is and can be grid-searched;
        ``"marglik"`` maximizes the Laplace marginal likelihood on the
        training data; ``"heldout"`` scores a log grid (1e-4..1e6,
        :data:`skuq.base.HELDOUT_GRID`) by NLL on a held-out split (see
        ``calibration_fraction``) and, for classifiers, takes the widest
        posterior within 5 % of the best held-out NLL
        (:func:`skuq.base.heldout_choice`), for regressors the best.
        With a net trained in ``fit`` the net is then retrained on all rows:
        two trainings per ``fit``.
    prior_structure : {"scalar", "layerwise"}, default="scalar"
        One ``delta`` for all weights, or one per parameter tensor, for ``"marglik"``.
    curvature : {"ggn", "ef"}, default="ggn"
        Generalized Gauss-Newton or empirical Fisher.
    pred_type : {"glm", "nn"}, default="glm"
        Linearized predictive or weight sampling.
    link_approx : {"probit", "centered_probit", "mc", "bridge"}, default="centered_probit"
        From a Gaussian over logits to probabilities (``pred_type="glm"``).
        ``"probit"`` is laplace-torch's link; ``"centered_probit"`` first
        removes the variance of the shift shared by all logits, which
        softmax ignores, and is much closer to ``"mc"`` for last-layer
        posteriors (:func:`~skuq.outputs.centered_probit_probabilities`).
        With it, the predictive also carries ``Cov[P f]`` formed from
        centered Jacobians (``OutputDistribution.centered_covariance``), which
        keeps the digits that projecting ``Cov[f]`` in float32 would cancel.
    n_samples : int, default=100
        Samples for ``link_approx="mc"`` and ``pred_type="nn"``.
    temperature : float, default=1.0
        Divides the curvature and the log-likelihood (laplace-torch's convention).
    subnetwork_size : int, "auto" or None, default=None
        For ``subset_of_weights="subnetwork"``: ``k``, the number of weights
        with a posterior (at most the net's trainable parameters;
        ``"auto"``: ``min(1000, P)``). Needed by the ranking rules; the set
        rules (``"last_layer"``, names, indices) take their whole set when it
        is None. Can be grid-searched.
    subnetwork_selection : str, SubnetworkSelection, list of str or array of int, \
default="largest_variance"
        How the subnetwork is chosen (see :mod:`skuq.laplace.subnetwork`):
        ``"largest_variance"`` (largest marginal variance under a diagonal
        Laplace over all weights, the 2-Wasserstein rule of Daxberger et
        al.; with this estimator's ``curvature``, ``temperature`` and a
        numeric ``prior_precision``, else 1), ``"largest_variance_swag"``
        (diagonal SWAG variances from a short seeded SGD run),
        ``"largest_magnitude"``, ``"random"`` (seeded by ``random_state``),
        ``"last_layer"``, a list of parameter or module names, an array of
        positions, or a rule object (e.g.
        ``skuq.laplace.subnetwork.LargestVarianceSWAG(lr=1e-3)``).
    subnetwork_indices : array of int, optional
        For ``subset_of_weights="subnetwork"``: positions in the flat vector of
        all trainable parameters (see :func:`skuq.curvature.select_subnetwork`);
        the same as passing them as ``subnetwork_selection``.
    rank : int, default=100
        Eigenpairs kept by ``hessian_structure="lowrank"``.
    calibration_fraction : float, default=0.2
        Share of the rows held out to choose ``prior_precision="heldout"``
        when the net is trained in ``fit`` (an already trained net uses all of
        ``fit``'s data; or pass ``X_cal``, ``y_cal`` to ``fit``).
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    classes_ : ndarray
    posterior_ : skuq.posterior.WeightPosterior
        The weight-space Gaussian.
    weights_ : skuq.curvature.WeightSubset
        The weights it lives on.
    prior_precision_ : float or ndarray
        The prior precision used.
    n_params_ : int
        Number of weights with a posterior.
    subnetwork_indices_ : ndarray of int64
        For ``subset_of_weights="subnetwork"``: the chosen positions, sorted.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import LaplaceClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = LaplaceClassifier(net, random_state=0).fit(d.X_train, d.y_train)
    >>> est.predict_proba(d.X_test).shape
    (271, 5)
    """

    def __init__(
        self,
        estimator,
        *,
        subset_of_weights="all",
        hessian_structure="diag",
        prior_precision="heldout",
        prior_structure="scalar",
        curvature="ggn",
        pred_type="glm",
        link_approx="centered_probit",
        n_samples=100,
        temperature=1.0,
        subnetwork_size=None,
        subnetwork_selection="largest_variance",
        subnetwork_indices=None,
        rank=100,
        calibration_fraction=0.2,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.subset_of_weights = subset_of_weights
        self.hessian_structure = hessian_structure
        self.prior_precision = prior_precision
        self.prior_structure = prior_structure
        self.curvature = curvature
        self.pred_type = pred_type
        self.link_approx = link_approx
        self.n_samples = n_samples
        self.temperature = temperature
        self.subnetwork_size = subnetwork_size
        self.subnetwork_selection = subnetwork_selection
        self.subnetwork_indices = subnetwork_indices
        self.rank = rank
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory


class LaplaceRegressor(UQRegressorMixin, RegressionLikelihood, _BaseLaplace):
    """Laplace approximation over a trained regression network (Gaussian likelihood).

    As :class:`LaplaceClassifier`, with the GGN of the Gaussian likelihood
    ``J^T J / sigma_noise^2``; the predictive mean is the net's output, its
    epistemic variance ``J Sigma J^T`` (``"glm"``) or the spread of sampled
    nets (``"nn"``), and ``sigma_noise_`` the aleatoric noise.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
    sigma_noise : float, "auto", "marglik" or "residual", default="residual"
        Observation noise. ``"residual"``: the RMS residual of the net on
        held-out rows -- ``X_cal``, ``y_cal`` given to ``fit``; else
        ``calibration_fraction`` of the rows, held out of a net trained in
        ``fit``; else, for a trained net, ``fit``'s rows. Residuals on the
        training rows (and the evidence's noise, which follows them)
        understate the error on new rows for a net that overfits: on
        ``benchmarks/shift.py``'s Friedman #1 task the 95 % band covered
        24 % of the test targets with ``"auto"``, 96 % with ``"residual"``.
        ``"marglik"`` fits the noise (with the prior precision when that is
        ``"marglik"`` too) by the Laplace marginal likelihood, starting from
        the RMS training residual. ``"auto"``: ``"marglik"`` when the
        posterior has at most as many weights as there are training targets
        (rows x outputs; a last layer, typically), else the RMS training
        residual: over all the weights of a net the evidence inflates the
        noise (4-41x the residual on the comparison's tasks).
    subset_of_weights, hessian_structure, prior_precision, prior_structure, curvature, \
pred_type, n_samples, temperature, subnetwork_size, subnetwork_selection, \
subnetwork_indices, rank, calibration_fraction
        As in :class:`LaplaceClassifier`; the defaults here are
        ``"last_layer"``, ``"kron"`` and ``"marglik"``.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    sigma_noise_ : float or ndarray
    posterior_, weights_, prior_precision_, n_params_, subnetwork_indices_
        As in :class:`LaplaceClassifier`.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from skuq import LaplaceRegressor
    >>> from skuq.datasets import make_gap_regression
    >>> from skuq.nets import MLP
    >>> d = make_gap_regression()
    >>> net = NeuralNetRegressor(MLP, optimizer=torch.optim.Adam, lr=1e-2,
    ...                          max_epochs=50, train_split=None, verbose=0)
    >>> est = LaplaceRegressor(net, random_state=0).fit(d.X, d.y)
    >>> mean, std = est.predict(d.X_test, return_std=True)
    >>> bool(std[d.in_gap].mean() > std[~d.in_gap].min())
    True
    """

    def __init__(
        self,
        estimator,
        *,
        sigma_noise="residual",
        subset_of_weights="last_layer",
        hessian_structure="kron",
        prior_precision="marglik",
        prior_structure="scalar",
        curvature="ggn",
        pred_type="glm",
        n_samples=100,
        temperature=1.0,
        subnetwork_size=None,
        subnetwork_selection="largest_variance",
        subnetwork_indices=None,
        rank=100,
        calibration_fraction=0.2,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.sigma_noise = sigma_noise
        self.subset_of_weights = subset_of_weights
        self.hessian_structure = hessian_structure
        self.prior_precision = prior_precision
        self.prior_structure = prior_structure
        self.curvature = curvature
        self.pred_type = pred_type
        self.n_samples = n_samples
        self.temperature = temperature
        self.subnetwork_size = subnetwork_size
        self.subnetwork_selection = subnetwork_selection
        self.subnetwork_indices = subnetwork_indices
        self.rank = rank
        self.calibration_fraction = calibration_fraction
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory


class SubnetworkLaplaceClassifier(UQClassifierMixin, ClassificationLikelihood, _BaseLaplace):
    """Subnetwork inference: a full-covariance Laplace over a chosen subset of the weights.

    Daxberger et al. (ICML 2021): ``subnetwork_size`` weights, chosen by
    ``subnetwork_selection`` (by default those of largest marginal variance
    under a diagonal Laplace over all weights, the 2-Wasserstein rule), get a
    full-covariance GGN Laplace posterior ``N(theta*_S, (H_SS / T +
    delta I)^-1)``; every other weight stays at the MAP. ``H_SS`` comes from
    the Jacobian columns ``J[:, S]`` only (memory ``O(k^2 + batch C k)``), so
    a subnetwork of thousands of weights works inside a net of millions.

    The same machinery as ``LaplaceClassifier(subset_of_weights="subnetwork",
    hessian_structure="full", ...)``, with documented defaults.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        The network (see :class:`skuq.base.BaseUQEstimator`).
    subnetwork_size : int or "auto", default="auto"
        ``k``; ``"auto"`` is ``min(1000, P)`` (all weights of a net with
        fewer). Can be grid-searched.
    subnetwork_selection : str, SubnetworkSelection, list of str or array of int, \
default="largest_variance"
        See :class:`LaplaceClassifier` and :mod:`skuq.laplace.subnetwork`.
    prior_precision : float, array of float, "marglik" or "heldout", default="heldout"
        As in :class:`LaplaceClassifier` (one value per parameter tensor for
        an array, counting only the subnetwork's entries).
    prior_structure, curvature, pred_type, link_approx, n_samples, temperature, \
calibration_fraction
        As in :class:`LaplaceClassifier`.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    classes_ : ndarray
    subnetwork_indices_ : ndarray of int64
        The chosen positions in the flat vector of the trainable parameters.
    posterior_ : skuq.posterior.CholeskyFullPosterior
    weights_ : skuq.curvature.WeightSubset
    prior_precision_ : float or ndarray
    n_params_ : int
        ``k``.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import SubnetworkLaplaceClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = SubnetworkLaplaceClassifier(net, subnetwork_size=200, random_state=0)
    >>> est.fit(d.X_train, d.y_train).predict_proba(d.X_test).shape
    (271, 5)
    >>> est.subnetwork_indices_.shape
    (200,)
    """

    # the Laplace machinery's structure options, fixed here
    subset_of_weights = "subnetwork"
    hessian_structure = "full"
    subnetwork_indices = None
    rank = 100

    def __init__(
        self,
        estimator,
        *,
        subnetwork_size="auto",
        subnetwork_selection="largest_variance",
        prior_precision="heldout",
        prior_structure="scalar",
        curvature="ggn",
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
        self.subnetwork_size = subnetwork_size
        self.subnetwork_selection = subnetwork_selection
        self.prior_precision = prior_precision
        self.prior_structure = prior_structure
        self.curvature = curvature
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
