"""Global average pooling after a shared-weight layer: the covariance across positions.

A convolution (or a Linear applied to every token) uses one weight tensor at every
position, so its weight noise moves all positions together: the outputs at two
positions are correlated, ``Cov(y_cp, y_cq) = sum_j s_cj x_jp x_jq + s_b``
(``x_jp`` the input patch at position p, ``s`` the weight variances). Per-unit
propagation drops these covariances; for most layers that is the documented
mean-field approximation, but a global average pool sums exactly those covariances,
and dropping them underestimates the pooled variance by up to the number of
positions (a factor 5 to 25 on small CNNs).

So when a global average pool (``AdaptiveAvgPool1d/2d`` to size 1, its functional
form, or a mean over all position dimensions) is reached from such a layer ``L``
through per-position maps only -- elementwise activations, eval-mode BatchNorm,
dropout/identity, and residual additions of a branch that does not depend on
``L`` -- the pooled variance gets the cross-position part of ``L``'s own weight
noise, carried through those maps to first order:

``Var[mean_p g(y_cp)] += sum_j s_cj (z_cj^2 - d_cj) + s_bc ((sum_p G_cp)^2 - sum_p G_cp^2)``

with ``G_cp = E[g'(y_cp)] / P`` (the expected slope of the chain, exact for
ReLU's first Hermite term: Stein's lemma), ``z_cj = sum_p G_cp mu_jp`` and ``d_cj =
sum_p G_cp^2 mu_jp^2`` (``mu`` the mean of ``L``'s input). The diagonal (``p = q``)
stays the exact per-unit rule's. For a pool right after ``L`` (no nonlinearity) the
pooled variance of ``L``'s weight noise is then exact for independent inputs. When the
chain has one activation ``f``, the orders beyond the first are added from the Hermite
(Mehler) series of the covariance of ``f`` of two correlated Gaussians,
``sum_{k>=2} rho^k / k! f_k(p) f_k(q)`` with ``f_k = E[f(mu + sd z) He_k(z)]``, taking
the positions of a channel as equicorrelated (one ``rho`` per channel: the summed
off-diagonal covariance over the summed ``sd_p sd_q``); ReLU's ``f_k`` are closed forms.
The cost is a few batched matrix products of the size of ``L``'s weight gradient.

The covariance that reaches the pool through layers further down (the weight noise
of an earlier layer, mixed by ``L``) is not carried: per-unit propagation stays an
approximation there (``docs/methods/cvp.md`` has the measured ratios).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import moments as mom
from .graph import eval_chain, unary_parent
from .moments._normal import _HE_W, _HE_X
from .rules.normalization import layer_norm_moments

# internal to the propagator (propagator.py): no public names
__all__: list[str] = []

_SHARED = (nn.Conv1d, nn.Conv2d, nn.Linear)
_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_POOL_FNS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
_ADD_FNS = ("add", "iadd", "sub", "isub")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _norm_ok(mod) -> bool:
    """A normalization layer whose affine part is shared across positions in a form
    the correction handles (LayerNorm/RMSNorm over the last dim only)."""
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return not mod.training and mod.running_mean is not None
    return len(mod.normalized_shape) == 1


# entries of the (rows, out, in) temporaries per chunk of rows: a chunk's temporaries
# stay in cache (as skuq.cvp.moments.SLICE_ENTRIES); whole-batch ones of millions of
# entries went to main memory and cost more than the rest of a Transformer's pass.
# Each row's products are separate matrix products: the same values for any chunk
_CHUNK = 1 << 16


@dataclass
class PooledSite:
    """A global average pool reached from a shared-weight layer through per-position maps.

    ``chain`` lists the nodes from the layer's output to the pool's input, as
    ``(node, kind, parent)``: kind ``"unary"`` (elementwise map of ``parent``),
    ``"product"`` (an elementwise function of ``parent`` found by the propagator),
    ``"bn"``, ``"pass"``, ``"add"`` or ``"sub"`` (the chain operand is ``parent``).
    """

    pool: torch.fx.Node
    layer: torch.fx.Node
    chain: list
    dims: object  # the mean's dims (None for an adaptive pool)


def _is_global_pool(gm, node):
    """``(input node, dims)`` of a global average pool, else None."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _POOL_MODULES):
            size = mod.output_size
            size = size if isinstance(size, tuple) else (size,)
            if all(s == 1 for s in size):
                return node.args[0], None
        return None
    if node.op == "call_function" and node.target in _POOL_FNS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        size = size if isinstance(size, (tuple, list)) else (size,)
        if all(s == 1 for s in size):
            return node.args[0], None
        return None
    is_mean = (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    )
    if not is_mean:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or node.kwargs.get("dtype") is not None:
        return None
    return node.args[0], dims


def find_pooled_sites(gm: torch.fx.GraphModule, layer_names, products) -> dict:
    """``{pool node: [PooledSite, ...]}`` for the traced module ``gm``.

    ``layer_names``: the call sites with posterior variance; ``products``: the
    propagator's elementwise products (``{node: (root, g)}``).
    """
    layers = set(layer_names)
    ancestors: dict = {}
    for n in gm.graph.nodes:
        acc = set()
        for a in n.all_input_nodes:
            acc |= ancestors[a] | {a}
        ancestors[n] = acc

    found: list = []

    def walk(n, chain, depth=0):
        """Append ``(layer, chain)`` to ``found`` for the random shared layers behind n."""
        if depth > 64 or not isinstance(n, torch.fx.Node):
            return None
        if n.op == "call_module" and n.target in layers:
            mod = gm.get_submodule(n.target)
            if len(n.args) != 1 or n.kwargs:
                return None
            if isinstance(mod, _SHARED) or (isinstance(mod, _NORMS) and _norm_ok(mod)):
                found.append((n, chain))
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):  # per channel: go on
                return walk(n.args[0], [(n, "bn", n.args[0]), *chain], depth + 1)
            return None
        if n in products:
            return walk(products[n][0], [(n, "product", products[n][0]), *chain], depth + 1)
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and len(n.args) == 1:
                return walk(n.args[0], [(n, "bn", n.args[0]), *chain], depth + 1)
            if isinstance(mod, _PASS_MODULES) and len(n.args) == 1:
                return walk(n.args[0], [(n, "pass", n.args[0]), *chain], depth + 1)
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if (
            n.op in ("call_function", "call_method")
            and name in _ADD_FNS
            and len(n.args) == 2
            and not n.kwargs
            and all(isinstance(a, torch.fx.Node) for a in n.args)
        ):
            a, b = n.args
            for this, other in ((a, b), (b, a)):
                kind = "sub" if this is b and "sub" in name else "add"
                before = len(found)
                walk(this, [(n, kind, this), *chain], depth + 1)
                # keep the layers the other operand does not depend on
                found[before:] = [
                    f for f in found[before:] if f[0] not in ancestors[other] | {other}
                ]
            return None
        parent = unary_parent(gm, n)
        if parent is None:
            return None
        identity = n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Identity)
        return walk(parent, [(n, "pass" if identity else "unary", parent), *chain], depth + 1)

    sites = {}
    for node in gm.graph.nodes:
        pooled = _is_global_pool(gm, node)
        if pooled is None:
            continue
        found.clear()
        walk(pooled[0], [])
        if found:
            sites[node] = [PooledSite(node, layer, chain, pooled[1]) for layer, chain in found]
    return sites


# ------------------------------------------------------------------ slopes
_N_SLOPE = 20
_sz, _sw = np.polynomial.hermite_e.hermegauss(_N_SLOPE)
_SLOPE_Z = torch.as_tensor(_sz, dtype=torch.float64)
_SLOPE_W = torch.as_tensor(_sw / math.sqrt(2.0 * math.pi), dtype=torch.float64)


def _relu_like(gm, node) -> float | None:
    """The negative slope of a ReLU / LeakyReLU node, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.ReLU:
            return 0.0
        if type(mod) is nn.LeakyReLU:
            return float(mod.negative_slope)
        return None
    if node.target in (torch.relu, F.relu, "relu"):
        return 0.0
    if node.target is F.leaky_relu:
        s = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return float(s)
    return None


def expected_slope(fn, mu: Tensor, var: Tensor | None) -> Tensor:
    """``E[fn'(x)]`` for ``x ~ N(mu, var)`` elementwise, by Stein's lemma
    ``E[fn'(x)] = E[(x - mu) fn(x)] / var`` with Gauss-Hermite quadrature (float64)."""
    m = mu.double()
    v = torch.zeros_like(m) if var is None else var.double()
    sd = v.sqrt().clamp_min(1e-10 * (1.0 + m.abs()))

    def one(mm, ss):
        x = mm.unsqueeze(-1) + ss.unsqueeze(-1) * _SLOPE_Z.to(mm.device)
        d = fn(x) - fn(mm).unsqueeze(-1)
        return (d * _SLOPE_Z.to(mm.device) * _SLOPE_W.to(mm.device)).sum(-1) / ss, ss

    slope, _ = mom._in_slices(one, m, sd)
    return slope.to(mu.dtype)


def _unary_fn(gm, node, kind, parent, products):
    """The elementwise map of a chain node, as a function of a tensor."""
    if kind == "product":
        fn = products[node][1]
        return F.silu if fn is None else fn

    def fn(t, _n=node, _p=parent):
        return eval_chain(gm, [_n], _p, t)

    return fn


def _chain_slopes(gm, site: PooledSite, env, products):
    """``(G, nonlinear)``: the expected slope of the chain per unit, and, when the chain
    has exactly one nonlinear map, ``(lam, node, kind, parent, kappa)`` -- the slopes
    before and after it and the map -- else None."""
    out = env[site.layer]
    g = torch.ones_like(out.mean)
    nonlinear = []
    for node, kind, parent in site.chain:
        x = env[parent]
        if kind == "pass" or kind == "add":
            continue
        if kind == "sub":
            g = -g
        elif kind == "bn":
            bn = gm.get_submodule(node.target)
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                scale = scale * bn.weight
            g = g * scale.view((1, -1) + (1,) * (g.ndim - 2))
        else:
            neg = _relu_like(gm, node) if kind == "unary" else None
            if neg is not None:
                if x.var is None:
                    slope = torch.where(x.mean > 0, 1.0, neg).to(x.mean.dtype)
                else:
                    sd = x.var.clamp_min(torch.finfo(x.var.dtype).tiny).sqrt()
                    slope = neg + (1.0 - neg) * 0.5 * torch.erfc(-x.mean / sd / math.sqrt(2))
            else:
                slope = expected_slope(_unary_fn(gm, node, kind, parent, products), x.mean, x.var)
            nonlinear.append((node, kind, parent, g))
            g = g * slope
    if len(nonlinear) != 1:
        return g, None
    node, kind, parent, lam = nonlinear[0]
    # slopes after the map: the chain's product over the nodes past it
    after = torch.ones_like(out.mean)
    seen = False
    for n2, k2, _p2 in site.chain:
        if n2 is node:
            seen = True
            continue
        if not seen or k2 in ("pass", "add"):
            continue
        if k2 == "sub":
            after = -after
        elif k2 == "bn":
            bn = gm.get_submodule(n2.target)
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                scale = scale * bn.weight
            after = after * scale.view((1, -1) + (1,) * (after.ndim - 2))
    return g, (lam, node, kind, parent, after)


#: Hermite orders of the higher-order cross-covariance term
_HERMITE_ORDERS = 12


def _hermite_coefficients(gm, node, kind, parent, products, mu, var):
    """``f_k = E[f(mu + sd z) He_k(z)]``, k = 2 .. _HERMITE_ORDERS, of the chain's map
    (closed form for ReLU / LeakyReLU, 32-node Gauss-Hermite otherwise); a list of
    tensors shaped like ``mu`` (float64)."""
    m = mu.double()
    v = torch.zeros_like(m) if var is None else var.double()
    sd = v.clamp_min(1e-300).sqrt()
    neg = _relu_like(gm, node) if kind == "unary" else None
    out = []
    if neg is not None:
        a = (m / sd).clamp(-40.0, 40.0)
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        # f_k = (1 - s) sd He_{k-2}(-a) phi(a); He_n(t) = t He_{n-1} - (n - 1) He_{n-2}
        h_prev, h = torch.zeros_like(a), torch.ones_like(a)  # He_{-1}, He_0 at -a
        for k in range(2, _HERMITE_ORDERS + 1):
            out.append((1.0 - neg) * sd * h * pdf)
            h_prev, h = h, -a * h - (k - 1) * h_prev
        return out
    fn = _unary_fn(gm, node, kind, parent, products)
    z = _HE_X.to(m.device)
    w = _HE_W.to(m.device)
    vals = fn(m.unsqueeze(-1) + sd.unsqueeze(-1) * z)
    he_prev, he = torch.ones_like(z), z  # He_0, He_1
    for k in range(2, _HERMITE_ORDERS + 1):
        he_prev, he = he, z * he - (k - 1) * he_prev
        out.append((vals * (he * w)).sum(-1))
    return out


# -------------------------------------------------------------- correction
def _pooled_dims(site: PooledSite, ndim: int, conv: bool):
    """Whether the pool reduces exactly the position dims of the layer's output."""
    if site.dims is None:
        return conv  # an adaptive pool: over the spatial dims of (N, C, ...)
    dims = site.dims if isinstance(site.dims, (tuple, list)) else (site.dims,)
    if not all(isinstance(d, int) for d in dims):
        return False
    dims = {d % ndim for d in dims}
    want = set(range(2, ndim)) if conv else set(range(1, ndim - 1))
    return bool(want) and dims == want


def _normalized_mean(mod, x) -> Tensor:
    """The mean of a normalization layer's normalized input (before its affine part)."""
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        shape = (1, -1) + (1,) * (x.mean.ndim - 2)
        inv = torch.rsqrt(mod.running_var + mod.eps).view(shape)
        return (x.mean - mod.running_mean.view(shape)) * inv
    if isinstance(mod, nn.LayerNorm):
        return layer_norm_moments(x, mod.normalized_shape, mod.eps).mean
    eps = mod.eps if mod.eps is not None else torch.finfo(x.mean.dtype).eps
    ms = (x.mean * x.mean).mean(-1, keepdim=True)
    if x.var is not None:
        ms = ms + x.var.mean(-1, keepdim=True)
    return x.mean * torch.rsqrt(ms + eps)


def pooled_correction(ctx, gm, site: PooledSite, env, products, scale=1.0) -> Tensor | None:
    """The cross-position variance of the pool's output from its layer's weight noise,
    shaped ``(N, C)`` (None when the site does not apply to this call)."""
    mod = gm.get_submodule(site.layer.target)
    x = env[site.layer.args[0]]
    out = env[site.layer]
    pool_in = env[site.chain[-1][0]] if site.chain else out
    if not hasattr(x, "mean") or pool_in.mean.shape != out.mean.shape:
        return None
    channel_first = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d))
    if not _pooled_dims(site, out.mean.ndim, channel_first):
        return None
    wv, bv = ctx.param_var(mod.weight), ctx.param_var(getattr(mod, "bias", None))
    if wv is None and bv is None:
        return None
    g, nonlinear = _chain_slopes(gm, site, env, products)
    n = g.shape[0]
    c_out = g.shape[1] if channel_first else g.shape[-1]

    def per_channel(t):  # (N, C, positions)
        t = t.expand(g.shape) if t.shape != g.shape else t
        return t.reshape(n, c_out, -1) if channel_first else t.reshape(n, -1, c_out).transpose(1, 2)

    n_pos = per_channel(g).shape[-1]
    corr = _cross(mod, x, per_channel(g) / n_pos, wv, bv, n, c_out, channel_first)
    if nonlinear is not None:
        corr = corr + _higher_orders(
            gm, site, env, products, nonlinear, mod, x, wv, bv, n, c_out, channel_first, per_channel
        )
    return corr * scale


def _higher_orders(
    gm, site, env, products, nonlinear, mod, x, wv, bv, n, c_out, channel_first, per_channel
):
    """The orders k >= 2 of the cross-position covariance through the one nonlinear map
    ``f`` of the chain: ``sum_k rho^k / k! [(sum_p kappa_p f_k(p))^2 - sum_p (kappa_p
    f_k(p))^2] / P^2``, with one correlation ``rho`` per channel (the positions taken
    as equicorrelated: the pairwise covariance of the map's input from the layer's
    weight noise, summed, over the sum of ``sd_p sd_q``)."""
    lam, node, kind, parent, after = nonlinear
    a = env[parent]
    if a.var is None:
        return 0.0
    lam_p, sd = per_channel(lam), per_channel(a.var.clamp_min(0.0).sqrt())
    n_pos = sd.shape[-1]
    if n_pos < 2:
        return 0.0
    cov_sum = _cross(mod, x, lam_p, wv, bv, n, c_out, channel_first)
    sd_sum = sd.sum(-1) ** 2 - (sd * sd).sum(-1)
    rho = (cov_sum / sd_sum.clamp_min(torch.finfo(sd.dtype).tiny)).clamp(-1.0, 1.0)
    kappa = per_channel(after)
    coeffs = _hermite_coefficients(gm, node, kind, parent, products, a.mean, a.var)
    total = torch.zeros_like(rho, dtype=torch.float64)
    rho64, fact = rho.double(), 1.0
    for k, f_k in enumerate(coeffs, start=2):
        fact *= k
        t = per_channel(f_k.to(kappa.dtype)).double() * kappa.double()
        total = total + rho64**k / fact * (t.sum(-1) ** 2 - (t * t).sum(-1))
    return (total / (n_pos * n_pos)).to(rho.dtype)


def _cross(mod, x, g, wv, bv, n, c_out, channel_first) -> Tensor:
    """``sum_j s_cj [(sum_p g_cp x_jp)^2 - sum_p g_cp^2 x_jp^2]`` plus the bias' term:
    the off-diagonal sum of the layer's weight-noise covariance weighted by ``g`` (N,
    C, P)."""
    corr = torch.zeros(n, c_out, dtype=g.dtype, device=g.device)
    if wv is not None and isinstance(mod, _NORMS):  # one shared scale per channel
        xh = _normalized_mean(mod, x)
        xh = xh.reshape(n, c_out, -1) if channel_first else xh.reshape(n, -1, c_out).transpose(1, 2)
        z, d = (g * xh).sum(-1), (g * g * xh * xh).sum(-1)
        corr = corr + wv * (z * z - d)
    elif wv is not None:
        if channel_first:
            patches = _patches(mod, x.mean)  # (N, C_in * K, P)
        else:
            patches = x.mean.reshape(n, -1, x.mean.shape[-1]).transpose(1, 2)  # (N, D, P)
        groups = getattr(mod, "groups", 1)
        out_g, per = c_out // groups, patches.shape[1] // groups
        w2 = wv.reshape(c_out, -1)
        rows = max(1, _CHUNK // max(out_g * per, 1))
        for gi in range(groups):
            o, p = slice(gi * out_g, (gi + 1) * out_g), slice(gi * per, (gi + 1) * per)
            for i in range(0, n, rows):
                gg, xx = g[i : i + rows, o], patches[i : i + rows, p]
                z = torch.bmm(gg, xx.transpose(1, 2))
                d = torch.bmm(gg * gg, (xx * xx).transpose(1, 2))
                corr[i : i + rows, o] = ((z * z - d) * w2[o]).sum(-1)
    if bv is not None:
        corr = corr + bv * (g.sum(-1) ** 2 - (g * g).sum(-1))
    return corr


def _patches(mod, x: Tensor) -> Tensor:
    """The convolution's input patches, ``(N, C_in * prod(kernel), positions)``."""
    padding = mod.padding
    if mod.padding_mode != "zeros" or isinstance(padding, str):  # 'same', 'valid', modes
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * (x.ndim - 2)
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, s = (1, mod.kernel_size[0]), (1, mod.dilation[0]), (1, mod.stride[0])
        padding = (0, padding[0] if isinstance(padding, tuple) else padding)
    else:
        k, d, s = mod.kernel_size, mod.dilation, mod.stride
    return F.unfold(x, k, dilation=d, padding=padding, stride=s)
