"""A curvature read from optimizer state: the second moments Adam-family optimizers keep.

Adam-family optimizers already keep ``v``, an average of squared mini-batch
gradients, for every weight (Perone et al., 2021). Near a minimum the mean
gradient vanishes and ``v`` is the gradient *noise*: for the mean loss over a
batch of ``B`` rows, ``E[g_B^2] ~ (1/B) (1/N) sum_n g_n^2``, so

    sum_n g_n^2  ~  N * B * v_hat

is the diagonal empirical Fisher of the summed loss over the ``N`` training
rows (``scale="fisher"``, the default). Exactly, for batches ``b`` of a fixed
partition averaged with equal weights, ``N B mean_b(g_b^2) = sum_n g_n^2 +
sum_b sum_{n != m in b} g_n g_m``: the cross terms average out only when
``B << N`` and the mean gradient is ~0. Full-batch training (``B = N``) leaves
``(sum_n g_n)^2``, the squared full gradient, which vanishes at convergence.

Plain torch: :func:`second_moments` reads an optimizer's state,
:func:`l2m_curvature` turns it into a diagonal :class:`~skuq.curvature.Curvature`.
The L2M estimators (:mod:`skuq.laplace.l2m`) put the scikit-learn face on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import check_option, check_positive
from .ggn import Curvature
from .weights import WeightSubset

__all__ = [
    "SCALES",
    "SECOND_MOMENT_OPTIMIZERS",
    "l2m_curvature",
    "second_moments",
]

SCALES = ("fisher", "n_train")


def _ema_moment(key: str, beta) -> callable:
    """Reader of an exponential moving average of g^2 kept under ``key``."""

    def read(state: dict, group: dict, bias_correction: bool) -> Tensor:
        v = state[key]
        if not bias_correction:
            return v
        step = float(state["step"])
        return v / (1.0 - beta(group) ** step)

    return read


def _adagrad_moment(state: dict, group: dict, bias_correction: bool) -> Tensor:
    # ``sum`` accumulates g^2 from ``initial_accumulator_value``: its mean over steps is v
    return (state["sum"] - group["initial_accumulator_value"]) / float(state["step"])


def _adamax_moment(state: dict, group: dict, bias_correction: bool) -> Tensor:
    # Adamax keeps a decaying running max of |g|, not an average: its square bounds v above
    return state["exp_inf"] ** 2


#: optimizer class -> reader ``(state, param_group, bias_correction) -> v_hat``
SECOND_MOMENT_OPTIMIZERS: dict[type, callable] = {
    torch.optim.Adam: _ema_moment("exp_avg_sq", lambda g: g["betas"][1]),
    torch.optim.AdamW: _ema_moment("exp_avg_sq", lambda g: g["betas"][1]),
    torch.optim.NAdam: _ema_moment("exp_avg_sq", lambda g: g["betas"][1]),
    torch.optim.RAdam: _ema_moment("exp_avg_sq", lambda g: g["betas"][1]),
    torch.optim.RMSprop: _ema_moment("square_avg", lambda g: g["alpha"]),
    torch.optim.Adagrad: _adagrad_moment,
    torch.optim.Adamax: _adamax_moment,
}


def _reader(optimizer) -> callable:
    for cls in type(optimizer).__mro__:
        if cls in SECOND_MOMENT_OPTIMIZERS:
            return SECOND_MOMENT_OPTIMIZERS[cls]
    names = ", ".join(sorted(c.__name__ for c in SECOND_MOMENT_OPTIMIZERS))
    raise TypeError(
        f"L2M reads the second moment of the gradients that the optimizer keeps, but "
        f"{type(optimizer).__name__} keeps none. Train the net with one of: {names} "
        "(e.g. optimizer=torch.optim.Adam), or use LaplaceClassifier(hessian_structure='diag')"
    )


def second_moments(
    optimizer: torch.optim.Optimizer, params: list[Tensor], bias_correction: bool = True
) -> list[Tensor]:
    """The optimizer's estimate of ``E[g^2]`` for each of ``params``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        An optimizer of :data:`SECOND_MOMENT_OPTIMIZERS` that has taken steps
        over ``params``.
    params : list of Tensor
        Parameters (the optimizer's own tensors, matched by identity).
    bias_correction : bool, default=True
        Divide exponential moving averages by ``1 - beta2^t`` (Adam) or
        ``1 - alpha^t`` (RMSprop), which undoes their start at zero.

    Returns
    -------
    list of Tensor
        One tensor per parameter, of its shape.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature.optimizer import second_moments
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = torch.optim.Adam([w], betas=(0.9, 0.5))
    >>> w.grad = torch.tensor([1.0, 2.0]); opt.step()
    >>> second_moments(opt, [w])[0]  # (1 - 0.5) g^2 / (1 - 0.5^1) = g^2
    tensor([1., 4.])
    """
    read = _reader(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        state = optimizer.state.get(p)
        if id(p) not in group_of:
            raise ValueError(
                "the optimizer does not hold all the network's trainable parameters; give "
                "the optimizer that trained this network"
            )
        if not state or "step" not in state:
            raise ValueError(
                "the optimizer has no second-moment state: the net was never trained with "
                "it (or its state was dropped, e.g. by a save that kept only the weights). "
                "Train it first, or keep the optimizer state"
            )
        v = read(state, group_of[id(p)], bias_correction).detach()
        out.append(v.to(p.dtype).reshape(p.shape))
    return out


def l2m_curvature(
    weights: WeightSubset,
    optimizer: torch.optim.Optimizer,
    *,
    n_train: int,
    train_batch_size: int,
    scale: str | float = "fisher",
    likelihood: str = "classification",
    n_outputs: int,
    loss: float = 0.0,
    bias_correction: bool = True,
    params: list[Tensor] | None = None,
) -> Curvature:
    """The diagonal curvature of the summed training loss from optimizer state.

    Parameters
    ----------
    weights : WeightSubset
        All trainable weights of the network (no subnetwork).
    optimizer : torch.optim.Optimizer
        The optimizer that trained them, minimizing the *mean* loss of a batch.
    n_train, train_batch_size : int
        ``N`` and the training batch size ``B``.
    scale : {"fisher", "n_train"} or float, default="fisher"
        ``h = c * v_hat`` with ``c = N B`` (``"fisher"``: the empirical Fisher
        of the summed loss when the mean gradient has vanished, see the
        module docstring), ``c = N`` (``"n_train"``), or ``c`` given.
    likelihood : {"classification", "regression"}
        For regression the net trains on ``MSELoss`` (mean over rows and the
        ``C`` outputs), whose gradient is ``2/C`` that of ``0.5 * SSE``; the
        result is rescaled by ``C^2 / 4`` to skuq's unit-noise convention.
    n_outputs : int
    loss : float
        Summed training loss at the weights (cross-entropy, or ``0.5 * SSE``),
        for the marginal likelihood.
    bias_correction : bool, default=True
    params : list of Tensor, optional
        The optimizer's own tensors for ``weights`` when the weights' model is a
        copy of the trained one (e.g. on another device); default the weights'.

    Returns
    -------
    Curvature
        ``structure="diag"``, ``curvature="l2m"``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> from skuq.curvature.optimizer import l2m_curvature
    >>> lin = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.Adam(lin.parameters())
    >>> torch.nn.functional.cross_entropy(lin(torch.randn(8, 3)), torch.ones(8).long()).backward()
    >>> opt.step()
    >>> c = l2m_curvature(select_weights(lin), opt, n_train=8, train_batch_size=8, n_outputs=2)
    >>> c.diag.shape, c.curvature
    (torch.Size([8]), 'l2m')
    """
    if weights.indices is not None:
        raise ValueError("L2M covers whole parameter tensors, not a subnetwork")
    if isinstance(scale, str):
        check_option("scale", scale, SCALES)
        factor = float(n_train) * (float(train_batch_size) if scale == "fisher" else 1.0)
    else:
        check_positive("scale", scale)
        factor = float(scale)
    if likelihood == "regression":
        factor *= n_outputs**2 / 4.0
    params = weights.params() if params is None else params
    v = torch.cat(
        [
            m.reshape(-1).to(weights.device)
            for m in second_moments(optimizer, params, bias_correction)
        ]
    )
    if not bool(torch.isfinite(v).all()):
        raise FloatingPointError(
            "the optimizer's second moments contain NaN or inf: training diverged"
        )
    return Curvature(
        "diag",
        "l2m",
        likelihood,
        int(n_train),
        int(n_outputs),
        float(loss),
        diag=factor * v.clamp_min(0),
        info={"factor": factor},
    )
