"""Diagonal weight posteriors for CVP: independent Gaussians over named parameters.

Where they come from (Laplace, IVON, L2M, a user mapping) is the business of the
posterior sources (:mod:`skuq.cvp.sources`); this module holds the result and reads
a user's ``{parameter name: variance}`` mapping against a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["DiagonalWeightPosterior"]


@dataclass
class DiagonalWeightPosterior:
    """Independent Gaussians over named parameters.

    Parameters
    ----------
    variances : dict of str to Tensor
        Variance per parameter (same shape), keyed by parameter name.
    means : dict of str to Tensor, optional
        Posterior means; ``None`` means the model's current weights.

    Examples
    --------
    >>> import torch
    >>> from skuq.cvp.posterior import DiagonalWeightPosterior
    >>> post = DiagonalWeightPosterior({"weight": torch.full((2, 3), 0.1)})
    >>> post.n_parameters
    6
    """

    variances: dict[str, Tensor]
    means: dict[str, Tensor] | None = field(default=None)

    @property
    def n_parameters(self) -> int:
        return sum(int(v.numel()) for v in self.variances.values())


def variances_from_mapping(model: nn.Module, mapping: Mapping) -> dict[str, Tensor]:
    """Per-parameter variances from a user mapping ``{name: float or array}``."""
    named = dict(model.named_parameters())
    out = {}
    for name, v in mapping.items():
        key = name if name in named else (f"module.{name}" if f"module.{name}" in named else None)
        if key is None:
            raise ValueError(
                f"posterior names parameter {name!r}, which the network does not have; "
                f"its parameters are {sorted(named)}"
            )
        t = torch.as_tensor(v, dtype=named[key].dtype)
        out[key] = t.expand(named[key].shape).clone() if t.ndim == 0 else t
    return out
