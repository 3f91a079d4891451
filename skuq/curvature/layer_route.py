"""The layer route: diag, K-FAC or dense curvature of Linear/Conv2d layers from forward hooks.

One forward pass and ``K`` backward passes per batch give the per-sample
output gradients of every planned layer, from which the diagonal, the K-FAC
factors and the dense block follow in closed form (see :mod:`skuq.curvature.ggn`
for the conventions). A single layer whose output is the net's output needs no
backward pass: its output gradients are the columns of ``M`` themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .gram import GramRows
from .layers import LayerRouteUnavailable, layer_io, record_forward
from .likelihood import output_factors, sum_loss
from .result import KronBlock
from .weights import WeightSubset


def _hook_pass(
    weights: WeightSubset,
    plan,
    batches: Iterable,
    likelihood: str,
    curvature: str,
    structure: str,
    n_out: list,
    max_elements: int,
) -> tuple[dict, float, int]:
    """Accumulate diag entries, K-FAC factors or the dense block of the planned layers.

    The output gradients of the layers for each of the ``K`` columns of ``M``
    come from ``K`` backward passes -- except when the plan is one layer whose
    output is the network's output (a last Linear layer): then they are ``M``'s
    columns themselves, and the forward pass runs without autograd.
    """
    model = weights.model
    modules = [m for m, _ in plan]
    acc: dict = {}
    loss, n_data = 0.0, 0
    direct = len(modules) == 1  # until a batch shows the layer's output is not the net's
    first = True
    for x, y in batches:
        f, rec, direct = _forward(model, modules, x, direct, first)
        first = False
        n_out[0] = f.shape[1]
        fd = f.detach()
        loss += float(sum_loss(fd, y, likelihood))
        n_data += f.shape[0]
        M = output_factors(fd, y, likelihood, curvature)
        if direct:  # the layer's output gradients are M's columns: closed forms, no k loop
            mod, slices = plan[0]
            _accumulate_direct(acc, mod, slices, rec.inputs[mod][0], M, structure, max_elements)
        else:
            _accumulate_backward(acc, plan, rec, f, M, structure, weights.n_params, max_elements)
    return acc, loss, n_data


def _forward(model, modules, x, direct: bool, first: bool):
    """``model(x)`` with the planned layers recorded, and whether the direct route still holds.

    Without autograd while ``direct`` (one layer, presumed to give the net's
    output); run again with it when the layer's output proves not to be the
    net's. A layer called more than once per pass (weight sharing) ends the
    layer route: on the first batch as :class:`LayerRouteUnavailable`, so the
    caller can fall back to the Jacobian route before any work is done.
    """
    f, rec = record_forward(model, modules, x, grad=not direct)
    if direct and not (len(rec.outputs[modules[0]]) == 1 and rec.outputs[modules[0]][0] is f):
        direct = False
        f, rec = record_forward(model, modules, x, grad=True)
    for m in modules:
        if len(rec.outputs[m]) != 1:
            err = LayerRouteUnavailable if first else ValueError
            raise err(
                f"layer {type(m).__name__} is called {len(rec.outputs[m])} times per "
                "forward pass; weight sharing is not supported by the layer route"
            )
    return f, rec, direct


def _accumulate_backward(
    acc: dict, plan, rec, f: Tensor, M: Tensor, structure: str, n_params: int, max_elements: int
) -> None:
    """One batch by ``K`` backward passes, one per column of ``M`` (B, C, K)."""
    outs = [rec.outputs[m][0] for m, _ in plan]
    inputs: dict = {}  # each layer's (unfolded) inputs, formed once per batch
    gsq: dict = {}  # diag, layers at one position: squared output gradients over k
    for k in range(M.shape[2]):
        grads = torch.autograd.grad((f * M[:, :, k]).sum(), outs, retain_graph=k < M.shape[2] - 1)
        ios = []
        for (mod, _), g in zip(plan, grads, strict=True):
            a, gt = layer_io(mod, rec.inputs[mod][0], g.detach(), inputs.get(mod))
            inputs[mod] = a
            ios.append((a, gt))
        if structure == "full":
            _accumulate_full(acc, plan, ios, n_params, max_elements)
            continue
        for (mod, slices), (a, gt) in zip(plan, ios, strict=True):
            st = acc.setdefault(mod, {})
            if structure == "kron":
                _accumulate_kron_column(st, slices, a, gt, first=k == 0)
            else:
                _accumulate_diag_column(st, gsq, mod, slices, a, gt, max_elements)
    for mod, g2 in gsq.items():
        st = acc[mod]
        st["dw"] = st.get("dw", 0) + g2.T @ (inputs[mod][:, 0] ** 2)


def _accumulate_kron_column(st: dict, slices, a: Tensor, gt: Tensor, first: bool) -> None:
    """K-FAC factors, one column of ``M``: sums of outer products, accumulated in place.

    The inputs' factor ``A`` does not depend on the column: added on the first only.
    """
    if "weight" in slices:
        _add_gram(st, "G", gt.reshape(-1, gt.shape[-1]))
        if first:
            _add_gram(st, "A", a.reshape(-1, a.shape[-1]))
            st["rows"] = st.get("rows", 0) + a.shape[0] * a.shape[1]
    if "bias" in slices:
        _add_gram(st, "B", gt.sum(1))


def _accumulate_diag_column(
    st: dict, gsq: dict, mod, slices, a: Tensor, gt: Tensor, max_elements: int
) -> None:
    """Diagonal entries, one column of ``M``: squared per-sample gradients."""
    if "weight" in slices and a.shape[1] == 1:
        # one position: sum_k g_k^2 (x) a^2, the classes summed before the product
        gsq[mod] = gsq.get(mod, 0) + gt[:, 0] ** 2
    elif "weight" in slices:
        step = max(1, max_elements // max(1, gt.shape[2] * a.shape[2]))
        dw = 0
        for s in range(0, a.shape[0], step):
            per = torch.einsum("bto,bti->boi", gt[s : s + step], a[s : s + step])
            dw = dw + (per**2).sum(0)
        st["dw"] = st.get("dw", 0) + dw
    if "bias" in slices:
        st["db"] = st.get("db", 0) + (gt.sum(1) ** 2).sum(0)


def _add_gram(st: dict, key: str, rows: Tensor) -> None:
    """``st[key] += rows^T rows`` (one matrix product, no new tensor after the first)."""
    if key in st:
        st[key].addmm_(rows.T, rows)
    else:
        st[key] = rows.T @ rows


def _accumulate_full(acc: dict, plan, ios, n_params: int, max_elements: int) -> None:
    """``acc["full"] += R^T R`` for the per-sample gradients ``R`` (rows, P) of one column."""
    n = ios[0][0].shape[0]
    step = max(1, max_elements // max(1, n_params))
    for s in range(0, n, step):
        rows = slice(s, min(s + step, n))
        a0 = ios[0][0]
        R = torch.empty(rows.stop - s, n_params, dtype=a0.dtype, device=a0.device)
        for (_mod, slices), (a, gt) in zip(plan, ios, strict=True):
            if "weight" in slices:
                if a.shape[1] == 1:
                    per = gt[rows, 0, :, None] * a[rows, 0, None, :]
                else:
                    per = torch.einsum("bto,bti->boi", gt[rows], a[rows])
                R[:, slices["weight"]] = per.reshape(len(R), -1)
            if "bias" in slices:
                R[:, slices["bias"]] = gt[rows].sum(1)
        if "full" in acc:  # in place: no P x P temporary per chunk
            acc["full"].addmm_(R.T, R)
        else:
            acc["full"] = R.T @ R
        if "gram" not in acc:
            acc["gram"] = GramRows(n_params)
        acc["gram"].add(R)


def _accumulate_direct(
    acc: dict, mod, slices, a: Tensor, M: Tensor, structure: str, max_elements: int
) -> None:
    """One batch of a layer whose output is the net's: ``g_k = M[:, :, k]``, ``T = 1``."""
    if structure == "full":
        _accumulate_full_direct(acc, slices, a, M, max_elements)
        return
    st = acc.setdefault(mod, {})
    a = a.reshape(a.shape[0], -1)
    if structure == "kron":
        rows = M.transpose(1, 2).reshape(-1, M.shape[1])  # (B K, C): sum_k g_k g_k^T at once
        if "weight" in slices:
            _add_gram(st, "G", rows)
            _add_gram(st, "A", a)
            st["rows"] = st.get("rows", 0) + a.shape[0]
        if "bias" in slices:
            _add_gram(st, "B", rows)
        return
    lam = (M**2).sum(2)  # (B, C): diagonal of M M^T, the GGN's output weights
    if "weight" in slices:
        st["dw"] = st.get("dw", 0) + lam.T @ (a**2)
    if "bias" in slices:
        st["db"] = st.get("db", 0) + lam.sum(0)


def _accumulate_full_direct(acc: dict, slices, a: Tensor, M: Tensor, max_elements: int) -> None:
    """A last Linear layer's dense block: ``sum_n M_n M_n^T (x) phi_n phi_n^T``.

    ``phi_n`` is the layer's input with a 1 appended for the bias; the block is
    kept as its ``D x D`` blocks for the class pairs ``c <= c'`` (the others are
    their transposes) and laid out once at the end (:func:`_layout_full_direct`).
    ``O(N C^2 D^2 / 2)``, a factor ``2 C`` below the ``O(N K P^2)`` of per-sample
    gradients (``P = C D``).
    """
    n, C = M.shape[0], M.shape[1]
    lam = M @ M.transpose(1, 2)  # (B, C, C)
    feats = ([a.reshape(n, -1)] if "weight" in slices else []) + (
        [torch.ones(n, 1, dtype=a.dtype, device=a.device)] if "bias" in slices else []
    )
    phi = torch.cat(feats, 1)
    D = phi.shape[1]
    iu = torch.triu_indices(C, C, device=phi.device)
    lam = lam[:, iu[0], iu[1]]  # (B, pairs)
    n_pairs = lam.shape[1]
    if "full_cd" not in acc:
        acc["full_cd"] = torch.zeros(n_pairs * D, D, dtype=phi.dtype, device=phi.device)
    step = max(1, max_elements // max(1, n_pairs * D))
    for s in range(0, n, step):
        lam_s, phi_s = lam[s : s + step], phi[s : s + step]
        Z = (lam_s.unsqueeze(2) * phi_s.unsqueeze(1)).reshape(len(lam_s), -1)
        acc["full_cd"].addmm_(Z.T, phi_s)  # in place: no block-sized temporary per batch
    acc["full_shape"] = (C, D)


def _layout_full_direct(H2: Tensor, shape, slices, n_params: int) -> Tensor:
    """The class-pair blocks to the flat layout ``[vec(W) row-major, b]``.

    The blocks go to a class-major matrix (row ``c D + i``: class ``c``, feature
    ``i``), then one gather orders its rows and columns as the flat vector.
    """
    C, D = shape
    blocks = H2.reshape(-1, D, D)
    iu = torch.triu_indices(C, C)
    Hcm = torch.empty(C * D, C * D, dtype=H2.dtype, device=H2.device)
    for k, (c, c2) in enumerate(zip(iu[0].tolist(), iu[1].tolist(), strict=True)):
        Hcm[c * D : (c + 1) * D, c2 * D : (c2 + 1) * D] = blocks[k]
        if c != c2:
            Hcm[c2 * D : (c2 + 1) * D, c * D : (c + 1) * D] = blocks[k].T
    c = torch.arange(C, device=H2.device)
    cls = torch.empty(n_params, dtype=torch.long, device=H2.device)
    feat = torch.empty(n_params, dtype=torch.long, device=H2.device)
    if "weight" in slices:  # row-major W: class-major, then the feature
        n_w = D - ("bias" in slices)
        cls[slices["weight"]] = c.repeat_interleave(n_w)
        feat[slices["weight"]] = torch.arange(n_w, device=H2.device).repeat(C)
    if "bias" in slices:  # the appended constant feature
        cls[slices["bias"]] = c
        feat[slices["bias"]] = D - 1
    order = cls * D + feat
    return Hcm[order[:, None], order[None, :]]


def layer_curvature(weights, plan, batches, likelihood, curvature, structure, max_elements):
    """The layer route's fields, summed loss, rows and outputs (see :func:`_hook_pass`)."""
    n_out = [0]
    acc, loss, n_data = _hook_pass(
        weights, plan, batches, likelihood, curvature, structure, n_out, max_elements
    )
    if structure == "full":
        if "full_cd" in acc:
            full = _layout_full_direct(
                acc.pop("full_cd"), acc["full_shape"], plan[0][1], weights.n_params
            )
        else:
            full = acc["full"]
        spectrum = acc["gram"].spectrum() if "gram" in acc else None
        return dict(full=full, spectrum=spectrum), loss, n_data, n_out[0]
    if structure == "diag":
        diag = torch.zeros(weights.n_params, dtype=weights.dtype, device=weights.device)
        for mod, slices in plan:
            st = acc[mod]
            if "weight" in slices:
                diag[slices["weight"]] = st["dw"].reshape(-1)
            if "bias" in slices:
                diag[slices["bias"]] = st["db"].reshape(-1)
        return dict(diag=diag), loss, n_data, n_out[0]
    blocks = []
    for mod, slices in plan:
        st = acc[mod]
        if "weight" in slices:
            blocks.append(KronBlock(slices["weight"], [st["G"], st["A"] / st["rows"]]))
        if "bias" in slices:
            blocks.append(KronBlock(slices["bias"], [st["B"]]))
    blocks.sort(key=lambda b: b.index.start)
    return dict(kron=blocks), loss, n_data, n_out[0]
