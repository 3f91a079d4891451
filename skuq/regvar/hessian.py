"""RegVar's limit in closed form: ``J H^-1 J^T`` from the Hessian of the objective itself.

As ``lam -> 0`` exact RegVar tends to the linearized-Laplace covariance with the
true Hessian ``H`` of ``R(theta) = sum_n loss_n(theta) + (delta / 2) ||theta||^2``
(:mod:`skuq.regvar`). For a net whose ``P x P`` Hessian fits in memory that
limit can be computed directly -- ``P`` Hessian-vector products and one
eigendecomposition -- instead of one fine-tune per predicted row and output: no
finite-``lam`` bias, no solver tolerance, and the whole path over ``delta``
from one eigendecomposition (what the held-out choice of the prior needs).
Plain torch: no scikit-learn, skorch or estimator here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, jacrev

from .._utils import check_positive_int
from ..curvature import iter_jacobians, select_weights
from ..curvature.memory import available_memory
from ..posterior import FullPosterior
from .core import LossFn, _as_data

__all__ = [
    "HESSIAN_AUTO_MAX_PARAMS",
    "HessianPosterior",
    "hessian_covariance",
    "hessian_posterior",
    "objective_hessian",
]

#: ``exact_solver="auto"`` takes the Hessian up to this many weights, and L-BFGS fine-tunes
#: above. The Hessian's cost grows as P^3 and is paid once; L-BFGS pays about a second per
#: predicted row and output. Measured on one CPU thread (an MLP, 400 rows): the Hessian
#: route's fit costs as much as 2 L-BFGS rows at 1,291 weights, 8 at 2,929, 32 at 5,509
#: (1.7, 9.8 and 57 s); this limit keeps its fit within seconds and its memory within 150 MB
HESSIAN_AUTO_MAX_PARAMS = 2500


def objective_hessian(
    model: nn.Module,
    X: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    loss: LossFn,
    *,
    batch_size: int = 256,
    chunk_size: int = 256,
) -> Tensor:
    """The Hessian of the summed training loss ``sum_n loss_n`` at ``model``'s weights.

    In float64, over every trainable weight (the flat layout of
    :func:`skuq.curvature.select_weights`), without the prior term: the true
    Hessian, residual terms included, not the Gauss-Newton. Formed by
    reverse-over-reverse differentiation, ``chunk_size`` Hessian rows per pass
    over a batch.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network (left unchanged).
    X, y : Tensor or ndarray
        The training data.
    loss : callable
        ``loss(outputs, targets)``: the mean loss over a batch (differentiable
        twice, under :mod:`torch.func` transforms).
    batch_size, chunk_size : int, default=256
        Rows per pass, and Hessian rows per vectorized pass; memory grows with
        their product.

    Returns
    -------
    Tensor of shape (P, P), float64, symmetric

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar.hessian import objective_hessian
    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> X, y = torch.eye(2), torch.zeros(2, 1)
    >>> objective_hessian(lin, X, y, torch.nn.functional.mse_loss)  # sum_n (w . x_n)^2
    tensor([[2., 0.],
            [0., 2.]], dtype=torch.float64)
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("chunk_size", chunk_size)
    work = copy.deepcopy(model).double().eval()
    weights = select_weights(work, "all")
    theta = weights.vector()
    _check_hessian_memory(weights.n_params, theta.device)
    X, y = _as_data(X, y, theta.device, theta.dtype)
    H = torch.zeros(weights.n_params, weights.n_params, dtype=theta.dtype, device=theta.device)
    for start in range(0, len(X), batch_size):
        xb, yb = X[start : start + batch_size], y[start : start + batch_size]

        def summed(t: Tensor, xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
            return loss(weights.forward(t, xb), yb).reshape(()) * len(xb)

        H += jacrev(grad(summed), chunk_size=min(chunk_size, weights.n_params))(theta)
    H += H.T.clone()
    return H.mul_(0.5)


def _check_hessian_memory(n_params: int, device: torch.device) -> None:
    """A MemoryError before allocating when the Hessian route cannot fit on ``device``.

    It holds the ``P x P`` float64 Hessian, then its eigenvectors and the
    eigendecomposition's workspace, about three such matrices at once.
    """
    needed = 3 * n_params * n_params * 8
    avail = available_memory(device)
    if avail is None or needed <= avail:
        return
    raise MemoryError(
        f"RegVar's Hessian route over {n_params:,} weights needs about "
        f"{needed / 2**30:,.2f} GiB (the {n_params:,} x {n_params:,} float64 Hessian, its "
        f"eigenvectors and workspace), but {avail / 2**30:,.2f} GiB are available on "
        f"{torch.device(device)}. It serves exact_solver='hessian' (what 'auto' picks up to "
        f"{HESSIAN_AUTO_MAX_PARAMS:,} weights) and prior_precision='heldout' (the "
        "RegVarRegressor default). Give prior_precision a float (or None, the weight decay's "
        "prior), with exact_solver='lbfgs' or 'optimizer', or with mode='amortized'"
    )


class HessianPosterior(FullPosterior):
    """``N(theta, (H + delta I)^-1)`` over the true Hessian ``H``: what exact RegVar tends to.

    The limit ``J (H + delta I)^-1 J^T`` exists where ``H + delta I`` is
    positive definite; the data Hessian's negative eigenvalues are then kept
    as they are, so this is RegVar's exact answer. Where the prior does not
    cover them -- weights that are not a minimum of ``R`` (a net trained for
    a fixed number of epochs, without weight decay) and the small priors of a
    held-out grid -- ``R - lam f`` has no minimum and a fine-tune would
    diverge; the negative eigenvalues are then set to zero (the nearest
    positive semi-definite Hessian, which the Gauss-Newton always is). The
    rule is applied per ``delta``, also along ``functional_variance_grid``.
    The prior is one value for every weight (the eigenbasis serves every
    value); ``H`` itself is not kept.

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar.hessian import HessianPosterior
    >>> H = torch.diag(torch.tensor([3.0, -0.5]))
    >>> torch.diagonal(HessianPosterior(torch.zeros(2), H, prior_precision=1.0).covariance())
    tensor([0.2500, 2.0000])
    >>> torch.diagonal(HessianPosterior(torch.zeros(2), H, prior_precision=0.25).covariance())
    tensor([0.3077, 4.0000])
    """

    def __init__(self, mean: Tensor, curvature: Tensor, prior_precision: float):
        super().__init__(mean, curvature, prior_precision=prior_precision)
        # a scalar prior needs only the eigenpairs: H itself (P x P) is not kept
        self.H = None

    def _curvature_at(self, delta: float) -> Tensor:
        """The eigenvalues used with a scalar prior ``delta``."""
        raw = self.raw_eigvals
        return raw if float(raw.min()) + float(delta) > 0 else raw.clamp_min(0)

    def _invalidate(self) -> None:
        super()._invalidate()
        if hasattr(self, "raw_eigvals") and hasattr(self, "_prior_precision"):
            self.eigvals = self._curvature_at(self.prior_precision)

    def functional_variance_grid(self, J: Tensor) -> Callable[[float], Tensor]:
        JQ = J @ self.eigvecs.to(J.dtype)

        def full(delta: float) -> Tensor:
            lam = self._curvature_at(delta).to(J.dtype)
            return torch.einsum("bck,k,bdk->bcd", JQ, 1.0 / (lam + delta), JQ)

        return full


def hessian_posterior(theta: Tensor, H: Tensor, prior_precision: float | Tensor) -> FullPosterior:
    """The Gaussian whose ``J Sigma J^T`` exact RegVar tends to, for the prior ``delta``.

    A scalar ``delta`` (one for every weight) gives a :class:`HessianPosterior`,
    eigendecomposed once, whose ``delta`` can then be changed at ``O(P^2)`` a
    value. A prior per weight gives ``N(theta, (H + diag(delta))^-1)``, with
    ``H``'s negative eigenvalues set to zero if ``H + diag(delta)`` is not
    positive definite (the same rule). ``delta`` must be positive: along a
    direction the data leave flat a zero prior gives an unbounded variance.

    Parameters
    ----------
    theta : Tensor of shape (P,)
    H : Tensor of shape (P, P)
        The data part of the Hessian (:func:`objective_hessian`).
    prior_precision : float or Tensor of shape (P,)
        ``delta``, one for all weights or one per weight (> 0).

    Returns
    -------
    FullPosterior

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar.hessian import hessian_posterior
    >>> post = hessian_posterior(torch.zeros(2), torch.diag(torch.tensor([3.0, 1.0])), 1.0)
    >>> torch.diagonal(post.covariance())  # 1 / (3 + 1), 1 / (1 + 1)
    tensor([0.2500, 0.5000])
    """
    delta = torch.as_tensor(prior_precision, dtype=H.dtype, device=H.device)
    if not bool(torch.isfinite(delta).all()) or bool((delta <= 0).any()):
        raise ValueError(
            "the exact RegVar variance needs a prior precision > 0 for every weight: with a "
            "zero prior a direction the data leave flat has unbounded variance. The net was "
            "trained without weight decay on some or all weights; give prior_precision a "
            "float > 0, or prior_precision='heldout' to choose one on held-out rows"
        )
    flat = delta.reshape(-1)
    if bool((flat == flat[0]).all()):
        return HessianPosterior(theta, H, prior_precision=float(flat[0]))
    delta = flat.expand(theta.numel())
    _, info = torch.linalg.cholesky_ex(H + torch.diag(delta))
    if int(info) != 0:
        evals, evecs = torch.linalg.eigh(H)
        H = (evecs * evals.clamp_min(0)) @ evecs.T
        del evecs
    return FullPosterior(theta, H, prior_precision=delta, group_sizes=[1] * theta.numel())


def hessian_covariance(
    model: nn.Module, posterior: FullPosterior, queries: Tensor, n_outputs: int
) -> Tensor:
    """``J Sigma J^T`` per query row, (Q, C, C) in float64, ``J`` at ``model``'s weights.

    Examples
    --------
    >>> import torch
    >>> from skuq.regvar.hessian import hessian_covariance, hessian_posterior
    >>> lin = torch.nn.Linear(1, 1, bias=False)
    >>> post = hessian_posterior(torch.zeros(1, dtype=torch.float64), torch.eye(1), 1.0)
    >>> cov = hessian_covariance(lin, post, torch.tensor([[2.0]]), 1)  # 2 * (1 / (1 + 1)) * 2
    >>> round(float(cov), 12)
    2.0
    """
    weights = select_weights(copy.deepcopy(model).double().eval(), "all")
    x = torch.as_tensor(queries).to(weights.vector().device, torch.float64)
    parts = []
    for _, J, _ in iter_jacobians(weights, x, n_outputs):
        parts.append(posterior.functional_variance(J.detach()))
    return torch.cat(parts)
