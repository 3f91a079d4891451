"""Generalized Gauss-Newton and empirical Fisher in diag, kron, full and low-rank form.

``H = sum_n J_n^T Lambda_n J_n`` (GGN) with ``Lambda = diag(p) - p p^T`` for
softmax cross-entropy on logits and ``Lambda = I`` for a Gaussian likelihood
at unit noise (the noise enters later as the factor ``1 / sigma^2``), or
``H = sum_n g_n g_n^T`` with ``g_n`` the gradient of the per-sample loss
(empirical Fisher, EF). Everything accumulates over batches: memory is flat in
the number of rows.

Two routes compute it:

* **layer hooks** (Linear and Conv2d layers): one forward pass and ``C``
  backward passes per batch give per-sample output gradients of every layer,
  from which the diagonal, the K-FAC factors and the dense block follow in
  closed form -- no Jacobian of the whole net is ever stored (the dense block
  accumulates per-sample gradients in row chunks). When the weights are one
  layer whose output is the net's output (a last Linear layer), those
  gradients are the columns of ``Lambda``'s square root themselves: the
  forward pass runs without autograd and no backward pass is made;
* **Jacobian chunks** (any layer, any subset, subnetworks): per-sample
  Jacobians from :func:`~skuq.curvature.jacobians` in row chunks of at most
  ``max_elements`` entries, contracted with ``Lambda = L L^T``.

K-FAC convention: "expand" K-FAC with the exact expectation over classes
(type-2 Fisher), weight and bias in separate blocks. For a Linear/Conv2d weight
``H_W ~= G (x) A`` in the row-major layout of ``W.reshape(out, -1)``, with
``A = 1/(N T) sum_{n,t} a_nt a_nt^T`` (layer inputs; ``T`` = positions per
sample: spatial locations of a convolution, 1 for a dense layer on vectors)
and ``G = sum_{n,t,c} g_ntc g_ntc^T`` (output gradients after ``Lambda``'s
square root). The bias block is the exact GGN block
``sum_{n,c} (sum_t g_ntc) (sum_t g_ntc)^T`` -- the bias acts at every
position, so its gradient sums over them -- whose diagonal is what
``structure="diag"`` gives.

laplace-torch 0.3 (through curvlinops) uses the same weight blocks, and the
same bias blocks for Linear layers on vectors (``T = 1``, where the exact block
is ``G``). For a bias shared over ``T > 1`` positions (Conv2d; Linear on
sequences) it uses ``G = sum_{n,t,c} g_ntc g_ntc^T`` instead, which drops the
cross-position terms ``t != t'``; skuq keeps the exact block, so K-FAC
posteriors of such nets differ from laplace-torch's in those bias blocks only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .jacobian_route import jacobian_curvature
from .jacobians import DEFAULT_MAX_ELEMENTS
from .layer_route import layer_curvature
from .layers import LayerRouteUnavailable, layer_plan
from .likelihood import LIKELIHOODS, hessian_sqrt, sum_loss
from .lowrank import ggn_matmul, lowrank_curvature
from .memory import check_full_memory
from .result import Curvature, KronBlock
from .weights import WeightSubset

__all__ = [
    "Curvature",
    "KronBlock",
    "compute_curvature",
    "ggn_matmul",
    "hessian_sqrt",
    "sum_loss",
    "LIKELIHOODS",
    "STRUCTURES",
    "CURVATURES",
]

CURVATURES = ("ggn", "ef")
ROUTES = ("auto", "layers", "jacobians")


# ------------------------------------------------------------------- the backends
@dataclass(frozen=True)
class _Options:
    """What :func:`compute_curvature` was asked for, handed to a backend."""

    likelihood: str
    curvature: str
    structure: str
    route: str
    rank: int
    generator: torch.Generator | None
    max_elements: int


def _batches(batches):
    """The batches of a single pass: a callable is called once."""
    return batches() if callable(batches) else batches


def _layers_or_jacobians(weights: WeightSubset, batches, opt: _Options):
    """Diag or dense: the layer route where it applies, the Jacobian route otherwise."""
    data = _batches(batches)
    plan = layer_plan(weights)
    if opt.route == "layers" and isinstance(plan, str):
        raise ValueError(f"the layer route cannot be used: {plan}")
    if opt.route != "jacobians" and not isinstance(plan, str):
        # the first batch is kept aside: should it show that the layer route does not
        # apply (a layer called twice), the Jacobian route starts over from it
        it = iter(data)
        head = list(itertools.islice(it, 1))
        try:
            return layer_curvature(
                weights,
                plan,
                itertools.chain(head, it),
                opt.likelihood,
                opt.curvature,
                opt.structure,
                opt.max_elements,
            )
        except LayerRouteUnavailable:
            if opt.route == "layers":
                raise
        data = itertools.chain(head, it)
    with torch.no_grad():
        return jacobian_curvature(
            weights, data, opt.likelihood, opt.curvature, opt.structure, opt.max_elements
        )


def _kron_by_layers(weights: WeightSubset, batches, opt: _Options):
    """K-FAC: the layer route only (the factors come from the layers' inputs and gradients)."""
    data = _batches(batches)
    if opt.route == "jacobians":
        raise ValueError("hessian_structure='kron' is computed by the layer route only")
    plan = layer_plan(weights)
    if isinstance(plan, str):
        raise ValueError(
            f"hessian_structure='kron' supports Linear and Conv2d layers only: {plan}. "
            "Use 'diag', 'full' or 'lowrank', or restrict subset_of_weights"
        )
    return layer_curvature(
        weights, plan, data, opt.likelihood, opt.curvature, opt.structure, opt.max_elements
    )


def _randomized_lowrank(weights: WeightSubset, batches, opt: _Options):
    """Top eigenpairs by a randomized range finder (several passes over ``batches``)."""
    return lowrank_curvature(
        weights, batches, opt.likelihood, opt.curvature, opt.rank, opt.generator, opt.max_elements
    )


# structure -> the backend that computes it, as ``(fields, loss, n_data, n_outputs)``;
# a new structure is one function and one entry here
_BACKENDS: dict[str, Callable[[WeightSubset, Iterable | Callable, _Options], tuple]] = {
    "diag": _layers_or_jacobians,
    "kron": _kron_by_layers,
    "full": _layers_or_jacobians,
    "lowrank": _randomized_lowrank,
}
STRUCTURES = tuple(_BACKENDS)


# -------------------------------------------------------------------- public
def compute_curvature(
    weights: WeightSubset,
    batches: Iterable | Callable[[], Iterable],
    *,
    likelihood: str = "classification",
    structure: str = "diag",
    curvature: str = "ggn",
    rank: int = 100,
    route: str = "auto",
    generator: torch.Generator | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Curvature:
    """GGN or empirical Fisher of the summed loss over ``batches``.

    Parameters
    ----------
    weights : WeightSubset
        Which weights (see :func:`~skuq.curvature.select_weights`).
    batches : iterable of (x, y), or a callable returning one
        Training data as tensors on the model's device; ``y`` class indices or
        regression targets. ``structure="lowrank"`` makes several passes and
        needs a re-iterable (a list) or a callable.
    likelihood : {"classification", "regression"}
        Softmax cross-entropy on logits, or Gaussian at unit noise.
    structure : {"diag", "kron", "full", "lowrank"}
    curvature : {"ggn", "ef"}
    rank : int
        Eigenpairs kept by ``"lowrank"``.
    route : {"auto", "layers", "jacobians"}
        ``"layers"``: the hook route for Linear/Conv2d layers (required by
        ``"kron"``); ``"jacobians"``: per-sample Jacobians (any layer);
        ``"auto"``: layers where possible (``"diag"`` and ``"full"`` fall back
        to Jacobians for a layer called more than once per forward pass).
    generator : torch.Generator, optional
        Randomness of ``"lowrank"``.
    max_elements : int
        Most entries of per-sample Jacobians held at once.

    Returns
    -------
    Curvature

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, compute_curvature
    >>> lin = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    >>> compute_curvature(select_weights(lin), [(x, y)], structure="diag").diag.shape
    torch.Size([8])
    """
    _check_options(likelihood, structure, curvature, route)
    if structure == "full":  # the curvature and the posterior's factor, before either exists
        check_full_memory(weights.n_params, weights.dtype, weights.device)
    options = _Options(likelihood, curvature, structure, route, rank, generator, max_elements)
    fields, loss, n_data, n_out = _BACKENDS[structure](weights, batches, options)
    if n_data == 0:
        raise ValueError("no data: the batches were empty")
    result = Curvature(structure, curvature, likelihood, n_data, n_out, loss, **fields)
    _check_finite(fields, curvature, structure)
    return result


def _check_options(likelihood: str, structure: str, curvature: str, route: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"hessian_structure must be one of {STRUCTURES}, got {structure!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


def _check_finite(fields: dict, curvature: str, structure: str) -> None:
    """Raise if any computed tensor holds NaN or inf (the net or its data overflow)."""
    for name, t in fields.items():
        if t is None:
            continue
        tensors = [f for b in t for f in b.factors] if name == "kron" else [t]
        # in row chunks: a P x P boolean mask would be a quarter of a dense curvature
        if not all(
            bool(torch.isfinite(s[i : i + 1024]).all())
            for s in tensors
            for i in range(0, max(len(s), 1), 1024)
        ):
            raise FloatingPointError(
                f"the {curvature.upper()} curvature ({structure}) contains NaN or inf: the "
                "network's outputs or gradients overflow on the training data; check the "
                "inputs are scaled and the net is trained"
            )
