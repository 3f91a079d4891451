"""The trained optimizer in RegVar's fine-tunes: its groups, cloned state and implied prior.

The fine-tunes continue training with the optimizer the net was trained with
(class, hyperparameters per group, state such as Adam's moments), and the
prior of the regularized objective is the one its weight decay implies. Plain
torch: takes the trained optimizer (or ``None``) and the trainable weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .core import OptimizerFactory


def _decoupled_scale(cls: type, group: dict, state: dict, param: Tensor) -> Tensor:
    """``sqrt(v_hat) + eps`` per weight of an Adam with decoupled weight decay (flat, float64)."""
    if cls not in (torch.optim.Adam, torch.optim.AdamW):  # whose update the formula is
        raise ValueError(
            f"the net was trained with decoupled weight decay ({cls.__name__}), which is "
            "not an L2 term of the loss: the trained weights are not a minimum of loss + "
            "(N wd / 2) ||theta||^2. RegVar derives the implied prior for AdamW (and Adam "
            "with decoupled_weight_decay=True) only. Pass prior_precision=<delta of the "
            "summed loss>, or train with torch.optim.Adam(weight_decay=...)"
        )
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    if not state or key not in state or "step" not in state:
        raise ValueError(
            "the net was trained with AdamW, whose decoupled weight decay implies a prior "
            "that depends on the optimizer's second moments, but the optimizer has none "
            "(never stepped, or its state was dropped). Keep the trained optimizer, or "
            "pass prior_precision=<delta of the summed loss>"
        )
    beta2 = float(group["betas"][1])
    v_hat = state[key].detach().double().cpu() / (1.0 - beta2 ** float(state["step"]))
    return (v_hat.sqrt() + float(group["eps"])).reshape(-1)


def optimizer_spec(
    trainable: list[Tensor],
    trained: torch.optim.Optimizer | None,
    *,
    lr: float | None = None,
    drop_weight_decay: bool = False,
) -> tuple[type, list[dict], list[dict]]:
    """Optimizer class, hyperparameter groups and the trained optimizer's state per weight.

    Parameters
    ----------
    trainable : list of Tensor
        The net's trainable weights, in ``parameters()`` order.
    trained : torch.optim.Optimizer or None
        The optimizer the net trained with; ``None`` for a plain module, which
        gets Adam at ``lr`` (default 1e-3) without weight decay.
    lr : float or None
        Learning rate of the fine-tunes; ``None`` keeps the trained one.
    drop_weight_decay : bool, default=False
        Switch the optimizer's weight decay off (an explicit prior replaces it).

    Returns
    -------
    (cls, groups, state)
        The optimizer class; its hyperparameter groups, each with ``index``
        (positions among ``trainable``); the trained state per weight (empty
        for a plain module).

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar.optim import optimizer_spec
    >>> lin = torch.nn.Linear(2, 1)
    >>> sgd = torch.optim.SGD(lin.parameters(), lr=0.1, weight_decay=1e-2)
    >>> cls, groups, state = optimizer_spec(list(lin.parameters()), sgd, lr=0.01)
    >>> cls.__name__, groups[0]["lr"], groups[0]["index"]
    ('SGD', 0.01, [0, 1])
    """
    position = {id(p): i for i, p in enumerate(trainable)}
    if trained is None:  # a plain module: Adam at the given learning rate, no decay
        lr = 1e-3 if lr is None else float(lr)
        return torch.optim.Adam, [{"lr": lr, "index": list(range(len(trainable)))}], []
    groups, seen = [], set()
    for g in trained.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        idx = [position[id(p)] for p in g["params"] if id(p) in position]
        seen.update(idx)
        if lr is not None:
            hyper["lr"] = float(lr)
        if drop_weight_decay and "weight_decay" in hyper:
            hyper["weight_decay"] = 0.0  # the explicit prior replaces it
        groups.append({**hyper, "index": idx})
    if len(seen) != len(trainable):
        raise ValueError(
            "the net's optimizer does not hold all its trainable parameters; RegVar "
            "fine-tunes every weight with it"
        )
    return type(trained), groups, [trained.state.get(p, {}) for p in trainable]


def optimizer_factory(
    cls: type,
    groups: list[dict],
    state: list[dict],
    trainable: list[Tensor],
    *,
    stacked: bool = False,
) -> OptimizerFactory:
    """``make(params)``: ``cls`` over fine-tuned copies of the weights, from the trained state.

    The copies start from the trained optimizer's state (Adam's moments...),
    so a fine-tune continues training rather than restarting it. With
    ``stacked``, ``params`` is one ``(problems, P)`` tensor of flat weight
    vectors (:func:`~skuq.regvar.exact_covariance`'s ``"optimizer"`` solver).
    ``cls``, ``groups`` and ``state`` are those of :func:`optimizer_spec`;
    ``trainable`` the trained weights (their shapes place the state).
    """

    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        if stacked:
            return stacked_optimizer(cls, groups, state, trainable, params[0])
        return cloned_optimizer(cls, groups, state, params)

    return make


def cloned_optimizer(
    cls: type, groups: list[dict], state: list[dict], params: list[Tensor]
) -> torch.optim.Optimizer:
    """``cls`` over ``params`` (one per trained weight) with copies of the trained state."""
    opt = cls(
        [
            {
                **{k: v for k, v in g.items() if k != "index"},
                "params": [params[i] for i in g["index"]],
            }
            for g in groups
        ]
    )
    for p, s in zip(params, state, strict=False):
        if s:
            opt.state[p] = {
                k: v.clone() if isinstance(v, Tensor) else copy.copy(v) for k, v in s.items()
            }
    return opt


def stacked_optimizer(
    cls: type, groups: list[dict], state: list[dict], params: list[Tensor], theta: Tensor
) -> torch.optim.Optimizer:
    """``cls`` over one ``(problems, P)`` tensor, each row warm-started from the trained state."""
    hypers = [{k: v for k, v in g.items() if k != "index"} for g in groups]
    if any(h != hypers[0] for h in hypers[1:]):
        raise ValueError(
            "exact_solver='optimizer' runs all fine-tunes in one stacked tensor, which needs "
            "one set of optimizer hyperparameters for all weights; the net's optimizer has "
            "several parameter groups. Use exact_solver='lbfgs'"
        )
    opt = cls([{**hypers[0], "params": [theta]}])
    if state and all(state) and all(s.keys() == state[0].keys() for s in state):
        warm = {}
        for key, v in state[0].items():
            if isinstance(v, Tensor) and v.shape == params[0].shape and v.ndim > 0:
                flat = torch.cat([s[key].reshape(-1) for s in state]).to(theta)
                warm[key] = flat.expand_as(theta).clone()
            else:
                warm[key] = v.clone() if isinstance(v, Tensor) else copy.copy(v)
        opt.state[theta] = warm
    return opt


def implied_prior(
    cls: type, groups: list[dict], state: list[dict], trainable: list[Tensor], n_train: int
) -> Tensor:
    """``delta`` per weight (flat, float64): the prior the optimizer's weight decay implies.

    Coupled decay (SGD, Adam, ... ``weight_decay``) adds ``wd theta`` to the
    gradient of the mean loss: ``delta = N wd``. Decoupled decay (AdamW, or
    Adam with ``decoupled_weight_decay=True``) steps by ``lr (m_hat /
    (sqrt(v_hat) + eps) + wd theta)``; where that step vanishes on average,
    the mean gradient is ``-wd (sqrt(v_hat) + eps) theta``, so the trained
    weights are a stationary point of the mean loss plus
    ``(wd / 2) sum_i (sqrt(v_hat_i) + eps) theta_i^2`` (``v_hat`` the
    bias-corrected second moment at the end of training, read from the
    optimizer's state): ``delta_i = N wd (sqrt(v_hat_i) + eps)`` per weight.

    Parameters
    ----------
    cls, groups, state
        As returned by :func:`optimizer_spec`.
    trainable : list of Tensor
        The trained weights.
    n_train : int
        ``N``, the training rows the summed objective runs over.

    Returns
    -------
    Tensor of shape (P,)

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar.optim import implied_prior, optimizer_spec
    >>> lin = torch.nn.Linear(2, 1)
    >>> sgd = torch.optim.SGD(lin.parameters(), lr=0.1, weight_decay=1e-2)
    >>> params = list(lin.parameters())
    >>> implied_prior(*optimizer_spec(params, sgd), params, n_train=100)
    tensor([1., 1., 1.], dtype=torch.float64)
    """
    sizes = [p.numel() for p in trainable]
    parts = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    for g in groups:
        wd = float(g.get("weight_decay", 0.0) or 0.0)
        decoupled = bool(g.get("decoupled_weight_decay", False))
        for i in g["index"]:
            if not decoupled or wd == 0.0:
                parts[i].fill_(n_train * wd)
            else:
                parts[i] = n_train * wd * _decoupled_scale(cls, g, state[i], trainable[i])
    return torch.cat(parts)
