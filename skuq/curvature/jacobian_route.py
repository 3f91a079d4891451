"""The Jacobian route: diag or dense curvature of any weight subset from per-sample Jacobians.

Per-sample Jacobians in row chunks of at most ``max_elements`` entries
(:func:`~skuq.curvature.iter_jacobians`), contracted with the output factors
``M`` (``Lambda = M M^T`` for the GGN, the loss gradient for the EF).
"""

from __future__ import annotations

import torch

from .gram import GramRows
from .jacobians import iter_jacobians
from .likelihood import output_factors, sum_loss


def jacobian_curvature(weights, batches, likelihood, curvature, structure, max_elements):
    P = weights.n_params
    dev, dt = weights.device, weights.dtype
    acc = (
        torch.zeros(P, dtype=dt, device=dev)
        if structure == "diag"
        else torch.zeros(P, P, dtype=dt, device=dev)
    )
    gram = GramRows(P) if structure == "full" else None
    loss, n_data, n_out = 0.0, 0, 0
    for x, y in batches:
        n_out_guess = n_out or 16
        for rows, J, f in iter_jacobians(weights, x, n_out_guess, max_elements):
            n_out = f.shape[1]
            M = output_factors(f, y[rows], likelihood, curvature)
            MJ = torch.einsum("bck,bcp->bkp", M, J).reshape(-1, P)
            if structure == "diag":
                acc += (MJ**2).sum(0)
            else:
                acc.addmm_(MJ.T, MJ)  # in place: the P x P accumulator is the only one
                gram.add(MJ)
            loss += float(sum_loss(f, y[rows], likelihood))
            n_data += f.shape[0]
    if structure == "diag":
        return {"diag": acc}, loss, n_data, n_out
    return {"full": acc, "spectrum": gram.spectrum()}, loss, n_data, n_out
