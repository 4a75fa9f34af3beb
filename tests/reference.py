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


def forward(params, cfg, tokens):
    """Logits [B, T, V] in float64 for int tokens [B, T] (every position attends causally)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = tokens.shape
    H, G, K, k_top = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.experts_per_token
    out = np.zeros((B, T, cfg.vocab_size))
    for b in range(B):
        x = p["embed"][tokens[b]]  # [T, D]
        pos = np.arange(T)
        for l in range(cfg.num_layers):
            h = _rmsnorm(x, p["attn_norm"][l], cfg.rms_norm_eps)
            q = np.einsum("td,dhk->thk", h, p["wq"][l])
            kk = np.einsum("td,dgk->tgk", h, p["wk"][l])
            vv = np.einsum("td,dgk->tgk", h, p["wv"][l])
            q, kk = _rope(q, pos, cfg.rope_theta), _rope(kk, pos, cfg.rope_theta)
            attn = np.zeros((T, H, K))
            for head in range(H):
                g = head // (H // G)
                s = q[:, head] @ kk[:, g].T / np.sqrt(K)
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                attn[:, head] = (s / s.sum(-1, keepdims=True)) @ vv[:, g]
            x = x + np.einsum("thk,hkd->td", attn, p["wo"][l])
            h = _rmsnorm(x, p["moe_norm"][l], cfg.rms_norm_eps)
            logits = h @ p["router"][l]
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            y = np.zeros_like(x)
            for t in range(T):
                top = np.argsort(-probs[t], kind="stable")[:k_top]
                wts = probs[t, top] / probs[t, top].sum()
                for e, wt in zip(top, wts):
                    a = _silu(h[t] @ p["w1"][l, e]) * (h[t] @ p["w3"][l, e])
                    y[t] += wt * (a @ p["w2"][l, e])
            x = x + y
        out[b] = _rmsnorm(x, p["final_norm"], cfg.rms_norm_eps) @ p["lm_head"]
    return out
