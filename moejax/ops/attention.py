"""Attention with a KV cache, per device: the pre-norm projection, RoPE, the cache write and read of
each serving mode, and the output projection's partial sums (the caller reduces them over tp).
No family: the projections are named wq, wk, wv, wo in the layer's weights. No collectives but one:
a norm over the whole q/k projection (`qk_norm: proj`) sums its squares over the head axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config.model import ModelConfig
from moejax.ops import layers
from moejax.ops import quant as q8


def cache_dtype(dtype):
    """The KV cache holds 16-bit floats as their uint16 bit patterns: XLA:CPU scatters bfloat16 by
    converting the whole cache to float32 and back (5x slower, 2x the cache in temporaries), and a
    bitcast to uint16 around the scatter became two copies of the cache."""
    return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def bits(x, dtype):
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


DECODE_GROUP = 4  # decode rows that share one span on CPU (shakespeare-bpe engine's median decode step,
# 16 slots, 640 positions, two A/B pairs: 7.1 -> 4.7 and 8.6 -> 6.0 ms)
MIN_SPAN = 128  # the shortest span of cache positions decode and extend attention read on CPU


def spans(length: int) -> list[int]:
    """The spans a cache of `length` positions is read in: MIN_SPAN, 2 MIN_SPAN, ... below it, then
    `length`."""
    out = [min(MIN_SPAN, length)]
    while out[-1] < length:
        out.append(min(2 * out[-1], length))
    return out


def read_span(needed, length: int, platform: str, attend):
    """attend(span) for the smallest span of `spans(length)` that holds `needed` positions (traced:
    the rows' furthest position + 1), chosen at run time by `lax.switch` on CPU: attention then reads
    only the cache a step needs, not every row's whole `--max-len` (the shakespeare-bpe model's decode
    step, 16 slots at positions 10-25: 2.9 ms reading 128 positions, 6.5 ms reading 640). On GPU a conditional costs
    a device-to-host sync, so it reads the whole length."""
    options = spans(length) if platform == "cpu" else [length]
    if len(options) == 1:
        return attend(options[0])
    index = jnp.minimum(jnp.sum(jnp.asarray(options) < needed), len(options) - 1)
    return jax.lax.switch(index, [lambda a=a: attend(a) for a in options])


def attention_block(x_BTD, w, side, mode: str, kv, row0, cfg: ModelConfig, platform: str,
                    head_axis: str | None = None, window=None):
    """Pre-norm attention on this device's heads with its KV cache (w: attn_norm, wq, wk, wv, wo; bq,
    bk, bv under `cfg.attention_bias`; bo under `cfg.attention_out_bias`; sinks under
    `cfg.attention_sinks`; q_norm, k_norm under `cfg.qk_norm`; partial and scaled RoPE from
    `cfg.rotary_dim` and `cfg.rope`; `window`: this layer's sliding window, None for full attention,
    an int, or a traced scalar where the stages' layers in this slot differ;
    `mode` as models/transformer.py `build`; `head_axis`: the mesh axis the heads are split over, for
    `qk_norm: proj`, whose mean of squares spans every head). Decode and extend read the span of
    cache positions their rows reach (`read_span`). Returns the partial (over tp) output [B, T, D] f32
    and kv."""
    cdt = x_BTD.dtype
    h_BTD = layers.rmsnorm(x_BTD, w["attn_norm"], cfg.rms_norm_eps)
    b, t, d = x_BTD.shape
    heads = lambda w_: q8.reshape(w_, (d,), (-1,))  # 2-D dots: XLA:CPU runs [.., H, K] contractions 2-3x slower
    q_BTJ, k_BTJ, v_BTJ = (q8.matmul("btd,dj->btj", h_BTD, heads(w[n])) for n in ("wq", "wk", "wv"))
    if cfg.attention_bias:  # this device's heads' slices of the q, k, v biases
        q_BTJ, k_BTJ, v_BTJ = (a + w[n].reshape(-1) for a, n in ((q_BTJ, "bq"), (k_BTJ, "bk"), (v_BTJ, "bv")))
    q_BTJ, k_BTJ, v_BTJ = (a.astype(cdt) for a in (q_BTJ, k_BTJ, v_BTJ))
    if cfg.qk_norm == "proj":  # over the whole projection: this device's heads are a slice of it
        q_BTJ = layers.sharded_rmsnorm(q_BTJ, w["q_norm"], cfg.rms_norm_eps, cfg.num_heads * cfg.head_dim, head_axis)
        k_BTJ = layers.sharded_rmsnorm(k_BTJ, w["k_norm"], cfg.rms_norm_eps, cfg.num_kv_heads * cfg.head_dim,
                                       head_axis)
    if cfg.clip_qkv is not None:
        q_BTJ, k_BTJ, v_BTJ = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q_BTJ, k_BTJ, v_BTJ))
    q_BTHK, k_BTGK, v_BTGK = (a.reshape(b, t, -1, cfg.head_dim) for a in (q_BTJ, k_BTJ, v_BTJ))
    if cfg.qk_norm == "head":  # each head's q and k RMS-normalised over its K dims, before RoPE
        q_BTHK = layers.rmsnorm(q_BTHK, w["q_norm"], cfg.rms_norm_eps)
        k_BTGK = layers.rmsnorm(k_BTGK, w["k_norm"], cfg.rms_norm_eps)
    inv_freq, factor = layers.rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope)
    cos, sin = layers.rope_tables(side["pos"], inv_freq, factor, cdt)
    q_BTHK, k_BTGK = layers.apply_rope(q_BTHK, cos, sin), layers.apply_rope(k_BTGK, cos, sin)
    sinks_H = w["sinks"] if cfg.attention_sinks else None

    def attend(q, cached, mask_BTS):  # the heads' attention over cached keys and values (cache dtype bits)
        k_BSGK, v_BSGK = (bits(c, cdt) for c in cached)
        return layers.attention(q, k_BSGK, v_BSGK, mask_BTS=mask_BTS, platform=platform, sinks_H=sinks_H,
                                window=window)
    if mode in CACHED_MODES:
        out_BTHK, kv = cached_attention(mode, q_BTHK, (k_BTGK, v_BTGK), side, kv, row0, attend, window, platform)
    else:
        out_BTHK = layers.attention(q_BTHK, k_BTGK, v_BTGK, causal=True, platform=platform, sinks_H=sinks_H,
                                    window=window)
        if mode == "prefill":
            kv = write_prefill(kv, (k_BTGK, v_BTGK), row0)
    o_BTD = q8.matmul("btj,jd->btd", out_BTHK.reshape(b, t, -1), q8.reshape(w["wo"], (-1,), (d,)))
    if cfg.attention_out_bias:  # added once to the sum over the heads' devices
        o_BTD = o_BTD + layers.once_over(head_axis, w["bo"].astype(layers.F32))
    return o_BTD, kv


CACHED_MODES = ("decode", "extend", "mixed")  # the modes that read the cache (models/transformer.py `build`)


def write_prefill(kv, new, row0):
    """Prefill: each cache buffer's rows row0.. from position 0 get the new values (one per buffer)."""
    return tuple(jax.lax.dynamic_update_slice(c, bits(n, c.dtype), (row0,) + (0,) * (c.ndim - 1))
                 for c, n in zip(kv, new))


def cached_attention(mode: str, q_BTHK, new, side, kv, row0, attend, window, platform: str):
    """The cache modes of any attention whose cache is a tuple of [B, S, ...] buffers (keys and values;
    the latent of ops/mla.py): `new` holds each buffer's values of the step's tokens [B, T, ...]; they
    are written at their positions, then attend(q rows, the buffers' rows over a span, mask [B, T, span])
    -> [B, T, H, ?] runs on the span of positions the rows reach (`read_span`), masked causally and by
    `window`. decode: one token per row of cache row row0 + b; extend: side's rows and positions;
    mixed ([1, S + R x L]): S decode rows of one token, then R extend rows of L. Buffers no longer than
    an int `window` are rings (`models/cache.py` `init_cache(ring=True)`): position p at p % length."""
    if isinstance(window, int) and kv[0].shape[1] <= window:  # a ring of the window's positions (or fewer)
        decode, extend = _decode_ring, _extend_ring
    else:
        decode, extend = _decode, _extend
    if mode == "decode":
        return decode(q_BTHK, new, side["pos"][:, 0], side["valid"][:, 0], kv, row0, attend, window, platform)
    if mode == "extend":
        return extend(q_BTHK, new, side["row"], side["pos"], side["valid"], kv, attend, window, platform)
    r, ln = side["ext_pos"].shape
    s = q_BTHK.shape[1] - r * ln
    dec = lambda a: a[:, :s].reshape((s, 1) + a.shape[2:])  # noqa: E731
    ext = lambda a: a[:, s:].reshape((r, ln) + a.shape[2:])  # noqa: E731
    valid_S = side["valid"][0, :s]

    def decode_rows(kv):
        return decode(dec(q_BTHK), tuple(map(dec, new)), side["pos"][0, :s], valid_S, kv, 0, attend, window,
                       platform)
    out_shape = jax.eval_shape(decode_rows, kv)[0]
    # a step whose decode rows are all padding (only prompts prefilling) skips their attention
    out_dec, kv = jax.lax.cond(jnp.any(valid_S), decode_rows,
                               lambda kv: (jnp.zeros(out_shape.shape, out_shape.dtype), kv), kv)
    out_ext, kv = extend(ext(q_BTHK), tuple(map(ext, new)), side["row"], side["ext_pos"], ext(side["valid"]), kv,
                          attend, window, platform)
    out = jnp.concatenate([out_dec.reshape((1, s) + out_dec.shape[2:]),
                           out_ext.reshape((1, r * ln) + out_ext.shape[2:])], axis=1)
    return out, kv


def _decode(q_BTHK, new, pos_B, valid_B, kv, row0, attend, window, platform):
    """One new token per row b at position pos_B[b] of cache row row0 + b (valid rows only), then
    attention over that row's positions (the span the rows reach)."""
    mb = q_BTHK.shape[0]
    rows_B = jnp.where(valid_B, row0 + jnp.arange(mb), kv[0].shape[0])  # padding: dropped
    kv = tuple(c.at[rows_B, pos_B].set(bits(n[:, 0], c.dtype), mode="drop") for c, n in zip(kv, new))

    def group(lo, n):  # rows lo .. lo + n - 1, reading the span they reach
        def read(span):
            cached = tuple(jax.lax.dynamic_slice_in_dim(c[:, :span], row0 + lo, n, axis=0) for c in kv)
            mask_BTS = layers.window_mask(pos_B[lo:lo + n, None], jnp.arange(span)[None, :], window)[:, None, :]
            return attend(q_BTHK[lo:lo + n], cached, mask_BTS)
        needed = jnp.max(jnp.where(valid_B[lo:lo + n], pos_B[lo:lo + n] + 1, 1))
        return read_span(needed, kv[0].shape[1], platform, read)
    # on CPU, groups of DECODE_GROUP rows, each reading its own span: one long sequence no longer makes
    # every row read the whole cache
    g = DECODE_GROUP if platform == "cpu" and mb > DECODE_GROUP and mb % DECODE_GROUP == 0 else mb
    outs = [group(lo, g) for lo in range(0, mb, g)]
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)), kv


def _extend(q_BTHK, new, rows_B, pos_BT, valid_BT, kv, attend, window, platform):
    """T new tokens of row b at positions pos_BT[b] of cache row rows_B[b] (valid ones only), then
    attention over that row's positions (the span the rows reach)."""
    write_BT = jnp.where(valid_BT, rows_B[:, None], kv[0].shape[0])  # padding: dropped
    kv = tuple(c.at[write_BT, pos_BT].set(bits(n, c.dtype), mode="drop") for c, n in zip(kv, new))

    def read(span):
        cached = tuple(c[rows_B, :span] for c in kv)
        mask_BTS = layers.window_mask(pos_BT[:, :, None], jnp.arange(span)[None, None, :], window)
        return attend(q_BTHK, cached, mask_BTS)
    return read_span(jnp.max(jnp.where(valid_BT, pos_BT + 1, 1)), kv[0].shape[1], platform, read), kv


def _ring_positions(last_B, length: int):
    """[B, length]: the position ring entry k holds after positions up to last_B[b] were written (the
    latest p <= last with p % length == k); negative: never written."""
    return last_B[:, None] - (last_B[:, None] - jnp.arange(length)[None, :]) % length


def _decode_ring(q_BTHK, new, pos_B, valid_B, kv, row0, attend, window, platform):
    """`_decode` on rings of the window's positions: the new token overwrites the one `length` before
    it (outside its window), then the query reads the whole ring."""
    del window, platform
    mb, length = q_BTHK.shape[0], kv[0].shape[1]
    rows_B = jnp.where(valid_B, row0 + jnp.arange(mb), kv[0].shape[0])  # padding: dropped
    kv = tuple(c.at[rows_B, pos_B % length].set(bits(n[:, 0], c.dtype), mode="drop") for c, n in zip(kv, new))
    cached = tuple(jax.lax.dynamic_slice_in_dim(c, row0, mb, axis=0) for c in kv)
    return attend(q_BTHK, cached, (_ring_positions(pos_B, length) >= 0)[:, None, :]), kv


def _extend_ring(q_BTHK, new, rows_B, pos_BT, valid_BT, kv, attend, window, platform):
    """`_extend` on rings: a chunk longer than the ring would overwrite keys its own earlier queries
    need, so the queries read the ring as it was (the positions before the chunk) and the chunk's own
    keys, then the chunk's last `length` positions are written."""
    del platform
    b, t = pos_BT.shape
    length = kv[0].shape[1]
    old_BS = _ring_positions(pos_BT[:, 0] - 1, length)
    key_pos = jnp.concatenate([old_BS, pos_BT], axis=1)
    key_ok = jnp.concatenate([old_BS >= 0, valid_BT], axis=1)
    cached = tuple(jnp.concatenate([c[rows_B], bits(n, c.dtype)], axis=1) for c, n in zip(kv, new))
    mask_BTS = layers.window_mask(pos_BT[:, :, None], key_pos[:, None, :], window) & key_ok[:, None, :]
    own = jnp.arange(length + t)[None, :] == length + jnp.arange(t)[:, None]  # a padding query sees itself
    out = attend(q_BTHK, cached, mask_BTS | own[None])  # (no row of -inf only: no NaN)
    end_B = pos_BT[:, 0] + jnp.sum(valid_BT, axis=1)
    keep_BT = valid_BT & (pos_BT >= end_B[:, None] - length)  # one write per ring entry
    write_BT = jnp.where(keep_BT, rows_B[:, None], kv[0].shape[0])  # others: dropped
    kv = tuple(c.at[write_BT, pos_BT % length].set(bits(n, c.dtype), mode="drop") for c, n in zip(kv, new))
    return out, kv
