"""Jacobian columns ``J[:, S]`` of a subnetwork, without the Jacobian of all weights.

A subnetwork is an index set ``S`` (``k`` entries) in the flat vector of a
network's ``P`` trainable parameters. Differentiating with respect to a flat
vector of length ``k`` that is scattered into the parameters (what
:func:`torch.func.jacrev` does through :meth:`WeightSubset.forward`) makes
autograd form the per-sample gradient of every *whole* parameter tensor first,
an intermediate of ``rows x C x P`` entries; for a net of millions of weights
that is gigabytes per handful of rows. This module computes only the selected
columns:

* **Linear and Conv2d weights and biases** (the layer route): one forward pass
  with hooks records each layer's input ``a`` and output, and ``C`` backward
  passes give the per-sample output gradients ``g_c`` (no weight gradient is
  ever formed). The column of weight entry ``(o, i)`` is
  ``sum_t g_c[t, o] a[t, i]`` (``t``: positions -- one for a dense layer on
  vectors, the output pixels of a convolution, whose input patches come from
  ``unfold``); that of bias entry ``o`` is ``sum_t g_c[t, o]``. Memory per
  chunk of rows: the activations of one forward pass, plus
  ``rows x C x k`` for the result and, per layer, the smaller of
  ``rows x T x k_l`` (gathered entries) and ``rows x numel_l`` (the layer's
  per-sample gradient, then gathered), in sub-chunks of at most
  ``max_elements`` entries.
* **any other parameter tensor** (norm layers, embeddings, custom
  parameters, layers called more than once): per-sample :func:`jacrev` with
  only the tensors holding selected entries as free variables, in row chunks
  of at most ``max_elements`` entries, then gathered.

Never is an ``O(P^2)`` or ``O(B C P)`` array formed for the whole net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .weights import WeightSubset

__all__ = ["subnetwork_jacobians"]

#: default most entries of any transient array
_MAX_ELEMENTS = 2**25


@dataclass
class _Piece:
    """The selected entries of one parameter tensor."""

    name: str
    cols: slice  # columns of J[:, S] (contiguous: S is sorted)
    local: Tensor  # positions inside the flattened tensor
    module: nn.Module | None = None  # the owning Linear/Conv2d (layer route), else None
    attr: str = ""


def _layer_route_ok(mod: nn.Module, attr: str) -> bool:
    if attr not in ("weight", "bias"):
        return False
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod, nn.Conv2d):
        padding_ok = not isinstance(mod.padding, str) or mod.padding == "valid"
        return mod.groups == 1 and mod.padding_mode == "zeros" and padding_ok
    return False


def _plan(weights: WeightSubset, x: Tensor) -> list[_Piece]:
    """Where each selected entry lives, and which route computes its column (cached)."""
    cached = weights.__dict__.get("_subnet_plan")
    if cached is not None:
        return cached
    idx = weights.indices
    modules = dict(weights.model.named_modules())
    pieces, start = [], 0
    for name, n in zip(weights.names, weights.numels, strict=True):
        lo = int(torch.searchsorted(idx, start))
        hi = int(torch.searchsorted(idx, start + n))
        if hi > lo:
            owner, _, attr = name.rpartition(".")
            mod = modules.get(owner)
            layer = mod if mod is not None and _layer_route_ok(mod, attr) else None
            pieces.append(_Piece(name, slice(lo, hi), idx[lo:hi] - start, layer, attr))
        start += n
    # the layer route needs each layer to run exactly once per forward pass
    layers = {id(p.module): p.module for p in pieces if p.module is not None}
    calls = {key: 0 for key in layers}

    def count(mod, inp, out):
        calls[id(mod)] += 1

    handles = [m.register_forward_hook(count) for m in layers.values()]
    try:
        with torch.no_grad():
            weights.model(x[:1])
    finally:
        for h in handles:
            h.remove()
    for p in pieces:
        if p.module is not None and calls[id(p.module)] != 1:
            p.module = None
    weights.__dict__["_subnet_plan"] = pieces
    return pieces


def _rows_per_chunk(per_row: int, max_elements: int) -> int:
    return max(1, int(max_elements // max(1, per_row)))


def _layer_inputs(mod: nn.Module, a: Tensor) -> Tensor:
    """Per-sample inputs at every position, (B, T, I)."""
    if isinstance(mod, nn.Conv2d):
        padding = 0 if mod.padding == "valid" else mod.padding
        patches = F.unfold(
            a, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride
        )
        return patches.transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _layer_grads(mod: nn.Module, g: Tensor) -> Tensor:
    """Per-sample output gradients at every position, (B, T, O)."""
    if isinstance(mod, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _weight_columns(piece: _Piece, a: Tensor, g: Tensor, max_elements: int) -> Tensor:
    """``sum_t g[:, t, o] a[:, t, i]`` for the piece's entries ``(o, i)``, (B, k_l)."""
    n_in = a.shape[2]
    o, i = piece.local // n_in, piece.local % n_in
    B, T = a.shape[:2]
    if T == 1:
        return g[:, 0, o] * a[:, 0, i]
    k_l, numel = piece.local.numel(), g.shape[2] * n_in
    out = []
    if k_l * T <= numel:  # gather the entries' factors, then sum over positions
        step = _rows_per_chunk(k_l * T, max_elements)
        for s in range(0, B, step):
            out.append((g[s : s + step][:, :, o] * a[s : s + step][:, :, i]).sum(1))
    else:  # the layer's per-sample gradient (one matmul), then gather
        step = _rows_per_chunk(numel, max_elements)
        for s in range(0, B, step):
            full = torch.bmm(g[s : s + step].transpose(1, 2), a[s : s + step])  # (b, O, I)
            out.append(full.reshape(full.shape[0], -1)[:, piece.local])
    return torch.cat(out)


def _layer_route(
    weights: WeightSubset, pieces: list[_Piece], x: Tensor, max_elements: int
) -> tuple[Tensor, Tensor]:
    """``(J, f)``: ``J`` (B, C, k) with the layer-route columns filled, the outputs ``f``."""
    layers = list({id(p.module): p.module for p in pieces}.values())
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}

    def hook(mod, inp, out):
        inputs[id(mod)] = inp[0].detach()
        outputs[id(mod)] = out
        # what the rest of the net sees is a copy: an in-place op after the layer
        # (ReLU(inplace=True)) must not overwrite the tensor we differentiate by
        return out.clone()

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        f = weights.model(x)
    finally:
        for h in handles:
            h.remove()
    outs = [outputs[id(m)] for m in layers]
    patches = {
        id(m): _layer_inputs(m, inputs[id(m)])
        for m in layers
        if any(p.module is m and p.attr == "weight" for p in pieces)
    }
    n_out = f.shape[1]
    J = torch.zeros(len(x), n_out, weights.n_params, dtype=f.dtype, device=f.device)
    for c in range(n_out):
        grads = torch.autograd.grad(
            f[:, c].sum(), outs, retain_graph=c < n_out - 1, allow_unused=True
        )
        per_layer = {}
        for m, g in zip(layers, grads, strict=True):
            if g is None:  # the output does not depend on this layer
                g = torch.zeros_like(outputs[id(m)])
            per_layer[id(m)] = _layer_grads(m, g.detach())
        for p in pieces:
            g = per_layer[id(p.module)]
            if p.attr == "bias":
                J[:, c, p.cols] = g.sum(1)[:, p.local]
            else:
                J[:, c, p.cols] = _weight_columns(p, patches[id(p.module)], g, max_elements)
    return J, f.detach()


def _generic_route(
    weights: WeightSubset, pieces: list[_Piece], x: Tensor, J: Tensor, max_elements: int
) -> None:
    """Fill the other columns of ``J`` by per-sample ``jacrev`` over their tensors only."""
    params = dict(weights.model.named_parameters())
    free = {p.name: params[p.name].detach() for p in pieces}
    n_out = J.shape[1]
    per_row = n_out * sum(t.numel() for t in free.values())
    step = _rows_per_chunk(per_row, max_elements)

    def single(tensors: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(weights.model, tensors, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(single), in_dims=(None, 0))
    for s in range(0, len(x), step):
        d = jac(free, x[s : s + step])
        for p in pieces:
            J[s : s + step, :, p.cols] = d[p.name].reshape(d[p.name].shape[0], n_out, -1)[
                :, :, p.local
            ]


def subnetwork_jacobians(
    weights: WeightSubset, x: Tensor, max_elements: int = _MAX_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobian columns of a subnetwork, ``J[:, :, S]``, and the outputs.

    Parameters
    ----------
    weights : WeightSubset
        With ``indices`` set (a subnetwork).
    x : Tensor of shape (B, ...)
    max_elements : int
        Most entries of any transient array (per-sample layer gradients,
        per-sample Jacobians of non-Linear/Conv2d tensors).

    Returns
    -------
    J : Tensor of shape (B, C, k)
        ``J[n, c, j] = d f_c(x_n) / d theta_{S_j}``.
    f : Tensor of shape (B, C)

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> from skuq.curvature.subnet_jacobians import subnetwork_jacobians
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> w = select_weights(net, "subnetwork", subnetwork_indices=[0, 7, 20])
    >>> J, f = subnetwork_jacobians(w, torch.ones(5, 3))
    >>> J.shape, f.shape
    (torch.Size([5, 2, 3]), torch.Size([5, 2]))
    """
    if weights.indices is None:
        raise ValueError("subnetwork_jacobians needs a subnetwork (weights.indices)")
    pieces = _plan(weights, x)
    layered = [p for p in pieces if p.module is not None]
    others = [p for p in pieces if p.module is None]
    if layered:
        with torch.enable_grad():
            J, f = _layer_route(weights, layered, x, max_elements)
    else:
        with torch.no_grad():
            f = weights.model(x)
        J = torch.zeros(len(x), f.shape[1], weights.n_params, dtype=f.dtype, device=f.device)
    if others:
        _generic_route(weights, others, x, J, max_elements)
    return J, f
