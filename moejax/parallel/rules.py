"""The sharding rules: one table from logical axes to mesh axes, loaded from `meshes/*.yaml`.

Every parameter and activation sharding in moejax derives from logical axes (each family's parameter
table, moejax/models/<family>/, and `ACT_AXES` below) and a layout's rules. Besides this file, mesh
axis names appear only in the shard_map bodies that issue collectives, and those take them from the
layout too.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jax.sharding import PartitionSpec as P

from moejax.config.model import REPO_DIR, ModelConfig, load_yaml, preset_candidates
from moejax.errors import UserError
from moejax.parallel.mesh import MeshShape

_LAYOUT_DIR = os.path.join(REPO_DIR, "meshes")

# Logical axes a layout may map to mesh axes, and the mesh axes each may use.
LOGICAL_AXES = {
    "batch": ("dp", "ep"),  # sequences; attention is data-parallel over these
    "layers": ("pp",),  # the stacked layer axis: a stage owns a contiguous slice
    "heads": ("tp",),  # query heads
    "kv_heads": ("tp",),  # key/value heads (and the KV cache)
    "experts": ("ep", "tp", "dp"),  # the expert axes: the all-to-all runs over these
    "expert_ffn": ("tp",),  # an expert's hidden dimension
    "ffn": ("tp",),  # a dense FFN's hidden dimension (shared experts, dense layers)
    "vocab": ("tp",),  # embedding rows and head columns
}

# Activations and caches.
ACT_AXES = {
    "tokens": ("batch", None),  # tokens_BT
    "lengths": ("batch",),  # lengths_B
    "logits": ("batch", None, "vocab"),  # logits_BTV
    "last_logits": ("batch", "vocab"),  # logits_BV
    "kv_cache": ("layers", "batch", None, "kv_heads", None),  # cache_LBSGK
    "latent_cache": ("layers", "batch", None, None, None),  # MLA's latent and RoPE key [L, B, S, 1, C + R]
    "moe_counts": ("layers", None),  # counts_LE, summed over every device holding tokens
}


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    rules: dict  # logical axis -> tuple of mesh axes
    description: str = ""

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        return tuple(self.rules.get(logical, ()))

    def spec(self, logical_axes) -> P:
        parts = []
        for a in logical_axes:
            axes = self.mesh_axes(a) if a else ()
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*parts)

    def act_spec(self, name: str) -> P:
        return self.spec(ACT_AXES[name])

    def shards(self, logical: str, shape: MeshShape) -> int:
        return math.prod(getattr(shape, a) for a in self.mesh_axes(logical))

    @property
    def tokens_split_over_tp(self) -> bool:
        """Whether the MoE dispatches a distinct 1/tp share of the tokens from each tp rank."""
        return "tp" in self.mesh_axes("experts")

    def token_axes(self) -> tuple[str, ...]:
        """Mesh axes over which the MoE sees distinct tokens (used to sum statistics)."""
        return self.mesh_axes("batch") + (("tp",) if self.tokens_split_over_tp else ())

    def validate(self, cfg: ModelConfig, shape: MeshShape) -> None:
        """One-line errors for a config or mesh this layout cannot place."""
        dims = {"layers": ("num_layers", cfg.num_layers), "heads": ("num_heads", cfg.num_heads),
                "kv_heads": ("num_kv_heads", cfg.num_kv_heads), "experts": ("num_experts", cfg.num_experts),
                "expert_ffn": ("expert_ffn", cfg.expert_ffn), "vocab": ("vocab_size", cfg.vocab_size),
                "ffn": ("shared_expert_ffn and dense_ffn", math.gcd(cfg.shared_expert_ffn, cfg.dense_ffn))}
        for logical, (field, size) in dims.items():
            n = self.shards(logical, shape)
            if size % n:
                axes = "x".join(f"{a}={getattr(shape, a)}" for a in self.mesh_axes(logical))
                raise UserError(f"config {cfg.name}: {field}={size} is not divisible by the {n} "
                                f"{logical} shards ({axes}) of mesh {shape} under layout {self.name}")


def layout_from_dict(d: dict, name: str) -> Layout:
    allowed = {"rules", "description"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"layout {name}: unknown key {unknown[0]!r}; valid keys: description, rules")
    rules_in = d.get("rules")
    if not isinstance(rules_in, dict):
        raise UserError(f"layout {name}: 'rules' must map logical axes to lists of mesh axes")
    rules = {}
    for logical, axes in rules_in.items():
        if logical not in LOGICAL_AXES:
            raise UserError(f"layout {name}: unknown logical axis {logical!r}; valid: "
                            f"{', '.join(LOGICAL_AXES)}")
        axes = [axes] if isinstance(axes, str) else list(axes or [])
        for a in axes:
            if a not in LOGICAL_AXES[logical]:
                raise UserError(f"layout {name}: {logical} cannot use mesh axis {a!r}; valid: "
                                f"{', '.join(LOGICAL_AXES[logical])}")
        if len(set(axes)) != len(axes):
            raise UserError(f"layout {name}: {logical} lists a mesh axis twice: {axes}")
        rules[logical] = tuple(axes)
    for required in ("layers", "heads", "kv_heads", "batch", "experts"):
        if required not in rules:
            raise UserError(f"layout {name}: missing rule for {required!r}")
    if rules["layers"] != ("pp",):
        raise UserError(f"layout {name}: layers must be [pp] (pipeline stages own layer slices)")
    if rules["heads"] != ("tp",) or rules["kv_heads"] != ("tp",):
        raise UserError(f"layout {name}: heads and kv_heads must be [tp] (tp is the tensor-parallel axis)")
    ex, ffn = rules["experts"], rules.get("expert_ffn", ())
    if "tp" in ex and "tp" in ffn:
        raise UserError(f"layout {name}: tp cannot split both experts and expert_ffn")
    for a in ex:
        if a != "tp" and a not in rules["batch"]:
            raise UserError(f"layout {name}: experts over {a!r} needs batch over {a!r} too "
                            f"(tokens must differ along every expert axis)")
    return Layout(name=name, rules=rules, description=str(d.get("description", "")))


def resolve_layout_path(path: str) -> str:
    for c in preset_candidates(path, _LAYOUT_DIR):
        if os.path.isfile(c):
            return c
    shipped = sorted(f[:-5] for f in os.listdir(_LAYOUT_DIR) if f.endswith(".yaml"))
    raise UserError(f"unknown layout {path!r}: no such file; shipped layouts: {', '.join(shipped)}")


def load_layout(path: str) -> Layout:
    p = resolve_layout_path(path)
    return layout_from_dict(load_yaml(p), os.path.splitext(os.path.basename(p))[0])
