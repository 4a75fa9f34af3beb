"""The sharding rules: one table from logical axes to mesh axes, loaded from `meshes/*.yaml`.

Every parameter and activation sharding in moejax derives from `PARAM_AXES` / `ACT_AXES` below and
a layout's rules. Besides this file, mesh axis names appear only in the shard_map bodies that issue
collectives, and those take them from the layout too.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jax.sharding import PartitionSpec as P

from moejax.config import ModelConfig, load_yaml
from moejax.errors import UserError
from moejax.mesh import MeshShape

_LAYOUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "meshes")

# Logical axes a layout may map to mesh axes, and the mesh axes each may use.
LOGICAL_AXES = {
    "batch": ("dp", "ep"),  # sequences; attention is data-parallel over these
    "layers": ("pp",),  # the stacked layer axis: a stage owns a contiguous slice
    "heads": ("tp",),  # query heads
    "kv_heads": ("tp",),  # key/value heads (and the KV cache)
    "experts": ("ep", "tp", "dp"),  # the expert axes: the all-to-all runs over these
    "expert_ffn": ("tp",),  # an expert's hidden dimension
    "vocab": ("tp",),  # embedding rows and head columns
}

# Parameter name -> logical axis of each dimension (None: never sharded).
PARAM_AXES = {
    "embed": ("vocab", None),  # embed_VD
    "final_norm": (None,),  # final_norm_D
    "lm_head": (None, "vocab"),  # lm_head_DV
    "attn_norm": ("layers", None),  # attn_norm_LD
    "wq": ("layers", None, "heads", None),  # wq_LDHK
    "wk": ("layers", None, "kv_heads", None),  # wk_LDGK
    "wv": ("layers", None, "kv_heads", None),  # wv_LDGK
    "wo": ("layers", "heads", None, None),  # wo_LHKD
    "moe_norm": ("layers", None),  # moe_norm_LD
    "router": ("layers", None, None),  # router_LDE (every device routes its own tokens)
    "w1": ("layers", "experts", None, "expert_ffn"),  # w1_LEDF (gate)
    "w3": ("layers", "experts", None, "expert_ffn"),  # w3_LEDF (up)
    "w2": ("layers", "experts", "expert_ffn", None),  # w2_LEFD (down)
}

# int8 quantization (moejax/quant.py): the matrices it quantizes and, for each, the input (contracted)
# dimensions of the stacked tensor. A scale per output channel: the scale tensor keeps the weight's
# other dimensions (and their sharding) and has size 1 along these.
QUANT_INPUT_DIMS = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w1": (2,), "w3": (2,), "w2": (2,)}


def scale_name(name: str) -> str:
    return name + "_scale"


def param_axes(quant: str | None = None) -> dict:
    """PARAM_AXES, plus each quantized matrix's scale tensor under `quant`."""
    axes = dict(PARAM_AXES)
    if quant:
        for name, dims in QUANT_INPUT_DIMS.items():
            axes[scale_name(name)] = tuple(None if i in dims else a for i, a in enumerate(PARAM_AXES[name]))
    return axes


# Activations and caches.
ACT_AXES = {
    "tokens": ("batch", None),  # tokens_BT
    "lengths": ("batch",),  # lengths_B
    "logits": ("batch", None, "vocab"),  # logits_BTV
    "last_logits": ("batch", "vocab"),  # logits_BV
    "kv_cache": ("layers", "batch", None, "kv_heads", None),  # cache_LBSGK
    "moe_counts": ("layers", None),  # counts_LE, summed over every device holding tokens
}


def param_shapes(cfg: ModelConfig, quant: str | None = None) -> dict[str, tuple[int, ...]]:
    """Stacked parameter shapes; under `quant`, each quantized matrix's scale too."""
    shapes = _float_param_shapes(cfg)
    if quant:
        for name, dims in QUANT_INPUT_DIMS.items():
            shapes[scale_name(name)] = tuple(1 if i in dims else n for i, n in enumerate(shapes[name]))
    return shapes


def param_dtypes(dtype: str, quant: str | None = None) -> dict[str, str]:
    """Stored dtype of each parameter: `dtype`, except int8 matrices and their float32 scales."""
    out = {name: dtype for name in param_axes(quant)}
    if quant:
        for name in QUANT_INPUT_DIMS:
            out[name], out[scale_name(name)] = "int8", "float32"
    return out


def _float_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    L, E, D, H, G, K, F, V = (cfg.num_layers, cfg.num_experts, cfg.d_model, cfg.num_heads,
                              cfg.num_kv_heads, cfg.head_dim, cfg.expert_ffn, cfg.vocab_size)
    return {
        "embed": (V, D), "final_norm": (D,), "lm_head": (D, V),
        "attn_norm": (L, D), "wq": (L, D, H, K), "wk": (L, D, G, K), "wv": (L, D, G, K),
        "wo": (L, H, K, D), "moe_norm": (L, D), "router": (L, D, E),
        "w1": (L, E, D, F), "w3": (L, E, D, F), "w2": (L, E, F, D),
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

    def param_specs(self, quant: str | None = None) -> dict[str, P]:
        return {name: self.spec(axes) for name, axes in param_axes(quant).items()}

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
                "expert_ffn": ("expert_ffn", cfg.expert_ffn), "vocab": ("vocab_size", cfg.vocab_size)}
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
    for c in (path, os.path.join(_LAYOUT_DIR, path), os.path.join(_LAYOUT_DIR, path + ".yaml")):
        if os.path.isfile(c):
            return c
    shipped = sorted(f[:-5] for f in os.listdir(_LAYOUT_DIR) if f.endswith(".yaml"))
    raise UserError(f"unknown layout {path!r}: no such file; shipped layouts: {', '.join(shipped)}")


def load_layout(path: str) -> Layout:
    p = resolve_layout_path(path)
    return layout_from_dict(load_yaml(p), os.path.splitext(os.path.basename(p))[0])
