"""Checkpoints: orbax save and restore of the stacked parameters with their config, layout and dtype.

A checkpoint directory holds numbered steps (`CheckpointManager`); each step has `params` (the
stacked tensors, written shard by shard from whatever mesh they live on) and `meta` (JSON: the model
config, layout rules, mesh, dtype and a checksum of every tensor). Restoring reads each device's shards
straight into the target mesh's shardings: no host copy of the whole model. A save killed midway
leaves `N.orbax-checkpoint-tmp`, which `latest complete step` ignores.

Checksums: orbax's files carry none (zeroed or cut bytes in a data file restored silently), so `save`
stores per tensor two 32-bit sums over the bit patterns of the stacked array (`tensor_checksum`), and
`restore` recomputes them on the devices after reading and refuses a tensor that differs. Steps saved
before checksums existed still restore, with one line on stderr saying they are not verified.

Errors: what is wrong on disk (a missing, unreadable, truncated or damaged file, a format that is not
a moejax checkpoint) is a `UserError` naming the file and the reason; anything else propagates as
the bug it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from moejax.cli import os_reason
from moejax.config import ModelConfig, config_from_dict
from moejax.errors import UserError
from moejax.rules import Layout, param_dtypes, param_shapes

FORMAT = "moejax-checkpoint-1"
CHECKSUM = "sum32x2-v1"  # see tensor_checksum
_MULT = 2654435761  # odd: the position weights i * _MULT + 1 differ for any two positions mod 2**32
_warned_unverified: set = set()


def _uint(dtype) -> type:
    size = np.dtype(dtype).itemsize
    if size not in (1, 2, 4):
        raise ValueError(f"no checksum for {size}-byte elements ({dtype})")
    return {1: np.uint8, 2: np.uint16, 4: np.uint32}[size]


_ROW = 4096  # the host sums view a block as rows of this many elements


def _host_sums(x: np.ndarray, offset: int) -> np.ndarray:
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
def _device_sums_fn():
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
        for n, v in _device_sums_fn()(dev).items():
            out[n] = _hex(np.asarray(v.addressable_data(0)))
    return dict(sorted(out.items()))


def checksum_of_blocks(blocks) -> str:
    """`tensor_checksums`' value for the array whose C-order elements are those of `blocks` (host
    arrays) one after another: a tensor read or converted one slice at a time."""
    s, offset = np.zeros(2, np.uint32), 0
    for b in blocks:
        b = np.asarray(b)
        s += _host_sums(b, offset)
        offset += b.size
    return _hex(s)


def _hex(v) -> str:
    return f"{int(v[0]):08x}-{int(v[1]):08x}"


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(create=create, read_only=not create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=("params", "meta"))


def save(directory: str, params: dict, cfg: ModelConfig, layout: Layout, dtype: str, mesh_text: str,
         step: int | None = None) -> int:
    """Save stacked `params` as a new step (one past the latest, unless given), with a checksum of
    every tensor in its metadata. Quantized params (quant.py) are saved as they are, with
    `quant: int8` in the metadata; `dtype` is then their float tensors' dtype. Returns the step."""
    checksums = tensor_checksums(params)
    quant = "int8" if any(n.endswith("_scale") for n in params) else None
    mgr = _manager(directory, create=True)
    step = (mgr.latest_step() + 1 if mgr.latest_step() is not None else 0) if step is None else step
    meta = {"format": FORMAT, "config": dataclasses.asdict(cfg), "layout": layout.name,
            "rules": {k: list(v) for k, v in layout.rules.items()}, "dtype": dtype, "quant": quant, "mesh": mesh_text,
            "checksums": {"algorithm": CHECKSUM, "tensors": checksums}}
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    mgr.close()
    return step


def read_meta(directory: str, step: int | None = None) -> tuple[dict, int]:
    """The metadata of the latest complete step (or `step`), with one-line errors for bad paths."""
    if not os.path.exists(directory):
        raise UserError(f"checkpoint {directory!r}: no such directory")
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint {directory!r} is not a directory")
    try:
        mgr = _manager(directory, create=False)
        steps = mgr.all_steps()
    except OSError as e:
        raise UserError(f"checkpoint {directory!r}: {os_reason(e, directory)}") from None
    if not steps:
        raise UserError(f"checkpoint {directory!r} holds no complete step: not a moejax checkpoint, or "
                        f"its only save was interrupted")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"checkpoint {directory!r} has no step {step}; complete steps: {sorted(steps)}")
    meta_file = os.path.join(os.path.abspath(directory), str(step), "meta", "metadata")
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except OSError as e:
        raise UserError(f"checkpoint {directory!r} step {step}: {os_reason(e, meta_file)}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {directory!r} step {step}: {meta_file} is not valid JSON ({e}): "
                        f"truncated or damaged") from None
    except KeyError as e:
        if "was not found in the checkpoint" not in str(e):
            raise
        raise UserError(f"checkpoint {directory!r} step {step} has no 'meta' item: not a moejax checkpoint") from None
    finally:
        mgr.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {directory!r} step {step} is not a moejax checkpoint (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta, step


def quant_of(meta: dict) -> str | None:
    return meta.get("quant")


def refuse_quantized(meta: dict, directory: str, what: str) -> None:
    """One line for a tool that takes float parameters only."""
    if quant_of(meta):
        raise UserError(f"checkpoint {directory!r} holds {quant_of(meta)}-quantized weights (scripts/quantize.py), "
                        f"which {what} cannot take: give it the float checkpoint it was made from")


def resolve_quant(ckpt: str | None, requested: str | None) -> str | None:
    """The quantization a run serves with: `requested` (--quant), else the checkpoint's own."""
    from moejax.quant import check_scheme

    check_scheme(requested)
    stored = quant_of(read_meta(ckpt)[0]) if ckpt else None
    if stored and requested and stored != requested:
        raise UserError(f"--quant {requested} does not match checkpoint {ckpt!r}, which holds {stored} weights")
    return requested or stored


def load_weights(ckpt: str | None, cfg: ModelConfig, seed: int, dtype: str, mesh, layout: Layout,
                 quant: str | None = None) -> dict:
    """Stacked parameters on `mesh`: the checkpoint's (cast to `dtype`) or random ones from `seed`,
    quantized to `quant` unless they already are (`resolve_quant` gives the run's quant)."""
    from moejax import model, quant as q8

    params = restore(ckpt, mesh, layout, dtype)[1] if ckpt else model.init_params(cfg, seed, dtype, mesh, layout)
    if quant and not q8.is_quantized(params):
        params = q8.quantize(params, quant)
    return params


def config_of(meta: dict) -> ModelConfig:
    return config_from_dict({k: v for k, v in meta["config"].items() if k != "name"}, meta["config"]["name"])


def check_config(requested: ModelConfig, stored: ModelConfig) -> None:
    """A config passed beside a checkpoint must match it: name the first field that differs."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("name", "description"):
            continue
        a, b = getattr(requested, f.name), getattr(stored, f.name)
        if a != b:
            raise UserError(f"config {requested.name} does not match the checkpoint: {f.name}={a!r} there, "
                            f"{b!r} in the checkpoint (drop --config to use the checkpoint's)")


def serving_config(ckpt: str | None, config: str | None, default: str = "configs/seed.yaml") -> ModelConfig:
    """The config a command serves: the checkpoint's (a --config given beside it must match), else
    `config`'s, else `default`'s."""
    from moejax.config import load_config

    if ckpt is None:
        return load_config(config or default)
    meta, _ = read_meta(ckpt)
    cfg = config_of(meta)
    if config:
        check_config(load_config(config), cfg)
    return cfg


def restore(directory: str, mesh, layout: Layout, dtype: str | None = None, step: int | None = None):
    """(config, stacked params on `mesh` under `layout`, meta). `dtype` casts the float tensors
    after reading (a quantized checkpoint's int8 matrices and float32 scales stay as stored).

    Every device reads the shards the checkpoint was written in: onto the target mesh directly when
    its (pp, tp, ep) shape and layout match the saved ones, else onto a mesh of the saved shape (or
    one device), then tensor by tensor onto the target. Reading a coarsely chunked tensor straight
    into fine shards makes every device read the whole chunk: 27x the model's bytes in memory for a
    1x1x1x1 checkpoint restored onto 4x2x4x4."""
    from moejax.mesh import MeshShape, make_mesh, mesh_shape_of, parse_mesh
    from moejax.rules import layout_from_dict

    meta, step = read_meta(directory, step)
    cfg = config_of(meta)
    shape = mesh_shape_of(mesh)
    layout.validate(cfg, shape)
    saved = parse_mesh(meta["mesh"])
    saved_layout = layout_from_dict({"rules": meta["rules"]}, meta["layout"])
    same = (saved.pp, saved.tp, saved.ep) == (shape.pp, shape.tp, shape.ep) and saved_layout.rules == layout.rules
    params_dir = os.path.join(os.path.abspath(directory), str(step), "params")
    if same or _fine_chunks(params_dir):  # each device decodes only small chunks: read straight onto `mesh`
        same = True
        read_mesh, read_layout = mesh, layout
    else:
        replica = MeshShape(1, saved.pp, saved.tp, saved.ep)
        fits = replica.size <= len(mesh.devices.flat)
        read_mesh = make_mesh(replica if fits else MeshShape(1, 1, 1, 1), list(mesh.devices.flat))
        read_layout = saved_layout
    stored, quant = meta["dtype"], quant_of(meta)
    specs = read_layout.param_specs(quant)
    dtypes = param_dtypes(stored, quant)
    target = {n: jax.ShapeDtypeStruct(s, dtypes[n], sharding=NamedSharding(read_mesh, specs[n]))
              for n, s in param_shapes(cfg, quant).items()}
    mgr = _manager(directory, create=False)
    where = f"checkpoint {directory!r} step {step}"
    _drop_closed_loop_noise()
    try:
        params = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    except Exception as e:
        err = read_error(e, where, params_dir)
        if err is None:
            raise  # not a storage error: a bug, shown as one
        raise err from None
    finally:
        mgr.close()
    if not same:
        final = layout.param_specs(quant)
        for n in list(params):
            params[n] = jax.device_put(params.pop(n), NamedSharding(mesh, final[n]))
    verify(params, meta, where, params_dir)
    if dtype and dtype != stored:
        params = {n: cast(a, dtype) if dtypes[n] == stored else a for n, a in params.items()}
    return cfg, params, meta


_FINE_CHUNK = 64 << 20


def _fine_chunks(params_dir: str) -> bool:
    """Whether the largest tensors are stored in chunks of at most 64 MB (as ckstream writes them, a
    layer or an expert block each): any device then reads little beyond its own shard, and the
    checkpoint restores onto any mesh directly, without a copy on the saved mesh first."""
    try:
        from moejax.ckstream import open_read

        for name in ("w1", "w2", "embed", "lm_head"):
            arr = open_read(params_dir, name)
            if np.prod(arr.chunk_layout.read_chunk.shape) * arr.dtype.numpy_dtype.itemsize > _FINE_CHUNK:
                return False
        return True
    except Exception:  # unreadable here: the read below reports it
        return False


def read_error(e: BaseException, where: str, params_dir: str) -> UserError | None:
    """restore's one line for an unreadable tensor, naming its data file(s); None for a bug."""
    reason = _storage_reason(e)
    if reason is None:
        return None
    m = re.search(r'Error reading "([^/"]+)/', reason)
    files = [f if os.path.exists(f) else f"{f}, which is missing"
             for f in (_data_files(params_dir, {m.group(1)}) if m else [])]
    reason += f" (data file {', '.join(files)})" if files else ""
    m = _STATUS.search(reason)
    kind = {"OUT_OF_RANGE": "truncated", "DATA_LOSS": "damaged", "NOT_FOUND": "missing",
            "PERMISSION_DENIED": "permission denied"}.get(m.group(1) if m else "", "")
    kind = kind or ("truncated or missing" if "Truncated" in reason else "damaged" if "corrupt" in reason.lower() else "")
    return UserError(f"{where}: parameters unreadable{f' ({kind})' if kind else ''}: {reason}")


def _drop_closed_loop_noise() -> None:
    """After a failed read, orbax's storage callbacks still post to its closed asyncio loop and
    Python prints each 'RuntimeError: Event loop is closed' through sys.unraisablehook, around the
    real error. Drop exactly those; every other unraisable exception goes to the previous hook."""
    prev = sys.unraisablehook
    if getattr(prev, "_moejax", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        prev(u)

    hook._moejax = True
    sys.unraisablehook = hook


def verify(params: dict, meta: dict, where: str, files: str) -> None:
    """Compare `params` (as stored: before any cast) with the checksums saved in `meta`."""
    saved = meta.get("checksums")
    if saved is None:
        if where not in _warned_unverified:
            _warned_unverified.add(where)
            print(f"warning: {where} was saved without checksums (by an older moejax): its tensors are not "
                  f"verified", file=sys.stderr, flush=True)
        return
    if saved.get("algorithm") != CHECKSUM or set(saved.get("tensors", {})) != set(params):
        raise UserError(f"{where}: checksum record {saved.get('algorithm')!r} over "
                        f"{sorted(saved.get('tensors', {}))} does not fit this moejax ({CHECKSUM} over "
                        f"{sorted(params)})")
    got = tensor_checksums(params)
    bad = [n for n in sorted(params) if got[n] != saved["tensors"][n]]
    if bad:
        named = _data_files(files, set(bad))
        raise UserError(f"{where}: tensor(s) {', '.join(bad)} do not match the checksums saved with them: "
                        + (f"data file {', '.join(named)}" if named else f"the data files under {files}")
                        + " damaged (overwritten, truncated or a partial copy)")


def _data_files(params_dir: str, names: set) -> list:
    """The OCDBT data files that hold the chunks of tensors `names`, read from the b-tree; [] when
    that cannot be worked out (the message then names the directory)."""
    try:
        import tensorstore as ts
        from tensorstore import ocdbt

        base = ts.KvStore.open("file://" + params_dir.rstrip("/") + "/").result()
        top = ocdbt.dump(base).result()
        todo = [v["root"]["location"] for v in top.get("versions", [])[-1:] if "location" in v.get("root", {})]
        files = set()
        while todo:
            node = ocdbt.dump(base, todo.pop()).result()
            for e in node.get("entries", []):
                todo += [v for v in e.values() if isinstance(v, str) and v.startswith("btreenode::")]
                key = e.get("key", b"")
                key = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
                ref = e.get("indirect_value")
                if isinstance(ref, str) and ref.startswith("value:") and key.split("/")[0] in names:
                    _, prefix, rest = ref.split(":", 2)  # value:ocdbt.process_0/:d/<file>:<offset>:<length>
                    files.add(os.path.join(params_dir, prefix + rest.rsplit(":", 2)[0]))
        return sorted(files)
    except Exception:  # only a diagnostic: any failure to work it out falls back to the directory
        return []


_STATUS = re.compile(r"\b(OUT_OF_RANGE|FAILED_PRECONDITION|DATA_LOSS|NOT_FOUND|PERMISSION_DENIED|UNAVAILABLE|"
                     r"RESOURCE_EXHAUSTED|ABORTED): ")


def _storage_reason(e: BaseException) -> str | None:
    """One line for a storage failure anywhere in `e`'s chain (an OSError, a TensorStore status
    that means missing, unreadable, truncated or damaged data, undecodable metadata), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return os_reason(e, "?")
        if isinstance(e, json.JSONDecodeError):
            return f"metadata is not valid JSON ({e}): truncated or damaged"
        m = _STATUS.search(str(e)) if isinstance(e, ValueError) else None
        if m:
            text = str(e)[m.start():].split(" [tensorstore_spec")[0].split(" [source locations")[0]
            return " ".join(text.split())[:400]
        e = e.__cause__ or e.__context__
    return None


def cast(a, dtype: str):
    """Cast a sharded array, keeping its sharding."""
    return jax.jit(lambda x: x.astype(dtype), out_shardings=a.sharding)(a)
