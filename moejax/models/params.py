"""Shapes, logical axes, dtypes and int8 dims of a config's parameters, read from its family's table.

Every parameter sharding in moejax derives from these axes and a layout's rules (parallel/rules.py).
Under int8 (ops/quant.py) each quantized matrix has a float32 scale per output channel: the scale
keeps the weight's other dimensions (and their sharding) and has size 1 along its input dims.
"""

from __future__ import annotations

from moejax.config.model import ModelConfig
from moejax.models.registry import family_of
from moejax.ops.quant import SCALE_SUFFIX, scale_name
from moejax.parallel.rules import Layout

def base_name(name: str) -> str:
    """A quantized matrix's scale is laid out like the matrix: `w1_scale` -> `w1`."""
    return name.removesuffix(SCALE_SUFFIX)


def table(cfg: ModelConfig) -> tuple:
    """The family's parameter rows that exist under `cfg`."""
    return family_of(cfg).params_of(cfg)


def quant_dims(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The matrices int8 quantizes and, for each, the input dims of the stacked tensor."""
    return {p.name: p.quant_dims for p in table(cfg) if p.quant_dims}


def stacks_every_layer(cfg: ModelConfig, p) -> bool:
    """A per-layer tensor whose stack holds every layer (split over pp as stages hold layers). A stack
    of one kind in a model that mixes dense and MoE layers is kept whole on every stage until
    `serving_params` (or the training step) gathers each stage's own layers from it."""
    return p.per_layer and len(cfg.kind_layers(p.kind)) == cfg.num_layers


def _axes(cfg: ModelConfig, p) -> tuple:
    return p.axes if not p.per_layer or stacks_every_layer(cfg, p) else (None,) + p.axes[1:]


def param_axes(cfg: ModelConfig, quant: str | None = None, stacked: bool = True) -> dict[str, tuple]:
    """Logical axes of every stacked parameter, plus each quantized matrix's scale under `quant`.
    stacked=False: the axes of the serving layout's per-layer buffers ([pp, ...] for every kind)."""
    axes = {p.name: _axes(cfg, p) if stacked else p.axes for p in table(cfg)}
    if quant:
        for name, dims in quant_dims(cfg).items():
            axes[scale_name(name)] = tuple(None if i in dims else a for i, a in enumerate(axes[name]))
    return axes


def param_shapes(cfg: ModelConfig, quant: str | None = None) -> dict[str, tuple[int, ...]]:
    """Stacked parameter shapes; under `quant`, each quantized matrix's scale too."""
    shapes = {p.name: tuple(p.shape(cfg)) for p in table(cfg)}
    if quant:
        for name, dims in quant_dims(cfg).items():
            shapes[scale_name(name)] = tuple(1 if i in dims else n for i, n in enumerate(shapes[name]))
    return shapes


def param_dtypes(cfg: ModelConfig, dtype: str, quant: str | None = None) -> dict[str, str]:
    """Stored dtype of each parameter: `dtype`, except int8 matrices and their float32 scales, and rows the
    family keeps in float32 (`Param.f32`)."""
    out = {name: "float32" if row(cfg, name).f32 else dtype for name in param_axes(cfg, quant)}
    if quant:
        for name in quant_dims(cfg):
            out[name], out[scale_name(name)] = "int8", "float32"
    return out


def param_specs(layout: Layout, cfg: ModelConfig, quant: str | None = None) -> dict:
    """PartitionSpec of every stacked parameter under `layout`."""
    return {name: layout.spec(axes) for name, axes in param_axes(cfg, quant).items()}


def layer_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Parameters with a stacked layer axis (served as one buffer per local layer)."""
    return tuple(p.name for p in table(cfg) if p.per_layer)


def expert_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Parameters with an experts axis (served per local expert, or all local experts stacked)."""
    return tuple(p.name for p in table(cfg) if p.per_expert)


def row(cfg: ModelConfig, name: str):
    """The table row of a parameter (or of a quantized matrix's scale)."""
    return family_of(cfg).table()[base_name(name)]


def init_kind(cfg: ModelConfig, name: str) -> str:
    return row(cfg, name).init
