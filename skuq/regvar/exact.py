"""Exact RegVar: one fine-tune of ``R - lam f_k(x*)`` per query row and output.

Two solvers: full-batch float64 L-BFGS on the rescaled displacement (the
reference), and mini-batch fine-tunes with the net's optimizer on all problems
stacked in one tensor. Plain torch: no scikit-learn, skorch or estimator here.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from .._utils import check_option, check_positive_int, progress
from ..curvature import select_weights
from .core import (
    EXACT_SOLVERS,
    LossFn,
    OptimizerFactory,
    RegVarConvergenceWarning,
    _as_data,
    _batches,
    _check_lam,
    _check_loss_value,
    _finite_or_raise,
    _flat_prior,
    _loss_and_query_output,
    _stacked,
)


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
    work = _working_copy(model, solver, optimizer)
    weights = select_weights(work, "all")
    theta = weights.vector()
    X, y = _as_data(X, y, theta.device, theta.dtype)
    queries = torch.as_tensor(queries).to(theta.device, theta.dtype)
    with torch.no_grad():
        f_star = work(queries)
    n_rows, n_out = f_star.shape
    delta = _flat_prior(prior_precision, weights.n_params, theta)
    rows, outs = _problems(n_rows, n_out, theta.device)
    cov = torch.zeros(n_rows, n_out, n_out, dtype=theta.dtype, device=theta.device)
    chunks = list(range(0, len(rows), max_problems))
    if solver == "lbfgs":
        R0, g0 = _objective_at(weights, theta, X, y, loss, delta, batch_size)
    for start in progress(chunks, verbose, "RegVar exact"):
        q = rows[start : start + max_problems]
        k = outs[start : start + max_problems]
        if solver == "lbfgs":
            thetas = _solve_lbfgs(
                weights,
                theta,
                X,
                y,
                loss,
                delta,
                queries[q],
                k,
                lam,
                R0,
                g0,
                batch_size,
                max_iter,
                tol,
            )
            reference = f_star[q]
        else:
            thetas, ref = _solve_optimizer(
                weights,
                theta,
                X,
                y,
                loss,
                delta,
                queries[q],
                k,
                lam,
                optimizer,
                n_epochs,
                train_batch_size,
                n_average,
                generator,
            )
            with torch.no_grad():
                reference = weights.forward(ref, queries[q])
        f_lam = _outputs_at(weights, thetas, queries[q])
        cov[q, :, k] = (f_lam - reference) / lam
    _finite_or_raise(
        [cov],
        "the exact RegVar covariance",
        "the fine-tune diverged; lower lam, or check that the net is trained "
        "to a minimum of its regularized loss",
    )
    return 0.5 * (cov + cov.transpose(1, 2))


def _working_copy(model: nn.Module, solver: str, optimizer) -> nn.Module:
    """The copy of ``model`` the solver fine-tunes: float64 for L-BFGS, in eval mode."""
    if solver == "lbfgs":
        return copy.deepcopy(model).double().eval()
    if optimizer is None:
        raise ValueError("solver='optimizer' needs an optimizer factory")
    return copy.deepcopy(model).eval()


def _problems(n_rows: int, n_out: int, device) -> tuple[Tensor, Tensor]:
    """Query row and output of every (row, output) problem, row by row."""
    rows = torch.arange(n_rows, device=device).repeat_interleave(n_out)
    outs = torch.arange(n_out, device=device).repeat(n_rows)
    return rows, outs


def _outputs_at(weights, thetas: Tensor, xq: Tensor) -> Tensor:
    """``f(xq[i]; thetas[i])`` for each problem ``i``, (M, C)."""
    with torch.no_grad():
        return vmap(lambda t, x: weights.forward(t, x.unsqueeze(0)).squeeze(0))(thetas, xq)


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


def _solve_lbfgs(
    weights, theta, X, y, loss, delta, xq, k, lam, R0, g0, batch_size, max_iter, tol
) -> Tensor:
    """Minimizers ``theta* + lam u`` of the rescaled problems of one chunk, (M, P)."""
    m = len(k)
    U = torch.zeros(m, weights.n_params, dtype=theta.dtype, device=theta.device, requires_grad=True)
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
            data, f_k = _stacked(
                _loss_and_query_output(weights, loss, xb, yb), theta + lam * U, xq, onehot
            )
            part = data.sum() * len(xb)
            if start == 0:  # the perturbation -lam f_k(x*), relative to f_k(x*; theta*)
                part = part - lam * (f_k - f_star).sum()
            (part / lam**2).backward()
            value += part.detach()
        # exact differences: no cancellation in the prior or the tilt
        rest = (
            0.5 * (delta * (2 * lam * theta * U + lam**2 * U**2)).sum() - lam * (U @ g0).sum()
        ) / lam**2
        rest.backward()
        return (value - m * R0_data) / lam**2 + rest.detach()

    opt = torch.optim.LBFGS(
        [U],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
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
            RegVarConvergenceWarning,
            stacklevel=3,
        )
    return (theta + lam * U).detach()


#: relative gradient above which an L-BFGS solve is reported as unconverged
_LBFGS_WARN = 1e-3


def _solve_optimizer(
    weights,
    theta,
    X,
    y,
    loss,
    delta,
    xq,
    k,
    lam,
    optimizer,
    n_epochs,
    batch_size,
    n_average,
    generator,
) -> tuple[Tensor, Tensor]:
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
            losses, f_k = _stacked(_loss_and_query_output(weights, loss, xb, yb), Theta, xq, onehot)
            obj = losses.sum() - (lam / n) * f_k.sum()
            if use_prior:
                obj = obj + (delta * Theta**2).sum() / (2 * n)
            obj.backward()
            opt.step()
            step += 1
            if step > total - n_avg:
                acc += Theta.detach()
    avg = acc / n_avg
    _finite_or_raise(
        [avg],
        "the fine-tuned weights",
        "the fine-tune diverged; lower the fine-tuning learning rate or lam",
    )
    return avg[:m], avg[m]
