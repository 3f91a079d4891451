"""Predictive distributions of a weight-space posterior, as OutputDistribution.

* :func:`glm_predictive` -- the linearized network
  ``f(x) ~ N(f(x; theta*), J(x) Sigma J(x)^T)``; Jacobians are formed in row
  chunks (never more than one batch), and for a last Linear layer the
  covariance comes straight from its input features ``phi`` and the
  posterior's structure, never from ``phi^T (x) I``.
* :func:`nn_predictive` -- weights sampled from the posterior, pushed through
  the network: ``OutputDistribution.from_samples``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vmap

from .curvature.jacobians import DEFAULT_MAX_ELEMENTS, iter_jacobians
from .curvature.layers import layer_plan, record_forward, unfold
from .curvature.weights import WeightSubset
from .outputs import OutputDistribution
from .posterior import (
    DiagPosterior,
    KronPosterior,
    LowRankPosterior,
    WeightPosterior,
    augment_centered,
    split_centered,
)

__all__ = [
    "glm_predictive",
    "nn_predictive",
    "gaussian_predictive",
    "last_layer_features",
    "needs_jacobians",
]


def last_layer_features(weights: WeightSubset, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(phi, f)``: the last Linear layer's input features and the outputs.

    ``None`` when the feature route does not apply: the subset is not a last
    ``nn.Linear`` layer fed by vectors, or the network's output is not that
    layer's output (e.g. a log-softmax after it).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> from skuq.predictive import last_layer_features
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.zeros(5, 3)
    >>> phi, f = last_layer_features(select_weights(net, "last_layer", example_input=x), x)
    >>> phi.shape
    torch.Size([5, 4])
    """
    layer = weights.last_layer
    if weights.kind != "last_layer" or not isinstance(layer, nn.Linear):
        return None
    if weights.names[0] != f"{weights.last_layer_name}.weight":
        return None  # the weight itself is frozen
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    try:
        with torch.no_grad():
            f = weights.model(x)
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0].ndim != 2:
        return None
    phi = seen[0]
    with torch.no_grad():
        direct = layer(phi)
    if direct.shape != f.shape or not torch.equal(direct, f):
        return None
    return phi, f


def _layer_glm(
    weights: WeightSubset, posterior, x: Tensor, center: bool = False
) -> OutputDistribution | None:
    """``J Sigma J^T`` for diag/K-FAC posteriors over dense layers fed by vectors.

    One forward pass and ``C`` backward passes give each layer's input ``a``
    and output gradients ``g_c``; the weight Jacobian of class ``c`` is
    ``g_c (x) a``, so the block-diagonal covariance contracts per layer in
    closed form (O(B C^2 (in + out)) after one transform), never forming ``J``.
    Conv2d layers too: their per-sample weight Jacobians ``sum_t g_c[t] a[t]^T``
    (input patches ``a``; for K-FAC, in the factors' eigenbases) are formed one
    layer and one chunk of rows at a time, never the Jacobian of all weights.
    ``None`` when the network has other layers or inputs with extra dims.
    ``center``: also the covariance of the centered logits, from output
    gradients centered over classes (see :func:`~skuq.posterior.augment_centered`).
    """
    plan = layer_plan(weights)
    if isinstance(plan, str) or not all(isinstance(m, (nn.Linear, nn.Conv2d)) for m, _ in plan):
        return None
    recorded = _record_layers(weights.model, [m for m, _ in plan], x)
    if recorded is None:
        return None
    f, inputs, outs = recorded
    grads = _class_output_gradients(f, outs, center)
    dt = posterior.mean.dtype
    n_rows = grads[0].shape[1]
    cov = torch.zeros(f.shape[0], n_rows, n_rows, dtype=dt, device=f.device)
    if isinstance(posterior, DiagPosterior):
        _add_diag_layers(cov, plan, inputs, grads, posterior)
    else:
        _add_kron_layers(cov, plan, inputs, grads, posterior)
    return gaussian_predictive(f.detach(), cov, center)


def _record_layers(model: nn.Module, modules: list[nn.Module], x: Tensor):
    """``model(x)`` with autograd, each layer's input and output; ``None`` if a layer is unfit.

    Unfit: called other than once per pass (weight sharing), or fed inputs with
    extra dims (a Linear layer on sequences, say), which the closed forms do not cover.
    """
    f, rec = record_forward(model, modules, x, grad=True)
    if any(
        len(rec.outputs[m]) != 1 or rec.inputs[m][0].ndim != (4 if isinstance(m, nn.Conv2d) else 2)
        for m in modules
    ):
        return None
    return f, {m: rec.inputs[m][0] for m in modules}, [rec.outputs[m][0] for m in modules]


def _class_output_gradients(f: Tensor, outs: list[Tensor], center: bool) -> list[Tensor]:
    """Per layer, the gradients of each output ``f[:, c]`` in the layer's output.

    ``C`` backward passes; each result is (B, C, out) or (B, C, O, H, W), or
    with ``C + 1`` rows (see :func:`~skuq.posterior.augment_centered`) when ``center``.
    """
    n_out = f.shape[1]
    grads = [[] for _ in outs]
    for c in range(n_out):
        gc = torch.autograd.grad(f[:, c].sum(), outs, retain_graph=c < n_out - 1)
        for k, g in enumerate(gc):
            grads[k].append(g.detach())
    grads = [torch.stack(g, 1) for g in grads]  # (B, C, out) or (B, C, O, H, W)
    if center:  # the Jacobian is linear in the output gradients: P J = (P g) (x) a
        grads = [augment_centered(g) for g in grads]
    return grads


def _add_diag_layers(
    cov: Tensor, plan, inputs: dict, grads: list[Tensor], posterior: DiagPosterior
) -> None:
    """``cov += J diag(var) J^T``, layer by layer (in place)."""
    dt = cov.dtype
    var = posterior.marginal_variance()
    for (mod, slices), g in zip(plan, grads, strict=True):
        g = g.to(dt)
        if isinstance(mod, nn.Conv2d):
            cov += _conv_diag_glm(mod, slices, inputs[mod].to(dt), g, var)
            continue
        u = 0
        if "weight" in slices:
            a = inputs[mod].to(dt)
            u = (a**2) @ var[slices["weight"]].reshape(mod.out_features, -1).T
        if "bias" in slices:
            u = u + var[slices["bias"]]
        cov += torch.einsum("bco,bdo,bo->bcd", g, g, u)


def _add_kron_layers(
    cov: Tensor, plan, inputs: dict, grads: list[Tensor], posterior: KronPosterior
) -> None:
    """``cov += J Sigma J^T`` under K-FAC, layer by layer in the factors' eigenbases."""
    dt = cov.dtype
    starts = {b.index.start: i for i, b in enumerate(posterior.blocks)}
    inv = posterior.inverse_eigvals()
    for (mod, slices), g in zip(plan, grads, strict=True):
        g = g.to(dt)
        if isinstance(mod, nn.Conv2d):
            cov += _conv_kron_glm(mod, slices, inputs[mod].to(dt), g, posterior, starts, inv)
            continue
        if "weight" in slices:
            i = starts[slices["weight"].start]
            QG, QA = posterior.eig[i][0][1], posterior.eig[i][1][1]
            a = inputs[mod].to(dt)
            sw = ((a @ QA) ** 2) @ inv[i].T  # (B, out)
            gq = g @ QG
            cov += torch.einsum("bco,bdo,bo->bcd", gq, gq, sw)
        if "bias" in slices:
            i = starts[slices["bias"].start]
            gq = g @ posterior.eig[i][0][1]
            cov += torch.einsum("bco,bdo,o->bcd", gq, gq, inv[i])


def gaussian_predictive(f: Tensor, cov: Tensor, augmented: bool = False) -> OutputDistribution:
    """``N(f, cov)`` in ``f``'s dtype; ``augmented``: ``cov`` is of ``(P f, mean f)``.

    An augmented (B, C+1, C+1) covariance (from
    :func:`~skuq.posterior.augment_centered` factors) is split into the
    covariance of ``f`` and the precise ``centered_covariance``.

    Examples
    --------
    >>> import torch
    >>> from skuq.posterior import augment_centered
    >>> from skuq.predictive import gaussian_predictive
    >>> J = augment_centered(torch.randn(2, 3, 5))
    >>> d = gaussian_predictive(torch.zeros(2, 3), J @ J.transpose(1, 2), augmented=True)
    >>> d.covariance.shape, d.centered_covariance.shape
    (torch.Size([2, 3, 3]), torch.Size([2, 3, 3]))
    """
    if not augmented:
        return OutputDistribution.gaussian(f, cov.to(f.dtype))
    S, S_c = split_centered(cov)
    return OutputDistribution.gaussian(f, S.to(f.dtype), S_c.to(f.dtype))


def _conv_diag_glm(mod: nn.Conv2d, slices, a: Tensor, g: Tensor, var: Tensor) -> Tensor:
    """A Conv2d layer's share of ``J diag(var) J^T``, (B, C, C), in chunks of rows."""
    gt = g.flatten(3)  # (B, C, O, T)
    out = torch.zeros(g.shape[0], g.shape[1], g.shape[1], dtype=g.dtype, device=g.device)
    if "bias" in slices:
        gb = gt.sum(-1)
        out += torch.einsum("bco,bdo,o->bcd", gb, gb, var[slices["bias"]])
    if "weight" in slices:
        patches = unfold(mod, a)  # (B, I, T)
        vw = var[slices["weight"]]
        per_row = g.shape[1] * vw.numel()
        step = max(1, DEFAULT_MAX_ELEMENTS // max(1, per_row))
        for s in range(0, g.shape[0], step):
            Jw = torch.einsum("bcot,bit->bcoi", gt[s : s + step], patches[s : s + step])
            Jw = Jw.flatten(2)
            out[s : s + step] += torch.einsum("bcp,p,bdp->bcd", Jw, vw, Jw)
    return out


def _conv_kron_glm(mod: nn.Conv2d, slices, a: Tensor, g: Tensor, posterior, starts, inv) -> Tensor:
    """A Conv2d layer's share of ``J Sigma J^T`` under K-FAC, (B, C, C), in chunks of rows.

    The weight Jacobian of class ``c`` is ``sum_t g_c[t] a[t]^T`` (output
    gradients ``g``, input patches ``a`` at positions ``t``); in the factors'
    eigenbases it is ``sum_t (Q_G^T g_c[t]) (Q_A^T a[t])^T``, weighted there by
    the block's inverse eigenvalues. The bias Jacobian is ``sum_t g_c[t]``.
    """
    gt = g.flatten(3)  # (B, C, O, T)
    out = torch.zeros(g.shape[0], g.shape[1], g.shape[1], dtype=g.dtype, device=g.device)
    if "bias" in slices:
        i = starts[slices["bias"].start]
        gq = gt.sum(-1) @ posterior.eig[i][0][1]
        out += torch.einsum("bco,bdo,o->bcd", gq, gq, inv[i])
    if "weight" in slices:
        i = starts[slices["weight"].start]
        QG, QA = posterior.eig[i][0][1], posterior.eig[i][1][1]
        gq = torch.einsum("bcot,op->bcpt", gt, QG)
        aq = torch.einsum("bit,ij->bjt", unfold(mod, a), QA)  # (B, I, T) rotated
        per_row = g.shape[1] * inv[i].numel()
        step = max(1, DEFAULT_MAX_ELEMENTS // max(1, per_row))
        w = inv[i].reshape(-1)
        for s in range(0, g.shape[0], step):
            Jq = torch.einsum("bcot,bit->bcoi", gq[s : s + step], aq[s : s + step]).flatten(2)
            out[s : s + step] += torch.bmm(Jq * w, Jq.transpose(1, 2))
    return out


def needs_jacobians(weights: WeightSubset, posterior: WeightPosterior, x: Tensor) -> bool:
    """Whether :func:`glm_predictive` falls back to per-sample Jacobians for ``x``.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> from skuq.posterior import DiagPosterior
    >>> from skuq.predictive import needs_jacobians
    >>> lin = torch.nn.Linear(3, 2)
    >>> w = select_weights(lin)
    >>> needs_jacobians(w, DiagPosterior(w.vector(), torch.ones(8)), torch.zeros(4, 3))
    False
    """
    if isinstance(posterior, LowRankPosterior):
        return True
    if last_layer_features(weights, x[:2]) is not None:
        return False
    if isinstance(posterior, (DiagPosterior, KronPosterior)):
        return _layer_glm(weights, posterior, x[:2]) is None
    return True


def glm_predictive(
    weights: WeightSubset,
    posterior: WeightPosterior,
    x: Tensor,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    use_features: bool = True,
    center: bool = False,
) -> OutputDistribution:
    """Linearized (GLM) predictive over outputs for one batch.

    Parameters
    ----------
    weights : WeightSubset
        The weights the posterior lives on.
    posterior : WeightPosterior
    x : Tensor of shape (B, ...)
    max_elements : int
        Most Jacobian entries held at once.
    use_features : bool
        Use the last-layer feature route where it applies.
    center : bool
        Also form the covariance of the centered logits ``P f`` (``P = I -
        11^T/C``; softmax gives them the same probabilities) from centered
        Jacobians, so that the variance of the shift shared by all logits
        never enters its sums (see :func:`~skuq.posterior.augment_centered`),
        as ``centered_covariance`` (for ``link="centered_probit"``).

    Returns
    -------
    OutputDistribution
        Gaussian with full (B, C, C) covariance.

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights, compute_curvature
    >>> from skuq.posterior import posterior_from_curvature
    >>> from skuq.predictive import glm_predictive
    >>> lin = torch.nn.Linear(3, 2)
    >>> w = select_weights(lin)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> post = posterior_from_curvature(compute_curvature(w, [(x, y)]), w.vector())
    >>> glm_predictive(w, post, x).probabilities("probit").shape
    torch.Size([8, 2])
    """
    if use_features and not isinstance(posterior, LowRankPosterior):
        feats = last_layer_features(weights, x)
        if feats is not None:
            phi, f = feats
            layer = weights.last_layer
            cov = posterior.functional_variance_last_layer(
                phi.to(posterior.mean.dtype),
                layer.out_features,
                len(weights.names) == 2,
                augment=center,
            )
            return gaussian_predictive(f, cov, center)
    if use_features and isinstance(posterior, (DiagPosterior, KronPosterior)):
        layered = _layer_glm(weights, posterior, x, center)
        if layered is not None:
            return layered
    parts = []
    with torch.no_grad():
        n_out = weights.model(x[:1]).shape[1]
    for _, J, f in iter_jacobians(weights, x, n_out, max_elements):
        J = J.detach().to(posterior.mean.dtype)
        cov = posterior.functional_variance(augment_centered(J) if center else J)
        parts.append(gaussian_predictive(f.detach(), cov, center))
    return OutputDistribution.concatenate(parts)


def nn_predictive(
    weights: WeightSubset,
    posterior: WeightPosterior,
    x: Tensor,
    *,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    thetas: Tensor | None = None,
) -> OutputDistribution:
    """Sampling predictive: outputs of the network at posterior weight draws.

    Parameters
    ----------
    n_samples : int
        Weight draws (ignored when ``thetas`` is given).
    thetas : Tensor of shape (S, P), optional
        Pre-drawn weights (to use the same draws for several batches).

    Returns
    -------
    OutputDistribution
        Sample form, (S, B, C).

    Examples
    --------
    >>> import torch
    >>> from skuq.curvature import select_weights
    >>> from skuq.posterior import DiagPosterior
    >>> from skuq.predictive import nn_predictive
    >>> lin = torch.nn.Linear(3, 2)
    >>> w = select_weights(lin)
    >>> post = DiagPosterior(w.vector(), torch.ones(8))
    >>> nn_predictive(w, post, torch.zeros(4, 3), n_samples=10).samples.shape
    torch.Size([10, 4, 2])
    """
    if thetas is None:
        thetas = posterior.sample(n_samples, generator)
    thetas = thetas.to(weights.dtype)
    step = max(1, int(DEFAULT_MAX_ELEMENTS // max(1, x[:1].numel() * 64)))
    outs = []
    with torch.no_grad():
        for start in range(0, len(thetas), step):  # vmap over weight draws, in chunks
            outs.append(vmap(lambda t: weights.forward(t, x))(thetas[start : start + step]))
    return OutputDistribution.from_samples(torch.cat(outs))
