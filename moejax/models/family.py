"""The model-family boundary: what a family declares, and nothing else.

A family is a package under `moejax/models/<family>/` exporting `FAMILY`: one table of its
parameters (each one's name, stacked shape, logical axes, int8 input dimensions, Hugging Face
tensor name and how it is laid out there), its per-device decoder layer, its router and its
Hugging Face config mapping. Shared code reads these tables (`models/params.py`, `models/hf_map.py`)
and never branches on a family's name; `models/registry.py` looks a family up by HF `model_type`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from moejax.config.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Param:
    """One stacked parameter (checkpoint layout: layer tensors are [L, ...])."""

    name: str
    shape: Callable[[ModelConfig], tuple]  # the stacked shape under a config
    axes: tuple  # logical axis of each dimension (parallel/rules.py LOGICAL_AXES; None: never sharded)
    quant_dims: tuple = ()  # int8: the input (contracted) dims of the stacked tensor; () = kept in float
    hf: str = ""  # HF tensor name; {l} is the layer, {e} the expert
    hf_transpose: bool = False  # HF stores it as a torch Linear [out, in]; moejax as [in..., out...]
    hf_vector: bool = False  # HF stores the (unstacked) tensor flattened to one dim (a bias [H*K])
    in_rank: int = 1  # leading dims of the moejax slice that form torch's `in` (wo [H, K, D]: 2)
    init: str = "normal"  # random init: "normal" (std 0.02), "ones" (norms) or "zeros" (biases)
    kind: str = "layer"  # which layers a [L, ...] tensor stacks: every layer, the "moe" or the "dense" ones
    # (its first dim is then that kind's layer count: ModelConfig.kind_layers)
    when: Callable[[ModelConfig], bool] | None = None  # the tensor exists only under configs where this holds
    hf_fused: str = ""  # transformers 5.x's fused 3-D expert tensor holding this one ([E, chunks x R, ...])
    hf_chunk: tuple = (0, 1)  # (which, of how many) equal chunks of the fused tensor's second dim this is
    hf_interleave: tuple = (0, 1)  # (which, of how many) interleaved columns of the HF tensor's last dim this is:
    # GPT-OSS's gate_up_proj [E, D, 2F] holds gate in the even columns, up in the odd (several rows, one tensor)
    f32: bool = False  # kept in float32 whatever the model's dtype (HF's _keep_in_fp32_modules: a sigmoid router)
    trained: bool = True  # False: no gradient step and no weight decay (a balancing bias updated by a rule)

    @property
    def per_layer(self) -> bool:
        return self.axes[:1] == ("layers",)

    def present(self, cfg: ModelConfig) -> bool:
        return self.when is None or bool(self.when(cfg))

    @property
    def per_expert(self) -> bool:
        return "experts" in self.axes

    @property
    def hf_per_expert(self) -> bool:
        """HF holds one tensor per expert ({e} in its name), not every expert of a layer in one [E, ...]."""
        return self.per_expert and "{e}" in self.hf


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its parameter table, per-device layer, router and HF config mapping."""

    model_type: str  # Hugging Face `model_type`, the registry key and `ModelConfig.family`
    hf_architecture: str  # `architectures[0]` of an exported config.json
    params: tuple  # of Param, in checkpoint order
    # (x_BTD, valid_BT, w, side, mode, kv, row0, rs, slot) -> (x_BTD, kv, moe stats); it may read its local
    # layer slot only for what `transformer.slot_kinds` keys (the stages' windows and MoE-or-dense there)
    layer: Callable
    config_from_hf: Callable[[dict, str], dict]  # config.json (a dict), its path -> ModelConfig fields
    config_to_hf: Callable[[ModelConfig], dict]
    fixed: tuple = ()  # (config field, value) pairs the family's weights imply (its table has q_norm or not)
    latent_attention: bool = False  # its attention is multi-head latent attention (configs with kv_lora_rank > 0)

    def table(self) -> dict:
        return {p.name: p for p in self.params}

    def params_of(self, cfg: ModelConfig) -> tuple:
        """The rows of the table that exist under `cfg` (biases, shared experts, dense layers...)."""
        return tuple(p for p in self.params if p.present(cfg))
