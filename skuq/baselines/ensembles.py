"""Deep ensembles: independently seeded copies of a net, trained and averaged.

:class:`EnsembleModule` is the torch core (a list of trained networks seen as
one); :class:`DeepEnsembleClassifier` and :class:`DeepEnsembleRegressor` are
the scikit-learn estimators that train the members.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from joblib import Parallel, delayed
from torch import Tensor, nn

from .._skorch import criterion_outputs
from .._utils import check_positive_int
from ..base import BaseUQEstimator, UQClassifierMixin, UQRegressorMixin
from ..outputs import OutputDistribution

__all__ = [
    "EnsembleModule",
    "DeepEnsembleClassifier",
    "DeepEnsembleRegressor",
]


class EnsembleModule(nn.Module):
    """A list of trained networks seen as one: ``forward`` is the mean output.

    Parameters
    ----------
    members : sequence of nn.Module
        Networks with the same input and output shapes.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skuq.baselines import EnsembleModule
    >>> ens = EnsembleModule([nn.Linear(3, 2), nn.Linear(3, 2)])
    >>> ens.member_outputs(torch.zeros(4, 3)).shape
    torch.Size([2, 4, 2])
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def member_outputs(self, x: Tensor) -> Tensor:
        """Every member's output, shape (M, N, C)."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return self.member_outputs(x).mean(dim=0)


class _DeepEnsembleBase(BaseUQEstimator):
    """Shared part of the deep-ensemble classifier and regressor."""

    def __init__(
        self,
        estimator,
        *,
        n_estimators=5,
        n_jobs=None,
        device="auto",
        batch_size=256,
        random_state=None,
        verbose=0,
        memory=None,
    ):
        self.estimator = estimator
        self.n_estimators = n_estimators
        self.n_jobs = n_jobs
        self.device = device
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose
        self.memory = memory

    def _validate_options(self) -> None:
        check_positive_int("n_estimators", self.n_estimators)
        if self.n_jobs is not None and not (
            isinstance(self.n_jobs, numbers.Integral)
            and not isinstance(self.n_jobs, bool)
            and self.n_jobs != 0
        ):
            raise ValueError(f"n_jobs must be None or a non-zero int, got {self.n_jobs!r}")

    def _resolve_net(self, X: np.ndarray, y: np.ndarray) -> None:
        if self._net_is_prefit():
            raise TypeError(
                f"{type(self).__name__} trains n_estimators independently seeded copies of "
                "the net, so it needs an unfitted skorch net; got an already trained "
                f"{type(self.estimator).__name__}. Pass the skorch net itself (not a "
                "FrozenEstimator or torch.nn.Module)."
            )
        outputs = criterion_outputs(self.estimator) if self._is_classifier() else "logits"
        seeds = np.random.RandomState(self._seed).randint(0, 2**31 - 1, self.n_estimators)
        train = self._net_trainer()
        y_net = self._net_target(y)
        nets = Parallel(n_jobs=self.n_jobs)(
            delayed(train)(self._prepare_skorch(self.estimator), X, y_net, int(seed))
            for seed in seeds
        )
        members = [self._logit_module(net.module_, outputs) for net in nets]
        self.net_ = list(nets)
        self.member_seeds_ = seeds
        self.model_ = EnsembleModule(members).eval()
        self._check_output_width(X[: min(len(X), 2)])

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        if isinstance(self, UQRegressorMixin):
            # residuals of the ensemble mean, less the members' spread
            self._fit_heldout_noise(X, y, X_cal, y_cal, net_spread=True)


class DeepEnsembleClassifier(UQClassifierMixin, _DeepEnsembleBase):
    """Deep ensemble (Lakshminarayanan et al., 2017) of independently seeded nets.

    ``fit`` trains ``n_estimators`` clones of the wrapped skorch net, each with
    its own seed (initialization and batch order), through
    :class:`joblib.Parallel` with ``n_jobs`` workers -- so a Dask or Ray
    joblib backend (``with joblib.parallel_backend("dask"): est.fit(X, y)``)
    spreads the members over a cluster. ``predict_proba`` is the average of
    the members' softmax; ``predict_distribution`` holds the members' logits
    as samples.

    Parameters
    ----------
    estimator : skorch net
        An unfitted skorch net. An already trained net (``FrozenEstimator``
        or ``torch.nn.Module``) cannot be made into an ensemble: ``TypeError``.
    n_estimators : int, default=5
        Members of the ensemble.
    n_jobs : int or None, default=None
        Parallel training jobs (joblib semantics: ``None`` is one unless in a
        ``joblib.parallel_backend`` context, ``-1`` all cores).
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    net_ : list of skorch nets
        The trained members.
    model_ : skuq.baselines.EnsembleModule
        The members' logit modules (its ``forward`` is the mean logit).
    member_seeds_ : ndarray of shape (n_estimators,)
        The seed each member was trained with (drawn from ``random_state``).

    Notes
    -----
    Each member trains on a private copy of torch's global generator seeded
    with its seed (skorch draws initialization, batch order and dropout from
    that generator), so the same ``random_state`` gives the same members under
    every joblib backend: serial, process-based (``loky``, Dask, Ray) or
    threads. The global generator is one per process, so members in threads
    of one process train one at a time; use a process-based backend to train
    them in parallel. The caller's global generator is left as it was.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from skuq import DeepEnsembleClassifier
    >>> from skuq.datasets import load_digits_ood
    >>> from skuq.nets import MLP
    >>> d = load_digits_ood()
    >>> net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss,
    ...                           optimizer=torch.optim.Adam, lr=1e-2, max_epochs=10,
    ...                           train_split=None, verbose=0)
    >>> est = DeepEnsembleClassifier(net, n_estimators=3, random_state=0)
    >>> est.fit(d.X_train, d.y_train).score(d.X_test, d.y_test) > 0.9
    True
    >>> est.predict_distribution(d.X_test[:4]).samples.shape
    torch.Size([3, 4, 5])
    """

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            return OutputDistribution.from_samples(self.model_.member_outputs(x).float())


class DeepEnsembleRegressor(UQRegressorMixin, _DeepEnsembleBase):
    """Deep ensemble for regression: the mixture of the members' predictions.

    Mean = average of the members' outputs; epistemic variance = the mixture
    variance ``mean_m (f_m - mean)^2`` (divided by M, the exact second moment
    of the equally weighted mixture; returned in Gaussian form). The
    aleatoric ``sigma_noise_`` comes from held-out rows (``X_cal``, ``y_cal``
    given to ``fit``, or a fifth of the rows, which the members are then not
    trained on), as in :class:`MAPRegressor`: its square is the mean squared
    residual of the ensemble mean there less the mean mixture variance (at
    least 1 % of the former), so that the members' spread is not counted
    twice. Members are trained as in
    :class:`DeepEnsembleClassifier`.

    Parameters
    ----------
    estimator : skorch net
        An unfitted skorch net (``NeuralNetRegressor``).
    n_estimators : int, default=5
    n_jobs : int or None, default=None
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    net_ : list of skorch nets
    model_ : skuq.baselines.EnsembleModule
    sigma_noise_ : float or ndarray

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetRegressor
    >>> from skuq import DeepEnsembleRegressor
    >>> from skuq.datasets import make_gap_regression
    >>> from skuq.nets import MLP
    >>> d = make_gap_regression()
    >>> net = NeuralNetRegressor(MLP, optimizer=torch.optim.Adam, lr=1e-2,
    ...                          max_epochs=50, train_split=None, verbose=0)
    >>> est = DeepEnsembleRegressor(net, n_estimators=3, random_state=0).fit(d.X, d.y)
    >>> est.predict(d.X_test, return_std=True)[1].shape
    (301,)
    """

    _uses_calibration_split = True  # the noise level is read on held-out rows

    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            outs = self.model_.member_outputs(x).double()
        # moments over members in float64, so that their rounding does not hang on
        # the row's position in the batch (torch's float32 sums differ there)
        mean, var = outs.mean(dim=0), outs.var(dim=0, unbiased=False)
        return OutputDistribution.gaussian(mean.float(), var.float())
