"""The cost model: what one device does in a prefill or a decode step, and how long it takes.

Work per device follows the program in model.py / moe.py / pipeline.py (shapes from the rules
table): per pipeline step each device runs its L/pp layers on one microbatch (attention on its
heads, the MoE on its tokens) and then the stages pass activations on; once per program every stage
embeds and applies the head to its rows. Time of a step on a GPU:

    max(FLOPs / (peak x matmul), bytes / (HBM x bandwidth), layers x layer_overhead)
      + MoE layers that size their dropless round at run time x round_overhead
      + sum over collectives of (latency + bytes on the wire / link bandwidth)

and a prefill is (M + P - 1) such steps. Simulated CPU devices share the host's cores (`shared_host`):
stages never overlap, bubble steps are skipped, so the time is the sum of every device's steps.

Weights are read from the family's parameter table (models/params.py), not by name: attention is every
row with a heads axis (projections, their biases and a norm over the projection), the experts every row
with an experts axis, a dense SwiGLU every row with an `ffn` axis (the shared expert in MoE layers, the
FFN of `dense_layers`), norms and biases add bytes but no FLOPs. Where the stages hold different layer
kinds (dense layers in a MoE model), each stage's step is costed on its own layers: the pipeline runs
at the slowest stage's pace, and the per-device figures are the mean over stages.
"""

from __future__ import annotations

import dataclasses
import math

from moejax.config.model import ModelConfig, dtype_bytes
from moejax.models.cache import cache_values_per_token
from moejax.models.counts import attended_positions, attention_flops_per_position
from moejax.models.params import param_dtypes, table
from moejax.parallel.mesh import MeshShape
from moejax.parallel.rules import Layout
from moejax.planner.comms import KINDS, collective_seconds, collectives, exchanged_rows, link_bandwidth
from moejax.planner.shapes import (F32, Mix, Shapes, Workload, decides_round, ffn_tokens, mean_mix, shapes,
                                   stage_mixes)
from moejax.planner.specs import Fractions, MachineSpec

# Activation traffic per layer, beyond weights and cache (estimates from the program, not fitted):
ACT_BYTES_PER_TOKEN_D = 64  # per token and model dimension: ~16 float32 passes (norms, q/k/v/o,
# residuals, dispatch gather, combine)


def act_bytes_per_row_f(b: int) -> int:
    """Per computed expert row and FFN element: gate and up written in float32 and read back to be
    cast (2 x (4 + 4 + b)), SwiGLU reads two and writes one (3 b), the down matmul reads it (b)."""
    return 2 * (2 * F32 + b) + 3 * b + b


@dataclasses.dataclass
class Work:
    """One device's work in one pipeline step (its layers on one microbatch), plus once per program."""

    flops: dict  # part -> FLOPs per step
    flops_program: dict  # head, once
    bytes: dict  # part -> bytes read or written per step
    bytes_program: dict
    expert_rows: float  # expert rows one layer computes in one step


def _layer_local(cfg: ModelConfig, layout: Layout, mesh: MeshShape, p) -> int:
    """Elements of one layer of a per-layer row (of the whole tensor otherwise) that a device holds."""
    dims, axes = (p.shape(cfg)[1:], p.axes[1:]) if p.per_layer else (p.shape(cfg), p.axes)
    return math.prod(d // (layout.shards(a, mesh) if a else 1) for d, a in zip(dims, axes))


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One device's elements of one layer, by the part of the program that uses them (from the table)."""

    attention: int  # projections: every matrix of every layer outside the FFN (with a heads axis or replicated)
    attention_other: int  # their biases, a norm over the projection (bytes only)
    norms: int  # the layer's other vectors (pre-norms, per-head QK norms)
    router: int  # the router matrix, on the routed tokens
    moe_other: int  # a MoE layer's unsharded matrices besides the router (the shared expert's gate), on the
    # device's own tokens
    moe_vectors: int  # the correction bias
    expert: int  # one expert's slice (every row with an experts axis, per local expert)
    shared: int  # the shared expert's slice (rows with an ffn axis of MoE layers)
    dense: int  # a dense layer's FFN slice


def layer_weights(cfg: ModelConfig, layout: Layout, mesh: MeshShape, dtype: str | None = None) -> LayerWeights:
    """Elements per part; with `dtype`, bytes per part instead, each row at its stored dtype (the
    compute dtype, or float32 for a row the family keeps in float32)."""
    parts = {f.name: 0 for f in dataclasses.fields(LayerWeights)}
    e_local = cfg.num_experts // layout.shards("experts", mesh)
    stored = param_dtypes(cfg, dtype) if dtype else {}
    for p in table(cfg):
        if not p.per_layer:
            continue
        n, matrix = _layer_local(cfg, layout, mesh, p), p.init == "normal"
        n *= dtype_bytes(stored[p.name]) if dtype else 1
        if p.per_expert:
            parts["expert"] += n // e_local
        elif "heads" in p.axes or "kv_heads" in p.axes or (p.kind == "layer" and matrix):  # (MLA's q_a, kv_a)
            parts["attention" if matrix else "attention_other"] += n
        elif "ffn" in p.axes:
            parts["shared" if p.kind == "moe" else "dense"] += n
        elif p.kind == "moe":
            parts["router" if p.name == "router" else "moe_other" if matrix else "moe_vectors"] += n
        else:
            parts["norms"] += n
    return LayerWeights(**parts)


def work(cfg: ModelConfig, layout: Layout, mesh: MeshShape, wl: Workload, s: Shapes,
         rows_factor: float | None = None, context: float | None = None, mix: Mix | None = None) -> Work:
    """Executed work per device. `rows_factor` overrides the executed/top-k expert rows (1.0 gives
    the analytic top-k work); decode attends to `context` positions (default: the workload's); `mix`:
    the MoE and dense layers of one step (default: the mean over stages, `mean_mix`)."""
    b = dtype_bytes(wl.dtype)
    D, F, E, k, V = cfg.d_model, cfg.expert_ffn, cfg.num_experts, cfg.experts_per_token, cfg.vocab_size
    mix = mix or mean_mix(cfg, mesh.pp)
    L, tp, Lm, Ld = s.layers_local, mesh.tp, mix.moe, mix.dense
    lw, lb = layer_weights(cfg, layout, mesh), layer_weights(cfg, layout, mesh, wl.dtype)  # elements, bytes
    heads_local = cfg.num_heads // layout.shards("heads", mesh)
    f_local = F // layout.shards("expert_ffn", mesh)
    e_local = E // layout.shards("experts", mesh)
    act = s.attention_active
    # positions a query attends to (sliding layers: at most their window, the server's ring)
    ctx = attended_positions(cfg, s.t if s.phase == "prefill" else (context if context is not None else wl.context),
                             s.phase == "prefill")
    # tokens a device routes, less the padding (neither padded rows nor the rows that pad N to tp are routed)
    valid_tokens = (s.n if s.moe_tokens == s.n_pad else s.n / tp) * s.valid_frac
    own_tokens = s.n_pad // tp  # a device's share after the attention's psum_scatter
    ffn_n = ffn_tokens(layout, mesh, s)
    factor = rows_factor if rows_factor is not None else (wl.rows_factor if s.phase == "prefill" else 1.0)
    if rows_factor is None and s.moe.kernel == "batched":  # every buffer row computes, filled or not
        rows = e_local * s.moe.expert_shards * exchanged_rows(wl, s)
        experts_read = e_local
    else:
        rows = valid_tokens * k * factor
        experts_read = e_local if s.moe.kernel == "batched" else e_local * expert_hit_rate(cfg, layout, mesh, wl, s)
    flops = {
        "attention projections": 2 * s.n * lw.attention * act * L,
        "attention scores": s.n * ctx * heads_local * attention_flops_per_position(cfg, s.phase == "decode") * act * L,
        "router": 2 * valid_tokens * lw.router * Lm,
        "experts": 2 * lw.expert * rows * Lm,
    }
    if lw.moe_other:
        flops["shared expert gate"] = 2 * own_tokens * lw.moe_other * Lm
    if lw.shared:
        flops["shared expert"] = 2 * ffn_n * lw.shared * Lm
    if Ld:
        flops["dense layers' FFN"] = 2 * ffn_n * lw.dense * Ld
    emitted = s.b_loc  # last position of each row (prefill) or the new token (decode)
    v_local = V // layout.shards("vocab", mesh)
    flops_program = {"head": 2 * emitted * D * v_local}
    kv_row = cache_values_per_token(cfg, layout, mesh) * b  # what one position of one layer keeps here
    f_rows = lambda n: n * act_bytes_per_row_f(b)  # noqa: E731  per computed FFN element of n rows
    nbytes = {
        "weights": (L * ((lb.attention + lb.attention_other) * act + lb.norms)
                    + Lm * (lb.router + lb.moe_other + lb.moe_vectors + lb.shared + experts_read * lb.expert)
                    + Ld * lb.dense),
        "kv cache": L * (s.mb * ctx * kv_row * act if s.phase == "decode" else 0) + L * s.n * kv_row * act,
        "activations": L * s.n * D * ACT_BYTES_PER_TOKEN_D + Lm * f_rows(rows * f_local)
                       + f_rows(ffn_n * (Lm * cfg.shared_expert_ffn + Ld * cfg.dense_ffn) // layout.shards("ffn", mesh)),
    }
    bytes_program = {"head weights": D * v_local * b, "logits": emitted * v_local * F32}
    return Work(flops, flops_program, nbytes, bytes_program, rows)


def expert_hit_rate(cfg: ModelConfig, layout: Layout, mesh: MeshShape, wl: Workload, s: Shapes) -> float:
    """Share of experts that receive a row in one step (the buffers kernel reads no weights of an
    idle expert), averaged over all-to-all groups under uniform random routing. Rows fill the batch
    shards in order, so a group whose shards hold only padding reads nothing."""
    batch_axes = layout.mesh_axes("batch")
    sizes = [getattr(mesh, a) for a in batch_axes]
    tokens = {}
    for i in range(math.prod(sizes)):
        coords, rest = {}, i
        for a, n in reversed(list(zip(batch_axes, sizes))):
            coords[a], rest = rest % n, rest // n
        real_rows = min(max(wl.batch - i * s.b_loc, 0), s.b_loc)
        key = tuple(coords[a] for a in batch_axes if a not in layout.mesh_axes("experts"))
        tokens[key] = tokens.get(key, 0) + real_rows * s.t / s.micro
    p_idle = 1 - cfg.experts_per_token / cfg.num_experts
    return sum(1 - p_idle ** n for n in tokens.values()) / len(tokens)


@dataclasses.dataclass
class PhaseCost:
    seconds: float  # the whole prefill, or one decode step
    step: dict  # seconds of one pipeline step by term
    flops_per_device: float
    bytes_per_device: float
    collective_bytes: dict  # kind -> bytes one device's collectives move in the phase (result buffers)
    steps: int  # pipeline steps (M + P - 1)
    bubble: float
    shapes: Shapes
    work: Work
    collectives: list  # the inventory, with calls per phase and link


def phase_cost(cfg: ModelConfig, layout: Layout, mesh: MeshShape, wl: Workload, spec: MachineSpec,
               fr: Fractions, phase: str, context: float | None = None) -> PhaseCost:
    """A phase's time and per-device figures. Stages that hold different layer kinds are costed
    apart: the pipeline step is the slowest stage's; work, bytes and collectives are the mean over
    stages (so that they add up over the mesh)."""
    s = shapes(cfg, layout, mesh, wl, phase)
    flop_rate = spec.peak_matmul_flops_per_s * fr.matmul
    byte_rate = spec.hbm_bandwidth_bytes_per_s * fr.bandwidth
    steps = s.micro + mesh.pp - 1

    def calls(c):  # a stage skips its layers in bubble steps; the stage-to-stage send runs every step
        return c.calls * ((steps if c.kind == "collective-permute" else s.micro) if c.per_step else 1)

    stages = []  # (stages running it, step terms, busy seconds, collectives)
    for mix, count in stage_mixes(cfg, mesh.pp):
        w = work(cfg, layout, mesh, wl, s, context=context, mix=mix)
        colls = collectives(cfg, layout, mesh, wl, s, mix)
        compute = sum(w.flops.values()) / flop_rate
        memory = sum(w.bytes.values()) / byte_rate
        launches = s.layers_local * fr.layer_overhead_s
        rounds = mix.moe * fr.round_overhead_s if decides_round(s) else 0.0
        coll_step = sum(collective_seconds(spec, mesh, c) for c in colls if c.per_step)
        if spec.shared_host:
            step = {"compute": compute, "memory": memory, "overhead": launches + rounds, "collectives": coll_step}
            busy = max(compute, memory) + launches + rounds + coll_step
        else:
            step = {"compute": compute, "memory": memory, "launch floor": launches, "round syncs": rounds,
                    "collectives": coll_step}
            busy = max(compute, memory, launches) + rounds + coll_step
        stages.append((count, step, busy, colls))
    w = work(cfg, layout, mesh, wl, s, context=context)  # the mean over stages
    mean = collectives(cfg, layout, mesh, wl, s, mean_mix(cfg, mesh.pp))
    coll_program = sum(collective_seconds(spec, mesh, c) for c in mean if not c.per_step)
    program = max(sum(w.flops_program.values()) / flop_rate, sum(w.bytes_program.values()) / byte_rate)
    _, step, busy, _ = max(stages, key=lambda x: x[2])
    if spec.shared_host:  # every device's steps run one after another; bubble steps are skipped
        per_stage = mesh.size // mesh.pp
        seconds = per_stage * sum(n * s.micro * b for n, _, b, _ in stages) + mesh.size * (program + coll_program)
    else:
        seconds = steps * busy + program + coll_program

    coll_bytes = {k: 0 for k in KINDS}
    for c in mean:
        coll_bytes[c.kind] += c.nbytes * calls(c)
    flops_dev = s.micro * sum(w.flops.values()) + sum(w.flops_program.values())
    bytes_dev = s.micro * sum(w.bytes.values()) + sum(w.bytes_program.values())
    inventory = [{"name": c.name, "kind": c.kind, "axes": list(c.axes), "group": c.group, "bytes_per_call": c.nbytes,
                  "calls": calls(c),
                  "link": "-" if c.group == 1 or spec.shared_host else
                  ("nvlink" if link_bandwidth(spec, mesh, c.axes) == spec.nvlink_bandwidth_bytes_per_s else "network")}
                 for c in mean]
    return PhaseCost(seconds, step, flops_dev, bytes_dev, coll_bytes, steps, (mesh.pp - 1) / steps, s, w, inventory)
