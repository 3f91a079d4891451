"""IVON for CVP: training a skorch net with the IVON optimizer, and reading its posterior.

IVON (Shen et al., 2024) learns a diagonal Gaussian over the weights while it
trains; ``CVPClassifier(posterior="ivon")`` swaps an unfitted skorch net's
optimizer for IVON (:func:`prepare_ivon_net`) and reads
``sigma^2 = 1 / (ess (h + weight_decay))`` from it (:func:`ivon_posterior`).
This module knows skorch (the net classes and their training step).
"""

from __future__ import annotations

import torch
from skorch import NeuralNet, NeuralNetClassifier
from torch import nn

from .posterior import DiagonalWeightPosterior

__all__ = ["IVONTrainingMixin", "IVON_DEFAULTS", "ivon_posterior"]

IVON_INSTALL_HINT = (
    "posterior='ivon' needs the IVON optimizer, an optional extra: "
    "pip install skuq[ivon]  (or: pip install ivon-opt)"
)


#: IVON options used when ``CVPClassifier`` swaps a net's optimizer for IVON. ``lr``:
#: the minimax choice over the comparison's four classification tasks (3 seeds each) of
#: the NLL on a split of their *training* rows, lr in {1, 0.5, 0.3, 0.2, 0.1, 0.05}:
#: 0.2 is at most 1.26x each task's best; 1.0 was 5.3x on the image CNN (it did not train).
IVON_DEFAULTS = {"lr": 0.2, "hess_init": 1.0, "beta2": 0.999, "weight_decay": 1e-4, "mc_samples": 1}


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
    >>> from skuq.cvp.ivon import IVONTrainingMixin
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


# module-level classes so that trained nets pickle
class IVONNeuralNetClassifier(IVONTrainingMixin, NeuralNetClassifier):
    """``skorch.NeuralNetClassifier`` trained with IVON (see :class:`IVONTrainingMixin`)."""


class IVONNeuralNet(IVONTrainingMixin, NeuralNet):
    """``skorch.NeuralNet`` trained with IVON (see :class:`IVONTrainingMixin`)."""


_IVON_NET_CLASSES = {NeuralNetClassifier: IVONNeuralNetClassifier, NeuralNet: IVONNeuralNet}


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
    unknown = set(options) - set(IVON_DEFAULTS) - {"ess", "clip_radius", "hess_approx", "beta1"}
    if unknown:
        raise ValueError(
            f"unknown IVON options {sorted(unknown)}; allowed: "
            f"{sorted(set(IVON_DEFAULTS) | {'ess', 'clip_radius', 'hess_approx', 'beta1'})}"
        )
    if isinstance(net, IVONTrainingMixin) and params.get("optimizer") is ivon.IVON:
        if "optimizer__ess" not in params:
            net = net.__class__(**params, optimizer__ess=float(n_train))
        return net
    cls = _IVON_NET_CLASSES.get(type(net))
    if cls is None:
        raise TypeError(
            f"posterior='ivon' cannot convert a {type(net).__name__} to IVON training; "
            "define class MyNet(skuq.cvp.IVONTrainingMixin, "
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


def ivon_posterior(
    model: nn.Module, net, X=None, y=None, *, device=None, batch_size=None, **options
) -> DiagonalWeightPosterior:
    """Read IVON's posterior: ``sigma^2 = 1 / (ess (h + weight_decay))``.

    ``net`` must be a skorch net trained with ``ivon.IVON`` (its
    ``optimizer_``) or an ``ivon.IVON`` optimizer over ``model``'s parameters.

    Examples
    --------
    >>> import torch, ivon
    >>> from skuq.cvp.ivon import ivon_posterior
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
                variances[names[id(p)]] = var[offset : offset + n].view_as(p).detach().clone()
            offset += n
    if not variances:
        raise ValueError("the IVON optimizer holds none of the network's parameters")
    return DiagonalWeightPosterior(variances)
