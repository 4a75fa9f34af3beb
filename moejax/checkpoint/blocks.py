"""Streaming checkpoints: read and write a moejax checkpoint's stacked tensors in bounded slices.

A step written here is what `checkpoint.save` writes for host arrays (orbax's OCDBT database of zarr
arrays, its `_METADATA`, the `meta` JSON item, the commit markers), so `checkpoint.restore` and
`read_meta` read it unchanged; only the chunks differ: one chunk never spans two layers (or expert
blocks) and never two shards of the target mesh, so a slice read decodes only what it needs and each
device of that mesh reads only its own chunks. Nothing here holds a whole stacked tensor: tensors
move one block of the leading (layer, expert) axes at a time, the next block is read while the
previous one is written, and checksums (checkpoint.tensor_checksums' sums) accumulate block by block.

Slices: a block is `[i0, ..., i(a-1), k rows of axis a, all of the rest]` in C order, so its elements
are a contiguous run of the flat tensor and the position-weighted checksum only needs its offset.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from moejax.checkpoint.format import ORBAX_COMMIT, ORBAX_HANDLERS, hex_sums, host_sums
from moejax.checkpoint.storage import data_files, read_error, storage_reason
from moejax.errors import UserError

_ZARR_DTYPE = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16", "int8": "|i1"}
IN_FLIGHT = 6  # block-sized buffers alive at once: read, cast, the write being copied, checksum temporaries


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (elsewhere: 8 GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def memory_bound(gb: float | None) -> int:
    """The tools' memory bound in bytes: `gb`, else a quarter of the memory free now (at least 1 GB)."""
    if gb is None:
        return max(1 << 30, available_bytes() // 4)
    if not gb > 0:
        raise UserError(f"--max-memory-gb {gb} must be > 0")
    return int(gb * 1e9)


def block_bytes(bound: int) -> int:
    """Bytes per block under `bound`: IN_FLIGHT blocks plus the process itself (~0.4 GB) fit in it."""
    return max(1, (bound - min(bound // 2, 400_000_000)) // IN_FLIGHT)


def plan(shape: tuple, itemsize: int, max_bytes: int, split_axes: int | None = None,
         align: tuple | None = None) -> tuple[int, int]:
    """(axis a, rows k): blocks of k rows of axis a (all earlier axes one index) are at most `max_bytes`,
    or one row of the last axis that may be cut: `split_axes` (the axes after it stay whole: an HF
    tensor, a random matrix; below 0, the whole tensor is one block). k is a multiple or a divisor of
    `align[a]` (a chunk's extent), so no chunk is written by two blocks."""
    n = len(shape)
    last = n - 1 if split_axes is None else min(split_axes, n - 1)
    if n == 0 or last < 0:
        return 0, shape[0] if n else 1
    for a in range(last + 1):
        row = math.prod(shape[a + 1:]) * itemsize
        if row <= max_bytes or a == last:
            k = max(1, min(shape[a], max_bytes // max(row, 1)))
            s = align[a] if align else shape[a]
            k = (k // s) * s if k >= s else max(d for d in range(1, k + 1) if s % d == 0)
            return a, k
    raise AssertionError


def blocks(shape: tuple, a: int, k: int):
    """(index, flat offset) of each block of `plan`'s (a, k), in C order."""
    if not shape:
        yield (), 0
        return
    inner = math.prod(shape[a + 1:])
    for lead in np.ndindex(*shape[:a]):
        base = int(np.ravel_multi_index(lead, shape[:a])) * shape[a] if a else 0
        for r0 in range(0, shape[a], k):
            yield lead + (slice(r0, min(r0 + k, shape[a])),), (base + r0) * inner


CHUNK_BYTES = 32 << 20  # the largest chunk written: what any reader decodes to get one element


def chunk_shape(shard: tuple, itemsize: int, max_bytes: int) -> list:
    """A shard cut along its leading axes into chunks of at most `max_bytes` (one row of the last axis
    at least): every device's shard is whole chunks, and a block read decodes only its own chunks."""
    if not shard:
        return []
    a, k = plan(shard, itemsize, max_bytes)
    return [1] * a + [k] + list(shard[a + 1:])


def shard_shapes(cfg, layout, mesh_shape, quant: str | None = None) -> dict:
    """Each tensor's shard on `mesh_shape` under `layout`."""
    from moejax.models.params import param_shapes, param_specs

    specs = param_specs(layout, cfg, quant)
    out = {}
    for n, s in param_shapes(cfg, quant).items():
        spec = tuple(specs[n]) + (None,) * (len(s) - len(tuple(specs[n])))
        parts = [math.prod(getattr(mesh_shape, ax) for ax in ((p,) if isinstance(p, str) else (p or ())))
                 for p in spec]
        out[n] = tuple(d // max(1, p) if d % max(1, p) == 0 else d for d, p in zip(s, parts))
    return out


def context():
    import tensorstore as ts

    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 2}})


def _kvstore(params_dir: str, name: str) -> dict:
    return {"driver": "ocdbt", "base": "file://" + os.path.abspath(params_dir).rstrip("/") + "/", "path": name + "/"}


def open_read(params_dir: str, name: str, ctx=None):
    """A saved tensor of a step's `params` directory, opened for slice reads."""
    import tensorstore as ts

    return ts.open({"driver": "zarr", "kvstore": _kvstore(params_dir, name)}, open=True, read=True,
                   context=ctx or context()).result()


class StepWriter:
    """Writes one checkpoint step into `step_dir` (which must not exist): `array` opens a tensor for
    block writes, `finish` writes orbax's metadata, the `meta` item and the commit markers last."""

    def __init__(self, step_dir: str):
        self.step_dir = step_dir
        self.params_dir = os.path.join(step_dir, "params")
        os.makedirs(self.params_dir)
        os.makedirs(os.path.join(step_dir, "meta"))
        self.ctx = context()
        self.names = []
        self.blocks = 0  # blocks written (reported)

    def array(self, name: str, shape: tuple, dtype: str, chunks: list):
        import tensorstore as ts

        self.names.append(name)
        meta = {"shape": list(shape), "chunks": list(chunks) if shape else [],
                "compressor": None, "dimension_separator": ".", "order": "C", "fill_value": None}
        return ts.open({"driver": "zarr", "kvstore": _kvstore(self.params_dir, name),
                        "dtype": dtype, "metadata": {**meta, "dtype": _ZARR_DTYPE[dtype]}},
                       create=True, context=self.ctx).result()

    def finish(self, meta: dict) -> None:
        tree = {f"('{n}',)": {"key_metadata": [{"key": n, "key_type": 2}],
                              "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                for n in sorted(self.names)}
        _write_json(os.path.join(self.params_dir, "_METADATA"),
                    {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
                     "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
        _write_json(os.path.join(self.step_dir, "meta", "metadata"), meta)
        for part in ("params", "meta"):
            _write_text(os.path.join(self.step_dir, part, "commit_success.txt"), ORBAX_COMMIT.format(part))
        now = time.time_ns()
        _write_json(os.path.join(self.step_dir, "_CHECKPOINT_METADATA"),
                    {"item_handlers": ORBAX_HANDLERS, "metrics": {}, "performance_metrics": {},
                     "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now, "custom_metadata": {}})
        _write_text(os.path.join(self.step_dir, "commit_success.txt"), ORBAX_COMMIT.format(self.step_dir))
        _fsync_dir(self.params_dir)


def _write_json(path: str, obj) -> None:
    _write_text(path, json.dumps(obj))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def write_error(e: BaseException, where: str) -> UserError | None:
    """One line for a failed write (a full disk, an unwritable directory), else None (a bug)."""

    reason = storage_reason(e)
    if reason is None and isinstance(e, ValueError) and ("OS error" in str(e) or "UNKNOWN" in str(e)):
        reason = " ".join(str(e).split(" [tensorstore_spec")[0].split())[:400]
    if reason is None:
        return None
    return UserError(f"writing {where} failed: {reason}")


def write_tensors(writer: StepWriter, specs: dict, shards: dict, fill, bound: int, split_axes: dict | None = None,
                  done=None, progress=None) -> dict:
    """Write every tensor of `specs` ({name: (shape, dtype)}) block by block: `fill(name, index, offset)`
    gives each block as a host array. Returns {name: checksum} of what was written. The next block is
    produced while the previous one is being written."""

    bb, sums = block_bytes(bound), {}
    for i, name in enumerate(sorted(specs)):
        shape, dtype = specs[name]
        item = np.dtype(np_dtype(dtype)).itemsize
        chunks = chunk_shape(shards[name], item, min(bb, CHUNK_BYTES))
        a, k = plan(shape, item, bb, (split_axes or {}).get(name), chunks)
        arr = writer.array(name, shape, dtype, chunks)
        s, pending = np.zeros(2, np.uint32), None
        for idx, off in blocks(shape, a, k):
            x = np.ascontiguousarray(fill(name, idx, off))
            s += host_sums(x, off)
            if pending is not None:
                pending.result()
            pending = arr[idx].write(x) if shape else arr.write(x)
            writer.blocks += 1
        if pending is not None:
            pending.result()
        sums[name] = hex_sums(s)
        if done:
            done(name)
        if progress:
            progress(i + 1, len(specs))
    return sums


def tensor_sums(params_dir: str, specs: dict, bound: int, where: str) -> dict:
    """{name: checksum} of the tensors stored under `params_dir`, read block by block."""

    ctx, bb, out = context(), block_bytes(bound), {}
    for name in sorted(specs):
        shape, dtype = specs[name]
        try:
            arr = open_read(params_dir, name, ctx)
            a, k = plan(shape, arr.dtype.numpy_dtype.itemsize, bb)
            s = np.zeros(2, np.uint32)
            for idx, off in blocks(shape, a, k):
                s += host_sums(arr[idx].read().result() if shape else arr.read().result(), off)
        except ValueError as e:
            err = read_error(e, where, params_dir)
            if err is None:
                raise
            raise err from None
        out[name] = hex_sums(s)
    return out


_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_safetensors(path: str, entries: list, fill, metadata: dict | None = None) -> int:
    """A safetensors file written tensor by tensor: `entries` is [(name, shape, dtype)], `fill(name)`
    gives each tensor as a host array when its turn comes. Returns the bytes of tensor data."""
    header, off = {}, 0
    for name, shape, dtype in entries:
        n = math.prod(shape) * np.dtype(np_dtype(dtype)).itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:  # the next tensor is read and converted while this one is written
            ahead = pool.submit(lambda: np.ascontiguousarray(fill(entries[0][0]))) if entries else None
            for i, (name, shape, dtype) in enumerate(entries):
                x = ahead.result()
                if i + 1 < len(entries):
                    ahead = pool.submit(lambda n=entries[i + 1][0]: np.ascontiguousarray(fill(n)))
                assert x.shape == tuple(shape) and x.dtype == np_dtype(dtype), (name, x.shape, x.dtype)
                f.write(memoryview(x.reshape(-1).view(np.uint8)))
                del x
        f.flush()
        os.fsync(f.fileno())
    return off


def safetensors_sums(path: str) -> dict:
    """{tensor name: format.host_sums of its bytes as stored}, read one tensor at a time."""
    import struct


    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for name, h in header.items():
            if name == "__metadata__":
                continue
            b0, b1 = h["data_offsets"]
            f.seek(8 + n + b0)
            buf = np.empty(b1 - b0, np.uint8)
            if f.readinto(memoryview(buf)) != buf.size:
                out[name] = "truncated"
                continue
            out[name] = hex_sums(host_sums(buf.view({"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}[h["dtype"]]), 0))
    return out


def read_back_error(params_dir: str, bad: list, what: str) -> UserError:
    """The one line for tensors whose read-back checksums differ from what was written."""

    named = data_files(params_dir, set(bad))
    return UserError(f"verification failed: tensor(s) {', '.join(bad)} read back from {what} differ from what was "
                     f"written: " + (f"data file {', '.join(named)}" if named else f"the data files under {params_dir}")
                     + " damaged (a failing disk?); nothing was written")
