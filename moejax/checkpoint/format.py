"""The moejax checkpoint format: its metadata (built in one place, `build_meta`), the checksum of
every tensor, and the names orbax gives its handlers (what makes a step written by blocks.py
readable by orbax).

A checkpoint directory holds numbered steps; each step has `params` (the stacked tensors, an orbax
PyTree item in OCDBT/zarr3) and `meta` (an orbax JSON item: the model config, layout rules, mesh,
dtype, quantization and a checksum of every tensor).

Checksums: orbax's files carry none (zeroed or cut bytes in a data file restored silently), so each
tensor's metadata stores two 32-bit sums over the bit patterns of the stacked array
(`tensor_checksums`); readers recompute them and refuse a tensor that differs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from moejax.config.model import ModelConfig, config_from_dict
from moejax.parallel.rules import Layout

FORMAT = "moejax-checkpoint-1"
CHECKSUM = "sum32x2-v1"  # see tensor_checksums
_MULT = 2654435761  # odd: the position weights i * _MULT + 1 differ for any two positions mod 2**32
ITEMS = ("params", "meta")  # the orbax items of a step
# What orbax's CheckpointManager records for each item of a step written without it (blocks.py
# StepWriter): the handler class paths it reads back (pinned by tests/test_structure.py)
# and its commit marker.
ORBAX_HANDLERS = {"meta": "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
                  "params": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"}
ORBAX_COMMIT = "Checkpoint commit was successful to {}"


def build_meta(cfg: ModelConfig, layout: Layout, dtype: str, mesh_text: str, checksums: dict,
               quant: str | None = None) -> dict:
    """The `meta` item of a step: everything a reader needs besides the tensors."""
    return {"format": FORMAT, "config": dataclasses.asdict(cfg), "layout": layout.name,
            "rules": {k: list(v) for k, v in layout.rules.items()}, "dtype": dtype, "quant": quant,
            "mesh": mesh_text, "checksums": {"algorithm": CHECKSUM, "tensors": dict(sorted(checksums.items()))}}


def config_of(meta: dict) -> ModelConfig:
    return config_from_dict({k: v for k, v in meta["config"].items() if k != "name"}, meta["config"]["name"])


def quant_of(meta: dict) -> str | None:
    return meta.get("quant")


def saved_checksums(meta: dict) -> dict | None:
    """{tensor: checksum} saved in `meta`, or None (a step saved before checksums existed)."""
    return (meta.get("checksums") or {}).get("tensors")


def _uint(dtype) -> type:
    size = np.dtype(dtype).itemsize
    if size not in (1, 2, 4):
        raise ValueError(f"no checksum for {size}-byte elements ({dtype})")
    return {1: np.uint8, 2: np.uint16, 4: np.uint32}[size]


_ROW = 4096  # the host sums view a block as rows of this many elements


def host_sums(x: np.ndarray, offset: int) -> np.ndarray:
    """The two sums of a contiguous host block whose first element has flat index `offset`.
    With i = r * C + c over a [R, C] view: sum b_i * i = C * sum_r r * rowsum_r + sum_c c * colsum_c,
    and the weighted sum is M * (that + offset * sum b) + sum b. uint64 arithmetic wraps mod 2**64,
    a multiple of 2**32, so the low 32 bits are exact: 5x faster than weighting every element."""
    b = np.ascontiguousarray(x).reshape(-1).view(_uint(x.dtype))
    rows, rem = divmod(b.size, _ROW)
    s0, s1 = np.uint64(0), np.uint64(0)
    with np.errstate(over="ignore"):
        if rows:
            m = b[: rows * _ROW].reshape(rows, _ROW)
            row_sums = m.sum(axis=1, dtype=np.uint64)
            s0 = row_sums.sum(dtype=np.uint64)
            s1 = (np.uint64(_ROW) * np.dot(np.arange(rows, dtype=np.uint64), row_sums)
                  + np.dot(np.arange(_ROW, dtype=np.uint64), m.sum(axis=0, dtype=np.uint64)))
        if rem:
            t = b[rows * _ROW:].astype(np.uint64)
            s0 = s0 + t.sum(dtype=np.uint64)
            s1 = s1 + np.dot(np.arange(rows * _ROW, b.size, dtype=np.uint64), t)
        w = np.uint64(_MULT) * (s1 + np.uint64(int(offset) % 2**64) * s0) + s0
    return np.array([int(s0) % 2**32, int(w) % 2**32], np.uint32)


@functools.lru_cache(maxsize=None)
def device_sums_fn():
    import jax.numpy as jnp

    def sums(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(_uint(x.dtype))).astype(jnp.uint32)
        pos, stride = jnp.zeros(x.shape, jnp.uint32), 1  # flat C-order index mod 2**32, elementwise in
        for ax in reversed(range(x.ndim)):  # x's own shape so that every device sums its own shard
            pos = pos + jax.lax.broadcasted_iota(jnp.uint32, x.shape, ax) * jnp.uint32(stride % 2**32)
            stride *= x.shape[ax]
        w = pos * jnp.uint32(_MULT) + jnp.uint32(1)
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * w, dtype=jnp.uint32)])

    return jax.jit(lambda tree: {n: sums(x) for n, x in tree.items()})


def tensor_checksums(params: dict) -> dict:
    """{name: 'xxxxxxxx-yyyyyyyy'} per tensor: over the array's element bit patterns b_i (i the flat
    C-order index), sum b_i and sum b_i * (i * 2654435761 + 1), both mod 2**32. Any change of one
    element changes the first; moved, swapped or zeroed blocks change the second. Integer sums are
    exact in any order, so the value does not depend on the mesh: JAX arrays are summed on their own
    devices (no gather), NumPy arrays on the host, one piece at a time."""
    out, dev = {}, {}
    for n, a in params.items():
        if isinstance(a, jax.Array):
            dev[n] = a
        else:
            a = np.asarray(a)
            out[n] = checksum_of_blocks(a[i] for i in range(a.shape[0])) if a.ndim else checksum_of_blocks([a])
    if dev:
        for n, v in device_sums_fn()(dev).items():
            out[n] = hex_sums(np.asarray(v.addressable_data(0)))
    return dict(sorted(out.items()))


def checksum_of_blocks(blocks) -> str:
    """`tensor_checksums`' value for the array whose C-order elements are those of `blocks` (host
    arrays) one after another: a tensor read or converted one slice at a time."""
    s, offset = np.zeros(2, np.uint32), 0
    for b in blocks:
        b = np.asarray(b)
        s += host_sums(b, offset)
        offset += b.size
    return hex_sums(s)


def hex_sums(v) -> str:
    return f"{int(v[0]):08x}-{int(v[1]):08x}"
