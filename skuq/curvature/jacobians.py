"""Per-sample Jacobians and Jacobian-vector products with :mod:`torch.func`.

All functions take a :class:`~skuq.curvature.WeightSubset` (which weights) and
a batch ``x``; the network must act on each row independently (eval mode:
no batch statistics, no dropout).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap

from .weights import WeightSubset

__all__ = ["jacobians", "iter_jacobians", "jvp_batch", "vjp_batch", "DEFAULT_MAX_ELEMENTS"]

#: Largest number of Jacobian entries (rows x outputs x weights) held at once.
DEFAULT_MAX_ELEMENTS = 2**25


def jacobians(weights: WeightSubset, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobians of the outputs with respect to the subset's weights.

    Parameters
    ----------
    weights : WeightSubset
    x : Tensor of shape (B, ...)

    Returns
    -------
    J : Tensor of shape (B, C, P)
        ``J[n, c, p] = d f_c(x_n) / d theta_p``.
    f : Tensor of shape (B, C)
        The outputs at the current weights.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, jacobians
    >>> lin = torch.nn.Linear(3, 2)
    >>> J, f = jacobians(select_weights(lin), torch.ones(4, 3))
    >>> J.shape, f.shape
    (torch.Size([4, 2, 8]), torch.Size([4, 2]))

    A subnetwork (``weights.indices`` set) gets only its columns ``J[:, :, S]``,
    never the Jacobian of all weights (see
    :mod:`skuq.curvature.subnet_jacobians`).
    """
    if weights.indices is not None:
        from .subnet_jacobians import subnetwork_jacobians

        return subnetwork_jacobians(weights, x)
    theta = weights.vector()

    def single(t: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:
        out = weights.forward(t, xi.unsqueeze(0)).squeeze(0)
        return out, out

    J, f = vmap(jacrev(single, has_aux=True), in_dims=(None, 0))(theta, x)
    return J, f


def chunk_rows(n_outputs: int, n_params: int, max_elements: int) -> int:
    """Rows per chunk so that a chunk of Jacobians has at most ``max_elements`` entries."""
    return max(1, int(max_elements // max(1, n_outputs * n_params)))


def iter_jacobians(
    weights: WeightSubset, x: Tensor, n_outputs: int, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Jacobians of ``x`` in row chunks, never more than ``max_elements`` at once.

    Yields ``(rows, J, f)`` with ``rows`` a slice into ``x``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, iter_jacobians
    >>> w = select_weights(torch.nn.Linear(3, 2))
    >>> [J.shape[0] for _, J, _ in iter_jacobians(w, torch.ones(5, 3), 2, max_elements=32)]
    [2, 2, 1]
    """
    step = chunk_rows(n_outputs, weights.n_params, max_elements)
    for start in range(0, len(x), step):
        rows = slice(start, min(start + step, len(x)))
        J, f = jacobians(weights, x[rows])
        yield rows, J, f


def jvp_batch(weights: WeightSubset, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``J(x) v`` for a batch, without forming ``J``.

    Parameters
    ----------
    v : Tensor of shape (P,) or (P, m)
        One or ``m`` weight-space directions.

    Returns
    -------
    Jv : Tensor of shape (B, C) or (m, B, C)
    f : Tensor of shape (B, C)

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, jvp_batch
    >>> w = select_weights(torch.nn.Linear(3, 2))
    >>> jvp_batch(w, torch.ones(4, 3), torch.ones(8))[0].shape
    torch.Size([4, 2])
    """
    theta = weights.vector()

    def fn(t):
        return weights.forward(t, x)

    if v.ndim == 1:
        f, jv = jvp(fn, (theta,), (v,))
        return jv, f
    f = fn(theta)
    jv = vmap(lambda u: jvp(fn, (theta,), (u,))[1], in_dims=1)(v)
    return jv, f


def vjp_batch(weights: WeightSubset, x: Tensor, u: Tensor) -> Tensor:
    """``sum_n J(x_n)^T u_n`` for output cotangents ``u``.

    Parameters
    ----------
    u : Tensor of shape (B, C) or (m, B, C)

    Returns
    -------
    Tensor of shape (P,) or (P, m)

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, vjp_batch
    >>> w = select_weights(torch.nn.Linear(3, 2))
    >>> vjp_batch(w, torch.ones(4, 3), torch.ones(4, 2)).shape
    torch.Size([8])
    """
    theta = weights.vector()
    _, pullback = vjp(lambda t: weights.forward(t, x), theta)
    if u.ndim == 2:
        return pullback(u)[0]
    return vmap(lambda w: pullback(w)[0], in_dims=0, out_dims=1)(u)
