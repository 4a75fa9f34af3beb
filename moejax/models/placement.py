"""The placement report: where every layer, head and expert lives, from shapes alone.

Nothing is allocated: parameter shapes come from the rules' table of shapes (the initialiser's) and
are divided by the mesh axes the rules table gives each dimension. A layer tensor is counted as
serving holds it: one buffer per local layer slot of its stage; a stack of one kind (MoE or dense
layers) in a model that mixes them has a buffer in each slot that holds that kind on some stage
(`ModelConfig.slot_rows`), not the whole stack (kept whole on every stage only until serving_params).
"""

from __future__ import annotations

import math

from moejax.config.model import ModelConfig, dtype_bytes
from moejax.parallel.mesh import MeshShape
from moejax.models.params import param_axes, param_dtypes, param_shapes, row
from moejax.parallel.rules import ACT_AXES, Layout
from moejax.models import counts


def _local_shape(shape, logical_axes, layout: Layout, mesh: MeshShape):
    return tuple(d // (layout.shards(a, mesh) if a else 1) for d, a in zip(shape, logical_axes))


def serving_bytes(cfg: ModelConfig, layout: Layout, mesh: MeshShape, dtype: str, quant: str | None = None) -> int:
    """Parameter bytes per device of the serving layout: a layer tensor's local slots (every slot for a
    tensor of every layer, L/pp; the slots holding its kind on some stage for a kind's stack) x one
    layer's local elements, plus the global tensors' local shapes."""
    dtypes = param_dtypes(cfg, dtype, quant)
    axes = param_axes(cfg, quant, stacked=False)
    total = 0
    for name, shape in param_shapes(cfg, quant).items():
        local = _local_shape(shape, axes[name], layout, mesh)
        p = row(cfg, name)
        if p.per_layer:
            slots = sum(max(r) >= 0 for r in cfg.slot_rows(p.kind, mesh.pp))
            local = (slots,) + local[1:]
        total += math.prod(local) * dtype_bytes(dtypes[name])
    return total


def expert_ids(layout: Layout, mesh: MeshShape, coords: dict, num_experts: int) -> list[int]:
    """Experts of one layer held by the device at `coords` ({axis: index})."""
    block = 0
    for a in layout.mesh_axes("experts"):
        block = block * getattr(mesh, a) + coords[a]
    per = num_experts // layout.shards("experts", mesh)
    return list(range(block * per, (block + 1) * per))


def placement(cfg: ModelConfig, layout: Layout, mesh: MeshShape, dtype: str, batch: int, max_len: int,
              quant: str | None = None, ring: bool = False) -> dict:
    """The placement report; `quant`: int8 matrices and their float32 scales counted as stored; `ring`:
    the server's cache, whose sliding-window layers keep rings of their window (models/cache.py)."""
    from moejax.models.cache import cache_axes, cache_shapes, slot_lengths  # late: keeps `--plan` light to import

    layout.validate(cfg, mesh)
    nbytes = dtype_bytes(dtype)
    dtypes = param_dtypes(cfg, dtype, quant)
    param_bytes = serving_bytes(cfg, layout, mesh, dtype, quant)
    batch_shards = layout.shards("batch", mesh)
    padded_batch = -(-batch // batch_shards) * batch_shards
    lengths = slot_lengths(cfg, mesh.pp, max_len, ring)  # positions each local layer slot keeps
    kv_local = [_local_shape((mesh.pp, padded_batch, n) + shape[3:], ACT_AXES[cache_axes(cfg)], layout, mesh)
                for shape in cache_shapes(cfg, padded_batch, max_len) for n in lengths]  # one layer each
    grid = [[expert_ids(layout, mesh, {"dp": 0, "pp": 0, "tp": t, "ep": e}, cfg.num_experts)
             for e in range(mesh.ep)] for t in range(mesh.tp)]
    experts_per_device = cfg.num_experts // layout.shards("experts", mesh)
    layers_per_stage = cfg.num_layers // mesh.pp
    checks = {
        "128 devices": mesh.size == 128,
        "TP groups of 4": mesh.tp == 4,
        "8 layers per stage": layers_per_stage == 8,
        "1 expert per device per layer": experts_per_device == 1,
    }
    return {
        "config": cfg.name,
        "layout": layout.name,
        "mesh": mesh.as_dict(),
        "devices": mesh.size,
        "dtype": dtype,
        "params_total": counts.param_count(cfg),
        "param_bytes_total": sum(math.prod(s) * dtype_bytes(dtypes[n]) for n, s in param_shapes(cfg, quant).items()),
        "placement": {
            "tp_group_size": mesh.tp,
            "layers_per_stage": layers_per_stage,
            "stage_layers": [[s * layers_per_stage, (s + 1) * layers_per_stage - 1] for s in range(mesh.pp)],
            "experts_per_device_per_layer": experts_per_device,
            "heads_per_device": cfg.num_heads // layout.shards("heads", mesh),
            "kv_heads_per_device": cfg.num_kv_heads // layout.shards("kv_heads", mesh),
            "layer0_experts_by_tp_ep": grid,
            "param_bytes_per_device": param_bytes,
            "quant": quant,
            "kv_batch": padded_batch,
            "kv_max_len": max_len,
            "kv_bytes_per_device": sum(math.prod(s) for s in kv_local) * nbytes,
            "rules": {k: list(v) for k, v in layout.rules.items()},
        },
        "plan_checklist": {k: ("pass" if v else "fail") for k, v in checks.items()},
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def format_placement(p: dict) -> str:
    pl, m = p["placement"], p["mesh"]
    lines = [
        f"config {p['config']}: {p['params_total']:,} parameters, {_gb(p['param_bytes_total'])} in {p['dtype']}"
        + (f" ({pl['quant']} attention and expert matrices)" if pl.get("quant") else ""),
        f"mesh dp={m['dp']} pp={m['pp']} tp={m['tp']} ep={m['ep']}: {p['devices']} devices, layout {p['layout']}",
        "rules: " + ", ".join(f"{k}->{'x'.join(v) or '-'}" for k, v in pl["rules"].items()),
        f"TP group size {pl['tp_group_size']}: {pl['heads_per_device']} heads and {pl['kv_heads_per_device']} "
        f"kv heads per device",
        f"pipeline: {m['pp']} stage(s) of {pl['layers_per_stage']} layers: "
        + ", ".join(f"stage {s}: layers {a}-{b}" for s, (a, b) in enumerate(pl["stage_layers"])),
        f"experts per device per layer: {pl['experts_per_device_per_layer']}",
        "layer-0 experts on stage 0 (rows tp, columns ep; the same on every dp replica, and each stage"
        " holds the same ids for its own layers):",
    ]
    width = max(len(",".join(map(str, ids))) for tp_row in pl["layer0_experts_by_tp_ep"] for ids in tp_row)
    for t, tp_row in enumerate(pl["layer0_experts_by_tp_ep"]):
        lines.append(f"  tp={t}: " + " ".join(",".join(map(str, ids)).rjust(width) for ids in tp_row))
    lines += [
        f"parameter bytes per device: {_gb(pl['param_bytes_per_device'])}",
        f"KV-cache bytes per device: {_gb(pl['kv_bytes_per_device'])} (batch {pl['kv_batch']}, "
        f"length {pl['kv_max_len']})",
        "plan checklist: " + ", ".join(f"{k}: {v}" for k, v in p["plan_checklist"].items()),
    ]
    return "\n".join(lines)
