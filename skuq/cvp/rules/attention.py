"""Rules of attention: ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``
and the Transformer encoder (attention weights from the means, variance through
the values and the output projection: approximate)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Moments, UnsupportedLayerError, get_rule, register_rule
from ._common import _as_m, _derive, _is_m, _sq
from .arithmetic import _add
from .linear import _linear, _linear_fn


def _attend(q: Tensor, k: Tensor, v: Moments, attn_mask=None, is_causal=False, scale=None):
    """Attention weights from the means; variance through the values."""
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1)
    if scale is None or scale != 1.0:
        scores = scores * (scale if scale is not None else 1.0 / math.sqrt(d))
    if is_causal:
        lq, lk = scores.shape[-2], scores.shape[-1]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    mean = weights @ v.mean
    var = None if v.var is None else _sq(weights) @ v.var
    return Moments(mean, var), weights


@register_rule(F.scaled_dot_product_attention)
def _sdpa(
    ctx, fn, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs
) -> Moments:
    q = query.mean if _is_m(query) else query
    k = key.mean if _is_m(key) else key
    mask = attn_mask.mean if _is_m(attn_mask) else attn_mask
    out, _ = _attend(q, k, _as_m(value), mask, is_causal, scale)
    return out


@register_rule(nn.MultiheadAttention)
def _mha(
    ctx,
    m: nn.MultiheadAttention,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    if m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedLayerError(
            "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported by CVP"
        )
    query, key, value = _as_m(query), _as_m(key), _as_m(value)
    if not m.batch_first:  # (L, N, E) -> (N, L, E)
        query, key, value = (t.map(lambda a: a.transpose(0, 1)) for t in (query, key, value))
    e, h = m.embed_dim, m.num_heads
    hd = e // h
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.split(e, dim=0)
        wvar = ctx.param_var(m.in_proj_weight)
        wv_var = None if wvar is None else wvar[2 * e :]
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        wv_var = ctx.param_var(m.v_proj_weight)
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.split(e, dim=0)
        bvar = ctx.param_var(m.in_proj_bias)
        bv_var = None if bvar is None else bvar[2 * e :]
    else:
        bq = bk = bv = bv_var = None
    scale = 1.0 / math.sqrt(hd)  # applied to the query projection, not to the scores
    if m._qkv_same_embed_dim and key.mean is query.mean:  # self-attention: one product
        w = m.in_proj_weight
        w_qk = _derive(ctx, w, "mha_qk", lambda: torch.cat([w[:e] * scale, w[e : 2 * e]]))
        b_qk = None
        if bq is not None:
            b = m.in_proj_bias
            b_qk = _derive(ctx, b, "mha_qk", lambda: torch.cat([b[:e] * scale, b[e : 2 * e]]))
        q, k = F.linear(query.mean, w_qk, b_qk).split(e, dim=-1)
    else:
        q = F.linear(query.mean, wq, bq) * scale
        k = F.linear(key.mean, wk, bk)
    vm = _linear_fn(
        ctx, F.linear, value, Moments(wv, wv_var), None if bv is None else Moments(bv, bv_var)
    )
    n, lq, lk = q.shape[0], q.shape[1], k.shape[1]

    def heads(t, length):
        return t.reshape(n, length, h, hd).transpose(1, 2)

    mask = None
    if attn_mask is not None:
        am = attn_mask.mean if _is_m(attn_mask) else attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros_like(am, dtype=q.dtype).masked_fill(am, float("-inf"))
        mask = am.view(n, h, lq, lk) if am.ndim == 3 else am
    if key_padding_mask is not None:
        kp = key_padding_mask.mean if _is_m(key_padding_mask) else key_padding_mask
        if kp.dtype == torch.bool:
            kp = torch.zeros_like(kp, dtype=q.dtype).masked_fill(kp, float("-inf"))
        kp = kp.view(n, 1, 1, lk)
        mask = kp if mask is None else mask + kp
    out, weights = _attend(
        heads(q, lq),
        heads(k, lk),
        vm.map(lambda t: heads(t, lk)),
        mask,
        is_causal and attn_mask is None,
        scale=1.0,
    )
    out = out.map(lambda t: t.transpose(1, 2).reshape(n, lq, e))
    out = _linear(ctx, m.out_proj, out)
    if not m.batch_first:
        out = out.map(lambda t: t.transpose(0, 1))
    attn = None
    if need_weights:
        attn = Moments(weights.mean(dim=1) if average_attn_weights else weights)
    return out, attn


@register_rule(nn.TransformerEncoderLayer)
def _encoder_layer(
    ctx,
    m: nn.TransformerEncoderLayer,
    src,
    src_mask=None,
    src_key_padding_mask=None,
    is_causal=False,
):
    def sa(x):
        return ctx.call(
            m.self_attn,
            x,
            x,
            x,
            attn_mask=src_mask,
            key_padding_mask=src_key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]

    def ff(x):
        act = m.activation
        hdn = ctx.call(m.linear1, x)
        hdn = (
            ctx.call(act, hdn)
            if isinstance(act, nn.Module)
            else get_activation_rule(act)(ctx, act, hdn)
        )
        return ctx.call(m.linear2, hdn)

    x = _as_m(src)
    if m.norm_first:
        x = _add(ctx, None, x, sa(ctx.call(m.norm1, x)))
        x = _add(ctx, None, x, ff(ctx.call(m.norm2, x)))
    else:
        x = ctx.call(m.norm1, _add(ctx, None, x, sa(x)))
        x = ctx.call(m.norm2, _add(ctx, None, x, ff(x)))
    return x


def get_activation_rule(fn):
    rule = get_rule(fn)
    if rule is None:
        raise UnsupportedLayerError(f"CVP has no rule for the activation {fn!r}")
    return rule


@register_rule(nn.TransformerEncoder)
def _encoder(
    ctx, m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None
):
    x = src
    for layer in m.layers:
        x = ctx.call(
            layer,
            x,
            src_mask=mask,
            src_key_padding_mask=src_key_padding_mask,
            is_causal=bool(is_causal),
        )
    if m.norm is not None:
        x = ctx.call(m.norm, x)
    return x
