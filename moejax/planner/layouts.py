"""Every (dp, pp, tp, ep) layout of N devices, each evaluated: memory, work and predicted times."""

from __future__ import annotations

import dataclasses

from moejax.config.model import ModelConfig, dtype_bytes
from moejax.errors import UserError
from moejax.parallel.mesh import MeshShape
from moejax.models.placement import placement
from moejax.parallel.rules import Layout
from moejax.planner.costmodel import phase_cost
from moejax.planner.shapes import F32, Workload, ffn_tokens
from moejax.planner.specs import Fractions, MachineSpec
from moejax.models import counts

OBJECTIVES = ("throughput", "ttft", "memory")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes_of(n: int) -> list[MeshShape]:
    """Every (dp, pp, tp, ep) whose product is n."""
    out = []
    for dp in divisors(n):
        for pp in divisors(n // dp):
            for tp in divisors(n // dp // pp):
                out.append(MeshShape(dp, pp, tp, n // dp // pp // tp))
    return out


def activation_bytes(cfg: ModelConfig, layout: Layout, mesh: MeshShape, wl: Workload, fused_attention: bool,
                     prefill) -> int:
    """Peak temporaries of one prefill step on a device (an estimate: the largest live tensors of
    one layer, not XLA's buffer assignment): residual stream and attention in float32, the four
    exchange buffers, the experts' float32 intermediates, a dense SwiGLU's (the shared expert's or a
    dense layer's, the larger), unfused attention scores, the logits."""
    s, w = prefill.shapes, prefill.work
    b, D = dtype_bytes(wl.dtype), cfg.d_model
    heads = cfg.num_heads // layout.shards("heads", mesh)
    f_local = cfg.expert_ffn // layout.shards("expert_ffn", mesh)
    rows_layer = w.expert_rows
    total = 6 * s.n * D * F32
    total += 4 * cfg.num_experts * s.rows * D * b
    total += 3 * rows_layer * f_local * F32
    dense_hidden = max(cfg.shared_expert_ffn, cfg.dense_ffn) // layout.shards("ffn", mesh)
    total += 3 * ffn_tokens(layout, mesh, s) * dense_hidden * F32
    if not fused_attention:
        total += s.mb * heads * s.t * s.t * F32
    total += s.b_loc * (cfg.vocab_size // layout.shards("vocab", mesh)) * F32
    return int(total)


@dataclasses.dataclass
class Row:
    mesh: MeshShape
    layout: str
    feasible: bool
    reason: str = ""
    fits: bool = False
    memory: dict = dataclasses.field(default_factory=dict)
    prefill: dict = dataclasses.field(default_factory=dict)
    decode: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mesh"] = str(self.mesh)
        return d


def evaluate(cfg: ModelConfig, layout: Layout, mesh: MeshShape, wl: Workload, spec: MachineSpec,
             fr: Fractions) -> Row:
    try:
        layout.validate(cfg, mesh)
    except UserError as e:
        return Row(mesh, layout.name, feasible=False, reason=str(e))
    pl = placement(cfg, layout, mesh, wl.dtype, wl.batch, wl.context, ring=True)["placement"]  # the server's cache
    pre = phase_cost(cfg, layout, mesh, wl, spec, fr, "prefill")
    dec = phase_cost(cfg, layout, mesh, wl, spec, fr, "decode")
    act = activation_bytes(cfg, layout, mesh, wl, not spec.shared_host, pre)
    total = pl["param_bytes_per_device"] + pl["kv_bytes_per_device"] + act
    memory = {"params_bytes": pl["param_bytes_per_device"], "kv_bytes": pl["kv_bytes_per_device"],
              "kv_batch": pl["kv_batch"], "kv_len": pl["kv_max_len"], "activation_bytes": act,
              "total_bytes": total, "fraction": total / spec.hbm_bytes}
    n, B = mesh.size, wl.batch
    useful = B * wl.prompt_len * counts.flops_per_token_prefill(cfg, wl.prompt_len)  # bench.py's MFU numerator
    prefill = {"ttft_s": pre.seconds, "prefill_tokens_per_ms_per_device": B * wl.prompt_len / pre.seconds / 1e3 / n,
               "mfu": useful / (pre.seconds * n * spec.peak_matmul_flops_per_s),
               "flops_per_device": pre.flops_per_device, "bytes_per_device": pre.bytes_per_device,
               "collective_bytes_per_device": pre.collective_bytes, "collectives": pre.collectives,
               "microbatches": pre.shapes.micro,
               "bubble_fraction": pre.bubble, "step_seconds": pre.step}
    decode = {"step_s": dec.seconds, "tokens_per_s_per_device": B / dec.seconds / n,
              "tokens_per_s_per_replica": B / dec.seconds / mesh.dp, "tokens_per_s": B / dec.seconds,
              "flops_per_device": dec.flops_per_device, "bytes_per_device": dec.bytes_per_device,
              "collective_bytes_per_device": dec.collective_bytes, "collectives": dec.collectives,
              "step_seconds": dec.step}
    return Row(mesh, layout.name, feasible=True, fits=memory["fraction"] <= 1.0, memory=memory, prefill=prefill,
               decode=decode)


def same_without_tp(a: Layout, b: Layout) -> bool:
    """Whether two layouts place everything alike when tp = 1 (seed and ep-tp differ only in tp)."""
    drop = lambda lay: {k: tuple(x for x in v if x != "tp") for k, v in lay.rules.items() if v}
    return {k: v for k, v in drop(a).items() if v} == {k: v for k, v in drop(b).items() if v}


def plan(cfg: ModelConfig, layouts: list[Layout], devices: int, wl: Workload, spec: MachineSpec, fr: Fractions,
         objective: str, only: list[MeshShape] | None = None) -> list[Row]:
    """Every layout of `devices` (or only the meshes in `only`), ranked: usable and fitting first,
    by the objective."""
    if devices < 1:
        raise UserError(f"--devices {devices} must be a positive integer")
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    meshes = meshes_of(devices) if not only else only
    rows = [evaluate(cfg, lay, mesh, wl, spec, fr) for mesh in meshes for lay in layouts
            if mesh.tp > 1 or lay is layouts[0] or not same_without_tp(lay, layouts[0])]
    key = {"throughput": lambda r: -r.decode["tokens_per_s_per_device"],
           "ttft": lambda r: r.prefill["ttft_s"],
           "memory": lambda r: r.memory["fraction"]}[objective]
    usable = sorted((r for r in rows if r.feasible and r.fits), key=key)
    too_big = sorted((r for r in rows if r.feasible and not r.fits), key=lambda r: r.memory["fraction"])
    return usable + too_big + [r for r in rows if not r.feasible]
