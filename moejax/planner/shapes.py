"""A phase's per-device shapes on one layout (the planner's view of pipeline.py and moe.py): the
workload, the microbatches and rows each device runs per pipeline step, and which of a stage's layers
run a MoE or a dense FFN (`Mix`)."""

from __future__ import annotations

import dataclasses

from moejax.config.model import ModelConfig
from moejax.ops.moe.dispatch import MoeSpec
from moejax.ops.moe.ragged import GROUPED_GEMMS
from moejax.parallel.mesh import AXES, MeshShape
from moejax.parallel.pipeline import default_microbatches
from moejax.parallel.rules import Layout

F32 = 4

# Executed expert rows over top-k rows in prefill when the user gives none: the batched kernel's
# buffer holds the fullest queue rounded up to 1.25/1.5/2 x the mean, and a trained router keeps
# the fullest queue near 1.25-1.5x (moe.TRAIN_FRACTIONS); the buffers kernel computes m/2 .. 3m/2
# row steps, ~1.13x under near-even routing (docs/PERFORMANCE.md). Random weights route worse.
DEFAULT_EXPERT_ROWS_FACTOR = {"batched": 1.5, "buffers": 1.13}


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int  # B sequences over the whole mesh
    prompt_len: int  # T
    context: int  # cache positions a decode step attends to
    dtype: str = "bfloat16"
    kernel: str = "batched"  # MoE kernel: batched (GPU default) or buffers (CPU default)
    microbatches: int | None = None  # None: 2 x pp bounded by the rows per batch shard
    capacity_factor: float = 2.0
    expert_rows_factor: float | None = None  # executed / top-k expert rows in prefill
    skip_padding_attention: bool = False  # CPU: a device whose rows are all padding skips attention

    @property
    def rows_factor(self) -> float:
        return self.expert_rows_factor or DEFAULT_EXPERT_ROWS_FACTOR[self.kernel]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Per-device shapes of one phase (prefill or decode) on one layout."""

    phase: str
    micro: int  # M
    b_pad: int  # the batch padded to batch shards x M
    b_loc: int  # rows per batch shard
    mb: int  # rows per microbatch
    t: int  # new tokens per row
    n: int  # tokens a device's attention sees per step (mb x t)
    n_pad: int
    moe_tokens: int  # N: tokens a device routes per step
    valid_frac: float  # real rows / padded rows
    attention_active: float  # share of devices that run attention (CPU padding skip)
    layers_local: int
    moe: MoeSpec
    rows: int  # buffer rows per (source, expert) of one exchange round


def shapes(cfg: ModelConfig, layout: Layout, mesh: MeshShape, wl: Workload, phase: str) -> Shapes:
    shards = layout.shards("batch", mesh)
    micro = wl.microbatches or default_microbatches(mesh.pp, wl.batch, shards, "gpu")  # a GPU target
    mult = shards * micro
    b_pad = -(-wl.batch // mult) * mult
    b_loc = b_pad // shards
    mb = b_loc // micro
    t = wl.prompt_len if phase == "prefill" else 1
    n = mb * t
    tp = mesh.tp
    n_pad = -(-n // tp) * tp
    ffn = layout.mesh_axes("expert_ffn")
    ffn_axis = ffn[0] if ffn and tp > 1 else None
    moe_tokens = n_pad if ffn_axis or tp == 1 else n_pad // tp
    spec = MoeSpec(num_experts=cfg.num_experts, top_k=cfg.experts_per_token, policy="dropless",
                   capacity_factor=wl.capacity_factor, expert_axes=layout.mesh_axes("experts"),
                   expert_shards=layout.shards("experts", mesh), ffn_axis=ffn_axis,
                   ffn_shards=layout.shards("expert_ffn", mesh), round_axes=tuple(a for a in AXES if a != "pp"),
                   kernel=wl.kernel)
    active = 1.0
    if wl.skip_padding_attention:
        active = min(1.0, -(-wl.batch // b_loc) / shards)
    return Shapes(phase=phase, micro=micro, b_pad=b_pad, b_loc=b_loc, mb=mb, t=t, n=n, n_pad=n_pad,
                  moe_tokens=moe_tokens, valid_frac=wl.batch / b_pad, attention_active=active,
                  layers_local=cfg.num_layers // mesh.pp, moe=spec, rows=spec.buffer_rows(moe_tokens))


@dataclasses.dataclass(frozen=True)
class Mix:
    """Which of a device's local layers run which FFN in one pipeline step: `moe` and `dense` layers,
    and the gathers of the MoE's token mask (XLA merges the identical gathers of the MoE layers at the
    top level into one; a slot whose stages hold different kinds runs its MoE in a switch branch, with
    its own gather)."""

    moe: float
    dense: float
    mask_gathers: float


def stage_mix(cfg: ModelConfig, pp: int, stage: int) -> Mix:
    """What stage `stage` runs in each pipeline step."""
    moe = [r[stage] >= 0 for r in cfg.slot_rows("moe", pp)]
    mixed = [len({x >= 0 for x in r}) > 1 for r in cfg.slot_rows("moe", pp)]
    plain = any(m and not x for m, x in zip(moe, mixed))
    return Mix(moe=sum(moe), dense=len(moe) - sum(moe), mask_gathers=int(plain) + sum(m and x for m, x in zip(moe, mixed)))


def mean_mix(cfg: ModelConfig, pp: int) -> Mix:
    """The mean over stages: per-device figures that add up over the mesh to the model's."""
    mixes = [stage_mix(cfg, pp, st) for st in range(pp)]
    sums = [sum(getattr(m, f) for m in mixes) for f in ("moe", "dense", "mask_gathers")]
    return Mix(*(x // pp if x % pp == 0 else x / pp for x in sums))


def program_mix(cfg: ModelConfig, pp: int) -> Mix:
    """The call sites of the compiled program (what its HLO text shows): a slot's MoE where any stage
    holds a MoE layer there, its dense FFN where any stage holds a dense one (both in a switch)."""
    rows = cfg.slot_rows("moe", pp)
    any_moe = sum(max(r) >= 0 for r in rows)
    any_dense = sum(min(r) < 0 for r in rows)
    mixed = sum(max(r) >= 0 > min(r) for r in rows)
    return Mix(moe=any_moe, dense=any_dense, mask_gathers=int(any_moe > mixed) + mixed)


def stage_mixes(cfg: ModelConfig, pp: int) -> list[tuple[Mix, int]]:
    """Each distinct stage mix with the number of stages that run it."""
    out: dict = {}
    for st in range(pp):
        m = stage_mix(cfg, pp, st)
        out[m] = out.get(m, 0) + 1
    return list(out.items())


def decides_round(s: Shapes) -> bool:
    """Whether each MoE layer sizes its dropless exchange at run time (pmax, then a loop or switch)."""
    return s.moe.kernel not in GROUPED_GEMMS and s.rows < s.moe_tokens


def ffn_tokens(layout: Layout, mesh: MeshShape, s: Shapes) -> int:
    """Tokens a device's dense SwiGLU (shared expert, dense layer) computes: its 1/tp share, or every tp
    rank's tokens gathered when the hidden dim is split over tp (padding rows included)."""
    return s.n_pad // mesh.tp * layout.shards("ffn", mesh)

