"""The posterior matching a curvature's structure."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..curvature import Curvature
from .base import WeightPosterior
from .diag import DiagPosterior
from .full import CholeskyFullPosterior
from .kron import KronPosterior
from .lowrank import LowRankPosterior

__all__ = ["posterior_from_curvature", "subset_posterior"]


def posterior_from_curvature(
    curvature: Curvature,
    mean: Tensor,
    *,
    prior_precision=1.0,
    group_sizes: list[int] | None = None,
    sigma_noise: float = 1.0,
    temperature: float = 1.0,
) -> WeightPosterior:
    """The posterior class matching ``curvature.structure``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, compute_curvature
    >>> from skuq.posterior import posterior_from_curvature
    >>> lin = torch.nn.Linear(3, 2)
    >>> w = select_weights(lin)
    >>> curv = compute_curvature(w, [(torch.randn(8, 3), torch.randint(0, 2, (8,)))],
    ...                          structure="full")
    >>> post = posterior_from_curvature(curv, w.vector(), prior_precision=1.0)
    >>> post.sample(4).shape
    torch.Size([4, 8])
    """
    kwargs = dict(
        prior_precision=prior_precision,
        group_sizes=group_sizes,
        sigma_noise=sigma_noise,
        temperature=temperature,
        loss=curvature.loss,
        n_data=curvature.n_data,
        n_outputs=curvature.n_outputs,
        likelihood=curvature.likelihood,
        curvature_kind=curvature.curvature,
    )
    if curvature.structure == "diag":
        return DiagPosterior(mean, curvature.diag, **kwargs)
    if curvature.structure == "full":
        return CholeskyFullPosterior(mean, curvature.full, spectrum=curvature.spectrum, **kwargs)
    if curvature.structure == "kron":
        return KronPosterior(mean, curvature.kron, **kwargs)
    if curvature.structure == "lowrank":
        return LowRankPosterior(mean, curvature.eigvals, curvature.eigvecs, **kwargs)
    raise ValueError(f"unknown curvature structure {curvature.structure!r}")


def subset_posterior(
    curvature: Curvature,
    weights,
    prior_precision=1.0,
    *,
    sigma_noise: float = 1.0,
    temperature: float = 1.0,
) -> WeightPosterior:
    """The posterior over the weight subset ``weights`` (a ``WeightSubset``) at its values.

    ``prior_precision`` is a number, one number per parameter tensor of the
    subset, or the name of a rule that chooses it later (the posterior then
    starts from 1).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, compute_curvature
    >>> from skuq.posterior import subset_posterior
    >>> lin = torch.nn.Linear(3, 2)
    >>> w = select_weights(lin)
    >>> curv = compute_curvature(w, [(torch.randn(8, 3), torch.randint(0, 2, (8,)))],
    ...                          structure="diag")
    >>> post = subset_posterior(curv, w, [1.0, 10.0])  # weight, bias
    >>> post.prior_precision
    tensor([ 1., 10.])
    >>> post.marginal_variance().shape
    torch.Size([8])
    """
    init = 1.0 if isinstance(prior_precision, str) else np.asarray(prior_precision, dtype=float)
    group_sizes = weights.group_sizes()
    if isinstance(init, np.ndarray) and init.ndim == 1 and init.size not in (1, len(group_sizes)):
        raise ValueError(
            f"prior_precision has {init.size} values but the weights have "
            f"{len(group_sizes)} layers (parameter tensors)"
        )
    return posterior_from_curvature(
        curvature,
        weights.vector(),
        prior_precision=torch.as_tensor(init),
        group_sizes=group_sizes,
        sigma_noise=sigma_noise,
        temperature=temperature,
    )
