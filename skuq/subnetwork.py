"""The documented import path of the subnetwork selection rules; they live in
:mod:`skuq.laplace.subnetwork`."""

from .laplace.subnetwork import (
    DEFAULT_SUBNETWORK_SIZE,
    SELECTIONS,
    ByName,
    GivenIndices,
    LargestMagnitude,
    LargestVariance,
    LargestVarianceSWAG,
    LastLayerSelection,
    RandomSelection,
    SubnetworkSelection,
    check_subnetwork_size,
    resolve_selection,
    select_subnetwork_indices,
    top_k,
)

__all__ = [
    "SELECTIONS",
    "DEFAULT_SUBNETWORK_SIZE",
    "SubnetworkSelection",
    "LargestVariance",
    "LargestVarianceSWAG",
    "LargestMagnitude",
    "RandomSelection",
    "LastLayerSelection",
    "ByName",
    "GivenIndices",
    "check_subnetwork_size",
    "resolve_selection",
    "select_subnetwork_indices",
    "top_k",
]
