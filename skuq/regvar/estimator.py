"""RegVar: uncertainty from the variation of predictions due to regularization.

McInerney & Kallus (AISTATS 2025): a prediction that moves more when the
regularization of the training objective is perturbed is less certain. Write
the training objective as a negative log posterior over all weights,

    R(theta) = sum_n loss_n(theta) + (delta / 2) ||theta||^2,

with ``loss_n`` the net's own per-row loss and ``delta = N * weight_decay``
(the weight decay of the net's optimizer is an L2 term added to the gradient
of the *mean* loss, so ``N`` times it is the prior precision of the summed
objective). Perturbing ``R`` to ``R - lam f_k(x*)`` moves its minimizer by
``lam H^-1 J_k(x*)^T`` to first order (``H`` the true Hessian of ``R`` at
``theta*``, ``J`` the Jacobian of the outputs), hence

    (f_j(x*; theta_lam) - f_j(x*; theta*)) / lam  ->  [J H^-1 J^T]_jk   (lam -> 0),

the ``(j, k)`` entry of the linearized-Laplace covariance with the *Hessian*,
not the Gauss-Newton. Two ways to use it:

* ``exact`` (:func:`exact_covariance`, the reference): for every query row and
  output, fine-tune ``R - lam f_k(x*)`` from ``theta*`` and read one column of
  the covariance. The default solver is full-batch L-BFGS in float64 on the
  rescaled displacement ``u = (theta - theta*) / lam`` (well conditioned for
  every ``lam``), with the training gradient at ``theta*`` subtracted so that
  ``theta*`` is an exact optimum of the fine-tuned objective, as the theorem
  assumes. All (row, output) problems of a chunk are solved at once: their sum
  is separable, so its minimizer is theirs, and ``torch.func.vmap`` evaluates
  them in one pass over the training data. Costly: ``rows x outputs``
  fine-tunes.
* ``amortized`` (:func:`finetune_pair`, the scalable form of the paper's
  pseudocode): two warm-started fine-tunes with the net's optimizer on the
  training batches, one of ``loss + (lam / N) mean|f(x_batch)|``, one of the
  loss alone, in lockstep on the same batches (so the optimizer's drift away
  from ``theta*`` cancels), each averaging its last iterates. For any ``x``
  it returns ``|f_k(x; theta_lam) - f_k(x; theta_0)| / lam``, two forward
  passes. This is *not* a variance: one perturbation moves the optimum along
  one direction ``H^-1 u`` (``u`` the gradient of the regularizer), so the
  score tends to ``|J_k(x) H^-1 u|`` -- linear in ``J(x)``, a covariance with
  one training direction, zero on the hyperplane ``J(x) H^-1 u = 0`` however
  uncertain ``x`` is. Recovering ``J H^-1 J^T`` needs perturbations that span
  ``J(x)`` (the exact mode: one per query and output). Hence ``"exact"`` is
  the default and ``"amortized"`` an opt-in, uncalibrated sensitivity score.

The core functions are plain torch; :class:`RegVarClassifier` and
:class:`RegVarRegressor` put the scikit-learn face on them.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ._skorch import criterion_outputs
from ._utils import check_option, check_positive, check_positive_int, progress
from .base import BaseUQEstimator, UQClassifierMixin, UQRegressorMixin
from .curvature import select_weights
from .outputs import LINKS, OutputDistribution
from .posterior import center_outputs

__all__ = [
    "EXACT_SOLVERS",
    "MODES",
    "RegVarClassifier",
    "RegVarConvergenceWarning",
    "RegVarRegressor",
    "amortized_variance",
    "exact_covariance",
    "finetune_pair",
]

MODES = ("amortized", "exact")
EXACT_SOLVERS = ("lbfgs", "optimizer")

#: ``loss(outputs, targets) -> scalar``: the MEAN loss over a batch's rows
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``optimizer(params) -> torch.optim.Optimizer`` over the given tensors
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


class RegVarConvergenceWarning(UserWarning):
    """An exact-mode fine-tune stopped before its gradient reached the tolerance.

    Examples
    --------
    >>> from skuq.regvar import RegVarConvergenceWarning
    >>> issubclass(RegVarConvergenceWarning, UserWarning)
    True
    """


# ----------------------------------------------------------------- helpers
def _check_lam(lam) -> None:
    if not (isinstance(lam, numbers.Real) and not isinstance(lam, (bool, np.bool_))
            and math.isfinite(lam) and lam > 0):
        raise ValueError(
            f"lam must be a finite number > 0 (the size of the regularization "
            f"perturbation; RegVar divides by it), got {lam!r}"
        )


def _check_loss_value(value, what: str = "the loss") -> Tensor:
    """A loss RegVar can fine-tune on: a finite scalar tensor with a gradient."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(
            f"RegVar fine-tunes the network on its training loss, but {what} returned "
            f"{shape} instead of a scalar tensor: use a criterion with reduction='mean'"
        )
    if not value.requires_grad:
        raise TypeError(
            f"RegVar fine-tunes the network on its training loss, but {what} is not "
            "differentiable in the network's weights (it carries no gradient: a criterion "
            "that detaches, rounds or thresholds the outputs). Train the net with a "
            "differentiable criterion such as torch.nn.CrossEntropyLoss or MSELoss"
        )
    return value.reshape(())


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _per_param(prior_precision, params: Sequence[Tensor]) -> list[Tensor] | None:
    """A prior precision (float, or a flat tensor over ``params``) cut per tensor."""
    if prior_precision is None:
        return None
    if not isinstance(prior_precision, Tensor):
        if float(prior_precision) == 0.0:
            return None
        return [torch.full_like(p, float(prior_precision)) for p in params]
    flat = prior_precision.reshape(-1)
    n = sum(p.numel() for p in params)
    if flat.numel() == 1:
        return _per_param(float(flat), params)
    if flat.numel() != n:
        raise ValueError(f"prior_precision has {flat.numel()} entries, the weights {n}")
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape).to(p))
        start += p.numel()
    return out


def _flat_prior(prior_precision, n_params: int, like: Tensor) -> Tensor:
    """The prior precision as a flat (P,) tensor (zeros for None)."""
    if prior_precision is None:
        return torch.zeros(n_params, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(prior_precision, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        return t.expand(n_params).clone()
    if t.numel() != n_params:
        raise ValueError(f"prior_precision has {t.numel()} entries, the weights {n_params}")
    return t


def _as_data(X, y, device, dtype) -> tuple[Tensor, Tensor]:
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if X.is_floating_point():
        X = X.to(dtype)
    if y.is_floating_point():
        y = y.to(dtype)
    return X, y


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    """One epoch of shuffled row indices (on the CPU), from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(n, generator=generator, device=device).cpu()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _stacked(fn: Callable[..., tuple[Tensor, Tensor]], *args: Tensor) -> tuple[Tensor, Tensor]:
    """``fn`` over the rows of ``args``, vectorized with ``vmap`` where it can be."""
    try:
        return vmap(fn)(*args)
    except (RuntimeError, NotImplementedError):  # an op torch.func cannot batch: a loop
        parts = [fn(*row) for row in zip(*args, strict=True)]
        return tuple(torch.stack(p) for p in zip(*parts, strict=True))


def _loss_and_query_output(weights, loss, xb, yb):
    """``(t, x*, e_k) -> (loss of the batch, f_k(x*))`` at weights ``t``, in ONE forward pass
    (the query row rides along with the batch; the net acts on rows independently)."""

    def fn(t: Tensor, xq: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        out = weights.forward(t, torch.cat([xb, xq.unsqueeze(0)]))
        return loss(out[:-1], yb), (out[-1] * onehot).sum()

    return fn


def _finite_or_raise(tensors, what: str, hint: str) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"{what} contains NaN or inf: {hint}")


# ---------------------------------------------------------------- amortized
def finetune_pair(
    model: nn.Module,
    X: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    loss: LossFn,
    *,
    lam: float,
    optimizer: OptimizerFactory,
    n_epochs: int = 5,
    batch_size: int = 64,
    n_average: int = 100,
    prior_precision: float | Tensor | None = None,
    generator: torch.Generator | None = None,
    verbose: int = 0,
) -> tuple[nn.Module, nn.Module]:
    """The two warm-started fine-tunes of amortized RegVar.

    Both start from copies of ``model`` (in eval mode: no dropout, fixed batch
    statistics) and take the same steps on the same shuffled batches, one
    minimizing ``loss + (lam / N) * mean|f(x_batch)|`` (the output regularizer,
    mean over rows and outputs), the other ``loss`` alone; whatever the
    optimizer does besides the perturbation (drift away from ``model``'s
    weights, SGD noise) is common to both and cancels in their difference.
    Each returns the average of its last ``n_average`` iterates.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network (left unchanged).
    X, y : Tensor or ndarray
        Training inputs and targets, batched onto ``model``'s device.
    loss : callable
        ``loss(model(x_batch), y_batch)``, the mean loss of a batch (the
        objective the net was trained on).
    lam : float
        Size ``lam > 0`` of the perturbation.
    optimizer : callable
        ``optimizer(params) -> torch.optim.Optimizer``; called once per copy
        with its trainable parameters in ``model.parameters()`` order. Its
        weight decay is the prior.
    n_epochs : int, default=5
        Passes over the data of each fine-tune.
    batch_size : int, default=64
    n_average : int, default=100
        Last iterates averaged (at most all steps).
    prior_precision : float, Tensor or None
        ``delta`` of an explicit ``(delta / 2) ||theta||^2`` in the summed
        objective (added to the batch loss as ``delta / (2 N) ||theta||^2``),
        for an optimizer without weight decay.
    generator : torch.Generator, optional
        Shuffles the batches.
    verbose : int, default=0

    Returns
    -------
    (model_lam, model_0) : tuple of torch.nn.Module
        The fine-tuned copies, in eval mode, without gradients.

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar import amortized_variance, finetune_pair
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> adam = lambda params: torch.optim.Adam(params, lr=1e-3, weight_decay=1e-2)
    >>> m_lam, m_0 = finetune_pair(net, X, y, torch.nn.functional.cross_entropy, lam=1e-2,
    ...                            optimizer=adam, n_epochs=2, batch_size=16)
    >>> var = amortized_variance(m_lam, m_0, X[:5], lam=1e-2)
    >>> var.shape, bool((var >= 0).all())
    (torch.Size([5, 2]), True)
    """
    _check_lam(lam)
    check_positive_int("n_epochs", n_epochs)
    check_positive_int("batch_size", batch_size)
    check_positive_int("n_average", n_average)
    first = next(model.parameters())
    X, y = _as_data(X, y, first.device, first.dtype)
    n = len(X)
    models = [copy.deepcopy(model).eval() for _ in range(2)]  # [perturbed, reference]
    params = [_trainable(m) for m in models]
    opts = [optimizer(ps) for ps in params]
    priors = [_per_param(prior_precision, ps) for ps in params]
    total = n_epochs * -(-n // batch_size)
    n_avg = min(n_average, total)
    sums = [[torch.zeros_like(p) for p in ps] for ps in params]
    step = 0
    for _ in progress(range(n_epochs), verbose, "RegVar fine-tune"):
        for idx in _batches(n, batch_size, generator):
            xb, yb = X[idx].to(first.device), y[idx].to(first.device)
            for which in (0, 1):
                opts[which].zero_grad(set_to_none=True)
                out = models[which](xb)
                obj = _check_loss_value(loss(out, yb))
                if which == 0:
                    obj = obj + (lam / n) * out.abs().mean()
                if priors[which] is not None:
                    penalty = sum((d * p**2).sum() for d, p in zip(priors[which], params[which],
                                                                  strict=True))
                    obj = obj + penalty / (2 * n)
                obj.backward()
                opts[which].step()
            step += 1
            if step > total - n_avg:
                with torch.no_grad():
                    for acc, ps in zip(sums, params, strict=True):
                        torch._foreach_add_(acc, [p.detach() for p in ps])
    with torch.no_grad():
        for acc, ps in zip(sums, params, strict=True):
            for a, p in zip(acc, ps, strict=True):
                p.copy_(a / n_avg)
    _finite_or_raise(
        [p for ps in params for p in ps], "the fine-tuned weights",
        "the fine-tune diverged; lower the fine-tuning learning rate or lam",
    )
    for m in models:
        m.requires_grad_(False)
    return models[0], models[1]


def amortized_variance(model_lam: nn.Module, model_0: nn.Module, x: Tensor, lam: float) -> Tensor:
    """``|f(x; theta_lam) - f(x; theta_0)| / lam`` per row and output.

    Evaluated in the nets' dtype (``x`` is cast to it). The difference is small
    next to the outputs themselves, so float32 rounding of each (which depends on
    the batch shape) is amplified by ``1 / lam``; nets converted to float64 give
    a difference that rounding does not move.

    Parameters
    ----------
    model_lam, model_0 : torch.nn.Module
        The two fine-tuned nets of :func:`finetune_pair`.
    x : Tensor of shape (B, ...)
    lam : float

    Returns
    -------
    Tensor of shape (B, C)

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar import amortized_variance
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> amortized_variance(a, b, torch.zeros(3, 2), lam=0.5).shape
    torch.Size([3, 1])
    """
    _check_lam(lam)
    dtype = next(model_lam.parameters()).dtype
    with torch.no_grad():
        x = x.to(dtype) if x.is_floating_point() else x
        return (model_lam(x) - model_0(x)).abs() / lam


# -------------------------------------------------------------------- exact
def exact_covariance(
    model: nn.Module,
    X: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    queries: Tensor,
    loss: LossFn,
    *,
    lam: float,
    prior_precision: float | Tensor | None = None,
    solver: str = "lbfgs",
    batch_size: int = 256,
    max_iter: int = 500,
    tol: float = 1e-9,
    max_problems: int = 64,
    optimizer: OptimizerFactory | None = None,
    n_epochs: int = 20,
    train_batch_size: int = 64,
    n_average: int = 100,
    generator: torch.Generator | None = None,
    verbose: int = 0,
) -> Tensor:
    """Exact RegVar: one fine-tune of ``R - lam f_k(x*)`` per query row and output.

    ``R(theta) = sum_n loss_n(theta) + (delta / 2) ||theta||^2`` is the
    negative log posterior, with ``loss_n`` the per-row loss (``loss`` of a
    batch times its rows). Column ``k`` of row ``q``'s covariance is
    ``(f(x_q; theta_lam) - f(x_q; theta_ref)) / lam``; the result is
    symmetrized. As ``lam -> 0`` it tends to ``J H^-1 J^T`` with ``H`` the
    Hessian of ``R`` at ``model``'s weights (if that is a strict minimum).

    Parameters
    ----------
    model : torch.nn.Module
        The trained network (left unchanged); every trainable weight counts.
    X, y : Tensor or ndarray
        The training data ``R`` sums over.
    queries : Tensor of shape (Q, ...)
        Rows to get the covariance of.
    loss : callable
        ``loss(outputs, targets)``: the mean loss over a batch; must work
        under :func:`torch.func.vmap` for the vectorized path (a loop is
        used otherwise).
    lam : float
        Perturbation size ``> 0``.
    prior_precision : float, Tensor of shape (P,) or None
        ``delta`` (per weight or one for all). With ``solver="lbfgs"`` this
        is the whole prior; with ``solver="optimizer"`` it is added to the
        optimizer's own weight decay.
    solver : {"lbfgs", "optimizer"}, default="lbfgs"
        ``"lbfgs"``: full-batch L-BFGS (strong Wolfe line search) in float64
        on ``u = (theta - theta*) / lam``, minimizing
        ``[R(theta) - g*^T theta - lam f_k(x*; theta)] / lam^2`` with
        ``g* = grad R(theta*)`` (zero at a converged minimum; subtracting it
        makes ``theta*`` the reference optimum). ``"optimizer"``: mini-batch
        fine-tunes with ``optimizer`` on all problems at once (their weights
        stacked in one ``(problems + 1, P)`` tensor, so an elementwise
        optimizer -- SGD, Adam, RMSprop... -- runs them independently), the
        last row a reference fine-tune of ``R`` alone on the same batches;
        each averages its last ``n_average`` iterates. For nets too big for
        float64 full-batch passes; less accurate.
    batch_size : int, default=256
        Rows per pass of the full-batch objective (``"lbfgs"``).
    max_iter : int, default=500
        L-BFGS iterations per chunk of problems.
    tol : float, default=1e-9
        L-BFGS stops when the largest gradient entry falls below ``tol`` times
        its value at the start, or when the line search can make no more
        progress: the rescaled objective's value carries rounding of order
        ``1e-16 R / lam^2``, which ends the search near a relative gradient of
        ``1e-5`` at ``lam = 1e-3`` -- far below the ``O(lam)`` bias of a finite
        ``lam``. Above ``1e-3`` a :class:`RegVarConvergenceWarning` is issued.
    max_problems : int, default=64
        (row, output) problems solved together; memory grows with it.
    optimizer : callable, optional
        ``optimizer([theta]) -> Optimizer`` for ``solver="optimizer"``.
    n_epochs, train_batch_size, n_average : int
        Length, batch size and averaging of ``solver="optimizer"`` runs.
    generator : torch.Generator, optional
        Shuffles the batches (``"optimizer"``).
    verbose : int, default=0

    Returns
    -------
    Tensor of shape (Q, C, C)
        In float64 for ``"lbfgs"``, else ``model``'s dtype.

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar import exact_covariance
    >>> X, y = torch.randn(20, 2), torch.randn(20, 1)
    >>> lin = torch.nn.Linear(2, 1)
    >>> cov = exact_covariance(lin, X, y, torch.zeros(3, 2), torch.nn.functional.mse_loss,
    ...                        lam=1e-3, prior_precision=1.0)
    >>> cov.shape
    torch.Size([3, 1, 1])
    """
    _check_lam(lam)
    check_option("solver", solver, EXACT_SOLVERS)
    check_positive_int("max_problems", max_problems)
    if solver == "lbfgs":
        work = copy.deepcopy(model).double().eval()
    else:
        if optimizer is None:
            raise ValueError("solver='optimizer' needs an optimizer factory")
        work = copy.deepcopy(model).eval()
    weights = select_weights(work, "all")
    theta = weights.vector()
    X, y = _as_data(X, y, theta.device, theta.dtype)
    queries = torch.as_tensor(queries).to(theta.device, theta.dtype)
    with torch.no_grad():
        f_star = work(queries)
    n_rows, n_out = f_star.shape
    delta = _flat_prior(prior_precision, weights.n_params, theta)
    rows = torch.arange(n_rows, device=theta.device).repeat_interleave(n_out)
    outs = torch.arange(n_out, device=theta.device).repeat(n_rows)
    cov = torch.zeros(n_rows, n_out, n_out, dtype=theta.dtype, device=theta.device)
    chunks = list(range(0, len(rows), max_problems))
    if solver == "lbfgs":
        R0, g0 = _objective_at(weights, theta, X, y, loss, delta, batch_size)
    for start in progress(chunks, verbose, "RegVar exact"):
        q = rows[start : start + max_problems]
        k = outs[start : start + max_problems]
        if solver == "lbfgs":
            thetas = _solve_lbfgs(weights, theta, X, y, loss, delta, queries[q], k, lam,
                                  R0, g0, batch_size, max_iter, tol)
            reference = f_star[q]
        else:
            thetas, ref = _solve_optimizer(weights, theta, X, y, loss, delta, queries[q], k,
                                           lam, optimizer, n_epochs, train_batch_size,
                                           n_average, generator)
            with torch.no_grad():
                reference = weights.forward(ref, queries[q])
        with torch.no_grad():
            f_lam = vmap(lambda t, x: weights.forward(t, x.unsqueeze(0)).squeeze(0))(
                thetas, queries[q])
        cov[q, :, k] = (f_lam - reference) / lam
    _finite_or_raise([cov], "the exact RegVar covariance",
                     "the fine-tune diverged; lower lam, or check that the net is trained "
                     "to a minimum of its regularized loss")
    return 0.5 * (cov + cov.transpose(1, 2))


def _objective_at(weights, theta, X, y, loss, delta, batch_size) -> tuple[Tensor, Tensor]:
    """``R(theta)`` and its gradient, accumulated over batches."""
    t = theta.detach().clone().requires_grad_(True)
    value = torch.zeros((), dtype=theta.dtype, device=theta.device)
    grad = torch.zeros_like(theta)
    for start in range(0, len(X), batch_size):
        xb = X[start : start + batch_size].to(theta.device)
        yb = y[start : start + batch_size].to(theta.device)
        part = _check_loss_value(loss(weights.forward(t, xb), yb)) * len(xb)
        (g,) = torch.autograd.grad(part, t)
        value += part.detach()
        grad += g
    value += 0.5 * (delta * theta**2).sum()
    return value, grad + delta * theta


def _solve_lbfgs(weights, theta, X, y, loss, delta, xq, k, lam, R0, g0, batch_size,
                 max_iter, tol) -> Tensor:
    """Minimizers ``theta* + lam u`` of the rescaled problems of one chunk, (M, P)."""
    m = len(k)
    U = torch.zeros(m, weights.n_params, dtype=theta.dtype, device=theta.device,
                    requires_grad=True)
    with torch.no_grad():
        f_q = weights.forward(theta, xq)
    onehot = F.one_hot(k, f_q.shape[1]).to(theta)
    f_star = (f_q * onehot).sum(1)
    R0_data = R0 - 0.5 * (delta * theta**2).sum()

    def closure():
        U.grad = None
        value = torch.zeros((), dtype=theta.dtype, device=theta.device)
        for start in range(0, len(X), batch_size):
            xb = X[start : start + batch_size].to(theta.device)
            yb = y[start : start + batch_size].to(theta.device)
            data, f_k = _stacked(_loss_and_query_output(weights, loss, xb, yb),
                                 theta + lam * U, xq, onehot)
            part = data.sum() * len(xb)
            if start == 0:  # the perturbation -lam f_k(x*), relative to f_k(x*; theta*)
                part = part - lam * (f_k - f_star).sum()
            (part / lam**2).backward()
            value += part.detach()
        # exact differences: no cancellation in the prior or the tilt
        rest = (0.5 * (delta * (2 * lam * theta * U + lam**2 * U**2)).sum()
                - lam * (U @ g0).sum()) / lam**2
        rest.backward()
        return (value - m * R0_data) / lam**2 + rest.detach()

    opt = torch.optim.LBFGS([U], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=0.0, tolerance_change=0.0, history_size=50,
                            line_search_fn="strong_wolfe")
    closure()
    scale = max(float(U.grad.abs().max()), 1e-300)
    opt.param_groups[0]["tolerance_grad"] = tol * scale
    opt.step(closure)
    closure()
    final = float(U.grad.abs().max()) / scale
    if not final <= _LBFGS_WARN:
        warnings.warn(
            f"exact RegVar: L-BFGS stopped at a relative gradient of {final:.1e}, so these "
            "variances are unreliable. Either the iteration limit (exact_max_iter) is too "
            "low, or the trained weights are not a strict minimum of the regularized loss "
            "(train to convergence, or add weight decay / prior_precision)",
            RegVarConvergenceWarning, stacklevel=3,
        )
    return (theta + lam * U).detach()


#: relative gradient above which an L-BFGS solve is reported as unconverged
_LBFGS_WARN = 1e-3


def _solve_optimizer(weights, theta, X, y, loss, delta, xq, k, lam, optimizer, n_epochs,
                     batch_size, n_average, generator) -> tuple[Tensor, Tensor]:
    """Mini-batch fine-tunes of one chunk's problems and a reference, stacked in one tensor."""
    m, n = len(k), len(X)
    Theta = theta.detach().unsqueeze(0).repeat(m + 1, 1).requires_grad_(True)
    with torch.no_grad():
        n_out = weights.forward(theta, xq[:1]).shape[1]
    onehot = F.one_hot(k, n_out).to(theta)
    # the reference row carries no perturbation: a zero one-hot
    onehot = torch.cat([onehot, torch.zeros_like(onehot[:1])])
    xq = torch.cat([xq, xq[:1]])
    opt = optimizer([Theta])
    total = n_epochs * -(-n // batch_size)
    n_avg = min(n_average, total)
    acc = torch.zeros_like(Theta)
    use_prior = bool((delta != 0).any())
    step = 0
    for _ in range(n_epochs):
        for idx in _batches(n, batch_size, generator):
            xb, yb = X[idx].to(theta.device), y[idx].to(theta.device)
            opt.zero_grad(set_to_none=True)
            losses, f_k = _stacked(_loss_and_query_output(weights, loss, xb, yb),
                                   Theta, xq, onehot)
            obj = losses.sum() - (lam / n) * f_k.sum()
            if use_prior:
                obj = obj + (delta * Theta**2).sum() / (2 * n)
            obj.backward()
            opt.step()
            step += 1
            if step > total - n_avg:
                acc += Theta.detach()
    avg = acc / n_avg
    _finite_or_raise([avg], "the fine-tuned weights",
                     "the fine-tune diverged; lower the fine-tuning learning rate or lam")
    return avg[:m], avg[m]


def _nearest_psd(cov: Tensor) -> Tensor:
    """Eigenvalues clipped at zero: finite-lam estimates can be slightly indefinite."""
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs * evals.clamp_min(0).unsqueeze(-2)) @ evecs.transpose(-1, -2)


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


# -------------------------------------------------------------- estimators
class _BaseRegVar(BaseUQEstimator):
    """Shared fitting and prediction of the RegVar estimators."""

    # the comparison benchmark predicts thousands of rows, one exact fine-tune per row and
    # class; its RegVar rows are the amortized score, and are labeled so in the docs
    _benchmark_hints = {"init_params": {"mode": "amortized"}}

    def _validate_options(self) -> None:
        check_option("mode", self.mode, MODES)
        _check_lam(self.lam)
        check_positive_int("finetune_epochs", self.finetune_epochs)
        check_positive("finetune_lr", self.finetune_lr, allow_none=True)
        check_positive_int("n_average", self.n_average)
        check_positive("variance_scale", self.variance_scale)
        check_positive("prior_precision", self.prior_precision, allow_none=True, strict=False)
        check_option("exact_solver", self.exact_solver, EXACT_SOLVERS)
        check_positive_int("exact_max_iter", self.exact_max_iter)
        self._validate_likelihood_options()

    # ---------------------------------------------------- the net's objective
    def _is_skorch(self) -> bool:
        return hasattr(self.net_, "get_loss") and hasattr(self.net_, "criterion_")

    def _loss(self) -> LossFn:
        """The mean batch loss the net trained on, as a function of ``model_``'s outputs."""
        if not self._is_skorch():
            return self._default_loss
        net = self.net_
        reduction = getattr(net.criterion_, "reduction", "mean")
        if reduction != "mean":
            raise ValueError(
                f"RegVar reads the net's criterion as the mean loss of a batch, but it uses "
                f"reduction={reduction!r}; train with reduction='mean' (torch's default)"
            )
        probabilities = self._is_classifier() and criterion_outputs(net) == "probabilities"

        def loss(f: Tensor, y: Tensor) -> Tensor:
            # model_ outputs logits; an NLLLoss net's own module outputs their softmax
            pred = torch.softmax(f, dim=-1) if probabilities else f
            if not self._is_classifier():
                y = y.reshape(pred.shape)
            return net.get_loss(pred, y, training=True)

        return loss

    def _optimizer_spec(self) -> tuple[type, list[dict], list[dict]]:
        """Optimizer class, hyperparameter groups (``index``: positions among the
        trainable weights) and the trained optimizer's state per weight."""
        trainable = _trainable(self.model_)
        position = {id(p): i for i, p in enumerate(trainable)}
        trained = getattr(self.net_, "optimizer_", None) if self._is_skorch() else None
        if trained is None:  # a plain module: Adam at the given learning rate, no decay
            lr = 1e-3 if self.finetune_lr is None else float(self.finetune_lr)
            return torch.optim.Adam, [{"lr": lr, "index": list(range(len(trainable)))}], []
        groups, seen = [], set()
        for g in trained.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            idx = [position[id(p)] for p in g["params"] if id(p) in position]
            seen.update(idx)
            if self.finetune_lr is not None:
                hyper["lr"] = float(self.finetune_lr)
            if self.prior_precision is not None and "weight_decay" in hyper:
                hyper["weight_decay"] = 0.0  # the explicit prior replaces it
            groups.append({**hyper, "index": idx})
        if len(seen) != len(trainable):
            raise ValueError(
                "the net's optimizer does not hold all its trainable parameters; RegVar "
                "fine-tunes every weight with it"
            )
        return type(trained), groups, [trained.state.get(p, {}) for p in trainable]

    def _optimizer_factory(self, stacked: bool = False) -> OptimizerFactory:
        """``make(params)``: the net's optimizer over fine-tuned copies of its weights.

        The copies start from the trained optimizer's state (Adam's moments...),
        so a fine-tune continues training rather than restarting it. With
        ``stacked``, ``params`` is one ``(problems, P)`` tensor of flat weight
        vectors (:func:`exact_covariance`'s ``"optimizer"`` solver).
        """
        cls, groups, state = self._optimizer_spec()

        def make(params: list[Tensor]) -> torch.optim.Optimizer:
            if stacked:
                return self._stacked_optimizer(cls, groups, state, params[0])
            opt = cls([{**{k: v for k, v in g.items() if k != "index"},
                        "params": [params[i] for i in g["index"]]} for g in groups])
            for p, s in zip(params, state, strict=False):
                if s:
                    opt.state[p] = {k: v.clone() if isinstance(v, Tensor) else copy.copy(v)
                                    for k, v in s.items()}
            return opt

        return make

    def _stacked_optimizer(self, cls, groups, state, theta) -> torch.optim.Optimizer:
        hypers = [{k: v for k, v in g.items() if k != "index"} for g in groups]
        if any(h != hypers[0] for h in hypers[1:]):
            raise ValueError(
                "exact_solver='optimizer' runs all fine-tunes in one stacked tensor, which needs "
                "one set of optimizer hyperparameters for all weights; the net's optimizer has "
                "several parameter groups. Use exact_solver='lbfgs'"
            )
        opt = cls([{**hypers[0], "params": [theta]}])
        params = _trainable(self.model_)
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

    def _weight_decay_prior(self, n_train: int) -> Tensor:
        """``delta`` per weight: the prior the optimizer's weight decay implies, or the given one.

        Coupled decay (SGD, Adam, ... ``weight_decay``) adds ``wd theta`` to the
        gradient of the mean loss: ``delta = N wd``. Decoupled decay (AdamW, or
        Adam with ``decoupled_weight_decay=True``) steps by ``lr (m_hat /
        (sqrt(v_hat) + eps) + wd theta)``; where that step vanishes on average,
        the mean gradient is ``-wd (sqrt(v_hat) + eps) theta``, so the trained
        weights are a stationary point of the mean loss plus
        ``(wd / 2) sum_i (sqrt(v_hat_i) + eps) theta_i^2`` (``v_hat`` the
        bias-corrected second moment at the end of training, read from the
        optimizer's state): ``delta_i = N wd (sqrt(v_hat_i) + eps)`` per weight.
        """
        trainable = _trainable(self.model_)
        sizes = [p.numel() for p in trainable]
        if self.prior_precision is not None:
            return torch.full((sum(sizes),), float(self.prior_precision), dtype=torch.float64)
        cls, groups, state = self._optimizer_spec()
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

    def _train_batch_size(self, n_train: int) -> int:
        if not self._is_skorch():
            return min(self.batch_size, n_train)
        params = self.net_.get_params()
        b = params.get("iterator_train__batch_size", self.net_.batch_size)
        return n_train if b is None or b < 0 else min(int(b), n_train)

    def _check_differentiable(self, X, y, loss) -> None:
        rows = slice(0, min(len(X), 8))
        xb = torch.as_tensor(X[rows]).to(self.device_)
        yb = torch.as_tensor(y[rows]).to(self.device_)
        value = _check_loss_value(loss(self.model_(xb), yb), "the net's loss")
        grads = torch.autograd.grad(value, _trainable(self.model_), allow_unused=True)
        if all(g is None for g in grads):
            raise TypeError(
                "RegVar fine-tunes the network on its training loss, but the loss does not "
                "depend on any trainable weight; train with a differentiable criterion"
            )

    # ------------------------------------------------------------------- fit
    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        y_net = self._net_target(y)
        loss = self._loss()
        self._check_differentiable(X, y_net, loss)
        n = len(X)
        delta = self._weight_decay_prior(n)
        uniform = bool((delta == delta[0]).all())
        self.prior_precision_ = float(delta[0]) if uniform else delta.numpy()
        self.n_params_ = int(delta.numel())
        self.variance_factor_ = self._variance_factor()
        if self.mode == "amortized":
            explicit = None if self.prior_precision is None else float(self.prior_precision)
            pair = finetune_pair(
                self.model_, torch.as_tensor(X), torch.as_tensor(y_net), loss, lam=self.lam,
                optimizer=self._optimizer_factory(), n_epochs=self.finetune_epochs,
                batch_size=self._train_batch_size(n), n_average=self.n_average,
                prior_precision=explicit, generator=self._generator(), verbose=self.verbose,
            )
            # the difference of two nearby nets, taken in float64 (see amortized_variance)
            self.finetuned_ = tuple(m.double() for m in pair)
        else:
            self.finetuned_ = None
            self._train_data = (X, y_net)

    def _variance_factor(self) -> float:
        return 1.0

    # --------------------------------------------------------------- predict
    def _predict_batch(self, x: Tensor) -> OutputDistribution:
        with torch.no_grad():
            mean = self.model_(x)
        if self.mode == "amortized":
            cov = amortized_variance(*self.finetuned_, x, self.lam)
        else:
            cov = self._exact(x)
        cov = cov.to(torch.float64) * (self.variance_scale * self.variance_factor_)
        centered = None
        if self._centered_link() and cov.ndim == 3:
            centered = center_outputs(center_outputs(cov, 1), 2).float()  # before rounding
        if not bool(torch.isfinite(cov).all()):
            raise FloatingPointError(
                "RegVar's predicted variance contains NaN or inf on these inputs (the two "
                "fine-tuned nets' outputs overflow or differ by inf): the inputs are far out of "
                "the training range, or the fine-tune was unstable. Scale the inputs, lower "
                "finetune_lr or lam; no variance is returned"
            )
        return OutputDistribution.gaussian(mean.float(), cov.float(), centered)

    def _exact(self, x: Tensor) -> Tensor:
        X, y = self._train_data
        delta = self._weight_decay_prior(len(X))
        common = dict(lam=self.lam, batch_size=self.batch_size, verbose=self.verbose)
        if self.exact_solver == "lbfgs":
            cov = exact_covariance(self.model_, X, y, x, self._loss(), prior_precision=delta,
                                   max_iter=self.exact_max_iter, **common)
        else:
            explicit = None if self.prior_precision is None else float(self.prior_precision)
            cov = exact_covariance(
                self.model_, X, y, x, self._loss(), prior_precision=explicit,
                solver="optimizer", optimizer=self._optimizer_factory(stacked=True),
                n_epochs=self.finetune_epochs, train_batch_size=self._train_batch_size(len(X)),
                n_average=self.n_average, generator=self._generator(), **common,
            )
        return _nearest_psd(cov)


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
    prior_precision : float or None, default=None
        ``None``: the prior is the optimizer's weight decay (``delta = N *
        weight_decay`` per parameter group; 0 for a plain module). Decoupled
        decay (AdamW) is not an L2 term: its implied prior is
        ``delta_i = N wd (sqrt(v_hat_i) + eps)`` per weight, from the trained
        optimizer's second moments; other optimizers with decoupled decay are
        refused (pass a prior here). A float
        replaces it by an explicit ``(delta / 2) ||theta||^2`` (the
        optimizer's decay is then switched off in the fine-tunes). The exact
        mode needs ``R`` to have a strict minimum at the trained weights: a
        net trained without weight decay usually needs a prior here.
    exact_solver : {"lbfgs", "optimizer"}, default="lbfgs"
        ``mode="exact"``: full-batch float64 L-BFGS (the reference), or the
        net's optimizer on mini-batches (larger nets), see
        :func:`exact_covariance`.
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
    >>> est.predict_proba(d.X_test[:2]).shape  # exact mode: one fine-tune per row and class
    (2, 5)
    """

    def __init__(
        self, estimator, *, mode="exact", lam=1e-2, finetune_epochs=5, finetune_lr=None,
        n_average=100, variance_scale=1.0, prior_precision=None, exact_solver="lbfgs",
        exact_max_iter=500, link_approx="centered_probit", n_samples=100, device="auto",
        batch_size=256, random_state=None, verbose=0, memory=None,
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


class RegVarRegressor(UQRegressorMixin, _BaseRegVar):
    """RegVar for regression nets: epistemic variance from perturbed fine-tunes.

    As :class:`RegVarClassifier`, on the regression mean. A net trained on
    ``MSELoss`` (mean over rows and the ``C`` outputs) minimizes the Gaussian
    negative log posterior times ``2 sigma^2 / C``, so its RegVar variance is
    multiplied by that (``variance_factor_``) to be the variance of ``f(x)``
    under the Gaussian likelihood with noise ``sigma_noise_`` (for other
    criteria the net's own objective is read as the negative log likelihood:
    factor 1). The noise is the RMS training residual unless given.

    Parameters
    ----------
    estimator : skorch net, FrozenEstimator or torch.nn.Module
        A plain module is fine-tuned on ``MSELoss`` with Adam.
    sigma_noise : float or None, default=None
        Observation noise; ``None``: the RMS residual of the trained net.
    mode, lam, finetune_epochs, finetune_lr, n_average, variance_scale, \
prior_precision, exact_solver, exact_max_iter
        As in :class:`RegVarClassifier`.
    device, batch_size, random_state, verbose, memory
        See :class:`skuq.base.BaseUQEstimator`.

    Attributes
    ----------
    sigma_noise_ : float or ndarray
    finetuned_, prior_precision_, variance_factor_, n_params_
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
        self, estimator, *, sigma_noise=None, mode="exact", lam=1e-2, finetune_epochs=5,
        finetune_lr=None, n_average=100, variance_scale=1.0, prior_precision=None,
        exact_solver="lbfgs", exact_max_iter=500, device="auto", batch_size=256,
        random_state=None, verbose=0, memory=None,
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

    def _validate_likelihood_options(self) -> None:
        check_positive("sigma_noise", self.sigma_noise, allow_none=True)

    @staticmethod
    def _default_loss(f: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(f, y.reshape(f.shape).to(f.dtype))

    def _fit_uq(self, X, y, X_cal=None, y_cal=None) -> None:
        if self.sigma_noise is None:
            self._fit_noise_from_residuals(X, y)
        else:
            self.sigma_noise_ = float(self.sigma_noise)
        super()._fit_uq(X, y, X_cal, y_cal)

    def _variance_factor(self) -> float:
        criterion = getattr(self.net_, "criterion_", None) if self._is_skorch() else None
        if criterion is not None and not isinstance(criterion, nn.MSELoss):
            return 1.0
        sigma2 = float(np.mean(np.asarray(self.sigma_noise_, dtype=float) ** 2))
        return 2.0 * sigma2 / self.n_outputs_
