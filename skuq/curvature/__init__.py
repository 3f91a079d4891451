"""Curvature engine: weight subsets, per-sample Jacobians, GGN / empirical Fisher.

Pure torch (``torch.func``); no scikit-learn here, so a plain PyTorch user can
call it directly.
"""

from .ggn import (
    CURVATURES,
    LIKELIHOODS,
    STRUCTURES,
    Curvature,
    KronBlock,
    compute_curvature,
    ggn_matmul,
    hessian_sqrt,
    sum_loss,
)
from .jacobians import DEFAULT_MAX_ELEMENTS, iter_jacobians, jacobians, jvp_batch, vjp_batch
from .layers import layer_plan, unfold
from .weights import WeightSubset, find_last_layer, select_subnetwork, select_weights

__all__ = [
    "CURVATURES",
    "DEFAULT_MAX_ELEMENTS",
    "LIKELIHOODS",
    "STRUCTURES",
    "Curvature",
    "KronBlock",
    "WeightSubset",
    "compute_curvature",
    "find_last_layer",
    "ggn_matmul",
    "hessian_sqrt",
    "iter_jacobians",
    "jacobians",
    "jvp_batch",
    "layer_plan",
    "select_subnetwork",
    "select_weights",
    "sum_loss",
    "unfold",
    "vjp_batch",
]
