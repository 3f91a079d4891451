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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .jacobians import DEFAULT_MAX_ELEMENTS, iter_jacobians, jvp_batch, vjp_batch
from .memory import check_full_memory
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

LIKELIHOODS = ("classification", "regression")
STRUCTURES = ("diag", "kron", "full", "lowrank")
CURVATURES = ("ggn", "ef")


# ------------------------------------------------------------------ likelihoods
def hessian_sqrt(f: Tensor, likelihood: str) -> Tensor:
    """``L`` with ``L L^T = Lambda``, the Hessian of the loss in the outputs; (B, C, C).

    Softmax cross-entropy: ``L = diag(sqrt p) - p sqrt(p)^T``; Gaussian at unit
    noise: ``L = I``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import hessian_sqrt
    >>> f = torch.tensor([[0.5, -1.0, 2.0]])
    >>> L = hessian_sqrt(f, "classification")
    >>> p = torch.softmax(f, -1)[0]
    >>> torch.allclose(L[0] @ L[0].T, torch.diag(p) - torch.outer(p, p))
    True
    """
    if likelihood == "regression":
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        return eye.expand(f.shape[0], -1, -1)
    p = torch.softmax(f, dim=-1)
    sp = p.sqrt()
    return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)


def sum_loss(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """Summed negative log-likelihood (cross-entropy; or ``0.5 * SSE`` at unit noise).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import sum_loss
    >>> float(sum_loss(torch.zeros(2, 1), torch.ones(2), "regression"))
    1.0
    """
    if likelihood == "regression":
        return 0.5 * ((f - y.reshape(f.shape).to(f.dtype)) ** 2).sum()
    return F.cross_entropy(f, y.long(), reduction="sum")


def _loss_gradient(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """d loss_n / d f_n per row, (B, C)."""
    if likelihood == "regression":
        return f - y.reshape(f.shape).to(f.dtype)
    return torch.softmax(f, dim=-1) - F.one_hot(y.long(), f.shape[1]).to(f.dtype)


def _output_factors(f: Tensor, y: Tensor, likelihood: str, curvature: str) -> Tensor:
    """(B, C, K): ``H_n = J_n^T M_n M_n^T J_n`` with ``M = L`` (GGN) or the loss gradient (EF)."""
    if curvature == "ef":
        return _loss_gradient(f, y, likelihood).unsqueeze(2)
    return hessian_sqrt(f, likelihood)


# --------------------------------------------------------------------- results
@dataclass
class KronBlock:
    """One block of a K-FAC curvature, over ``weights`` slice ``index``.

    ``factors == [G, A]``: the block is ``G (x) A`` over the row-major
    ``(G.shape[0], A.shape[0])`` matrix view of the slice; ``factors == [H]``:
    a dense block (biases).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import KronBlock
    >>> KronBlock(slice(0, 6), [torch.eye(2), torch.eye(3)]).dense().shape
    torch.Size([6, 6])
    """

    index: slice
    factors: list[Tensor]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(f.shape[0] for f in self.factors)

    def dense(self) -> Tensor:
        """The block as a dense matrix (for tests and small layers)."""
        if len(self.factors) == 1:
            return self.factors[0]
        return torch.kron(self.factors[0], self.factors[1])


@dataclass
class Curvature:
    """Curvature of the summed loss over ``n_data`` rows, at unit noise and temperature.

    Exactly one of ``diag`` (P,), ``full`` (P, P), ``kron`` (list of blocks) or
    ``eigvals``/``eigvecs`` (k,), (P, k) is set, according to ``structure``.
    ``loss`` is the summed training loss (cross-entropy, or ``0.5 * SSE``).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, compute_curvature
    >>> lin = torch.nn.Linear(3, 2)
    >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
    >>> c = compute_curvature(select_weights(lin), data)
    >>> c.structure, c.n_data, c.n_outputs
    ('diag', 4, 2)
    """

    structure: str
    curvature: str
    likelihood: str
    n_data: int
    n_outputs: int
    loss: float
    diag: Tensor | None = None
    full: Tensor | None = None
    kron: list[KronBlock] | None = None
    eigvals: Tensor | None = None
    eigvecs: Tensor | None = None
    info: dict = field(default_factory=dict)

    def dense(self) -> Tensor:
        """The curvature as a dense P x P matrix (tests, small P)."""
        if self.full is not None:
            return self.full
        if self.diag is not None:
            return torch.diag(self.diag)
        if self.eigvecs is not None:
            return (self.eigvecs * self.eigvals) @ self.eigvecs.T
        n = max(b.index.stop for b in self.kron)
        out = torch.zeros(n, n, dtype=self.kron[0].factors[0].dtype)
        for b in self.kron:
            out[b.index, b.index] = b.dense()
        return out


# ------------------------------------------------------------------- layer hooks
_HOOKABLE = (nn.Linear, nn.Conv2d)


def _layer_plan(weights: WeightSubset) -> list[tuple[nn.Module, dict[str, slice]]] | str:
    """Modules owning the subset's tensors, or a message why the hook route cannot be used."""
    if weights.indices is not None:
        return "a subnetwork (an index set) has no layer structure"
    modules = dict(weights.model.named_modules())
    plan: dict[str, dict[str, slice]] = {}
    for name, index in weights.segments():
        owner, _, attr = name.rpartition(".")
        mod = modules[owner]
        if not isinstance(mod, _HOOKABLE) or attr not in ("weight", "bias"):
            return f"parameter {name!r} belongs to a {type(mod).__name__}"
        if isinstance(mod, nn.Conv2d) and (
            mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str)
            and mod.padding != "valid"
        ):
            return (
                f"Conv2d {owner!r} uses groups, a non-zero padding mode or string padding"
            )
        plan.setdefault(owner, {})[attr] = index
    return [(modules[n], slices) for n, slices in plan.items()]


def _unfold(mod: nn.Conv2d, a: Tensor) -> Tensor:
    """Input patches of a convolution, (B, C_in * kh * kw, T)."""
    padding = 0 if mod.padding == "valid" else mod.padding
    return F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)


def _layer_io(
    mod: nn.Module, a: Tensor, g: Tensor, patches: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample inputs (B, T, I) and output gradients (B, T, O) of a layer.

    ``patches``: a convolution's unfolded inputs from an earlier call, reused.
    """
    if isinstance(mod, nn.Conv2d):
        if patches is None:
            patches = _unfold(mod, a).transpose(1, 2)
        return patches, g.flatten(2).transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])


class _Recorder:
    def __init__(self, modules: list[nn.Module]):
        self.inputs: dict[nn.Module, list[Tensor]] = {m: [] for m in modules}
        self.outputs: dict[nn.Module, list[Tensor]] = {m: [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, mod, inp, out):
        self.inputs[mod].append(inp[0].detach())
        self.outputs[mod].append(out)

    def remove(self):
        for h in self.handles:
            h.remove()


class _LayerRouteUnavailable(ValueError):
    """The layer route does not apply to this net (found on the first batch, before any work)."""


def _record_forward(model, modules, x, grad: bool):
    """``model(x)`` with the inputs and outputs of ``modules`` recorded."""
    rec = _Recorder(modules)
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            f = model(x)
    finally:
        rec.remove()
    return f, rec


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
        f, rec = _record_forward(model, modules, x, grad=not direct)
        if direct and not (len(rec.outputs[modules[0]]) == 1 and rec.outputs[modules[0]][0] is f):
            direct = False
            f, rec = _record_forward(model, modules, x, grad=True)
        for m in modules:
            if len(rec.outputs[m]) != 1:
                err = _LayerRouteUnavailable if first else ValueError
                raise err(
                    f"layer {type(m).__name__} is called {len(rec.outputs[m])} times per "
                    "forward pass; weight sharing is not supported by the layer route"
                )
        first = False
        n_out[0] = f.shape[1]
        fd = f.detach()
        loss += float(sum_loss(fd, y, likelihood))
        n_data += f.shape[0]
        M = _output_factors(fd, y, likelihood, curvature)
        if direct:  # the layer's output gradients are M's columns: closed forms, no k loop
            mod, slices = plan[0]
            _accumulate_direct(acc, mod, slices, rec.inputs[mod][0], M, structure,
                               max_elements)
            continue
        outs = [rec.outputs[m][0] for m in modules]
        inputs: dict = {}  # each layer's (unfolded) inputs, formed once per batch
        gsq: dict = {}  # diag, layers at one position: squared output gradients over k
        for k in range(M.shape[2]):
            if direct:
                grads = [M[:, :, k]]
            else:
                grads = torch.autograd.grad(
                    (f * M[:, :, k]).sum(), outs, retain_graph=k < M.shape[2] - 1
                )
            ios = []
            for (mod, _), g in zip(plan, grads, strict=True):
                a, gt = _layer_io(mod, rec.inputs[mod][0], g.detach(), inputs.get(mod))
                inputs[mod] = a
                ios.append((a, gt))
            if structure == "full":
                _accumulate_full(acc, plan, ios, weights.n_params, max_elements)
                continue
            for (mod, slices), (a, gt) in zip(plan, ios, strict=True):
                st = acc.setdefault(mod, {})
                if structure == "kron":  # sums of outer products, accumulated in place
                    if "weight" in slices:
                        _add_gram(st, "G", gt.reshape(-1, gt.shape[-1]))
                        if k == 0:
                            _add_gram(st, "A", a.reshape(-1, a.shape[-1]))
                            st["rows"] = st.get("rows", 0) + a.shape[0] * a.shape[1]
                    if "bias" in slices:
                        _add_gram(st, "B", gt.sum(1))
                    continue
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
        for mod, g2 in gsq.items():
            st = acc[mod]
            st["dw"] = st.get("dw", 0) + g2.T @ (inputs[mod][:, 0] ** 2)
    return acc, loss, n_data


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


def _accumulate_direct(acc: dict, mod, slices, a: Tensor, M: Tensor, structure: str,
                       max_elements: int) -> None:
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
        [torch.ones(n, 1, dtype=a.dtype, device=a.device)] if "bias" in slices else [])
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


def _hook_curvature(weights, plan, batches, likelihood, curvature, structure, max_elements):
    n_out = [0]
    acc, loss, n_data = _hook_pass(
        weights, plan, batches, likelihood, curvature, structure, n_out, max_elements
    )
    if structure == "full":
        if "full_cd" in acc:
            full = _layout_full_direct(acc.pop("full_cd"), acc["full_shape"], plan[0][1],
                                       weights.n_params)
        else:
            full = acc["full"]
        return dict(full=full), loss, n_data, n_out[0]
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


# ----------------------------------------------------------------- Jacobian route
def _jacobian_curvature(weights, batches, likelihood, curvature, structure, max_elements):
    P = weights.n_params
    dev, dt = weights.device, weights.dtype
    acc = (
        torch.zeros(P, dtype=dt, device=dev)
        if structure == "diag"
        else torch.zeros(P, P, dtype=dt, device=dev)
    )
    loss, n_data, n_out = 0.0, 0, 0
    for x, y in batches:
        n_out_guess = n_out or 16
        for rows, J, f in iter_jacobians(weights, x, n_out_guess, max_elements):
            n_out = f.shape[1]
            M = _output_factors(f, y[rows], likelihood, curvature)
            MJ = torch.einsum("bck,bcp->bkp", M, J).reshape(-1, P)
            if structure == "diag":
                acc += (MJ**2).sum(0)
            else:
                acc.addmm_(MJ.T, MJ)  # in place: the P x P accumulator is the only one
            loss += float(sum_loss(f, y[rows], likelihood))
            n_data += f.shape[0]
    key = "diag" if structure == "diag" else "full"
    return {key: acc}, loss, n_data, n_out


# ------------------------------------------------------------------- low rank
def ggn_matmul(
    weights: WeightSubset,
    batches: Iterable,
    V: Tensor,
    likelihood: str = "classification",
    curvature: str = "ggn",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """``H V`` for a block of directions ``V`` (P, m), one pass over the data.

    GGN: ``sum_n J_n^T Lambda_n (J_n V)`` by JVPs and VJPs, never forming ``J``;
    EF: ``sum_n g_n (g_n^T V)`` from per-sample gradients.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, ggn_matmul
    >>> lin = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    >>> ggn_matmul(select_weights(lin), [(x, y)], torch.eye(8)).shape
    torch.Size([8, 8])
    """
    out = torch.zeros_like(V)
    for x, y in batches:
        if curvature == "ef":
            for rows, J, f in iter_jacobians(weights, x, 16, max_elements):
                g = torch.einsum("bc,bcp->bp", _loss_gradient(f, y[rows], likelihood), J)
                out += g.T @ (g @ V)
            continue
        JV, f = jvp_batch(weights, x, V)  # (m, B, C)
        f = f.detach()
        if likelihood == "regression":
            LJV = JV
        else:
            p = torch.softmax(f, dim=-1)
            LJV = p * JV - p * (p * JV).sum(-1, keepdim=True)
        out += vjp_batch(weights, x, LJV)
    return out


def _lowrank_curvature(weights, batches, likelihood, curvature, rank, generator, max_elements):
    """Top-``rank`` eigenpairs by a randomized range finder with one power iteration."""
    P = weights.n_params
    k = min(rank, P)
    m = min(P, k + 10)
    # drawn where the generator lives (a CUDA generator cannot fill a CPU tensor), then moved
    draw_device = generator.device if generator is not None else torch.device("cpu")
    omega = torch.randn(P, m, generator=generator, dtype=weights.dtype, device=draw_device)
    omega = omega.to(weights.device)
    data = list(batches) if not callable(batches) else None

    def passes():
        return batches() if data is None else data

    Y = ggn_matmul(weights, passes(), omega, likelihood, curvature, max_elements)
    Q = torch.linalg.qr(Y).Q
    Y = ggn_matmul(weights, passes(), Q, likelihood, curvature, max_elements)  # power step
    Q = torch.linalg.qr(Y).Q
    HQ = ggn_matmul(weights, passes(), Q, likelihood, curvature, max_elements)
    small = Q.T @ HQ
    evals, evecs = torch.linalg.eigh((small + small.T) / 2)
    order = torch.argsort(evals, descending=True)[:k]
    evals = evals[order].clamp_min(0)
    evecs = Q @ evecs[:, order]
    loss, n_data, n_out = 0.0, 0, 0
    with torch.no_grad():
        for x, y in passes():
            f = weights.model(x)
            loss += float(sum_loss(f, y, likelihood))
            n_data += f.shape[0]
            n_out = f.shape[1]
    return dict(eigvals=evals, eigvecs=evecs), loss, n_data, n_out


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
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if structure not in STRUCTURES:
        raise ValueError(f"hessian_structure must be one of {STRUCTURES}, got {structure!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if route not in ("auto", "layers", "jacobians"):
        raise ValueError(f"route must be one of ('auto', 'layers', 'jacobians'), got {route!r}")
    if structure == "full":  # the curvature and the posterior's factor, before either exists
        check_full_memory(weights.n_params, weights.dtype, weights.device)
    data = batches() if callable(batches) and structure != "lowrank" else batches
    if structure == "lowrank":
        parts = _lowrank_curvature(
            weights, batches, likelihood, curvature, rank, generator, max_elements
        )
    else:
        plan = _layer_plan(weights)
        use_layers = structure == "kron" or (
            structure in ("diag", "full") and route != "jacobians" and not isinstance(plan, str)
        )
        if structure == "kron" and route == "jacobians":
            raise ValueError("hessian_structure='kron' is computed by the layer route only")
        if use_layers and isinstance(plan, str):
            raise ValueError(
                f"hessian_structure='kron' supports Linear and Conv2d layers only: {plan}. "
                "Use 'diag', 'full' or 'lowrank', or restrict subset_of_weights"
            )
        if route == "layers" and isinstance(plan, str):
            raise ValueError(f"the layer route cannot be used: {plan}")
        parts = None
        if use_layers:
            # the first batch is kept aside: should it show that the layer route does not
            # apply (a layer called twice), the Jacobian route starts over from it
            it = iter(data)
            head = list(itertools.islice(it, 1))
            try:
                parts = _hook_curvature(weights, plan, itertools.chain(head, it), likelihood,
                                        curvature, structure, max_elements)
            except _LayerRouteUnavailable:
                if structure == "kron" or route == "layers":
                    raise
            data = itertools.chain(head, it)
        if parts is None:
            with torch.no_grad():
                parts = _jacobian_curvature(
                    weights, data, likelihood, curvature, structure, max_elements
                )
    fields, loss, n_data, n_out = parts
    if n_data == 0:
        raise ValueError("no data: the batches were empty")
    result = Curvature(structure, curvature, likelihood, n_data, n_out, loss, **fields)
    for name, t in fields.items():
        tensors = [f for b in t for f in b.factors] if name == "kron" else [t]
        # in row chunks: a P x P boolean mask would be a quarter of a dense curvature
        if not all(bool(torch.isfinite(s[i : i + 1024]).all()) for s in tensors
                   for i in range(0, max(len(s), 1), 1024)):
            raise FloatingPointError(
                f"the {curvature.upper()} curvature ({structure}) contains NaN or inf: the "
                "network's outputs or gradients overflow on the training data; check the "
                "inputs are scaled and the net is trained"
            )
    return result
