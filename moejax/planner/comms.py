"""The collectives of one pipeline step or program as the compiled program issues them (per-device
result bytes, calls, mesh axes), and their time on a machine's links."""

from __future__ import annotations

import dataclasses
import math

from moejax.config.model import ModelConfig, dtype_bytes
from moejax.parallel.mesh import AXES, MeshShape
from moejax.parallel.rules import Layout
from moejax.planner.shapes import F32, Mix, Shapes, Workload, decides_round, program_mix
from moejax.planner.specs import MachineSpec

KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    kind: str  # one of KINDS
    axes: tuple  # mesh axes of the group
    group: int  # devices in the group
    nbytes: int  # the result buffer per device (tuples summed), as HLO shapes count it
    calls: int  # calls per pipeline step (per_step) or per program
    per_step: bool

    def wire_bytes(self) -> float:
        """Bytes one device sends for one call (ring algorithms)."""
        g = self.group
        if g == 1:
            return 0.0
        factor = {"all-reduce": 2 * (g - 1) / g, "all-gather": (g - 1) / g, "reduce-scatter": g - 1,
                  "all-to-all": (g - 1) / g, "collective-permute": 1.0}[self.kind]
        return factor * self.nbytes


def collectives(cfg: ModelConfig, layout: Layout, mesh: MeshShape, wl: Workload, s: Shapes,
                mix: Mix | None = None) -> list[Collective]:
    """Every collective the compiled program issues, with its per-device result bytes: per pipeline
    step (the layers are unrolled, so `calls` counts each layer) or once per program. `mix`: which
    layers run a MoE and which a dense FFN; default: the program's call sites (`program_mix`)."""
    b, D, E, L = dtype_bytes(wl.dtype), cfg.d_model, cfg.num_experts, s.layers_local
    mix = mix or program_mix(cfg, mesh.pp)
    tp, spec, out = mesh.tp, s.moe, []
    group = lambda axes: math.prod(getattr(mesh, a) for a in axes)
    ffn_over_tp = tp > 1 and layout.shards("ffn", mesh) > 1

    def add(name, kind, axes, nbytes, calls, per_step):
        if calls:
            out.append(Collective(name, kind, tuple(axes), group(axes), int(nbytes), calls, per_step))

    if tp > 1 and "tp" in layout.mesh_axes("vocab"):
        add("embedding rows (psum over tp)", "all-reduce", ("tp",), s.b_loc * s.t * D * b, 1, False)
    if tp > 1:
        add("attention output (psum_scatter over tp)", "reduce-scatter", ("tp",), s.n_pad // tp * D * F32, L, True)
    if spec.ffn_axis:
        add("tokens to the expert FFN slices (all_gather over tp)", "all-gather", ("tp",), s.n_pad * D * b, mix.moe, True)
        # Mix.mask_gathers: XLA merges the MoE layers' identical gathers, not those in a switch branch
        add("token mask (all_gather over tp; one call: XLA merges the layers' identical gathers)",
            "all-gather", ("tp",), s.n_pad, mix.mask_gathers, True)
    if decides_round(s):
        add("fullest expert queue (pmax)", "all-reduce", spec.round_axes, 4, mix.moe, True)
    if spec.expert_shards > 1:
        rows = exchanged_rows(wl, s)
        back = F32 if spec.ffn_axis else b
        add("expert dispatch (all_to_all)", "all-to-all", spec.expert_axes, E * rows * D * b, mix.moe, True)
        if spec.kernel == "buffers":
            add("rows per expert (all_to_all)", "all-to-all", spec.expert_axes, E * 4, mix.moe, True)
        add("expert outputs back (all_to_all)", "all-to-all", spec.expert_axes, E * rows * D * back, mix.moe, True)
    if spec.ffn_axis:
        add("expert partial sums (psum_scatter over tp)", "reduce-scatter", ("tp",), s.n_pad // tp * D * F32, mix.moe, True)
    if ffn_over_tp:
        for what, calls in (("shared expert", mix.moe if cfg.shared_expert_ffn else 0), ("dense layer FFN", mix.dense)):
            add(f"tokens to the {what}'s hidden slices (all_gather over tp)", "all-gather", ("tp",), s.n_pad * D * b,
                calls, True)
            add(f"{what} partial sums (psum_scatter over tp)", "reduce-scatter", ("tp",), s.n_pad // tp * D * F32,
                calls, True)
    if tp > 1:
        add("tokens back to every tp rank (all_gather over tp)", "all-gather", ("tp",), s.n_pad * D * b, L, True)
    if mesh.pp > 1:
        add("activations to the next stage (ppermute)", "collective-permute", ("pp",), s.mb * s.t * D * b, 1, True)
        add("last stage's outputs to every stage (psum over pp)", "all-reduce", ("pp",), s.micro * s.mb * D * b,
            1, False)
    token_axes = layout.token_axes()
    add("MoE statistics (psum over token axes)", "all-reduce", token_axes,  # a dense layer's are zeros
        4 * L * (3 * E + 5), 1, False)
    return out


def exchanged_rows(wl: Workload, s: Shapes) -> int:
    """Rows per (source, expert) in one executed exchange. The buffers kernel sends fixed rounds of
    `rows`; the batched kernel one buffer sized to the fullest queue (the rows factor x the mean)
    unless N <= 64 tokens, which take N rows."""
    if s.moe.kernel == "batched" and s.rows < s.moe_tokens:
        mean = s.moe_tokens * s.moe.top_k / s.moe.num_experts
        return min(s.moe_tokens, math.ceil(wl.rows_factor * mean))
    return s.rows


def hlo_bytes_by_kind(colls: list[Collective]) -> dict[str, int]:
    """What the compiled HLO text shows: each collective once per call site (loops are not unrolled
    in the text: the pipeline scan and the dropless round loop appear once)."""
    got = {k: 0 for k in KINDS}
    for c in colls:
        got[c.kind] += c.nbytes * c.calls
    return got


def link_bandwidth(spec: MachineSpec, mesh: MeshShape, axes: tuple) -> float:
    """NVLink when the group lies inside one node (devices are numbered dp-major, ep-minor, as
    mesh.make_mesh lays them out), else the network."""
    stride, strides = 1, {}
    for a in reversed(AXES):
        strides[a] = stride
        stride *= getattr(mesh, a)
    span = max((strides[a] * getattr(mesh, a) for a in axes), default=1)
    return spec.nvlink_bandwidth_bytes_per_s if span <= spec.gpus_per_node else spec.network_bandwidth_bytes_per_s


def collective_seconds(spec: MachineSpec, mesh: MeshShape, c: Collective) -> float:
    if c.group == 1:
        return 0.0
    if spec.shared_host:  # a copy through the host's memory
        return c.calls * c.wire_bytes() / spec.hbm_bandwidth_bytes_per_s
    return c.calls * (spec.collective_latency_s + c.wire_bytes() / link_bandwidth(spec, mesh, c.axes))

