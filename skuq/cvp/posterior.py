"""Diagonal weight posteriors for CVP and the registry of their sources.

A *posterior source* is a function

    source(model, net, X, y, *, device, batch_size, **options) -> DiagonalWeightPosterior

where ``model`` is the trained logit module (``torch.nn.Module``), ``net`` is
what was trained (a skorch net, or the module itself), ``X, y`` the training
rows (float32 array, integer-encoded labels) and ``options`` the estimator's
``posterior_options``. It returns per-parameter variances keyed by the names
of ``model.named_parameters()``; the means are the trained weights.

A source may also provide ``prepare_net(net, n_train, **options) -> net``,
which changes how an unfitted skorch net is trained (IVON swaps the optimizer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "DiagonalWeightPosterior",
    "register_posterior_source",
    "POSTERIOR_SOURCES",
    "ivon_posterior",
    "IVONTrainingMixin",
    "IVON_DEFAULTS",
]

IVON_INSTALL_HINT = (
    "posterior='ivon' needs the IVON optimizer, an optional extra: "
    "pip install skuq[ivon]  (or: pip install ivon-opt)"
)


@dataclass
class DiagonalWeightPosterior:
    """Independent Gaussians over named parameters.

    Parameters
    ----------
    variances : dict of str to Tensor
        Variance per parameter (same shape), keyed by parameter name.
    means : dict of str to Tensor, optional
        Posterior means; ``None`` means the model's current weights.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.posterior import DiagonalWeightPosterior
    >>> post = DiagonalWeightPosterior({"weight": torch.full((2, 3), 0.1)})
    >>> post.n_parameters
    6
    """

    variances: dict[str, Tensor]
    means: dict[str, Tensor] | None = field(default=None)

    @property
    def n_parameters(self) -> int:
        return sum(int(v.numel()) for v in self.variances.values())


@dataclass
class _Source:
    fit: Callable[..., DiagonalWeightPosterior]
    prepare_net: Callable | None = None
    #: whether ``fit`` reads the rows it is given (a prefit net then keeps the
    #: calibration rows apart from them)
    uses_data: bool = True


POSTERIOR_SOURCES: dict[str, _Source] = {}


def register_posterior_source(
    name: str,
    source: Callable[..., DiagonalWeightPosterior],
    prepare_net: Callable | None = None,
    *,
    uses_data: bool = True,
) -> None:
    """Make ``CVPClassifier(posterior=name)`` use ``source``.

    Parameters
    ----------
    name : str
    source : callable
        ``source(model, net, X, y, *, device, batch_size, **options)`` returning
        a :class:`DiagonalWeightPosterior` (or a plain ``{name: variance}`` dict).
    prepare_net : callable, optional
        ``prepare_net(net, n_train, **options)`` returning the skorch net to train.
    uses_data : bool, default=True
        Whether ``source`` fits on the rows it is given. With a prefit net,
        ``CVPClassifier`` then holds a calibration split out of ``fit``'s rows,
        so that the posterior and the variance scales see different rows;
        ``False`` (the posterior is read from the trained net, as IVON's is)
        lets the calibration use all of them.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.posterior import register_posterior_source, DiagonalWeightPosterior
    >>> def fixed(model, net, X, y, *, device, batch_size, variance=1e-4):
    ...     return DiagonalWeightPosterior(
    ...         {n: torch.full_like(p, variance) for n, p in model.named_parameters()})
    >>> register_posterior_source("fixed_example", fixed)
    """
    POSTERIOR_SOURCES[name] = _Source(source, prepare_net, uses_data)


def variances_from_mapping(model: nn.Module, mapping: Mapping) -> dict[str, Tensor]:
    """Per-parameter variances from a user mapping ``{name: float or array}``."""
    named = dict(model.named_parameters())
    out = {}
    for name, v in mapping.items():
        key = name if name in named else (f"module.{name}" if f"module.{name}" in named else None)
        if key is None:
            raise ValueError(
                f"posterior names parameter {name!r}, which the network does not have; "
                f"its parameters are {sorted(named)}"
            )
        t = torch.as_tensor(v, dtype=named[key].dtype)
        out[key] = t.expand(named[key].shape).clone() if t.ndim == 0 else t
    return out


# ------------------------------------------------------------------- IVON
#: IVON options used when ``CVPClassifier`` swaps a net's optimizer for IVON. ``lr``:
#: the minimax choice over the comparison's four classification tasks (3 seeds each) of
#: the NLL on a split of their *training* rows, lr in {1, 0.5, 0.3, 0.2, 0.1, 0.05}:
#: 0.2 is at most 1.26x each task's best; 1.0 was 5.3x on the image CNN (it did not train).
IVON_DEFAULTS = {"lr": 0.2, "hess_init": 1.0, "beta2": 0.999, "weight_decay": 1e-4,
                 "mc_samples": 1}


def _import_ivon():
    try:
        import ivon
    except ImportError as exc:
        raise ImportError(IVON_INSTALL_HINT) from exc
    return ivon


class IVONTrainingMixin:
    """skorch mixin: each forward/backward runs on IVON's sampled weights.

    IVON (Shen et al., 2024) learns a Gaussian over the weights; every
    gradient must be taken at a draw from it, inside
    ``optimizer.sampled_params(train=True)``. Mix this in before a skorch
    net class and use ``optimizer=ivon.IVON`` (with ``optimizer__ess`` = the
    number of training rows); validation and prediction use the means.

    Examples
    --------
    >>> from skorch import NeuralNetClassifier
    >>> from skuq.cvp.posterior import IVONTrainingMixin
    >>> class MyIVONNet(IVONTrainingMixin, NeuralNetClassifier):
    ...     pass
    """

    def train_step_single(self, batch, **fit_params):
        opt = self.optimizer_
        if not hasattr(opt, "sampled_params"):
            return super().train_step_single(batch, **fit_params)
        with opt.sampled_params(train=True):
            return super().train_step_single(batch, **fit_params)

    def initialize_optimizer(self, *args, **kwargs):
        # IVON sizes its buffers at construction: lazy layers must be materialized first
        from torch.nn.parameter import UninitializedParameter

        if any(isinstance(p, UninitializedParameter) for p in self.module_.parameters()):
            self._ivon_pending = True
            return self
        return super().initialize_optimizer(*args, **kwargs)

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        if getattr(self, "_ivon_pending", False):
            if not self.initialized_:
                self.initialize()
            ds = self.get_dataset(X, y)
            batch = next(iter(self.get_iterator(ds, training=False)))
            with torch.no_grad():
                self.infer(batch[0])
            self._ivon_pending = False
            self._initialize_optimizer()
        return super().partial_fit(X, y, classes=classes, **fit_params)


def _ivon_net_classes():
    from skorch import NeuralNet, NeuralNetClassifier

    return {NeuralNetClassifier: IVONNeuralNetClassifier, NeuralNet: IVONNeuralNet}


try:  # module-level classes so that trained nets pickle
    from skorch import NeuralNet as _NeuralNet
    from skorch import NeuralNetClassifier as _NeuralNetClassifier

    class IVONNeuralNetClassifier(IVONTrainingMixin, _NeuralNetClassifier):
        """``skorch.NeuralNetClassifier`` trained with IVON (see :class:`IVONTrainingMixin`)."""

    class IVONNeuralNet(IVONTrainingMixin, _NeuralNet):
        """``skorch.NeuralNet`` trained with IVON (see :class:`IVONTrainingMixin`)."""

except ImportError:  # pragma: no cover - skorch is a run-time dependency
    pass


def prepare_ivon_net(net, n_train: int, **options):
    """The skorch net to train for ``posterior='ivon'``.

    A net already mixing in :class:`IVONTrainingMixin` with ``optimizer=IVON``
    keeps its settings (``ess`` defaults to ``n_train``). Any other
    ``NeuralNetClassifier``/``NeuralNet`` is converted: its optimizer becomes
    IVON with :data:`IVON_DEFAULTS` updated by ``options`` (the Adam-style
    ``lr`` and ``optimizer__*`` settings of the net do not carry over).
    """
    ivon = _import_ivon()
    params = net.get_params(deep=False)
    unknown = set(options) - set(IVON_DEFAULTS) - {"ess", "clip_radius", "hess_approx",
                                                   "beta1"}
    if unknown:
        raise ValueError(
            f"unknown IVON options {sorted(unknown)}; allowed: "
            f"{sorted(set(IVON_DEFAULTS) | {'ess', 'clip_radius', 'hess_approx', 'beta1'})}"
        )
    if isinstance(net, IVONTrainingMixin) and params.get("optimizer") is ivon.IVON:
        if "optimizer__ess" not in params:
            net = net.__class__(**params, optimizer__ess=float(n_train))
        return net
    cls = _ivon_net_classes().get(type(net))
    if cls is None:
        raise TypeError(
            f"posterior='ivon' cannot convert a {type(net).__name__} to IVON training; "
            "define class MyNet(skuq.cvp.posterior.IVONTrainingMixin, "
            f"{type(net).__name__}) and pass it with optimizer=ivon.IVON, "
            "optimizer__ess=<number of training rows>"
        )
    opts = {**IVON_DEFAULTS, **options}
    params = {k: v for k, v in params.items() if not k.startswith("optimizer__")}
    params["optimizer"] = ivon.IVON
    params["lr"] = opts.pop("lr")
    params["optimizer__ess"] = float(opts.pop("ess", n_train))
    for k, v in opts.items():
        params[f"optimizer__{k}"] = v
    return cls(**params)


def ivon_posterior(model: nn.Module, net, X=None, y=None, *, device=None, batch_size=None,
                   **options) -> DiagonalWeightPosterior:
    """Read IVON's posterior: ``sigma^2 = 1 / (ess (h + weight_decay))``.

    ``net`` must be a skorch net trained with ``ivon.IVON`` (its
    ``optimizer_``) or an ``ivon.IVON`` optimizer over ``model``'s parameters.

    Examples
    --------
    >>> import torch, ivon
    >>> from skuq.cvp.posterior import ivon_posterior
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = ivon.IVON(model.parameters(), lr=0.1, ess=100, hess_init=1.0)
    >>> post = ivon_posterior(model, opt)
    >>> round(float(post.variances["weight"][0, 0]), 6)  # 1 / (100 * (1 + 1e-4))
    0.009999
    """
    ivon = _import_ivon()
    opt = net if isinstance(net, ivon.IVON) else getattr(net, "optimizer_", None)
    if not isinstance(opt, ivon.IVON):
        raise TypeError(
            "posterior='ivon' reads the posterior from a net trained with the IVON "
            f"optimizer, but this net's optimizer is {type(opt).__name__}. Give an "
            "unfitted skorch net (CVPClassifier trains it with IVON), or choose another "
            "posterior ('laplace_diag', 'l2m', or a {parameter name: variance} mapping)."
        )
    names = {id(p): n for n, p in model.named_parameters()}
    variances = {}
    for group in opt.param_groups:
        var = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"]))
        offset = 0
        for p in group["params"]:
            n = p.numel()
            if id(p) in names:
                variances[names[id(p)]] = var[offset:offset + n].view_as(p).detach().clone()
            offset += n
    if not variances:
        raise ValueError("the IVON optimizer holds none of the network's parameters")
    return DiagonalWeightPosterior(variances)


register_posterior_source("ivon", ivon_posterior, prepare_ivon_net, uses_data=False)


# ------------------------------------------------------------- Laplace (diag)
def laplace_diag_posterior(
    model: nn.Module, net, X, y, *, device, batch_size, prior_precision="marglik",
    curvature: str = "ggn",
) -> DiagonalWeightPosterior:
    """Diagonal Laplace over all weights of the trained (MAP) net, from skuq's engine.

    Variance ``1 / (diag GGN + delta)`` of the summed cross-entropy; ``delta``
    maximizes the Laplace marginal likelihood unless given as a float.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.posterior import laplace_diag_posterior
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(20, 3).numpy(), torch.randint(0, 2, (20,)).numpy()
    >>> post = laplace_diag_posterior(model, model, X, y, device="cpu", batch_size=8)
    >>> sorted(post.variances)
    ['bias', 'weight']
    """
    from .._utils import iter_batches
    from ..curvature import compute_curvature, select_weights
    from ..posterior import posterior_from_curvature

    weights = select_weights(model, "all", example_input=torch.as_tensor(X[:2]).to(device))
    curv = compute_curvature(
        weights, lambda: iter_batches(X, y, batch_size=batch_size, device=device),
        likelihood="classification", structure="diag", curvature=curvature,
    )
    fixed = not isinstance(prior_precision, str)
    post = posterior_from_curvature(
        curv, weights.vector(), prior_precision=float(prior_precision) if fixed else 1.0,
        group_sizes=weights.group_sizes(),
    )
    if not fixed:
        post.optimize_prior_precision("scalar")
    return DiagonalWeightPosterior(weights.unflatten(post.marginal_variance().detach()))


register_posterior_source("laplace_diag", laplace_diag_posterior)
