"""The MoE kernel chosen by measurement: `--moe-kernel auto` in the commands.

Each candidate kernel this platform runs is timed on one MoE layer of the run's own shapes (its
config, mesh, layout, dtype, policy), at the token counts the run will see (a decode batch, a
prefill chunk, a training batch; rounded up to powers of two), with random weights, forward only
(for training too, with its differentiable rounds: timing the backward pass of `buffers` took
20-30 s to compile). The kernel with the lowest sum of slowdowns against the best at each count
wins. Results are kept in ~/.cache/moejax/kernels.json (`cache_file`), keyed by everything measured,
so a second start only reads it.

Measured on the 2-core development CPU, shakespeare-bpe config, one layer at 16 / 1024 tokens:
buffers 0.34 / 3.57 ms, batched 0.24 / 1.75 ms (the per-expert branches of `buffers` cost more than
the idle experts' weights they skip at this size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time

import numpy as np

CANDIDATES = {"cpu": ("buffers", "batched"), "gpu": ("batched", "buffers", "ragged")}


def cache_file() -> str | None:
    """MOEJAX_KERNEL_CACHE, default ~/.cache/moejax/kernels.json; empty: no file (measure every run).
    Separate from XLA's cache (MOEJAX_CACHE_DIR), which tests turn off: a few bytes per run shape."""
    path = os.environ.get("MOEJAX_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "moejax",
                                                              "kernels.json"))
    return path or None


def _key(rs, tokens: tuple[int, ...]) -> str:
    import jax

    cfg = rs.cfg
    dev = jax.devices()[0]
    return json.dumps([rs.platform, getattr(dev, "device_kind", ""), jax.__version__, cfg.d_model, cfg.num_experts,
                       cfg.expert_ffn, cfg.experts_per_token, cfg.router, cfg.n_group, cfg.topk_group,
                       str(rs.shape), rs.layout.name, rs.dtype, rs.policy, rs.capacity_factor, rs.training,
                       list(tokens)])


def _read(path: str | None) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return {}


def _write(path: str | None, key: str, value: dict) -> None:
    """Add one entry; atomically (concurrent runs each leave a whole file)."""
    if not path:
        return
    table = _read(path)
    table[key] = value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kernels-")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)


def choose_kernel(rs, mesh, tokens: tuple[int, ...], repeats: int = 5, progress=None):
    """(rs with its moe_kernel set, the choice: {"kernel", "ms": {kernel: [median ms per count]},
    "tokens", "cached", "why"}). Only `auto` is measured; a named kernel is kept as asked. int8
    runs keep the platform's default (the measurement draws float weights)."""
    if rs.moe_kernel != "auto":
        return rs, {"kernel": rs.kernel, "why": "asked for"}
    import jax

    if jax.process_count() > 1:  # every process must run the same kernel: no per-host timing
        return dataclasses.replace(rs, moe_kernel=rs.kernel), {"kernel": rs.kernel, "why": "multi-process: the default"}
    if rs.quant:
        return dataclasses.replace(rs, moe_kernel=rs.kernel), {"kernel": rs.kernel, "why": "int8: the default"}
    if rs.cfg.num_experts == 0 or not rs.cfg.moe_layers:
        return dataclasses.replace(rs, moe_kernel=rs.kernel), {"kernel": rs.kernel, "why": "no MoE layer"}
    tokens = tuple(sorted({1 << max(0, int(n) - 1).bit_length() for n in tokens}))  # powers of two: few keys
    key, path = _key(rs, tokens), cache_file()
    hit = _read(path).get(key)
    if hit:
        return dataclasses.replace(rs, moe_kernel=hit["kernel"]), {**hit, "cached": True}
    times = measure(rs, mesh, tokens, CANDIDATES.get(rs.platform, ("batched",)), repeats, progress)
    best = [min(t[i] for t in times.values()) for i in range(len(tokens))]
    kernel = min(times, key=lambda k: sum(t / b for t, b in zip(times[k], best)))
    choice = {"kernel": kernel, "ms": times, "tokens": list(tokens), "why": "measured"}
    _write(path, key, choice)
    return dataclasses.replace(rs, moe_kernel=kernel), {**choice, "cached": False}


def measure(rs, mesh, tokens: tuple[int, ...], kernels, repeats: int = 5, progress=None) -> dict:
    """{kernel: [median ms at each token count]}: one MoE layer (moe_block) over the whole mesh,
    random weights in each kernel's layout, candidates alternating so drift hits all alike. A kernel
    that fails to compile or run here is left out (said through `progress`)."""
    import jax

    programs, failed = {}, []
    for kernel in kernels:
        try:
            programs[kernel] = [_program(dataclasses.replace(rs, moe_kernel=kernel), mesh, n) for n in tokens]
            for f, args in programs[kernel]:
                jax.block_until_ready(f(*args))
        except Exception as e:  # noqa: BLE001 (a kernel this platform cannot run is not a candidate)
            programs.pop(kernel, None)
            failed.append(f"{kernel}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            if progress:
                progress(f"MoE kernel {failed[-1]} (left out)")
    if not programs:
        raise RuntimeError(f"no MoE kernel of {kernels} runs here ({'; '.join(failed)})")
    samples = {k: [[] for _ in tokens] for k in programs}
    for _ in range(repeats):
        for kernel, progs in programs.items():
            for i, (f, args) in enumerate(progs):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                samples[kernel][i].append(time.perf_counter() - t0)
    return {k: [round(1e3 * statistics.median(s), 3) for s in v] for k, v in samples.items()}


def _program(rs, mesh, n_tokens: int):
    """(compiled f, args): one MoE layer on `n_tokens` tokens spread over the mesh's token axes."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moejax.ops.moe.dispatch import STACKED_KERNELS, moe_block

    cfg, lay, spec = rs.cfg, rs.layout, rs.moe_spec()
    d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_ffn
    shards, e_loc = spec.expert_shards, e // spec.expert_shards
    token_axes = lay.token_axes()
    per = int(np.prod([mesh.shape[a] for a in token_axes])) if token_axes else 1
    n = max(per, -(-n_tokens // per) * per)
    rng = np.random.default_rng(0)
    put = lambda a, sp: jax.device_put(jnp.asarray(a, rs.dtype), NamedSharding(mesh, sp))  # noqa: E731
    w = {"moe_norm": put(1 + 0.1 * rng.standard_normal(d), P()),
         "router": put(0.5 * rng.standard_normal((d, e)), P()),
         "router_bias": put(0.01 * rng.standard_normal(e), P()), "router_logit_bias": put(np.zeros(e), P())}
    specs = {name: P() for name in w}
    stacked = rs.kernel in STACKED_KERNELS
    experts = (("w1", (d, f), (None, "expert_ffn")), ("w3", (d, f), (None, "expert_ffn")),
               ("w2", (f, d), ("expert_ffn", None)))
    if spec.expert_bias:
        experts += (("b1", (f,), ("expert_ffn",)), ("b3", (f,), ("expert_ffn",)), ("b2", (d,), (None,)))
    for name, shape, axes in experts:
        full = 0.05 * rng.standard_normal((shards, e_loc) + shape)
        sp = lay.spec(("experts",) + axes)
        if stacked:
            w[name], specs[name] = put(full, P(sp[0], None, *sp[1:])), P(sp[0], None, *sp[1:])
        else:
            w[name], specs[name] = [put(full[:, j], sp) for j in range(e_loc)], [sp] * e_loc
    tok = P(token_axes if token_axes else None)
    x = put(rng.standard_normal((n, d)), tok)
    valid = jax.device_put(np.ones(n, bool), NamedSharding(mesh, tok))

    per_expert = {name for name, _, _ in experts}

    def body(x, v, w):
        w = {k: [a.reshape(a.shape[1:]) for a in u] if isinstance(u, list) else
             (u.reshape(u.shape[1:]) if k in per_expert else u) for k, u in w.items()}
        y, _ = moe_block(x, v, w, spec, cfg.rms_norm_eps)
        return y

    layer = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, specs), out_specs=tok, check_vma=False)
    return jax.jit(layer).lower(x, valid, w).compile(), (x, valid, w)
