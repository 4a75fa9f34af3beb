"""Two weight sets of one checkpoint on the same windows: float against int8, through the serving forward."""

from __future__ import annotations

import numpy as np

from moejax.checkpoint import store as checkpoint
from moejax.inference.generate import fetch, padded_batch, put
from moejax.models import transformer as model
from moejax.models.runspec import RunSpec


def compare_weights(ckpt: str, float_rs: RunSpec, quant_rs: RunSpec, mesh, windows: np.ndarray, batch: int) -> dict:
    """Cross-entropy of each side on `windows` [W, T] (position t predicts token t + 1), next-token
    agreement and logit differences, `batch` windows per forward call."""
    cfg, layout = float_rs.cfg, float_rs.layout
    runs = {}
    for side, rs in (("float", float_rs), ("quant", quant_rs)):
        params = model.serving_params(checkpoint.load_weights(ckpt, cfg, 0, rs.dtype, mesh, layout, rs.quant), rs, mesh)
        runs[side] = (params, model.build(rs, mesh, "forward"))
    b = padded_batch(float_rs, batch)
    ce, agree, diff, peak, diff_sum, count = {"float": 0.0, "quant": 0.0}, 0, 0.0, 0.0, 0.0, 0
    for i in range(0, len(windows), b):
        chunk = windows[i:i + b]
        tok = np.zeros((b, windows.shape[1]), np.int32)
        tok[:len(chunk)] = chunk
        lengths = np.where(np.arange(b) < len(chunk), windows.shape[1], 0).astype(np.int32)
        logits = {}
        for side, (params, fwd) in runs.items():
            out = fwd(params, put(mesh, layout, "tokens", tok), put(mesh, layout, "lengths", lengths))[0]
            x = fetch(out)[:len(chunk), :-1].astype(np.float64)
            top = x.max(-1, keepdims=True)
            logp = x - top - np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))
            ce[side] += -np.take_along_axis(logp, chunk[:, 1:, None], axis=-1).sum()
            logits[side] = x
        f, q = logits["float"], logits["quant"]
        agree += int(np.sum(f.argmax(-1) == q.argmax(-1)))
        diff, peak = max(diff, float(np.max(np.abs(f - q)))), max(peak, float(np.max(np.abs(f))))
        diff_sum += float(np.sum(np.abs(f - q)))
        count += chunk[:, 1:].size
    return {"windows": int(len(windows)), "seq_len": int(windows.shape[1]), "dtype": float_rs.dtype,
            "quant": quant_rs.quant, "quant_matmul": quant_rs.quant_form, "predicted_tokens": count,
            "ce_loss_float": ce["float"] / count, "ce_loss_quant": ce["quant"] / count,
            "ce_loss_change": (ce["quant"] - ce["float"]) / count, "logits_max_abs_diff": diff,
            "logits_mean_abs_diff": diff_sum / (count * cfg.vocab_size), "logits_max_abs": peak,
            "next_token_agreement": agree / count}
