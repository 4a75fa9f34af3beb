"""Hugging Face tensors <-> moejax stacked parameters, from a family's table (models/family.py).

Each `Param` with an HF name maps one HF tensor per layer (`{l}`) and per expert (`{e}`) onto a
slice of the stacked tensor; `hf_transpose` ones are torch `Linear` weights [out, in], stored by
moejax as [in..., out...] (the first `in_rank` dims of the slice are torch's `in`). An expert tensor
whose HF name has no `{e}` holds every expert of its layer ([E, ...], GPT-OSS); one HF tensor may hold
several moejax slices interleaved along its last dim (`hf_interleave`: GPT-OSS's gate and up), which
`hf_writes` groups and `join` joins for export.
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
            if p.per_layer and not p.hf_per_expert and i in at[p.name]:  # every expert's, if an expert tensor
                yield p.hf.format(l=i), p.name, (at[p.name][i],), _from_hf(p, p.shape(cfg)[1:])
        for e in range(cfg.num_experts):
            for p in params:
                if p.per_layer and p.hf_per_expert and i in at[p.name]:
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


def expert_reads(cfg: ModelConfig) -> dict:
    """The HF tensors that hold every expert of a layer ([E, ...], GPT-OSS), read one expert at a time
    (a hub MXFP4 tensor of gpt-oss-120b's is 8.5 GB dequantised whole): {(moejax name, (layer slot,
    expert)): (HF name, expert, HF -> moejax transform of that expert's [...])}."""
    out = {}
    for p in table(cfg):
        if p.per_expert and not p.hf_per_expert:
            fn = _from_hf(p, p.shape(cfg)[2:])
            for j, layer in enumerate(cfg.kind_layers(p.kind)):
                for e in range(cfg.num_experts):
                    out[(p.name, (j, e))] = (p.hf.format(l=layer), e, fn)
    return out


def _from_hf(p: Param, slice_shape: tuple):
    which, n = p.hf_interleave
    cols = (lambda t: t) if n == 1 else (lambda t: t[..., which::n])  # noqa: E731
    if not p.hf_transpose:  # a bias [H*K] is stored [H, K]: a reshape (a view)
        return lambda t: cols(t).reshape(slice_shape)
    return lambda t: transpose(cols(t)).reshape(slice_shape)


def hf_writes(cfg: ModelConfig):
    """(HF name, [(moejax name, index), ...]) for every HF tensor, in `hf_tensors`' order: one slice, or
    the several it interleaves (`hf_interleave`), in column order. Export writes `join` of their `to_hf`
    forms under that name."""
    parts = {}
    for hf_name, name, idx, _ in hf_tensors(cfg):
        parts.setdefault(hf_name, []).append((row(cfg, name).hf_interleave[0], name, idx))
    return [(h, [(n, i) for _, n, i in sorted(v)]) for h, v in parts.items()]


def hf_merged(cfg: ModelConfig) -> dict:
    """{HF name: its slices} of the HF tensors several moejax slices make up (`hf_writes`)."""
    return {h: parts for h, parts in hf_writes(cfg) if len(parts) > 1}


def join(parts: list) -> np.ndarray:
    """The HF tensor of its slices' `to_hf` forms: the one, or their columns interleaved along the last
    dim (column j of slice w at w + n j)."""
    if len(parts) == 1:
        return parts[0]
    return np.stack(parts, axis=-1).reshape(parts[0].shape[:-1] + (-1,))


def to_hf(cfg: ModelConfig, name: str, x: np.ndarray) -> np.ndarray:
    """The inverse transform, moejax slice -> HF tensor (its columns, for an interleaved part)."""
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
