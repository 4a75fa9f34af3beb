"""Multi-head latent attention (DeepSeek-V2/V3), per device, on this device's heads.

    q     = q_b(norm(q_a(h)))  (or q(h))            [H, nope + rope] per token
    c, kr = kv_a(h) split [C, R]; c = norm(c)        the latent and one RoPE key shared by the heads
    k_h   = [c W_uk_h, kr],  v_h = c W_uv_h          kv_b = [W_uk | W_uv] per head: [C, H, nope + V]

The cache keeps (c, RoPE'd kr): C + R values per token per layer, whatever the heads (DeepSeek-V3:
576 against 128 x (192 + 128) = 40,960 for its expanded keys and values). It is replicated over tp: each
device's heads read all of it, and splitting C would need a sum of partial scores over tp per step.

Prefill and training (no cache read) expand k and v per head. Reading the cache (decode, extend,
mixed) uses the absorbed form by default: q_h W_uk_h^T is a query in latent space, so the scores are
[q_h W_uk_h^T, q_rope_h] . [c, kr] (one shared key per position: multi-query attention over C + R
dims), the weighted sum stays in latent space and W_uv_h maps it out, so the cache is never expanded.
`absorb=False` expands the span it reads instead (the benchmark's comparison).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.config.model import ModelConfig
from moejax.ops import layers
from moejax.ops import quant as q8
from moejax.ops.attention import CACHED_MODES, bits, cached_attention, write_prefill
from moejax.ops.layers import mm

LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, which q_a_layernorm and kv_a_layernorm keep


def softmax_scale(cfg: ModelConfig) -> float:
    """head_dim^-0.5, times yarn's mscale squared where rope_scaling has mscale_all_dim (transformers'
    yarn_apply_mscale)."""
    scale = cfg.head_dim ** -0.5
    rope = cfg.rope
    m_all = rope.get("mscale_all_dim")
    if rope.get("rope_type", "default") != "default" and m_all and float(rope["factor"]) > 1:
        m = 0.1 * m_all * math.log(float(rope["factor"])) + 1.0
        scale *= m * m
    return scale


def _rope(x, cos, sin, interleave: bool):
    """RoPE over x's last dim. Interleaved pairs (x0, x1), (x2, x3)...: transformers rotates each pair and
    writes the results de-interleaved (evens then odds), which is rotate-half RoPE of the de-interleaved x."""
    if interleave:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    return layers.apply_rope(x, cos, sin)


def _scores_softmax(scores, mask, dtype):
    """Masked softmax in float32 over the last axis, probabilities in `dtype`."""
    scores = jnp.where(mask, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def expanded_attention(q_BTHK, k_BSHK, v_BSHV, mask_BTS, scale: float):
    """Attention with a key dim K and a value dim V of their own (written out; float32 scores)."""
    scores = mm("bthk,bshk->bhts", q_BTHK, k_BSHK) * scale
    probs = _scores_softmax(scores, mask_BTS[:, None], v_BSHV.dtype)
    return mm("bhts,bshv->bthv", probs, v_BSHV).astype(q_BTHK.dtype)


def mla_block(x_BTD, w, side, mode: str, kv, row0, cfg: ModelConfig, platform: str, head_axis=None, window=None,
              absorb: bool = True):
    """Pre-norm latent attention on this device's heads (w: attn_norm, wq_a, q_a_norm, wq_b or wq, wkv_a,
    kv_a_norm, wkv_b, wo; `mode` as models/transformer.py `build`; kv: (the latent cache [B, S, 1, C + R],)
    in its bits). Returns the partial (over tp) output [B, T, D] float32 and kv. `head_axis` and
    `window` are attention_block's (no norm spans the heads; latent attention has no window)."""
    del head_axis, window
    cdt = x_BTD.dtype
    b, t, d = x_BTD.shape
    c_dim, r_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    nope = cfg.head_dim - r_dim
    h_BTD = layers.rmsnorm(x_BTD, w["attn_norm"], cfg.rms_norm_eps)
    if cfg.q_lora_rank:
        a_BTQ = q8.matmul("btd,dq->btq", h_BTD, w["wq_a"]).astype(cdt)
        a_BTQ = layers.rmsnorm(a_BTQ, w["q_a_norm"], LATENT_NORM_EPS)
        q_BTJ = q8.matmul("btq,qj->btj", a_BTQ, q8.reshape(w["wq_b"], (cfg.q_lora_rank,), (-1,)))
    else:
        q_BTJ = q8.matmul("btd,dj->btj", h_BTD, q8.reshape(w["wq"], (d,), (-1,)))
    q_BTHK = q_BTJ.astype(cdt).reshape(b, t, -1, cfg.head_dim)
    ckv_BTJ = q8.matmul("btd,dj->btj", h_BTD, w["wkv_a"]).astype(cdt)
    c_BTC = layers.rmsnorm(ckv_BTJ[..., :c_dim], w["kv_a_norm"], LATENT_NORM_EPS)
    inv_freq, factor = layers.rope_frequencies(r_dim, cfg.rope_theta, cfg.rope)
    cos, sin = layers.rope_tables(side["pos"], inv_freq, factor, cdt)
    q_rot = _rope(q_BTHK[..., nope:], cos, sin, cfg.rope_interleave)
    kr_BT1R = _rope(ckv_BTJ[..., None, c_dim:], cos, sin, cfg.rope_interleave)
    latent_BT1J = jnp.concatenate([c_BTC[:, :, None], kr_BT1R], axis=-1)  # what the cache keeps
    w_uk, w_uv = w["wkv_b"][..., :nope], w["wkv_b"][..., nope:]  # [C, H, nope], [C, H, V]
    scale = softmax_scale(cfg)

    def expand(lat_BS1J):  # per-head keys [B, S, H, K] and values [B, S, H, V] of latents
        c = lat_BS1J[:, :, 0, :c_dim]
        k_nope = mm("bsc,chn->bshn", c, w_uk).astype(cdt)
        v = mm("bsc,chv->bshv", c, w_uv).astype(cdt)
        kr = jnp.broadcast_to(lat_BS1J[:, :, :, c_dim:], k_nope.shape[:3] + (r_dim,))
        return jnp.concatenate([k_nope, kr], axis=-1), v

    q_full = jnp.concatenate([q_BTHK[..., :nope], q_rot], axis=-1)
    if mode in CACHED_MODES and absorb:
        q_lat = mm("bthn,chn->bthc", q_BTHK[..., :nope], w_uk).astype(cdt)  # the query in latent space
        q_abs = jnp.concatenate([q_lat, q_rot], axis=-1)  # [B, T, H, C + R]

        def attend(q, cached, mask_BTS):  # multi-query attention over [c, kr]; the sum stays latent
            lat_BSJ = bits(cached[0], cdt)[:, :, 0]
            probs = _scores_softmax(mm("bthj,bsj->bhts", q, lat_BSJ) * scale, mask_BTS[:, None], cdt)
            return mm("bhts,bsc->bthc", probs, lat_BSJ[..., :c_dim]).astype(cdt)
        o_lat, kv = cached_attention(mode, q_abs, (latent_BT1J,), side, kv, row0, attend, None, platform)
        out_BTHV = mm("bthc,chv->bthv", o_lat, w_uv).astype(cdt)
    elif mode in CACHED_MODES:
        def attend(q, cached, mask_BTS):
            return expanded_attention(q, *expand(bits(cached[0], cdt)), mask_BTS, scale)
        out_BTHV, kv = cached_attention(mode, q_full, (latent_BT1J,), side, kv, row0, attend, None, platform)
    else:
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        out_BTHV = expanded_attention(q_full, *expand(latent_BT1J), causal, scale)
        if mode == "prefill":
            kv = write_prefill(kv, (latent_BT1J,), row0)
    o_BTD = q8.matmul("btj,jd->btd", out_BTHV.reshape(b, t, -1), q8.reshape(w["wo"], (-1,), (d,)))
    return o_BTD, kv
