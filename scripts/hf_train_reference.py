#!/usr/bin/env python
"""Training reference numbers from Hugging Face transformers for the tiny Mixtral checkpoint.

    python scripts/hf_train_reference.py [--model tests/data/hf-mixtral-tiny]
                                         [--out tests/data/hf-mixtral-tiny/train_reference.npz]

Needs the `.[hf]` extra (torch + transformers), not jax: moejax is never imported, the HF -> moejax
name mapping is written out here (it mirrors moejax/checkpoint/hf.py `hf_tensors`). Not run in CI; CI reads the
.npz it writes.

Two cases on `MixtralForCausalLM` (float32, eval, eager attention and eager experts):
  full    ids = default_rng(7).integers(0, 256, (3, 20)), labels = ids, no attention_mask
  masked  the same ids right-padded to lengths [20, 17, 12] (pad id 0, label -100, mask 0)
For each: loss (CE + router_aux_loss_coef * aux), the raw aux loss, CE alone (a second call without
router logits), and d loss / d every parameter in moejax's stacked layout. Both losses are also
recomputed in NumPy from the logits and router logits, as a check on the definitions.
"""

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [20, 17, 12]


def to_moejax(t: dict, cfg) -> dict:
    """HF tensors (name -> array) -> moejax stacked arrays.

    Accepts both expert layouts: the checkpoint's per-expert `block_sparse_moe.experts.{e}.w1/w2/w3.weight`
    and transformers 5.x's fused `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows then up rows) and
    `mlp.experts.down_proj` [E, D, F]. Works for weights and for their gradients alike.
    """
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    D, H, G = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    K = getattr(cfg, "head_dim", None) or D // H
    F = cfg.intermediate_size
    out = {"embed": t["model.embed_tokens.weight"], "final_norm": t["model.norm.weight"],
           "lm_head": t["lm_head.weight"].T}
    per_layer = {n: [] for n in ("attn_norm", "moe_norm", "wq", "wk", "wv", "wo", "router", "w1", "w3", "w2")}
    for i in range(L):
        p = f"model.layers.{i}."
        per_layer["attn_norm"].append(t[p + "input_layernorm.weight"])
        per_layer["moe_norm"].append(t[p + "post_attention_layernorm.weight"])
        per_layer["wq"].append(t[p + "self_attn.q_proj.weight"].T.reshape(D, H, K))
        per_layer["wk"].append(t[p + "self_attn.k_proj.weight"].T.reshape(D, G, K))
        per_layer["wv"].append(t[p + "self_attn.v_proj.weight"].T.reshape(D, G, K))
        per_layer["wo"].append(t[p + "self_attn.o_proj.weight"].T.reshape(H, K, D))
        if p + "mlp.experts.gate_up_proj" in t:
            gate_up_E2FD, down_EDF = t[p + "mlp.experts.gate_up_proj"], t[p + "mlp.experts.down_proj"]
            assert gate_up_E2FD.shape == (E, 2 * F, D) and down_EDF.shape == (E, D, F)
            per_layer["router"].append(t[p + "mlp.gate.weight"].T)
            per_layer["w1"].append(gate_up_E2FD[:, :F, :].transpose(0, 2, 1))
            per_layer["w3"].append(gate_up_E2FD[:, F:, :].transpose(0, 2, 1))
            per_layer["w2"].append(down_EDF.transpose(0, 2, 1))
        else:
            q = p + "block_sparse_moe."
            per_layer["router"].append(t[q + "gate.weight"].T)
            for w in ("w1", "w3", "w2"):
                per_layer[w].append(np.stack([t[f"{q}experts.{e}.{w}.weight"].T for e in range(E)]))
    out.update({n: np.stack(v) for n, v in per_layer.items()})
    return {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in out.items()}


def numpy_aux_loss(router_logits: list, E: int, k: int, mask_N=None) -> float:
    """HF `load_balancing_loss_func`: every layer's rows together, full softmax, top-k one-hot counts.

    E * sum_e f_e * P_e with f_e = (top-k assignments to e) / rows and P_e = (sum of p_e) / rows over
    the counted rows (all layers' tokens, those with mask 1 when a mask is given). f sums to k, not 1.
    """
    x = np.concatenate([np.asarray(r, np.float64) for r in router_logits])  # [L*N, E]
    m = np.ones(len(x)) if mask_N is None else np.tile(np.asarray(mask_N, np.float64), len(router_logits))
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, top, 1.0, axis=-1)
    f = (onehot * m[:, None]).sum(0) / m.sum()
    P = (p * m[:, None]).sum(0) / m.sum()
    return float(E * np.sum(f * P))


def numpy_ce_loss(logits_BTV, labels_BT) -> float:
    x = np.asarray(logits_BTV, np.float64)[:, :-1]
    y = np.asarray(labels_BT)[:, 1:]
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    keep = y != -100
    picked = np.take_along_axis(x, np.where(keep, y, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * keep).sum() / keep.sum())


def run_case(model, ids_BT, labels_BT, mask_BT):
    cfg = model.config
    model.zero_grad(set_to_none=True)
    ids = torch.from_numpy(ids_BT.astype(np.int64))
    labels = torch.from_numpy(labels_BT.astype(np.int64))
    mask = None if mask_BT is None else torch.from_numpy(mask_BT.astype(np.int64))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    grads = to_moejax({n: p.grad.detach().numpy() for n, p in model.named_parameters()}, cfg)
    with torch.no_grad():
        ce = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False).loss.item()
    loss, aux, coef = out.loss.item(), out.aux_loss.item(), cfg.router_aux_loss_coef
    assert abs(ce - (loss - coef * aux)) < 1e-6, (ce, loss, coef, aux)

    np_aux = numpy_aux_loss([r.detach().numpy() for r in out.router_logits], cfg.num_local_experts,
                            cfg.num_experts_per_tok, None if mask_BT is None else mask_BT.reshape(-1))
    np_ce = numpy_ce_loss(out.logits.detach().numpy(), labels_BT)
    assert abs(np_aux - aux) < 1e-5 * max(1.0, abs(aux)), (np_aux, aux)
    assert abs(np_ce - ce) < 1e-5 * max(1.0, abs(ce)), (np_ce, ce)
    checks = {"numpy_aux": np_aux, "numpy_ce": np_ce, "n_router_layers": len(out.router_logits),
              "router_logits_shape": tuple(out.router_logits[0].shape),
              "counted_tokens": int((labels_BT[:, 1:] != -100).sum())}
    return {"loss": loss, "aux_loss": aux, "ce_loss": ce}, grads, checks


def cross_check_default_impl(path, cases) -> float:
    """Largest |loss difference| between the eager reference and transformers' default kernels."""
    import transformers

    m = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for ids_BT, labels_BT, mask_BT, want in cases:
            mask = None if mask_BT is None else torch.from_numpy(mask_BT.astype(np.int64))
            got = m(input_ids=torch.from_numpy(ids_BT.astype(np.int64)), attention_mask=mask,
                    labels=torch.from_numpy(labels_BT.astype(np.int64)), output_router_logits=True).loss.item()
            worst = max(worst, abs(got - want))
    impl = (m.config._attn_implementation, getattr(m.config, "_experts_implementation", None))
    return worst, impl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "tests/data/hf-mixtral-tiny"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/data/hf-mixtral-tiny/train_reference.npz"))
    args = ap.parse_args(argv)

    import transformers
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    model, info = transformers.MixtralForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"checkpoint did not load cleanly: {bad}"
    model.eval()
    cfg = model.config
    assert cfg.router_jitter_noise == 0.0 and all(p.dtype == torch.float32 for p in model.parameters())

    # The mapping applied to the loaded (fused) parameters must give what it gives on the file's own
    # per-expert tensors: this pins down transformers' gate_up_proj / down_proj layout.
    file_params = to_moejax(load_file(os.path.join(args.model, "model.safetensors")), cfg)
    model_params = to_moejax({n: p.detach().numpy() for n, p in model.named_parameters()}, cfg)
    assert file_params.keys() == model_params.keys()
    for n in file_params:
        assert np.array_equal(file_params[n], model_params[n]), n

    ids_BT = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(3, 20))
    T = ids_BT.shape[1]
    mask_BT = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    mids_BT = np.where(mask_BT == 1, ids_BT, 0)
    mlabels_BT = np.where(mask_BT == 1, ids_BT, -100)

    data = {"transformers_version": np.array(transformers.__version__), "torch_version": np.array(torch.__version__),
            "router_aux_loss_coef": np.float32(cfg.router_aux_loss_coef)}
    summary = []
    for case, ids, labels, mask in (("full", ids_BT, ids_BT, None), ("masked", mids_BT, mlabels_BT, mask_BT)):
        losses, grads, checks = run_case(model, ids, labels, mask)
        data[f"{case}_input_ids"] = ids.astype(np.int32)
        if mask is not None:
            data[f"{case}_lengths"] = np.array(LENGTHS, np.int32)
            data[f"{case}_attention_mask"] = mask.astype(np.int32)
            data[f"{case}_labels"] = labels.astype(np.int32)
        for k, v in losses.items():
            data[f"{case}_{k}"] = np.float32(v)
        for n, g in grads.items():
            assert g.shape == model_params[n].shape and np.isfinite(g).all(), n
            data[f"{case}_grad/{n}"] = g
        summary.append((case, losses, checks, grads))

    worst, impl = cross_check_default_impl(args.model, [
        (ids_BT, ids_BT, None, summary[0][1]["loss"]), (mids_BT, mlabels_BT, mask_BT, summary[1][1]["loss"])])
    assert worst < 1e-5, worst

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **data)

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"router_aux_loss_coef {cfg.router_aux_loss_coef}")
    for case, losses, checks, grads in summary:
        print(f"{case:6s} loss {losses['loss']:.9f}  ce {losses['ce_loss']:.9f}  aux {losses['aux_loss']:.9f}  "
              f"({checks['counted_tokens']} counted tokens; NumPy recompute: ce {checks['numpy_ce']:.9f}, "
              f"aux {checks['numpy_aux']:.9f} from {checks['n_router_layers']} x {checks['router_logits_shape']} "
              f"router logits)")
        print("       |grad| max: " + ", ".join(f"{n} {np.abs(g).max():.3g}" for n, g in grads.items()))
    print(f"default kernels {impl}: loss within {worst:.2g} of the eager reference")
    print(f"wrote {len(data)} arrays to {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
