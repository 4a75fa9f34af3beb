"""An independent float64 NumPy forward of the Mixtral model (Hugging Face semantics).

Written from the transformers definition, not from moejax: loops over experts and heads, explicit
causal masks, no shared helpers with the package.
"""

import numpy as np


def _rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope(x, pos, theta):
    # x: [T, H, K]; rotate-half layout
    k = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, k, 2, dtype=np.float64) / k)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    rot = np.concatenate([-x[..., k // 2:], x[..., : k // 2]], -1)
    return x * cos + rot * sin


def _silu(x):
    return x / (1.0 + np.exp(-x))


def act_quant(x, blocks: int = 1):
    """Each row of x rounded to int8 steps of its own scale (max |x| / 127), per block of `blocks`
    equal slices of the last axis: what moejax's `dynamic` int8 matmul does to its input rows on a
    device that holds one block (quant.quantize_rows)."""
    parts = np.split(np.asarray(x, np.float64), blocks, axis=-1)
    out = []
    for p in parts:
        s = np.max(np.abs(p), axis=-1, keepdims=True) / 127.0
        s = np.where(s > 0, s, 1.0)
        out.append(np.clip(np.round(p / s), -127, 127) * s)
    return np.concatenate(out, axis=-1)


def forward(params, cfg, tokens, act_blocks=None):
    """Logits [B, T, V] in float64 for int tokens [B, T] (every position attends causally).

    act_blocks: None, or {"attn_in": n, "wo": n, "w2": n}: the inputs of the quantized matrices'
    matmuls rounded by `act_quant` (n blocks each; attn_in feeds wq, wk, wv and w1, w3)."""
    aq = (lambda x, name: x) if act_blocks is None else (lambda x, name: act_quant(x, act_blocks[name]))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = tokens.shape
    H, G, K, k_top = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.experts_per_token
    out = np.zeros((B, T, cfg.vocab_size))
    for b in range(B):
        x = p["embed"][tokens[b]]  # [T, D]
        pos = np.arange(T)
        for l in range(cfg.num_layers):
            h = _rmsnorm(x, p["attn_norm"][l], cfg.rms_norm_eps)
            hq = aq(h, "attn_in")
            q = np.einsum("td,dhk->thk", hq, p["wq"][l])
            kk = np.einsum("td,dgk->tgk", hq, p["wk"][l])
            vv = np.einsum("td,dgk->tgk", hq, p["wv"][l])
            q, kk = _rope(q, pos, cfg.rope_theta), _rope(kk, pos, cfg.rope_theta)
            attn = np.zeros((T, H, K))
            for head in range(H):
                g = head // (H // G)
                s = q[:, head] @ kk[:, g].T / np.sqrt(K)
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                attn[:, head] = (s / s.sum(-1, keepdims=True)) @ vv[:, g]
            x = x + aq(attn.reshape(T, H * K), "wo") @ p["wo"][l].reshape(H * K, -1)
            h = _rmsnorm(x, p["moe_norm"][l], cfg.rms_norm_eps)
            logits = h @ p["router"][l]
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            y = np.zeros_like(x)
            for t in range(T):
                top = np.argsort(-probs[t], kind="stable")[:k_top]
                wts = probs[t, top] / probs[t, top].sum()
                for e, wt in zip(top, wts):
                    ht = aq(h[t], "attn_in")
                    a = _silu(ht @ p["w1"][l, e]) * (ht @ p["w3"][l, e])
                    y[t] += wt * (aq(a, "w2") @ p["w2"][l, e])
            x = x + y
        out[b] = _rmsnorm(x, p["final_norm"], cfg.rms_norm_eps) @ p["lm_head"]
    return out
