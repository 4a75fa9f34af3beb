"""Hugging Face tensors <-> moejax stacked parameters, from a family's table (models/family.py).

Each `Param` with an HF name maps one HF tensor per layer (`{l}`) and per expert (`{e}`) onto a
slice of the stacked tensor; `hf_transpose` ones are torch `Linear` weights [out, in], stored by
moejax as [in..., out...] (the first `in_rank` dims of the slice are torch's `in`).
"""

from __future__ import annotations

import math

import numpy as np

from moejax.config.model import ModelConfig
from moejax.models.family import Param
from moejax.models.params import row, table


def hf_tensors(cfg: ModelConfig):
    """(HF name, moejax param, index into the stacked tensor, HF -> moejax transform) for every
    tensor, in checkpoint order: global tensors, then layer by layer its own tensors, then each
    expert's, each group in table order. A tensor of one kind of layer (MoE, dense) is at its
    layer's place in that kind's stack."""
    params = table(cfg)
    for p in params:
        if not p.per_layer:
            yield p.hf, p.name, (), _from_hf(p, p.shape(cfg))
    at = {p.name: {l: j for j, l in enumerate(cfg.kind_layers(p.kind))} for p in params if p.per_layer}
    for i in range(cfg.num_layers):
        for p in params:
            if p.per_layer and not p.per_expert and i in at[p.name]:
                yield p.hf.format(l=i), p.name, (at[p.name][i],), _from_hf(p, p.shape(cfg)[1:])
        for e in range(cfg.num_experts):
            for p in params:
                if p.per_layer and p.per_expert and i in at[p.name]:
                    yield p.hf.format(l=i, e=e), p.name, (at[p.name][i], e), _from_hf(p, p.shape(cfg)[2:])


def fused_units(cfg: ModelConfig) -> dict:
    """Where transformers 5.x's fused 3-D expert tensors hold each per-expert tensor: {(moejax name,
    index): (fused HF name, expert, chunk, chunks)}. gate_up_proj [E, 2F, D] holds every expert's gate
    (chunk 0 of 2 along its second dim) and up (chunk 1); down_proj [E, D, F] each expert's down."""
    out = {}
    for p in table(cfg):
        if p.per_expert and p.hf_fused:
            for j, layer in enumerate(cfg.kind_layers(p.kind)):
                for e in range(cfg.num_experts):
                    out[(p.name, (j, e))] = (p.hf_fused.format(l=layer), e) + tuple(p.hf_chunk)
    return out


def _from_hf(p: Param, slice_shape: tuple):
    if not p.hf_transpose:  # a bias [H*K] is stored [H, K]: a reshape (a view)
        return lambda t: t.reshape(slice_shape)
    return lambda t: transpose(t).reshape(slice_shape)


def to_hf(cfg: ModelConfig, name: str, x: np.ndarray) -> np.ndarray:
    """The inverse transform, moejax slice -> HF tensor."""
    p = row(cfg, name)
    if not p.hf_transpose:  # 1-D in HF when it is a vector there (biases, norms)
        return np.ascontiguousarray(x.reshape(-1) if p.hf_vector else x)
    return transpose(x.reshape(math.prod(x.shape[:p.in_rank]), -1))


def transpose(m: np.ndarray) -> np.ndarray:
    """A contiguous m.T, copied in 32 x 1024 tiles: 1.65 GB/s for a [2048, 6144] float16 matrix on the
    development machine against 0.32 GB/s for np.ascontiguousarray(m.T), which strides through memory."""
    if m.size < 1 << 16:
        return np.ascontiguousarray(m.T)
    out = np.empty(m.shape[::-1], m.dtype)
    for i in range(0, m.shape[0], 32):
        for j in range(0, m.shape[1], 1024):
            out[j:j + 1024, i:i + 32] = m[i:i + 32, j:j + 1024].T
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    from moejax.models.registry import family_of

    return family_of(cfg).config_to_hf(cfg)
