"""orbax save and restore of the stacked parameters with their config, layout and dtype (format.py).

`save` writes a step through orbax's `CheckpointManager` from whatever mesh the tensors live on;
`restore` reads each device's shards straight into the target mesh's shardings (no host copy of the
whole model) and recomputes every tensor's checksum on the devices, refusing one that differs. A save
killed midway leaves `N.orbax-checkpoint-tmp`, which `latest complete step` ignores. Steps saved
before checksums existed still restore, with one line on stderr saying they are not verified.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from moejax.checkpoint.format import (CHECKSUM, FORMAT, ITEMS, build_meta, config_of, quant_of, tensor_checksums)
from moejax.checkpoint.storage import data_files, drop_closed_loop_noise, read_error
from moejax.config.model import ModelConfig
from moejax.errors import UserError, os_reason
from moejax.models.params import param_dtypes, param_shapes, param_specs, quant_dims
from moejax.parallel.rules import Layout

_warned_unverified: set = set()


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(create=create, read_only=not create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=ITEMS)


def save(directory: str, params: dict, cfg: ModelConfig, layout: Layout, dtype: str, mesh_text: str,
         step: int | None = None) -> int:
    """Save stacked `params` as a new step (one past the latest, unless given), with a checksum of
    every tensor in its metadata. Quantized params (quant.py) are saved as they are, with
    `quant: int8` in the metadata; `dtype` is then their float tensors' dtype. Returns the step."""
    checksums = tensor_checksums(params)
    quant = "int8" if any(n.endswith("_scale") for n in params) else None
    mgr = _manager(directory, create=True)
    step = (mgr.latest_step() + 1 if mgr.latest_step() is not None else 0) if step is None else step
    meta = build_meta(cfg, layout, dtype, mesh_text, checksums, quant)
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


def refuse_quantized(meta: dict, directory: str, what: str) -> None:
    """One line for a tool that takes float parameters only."""
    if quant_of(meta):
        raise UserError(f"checkpoint {directory!r} holds {quant_of(meta)}-quantized weights (`moejax ckpt quantize`), "
                        f"which {what} cannot take: give it the float checkpoint it was made from")


def resolve_quant(ckpt: str | None, requested: str | None) -> str | None:
    """The quantization a run serves with: `requested` (--quant), else the checkpoint's own."""
    from moejax.ops.quant import check_scheme

    check_scheme(requested)
    stored = quant_of(read_meta(ckpt)[0]) if ckpt else None
    if stored and requested and stored != requested:
        raise UserError(f"--quant {requested} does not match checkpoint {ckpt!r}, which holds {stored} weights")
    return requested or stored


def load_weights(ckpt: str | None, cfg: ModelConfig, seed: int, dtype: str, mesh, layout: Layout,
                 quant: str | None = None) -> dict:
    """Stacked parameters on `mesh`: the checkpoint's (cast to `dtype`) or random ones from `seed`,
    quantized to `quant` unless they already are (`resolve_quant` gives the run's quant)."""
    from moejax.models import transformer as model
    from moejax.ops import quant as q8

    params = restore(ckpt, mesh, layout, dtype)[1] if ckpt else model.init_params(cfg, seed, dtype, mesh, layout)
    if quant and not q8.is_quantized(params):
        params = q8.quantize(params, quant_dims(cfg), quant)
    return params


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
    from moejax.config.model import load_config

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
    from moejax.parallel.mesh import MeshShape, make_mesh, mesh_shape_of, parse_mesh
    from moejax.parallel.rules import layout_from_dict

    meta, step = read_meta(directory, step)
    cfg = config_of(meta)
    shape = mesh_shape_of(mesh)
    layout.validate(cfg, shape)
    saved = parse_mesh(meta["mesh"])
    saved_layout = layout_from_dict({"rules": meta["rules"]}, meta["layout"])
    same = (saved.pp, saved.tp, saved.ep) == (shape.pp, shape.tp, shape.ep) and saved_layout.rules == layout.rules
    params_dir = os.path.join(os.path.abspath(directory), str(step), "params")
    if same or _fine_chunks(params_dir, param_shapes(cfg, quant_of(meta))):  # each device decodes only small chunks: read straight onto `mesh`
        same = True
        read_mesh, read_layout = mesh, layout
    else:
        replica = MeshShape(1, saved.pp, saved.tp, saved.ep)
        fits = replica.size <= len(mesh.devices.flat)
        read_mesh = make_mesh(replica if fits else MeshShape(1, 1, 1, 1), list(mesh.devices.flat))
        read_layout = saved_layout
    stored, quant = meta["dtype"], quant_of(meta)
    specs = param_specs(read_layout, cfg, quant)
    dtypes = param_dtypes(cfg, stored, quant)
    target = {n: jax.ShapeDtypeStruct(s, dtypes[n], sharding=NamedSharding(read_mesh, specs[n]))
              for n, s in param_shapes(cfg, quant).items()}
    mgr = _manager(directory, create=False)
    where = f"checkpoint {directory!r} step {step}"
    drop_closed_loop_noise()
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
        final = param_specs(layout, cfg, quant)
        for n in list(params):
            params[n] = jax.device_put(params.pop(n), NamedSharding(mesh, final[n]))
    verify(params, meta, where, params_dir)
    if dtype and dtype != stored:
        params = {n: cast(a, dtype) if dtypes[n] == stored else a for n, a in params.items()}
    return cfg, params, meta


_FINE_CHUNK = 64 << 20


def _fine_chunks(params_dir: str, shapes: dict) -> bool:
    """Whether the largest tensors are stored in chunks of at most 64 MB (as ckstream writes them, a
    layer or an expert block each): any device then reads little beyond its own shard, and the
    checkpoint restores onto any mesh directly, without a copy on the saved mesh first."""
    try:
        from moejax.checkpoint.blocks import open_read

        for name in sorted(shapes, key=lambda n: -math.prod(shapes[n]))[:4]:  # the largest tensors
            arr = open_read(params_dir, name)
            if np.prod(arr.chunk_layout.read_chunk.shape) * arr.dtype.numpy_dtype.itemsize > _FINE_CHUNK:
                return False
        return True
    except Exception:  # unreadable here: the read below reports it
        return False


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
        named = data_files(files, set(bad))
        raise UserError(f"{where}: tensor(s) {', '.join(bad)} do not match the checksums saved with them: "
                        + (f"data file {', '.join(named)}" if named else f"the data files under {files}")
                        + " damaged (overwritten, truncated or a partial copy)")


def cast(a, dtype: str):
    """Cast a sharded array, keeping its sharding."""
    return jax.jit(lambda x: x.astype(dtype), out_shardings=a.sharding)(a)
