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


def quant_dims(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The matrices int8 quantizes and, for each, the input dims of the stacked tensor."""
    return {p.name: p.quant_dims for p in family_of(cfg).params if p.quant_dims}


def param_axes(cfg: ModelConfig, quant: str | None = None) -> dict[str, tuple]:
    """Logical axes of every stacked parameter, plus each quantized matrix's scale under `quant`."""
    axes = {p.name: p.axes for p in family_of(cfg).params}
    if quant:
        for name, dims in quant_dims(cfg).items():
            axes[scale_name(name)] = tuple(None if i in dims else a for i, a in enumerate(axes[name]))
    return axes


def param_shapes(cfg: ModelConfig, quant: str | None = None) -> dict[str, tuple[int, ...]]:
    """Stacked parameter shapes; under `quant`, each quantized matrix's scale too."""
    shapes = {p.name: tuple(p.shape(cfg)) for p in family_of(cfg).params}
    if quant:
        for name, dims in quant_dims(cfg).items():
            shapes[scale_name(name)] = tuple(1 if i in dims else n for i, n in enumerate(shapes[name]))
    return shapes


def param_dtypes(cfg: ModelConfig, dtype: str, quant: str | None = None) -> dict[str, str]:
    """Stored dtype of each parameter: `dtype`, except int8 matrices and their float32 scales."""
    out = {name: dtype for name in param_axes(cfg, quant)}
    if quant:
        for name in quant_dims(cfg):
            out[name], out[scale_name(name)] = "int8", "float32"
    return out


def param_specs(layout: Layout, cfg: ModelConfig, quant: str | None = None) -> dict:
    """PartitionSpec of every stacked parameter under `layout`."""
    return {name: layout.spec(axes) for name, axes in param_axes(cfg, quant).items()}


def layer_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Parameters with a stacked layer axis (served as one buffer per local layer)."""
    return tuple(p.name for p in family_of(cfg).params if p.per_layer)


def expert_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Parameters with an experts axis (served per local expert, or all local experts stacked)."""
    return tuple(p.name for p in family_of(cfg).params if p.per_expert)


def init_kind(cfg: ModelConfig, name: str) -> str:
    return family_of(cfg).table()[base_name(name)].init
