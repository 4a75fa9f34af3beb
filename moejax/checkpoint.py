"""Checkpoints: orbax save and restore of the stacked parameters with their config, layout and dtype.

A checkpoint directory holds numbered steps (`CheckpointManager`); each step has `params` (the
stacked tensors, written shard by shard from whatever mesh they live on) and `meta` (JSON: the model
config, layout rules, mesh and dtype). Restoring reads each device's shards straight into the target
mesh's shardings: no host copy of the whole model. A save killed midway leaves `N.orbax-checkpoint-tmp`,
which `latest complete step` ignores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from moejax.config import ModelConfig, config_from_dict
from moejax.errors import UserError
from moejax.rules import Layout, param_shapes

FORMAT = "moejax-checkpoint-1"


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(create=create, read_only=not create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=("params", "meta"))


def save(directory: str, params: dict, cfg: ModelConfig, layout: Layout, dtype: str, mesh_text: str,
         step: int | None = None) -> int:
    """Save stacked `params` as a new step (one past the latest, unless given). Returns the step."""
    mgr = _manager(directory, create=True)
    step = (mgr.latest_step() + 1 if mgr.latest_step() is not None else 0) if step is None else step
    meta = {"format": FORMAT, "config": dataclasses.asdict(cfg), "layout": layout.name,
            "rules": {k: list(v) for k, v in layout.rules.items()}, "dtype": dtype, "mesh": mesh_text}
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    mgr.close()
    return step


def read_meta(directory: str, step: int | None = None) -> tuple[dict, int]:
    """The metadata of the latest complete step (or `step`), with one-line errors for bad paths."""
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint {directory!r}: no such directory")
    try:
        mgr = _manager(directory, create=False)
        steps = mgr.all_steps()
    except Exception as e:  # orbax raises many types for unreadable directories
        raise UserError(f"checkpoint {directory!r} is not a moejax checkpoint ({type(e).__name__})") from None
    if not steps:
        raise UserError(f"checkpoint {directory!r} holds no complete step: not a moejax checkpoint, or "
                        f"its only save was interrupted")
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"checkpoint {directory!r} has no step {step}; complete steps: {sorted(steps)}")
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise UserError(f"checkpoint {directory!r} step {step}: metadata unreadable or corrupt "
                        f"({type(e).__name__})") from None
    finally:
        mgr.close()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {directory!r} step {step} is not a moejax checkpoint (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta, step


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


def restore(directory: str, mesh, layout: Layout, dtype: str | None = None, step: int | None = None):
    """(config, stacked params on `mesh` under `layout`, meta). `dtype` casts after reading.

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
    if same:
        read_mesh, read_layout = mesh, layout
    else:
        replica = MeshShape(1, saved.pp, saved.tp, saved.ep)
        fits = replica.size <= len(mesh.devices.flat)
        read_mesh = make_mesh(replica if fits else MeshShape(1, 1, 1, 1), list(mesh.devices.flat))
        read_layout = saved_layout
    stored = meta["dtype"]
    specs = read_layout.param_specs()
    target = {n: jax.ShapeDtypeStruct(s, stored, sharding=NamedSharding(read_mesh, specs[n]))
              for n, s in param_shapes(cfg).items()}
    mgr = _manager(directory, create=False)
    try:
        with _quiet_stderr():  # a failed read makes orbax's worker threads print tracebacks
            try:
                params = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
            finally:
                mgr.close()
    except Exception as e:
        raise UserError(f"checkpoint {directory!r} step {step}: parameters unreadable, truncated or corrupt "
                        f"({type(e).__name__})") from None
    if not same:
        final = layout.param_specs()
        for n in list(params):
            params[n] = jax.device_put(params.pop(n), NamedSharding(mesh, final[n]))
    if dtype and dtype != stored:
        params = {n: cast(a, dtype) for n, a in params.items()}
    return cfg, params, meta


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ and thread output included) for the block; after a failure,
    a moment longer, while orbax's worker threads print their tracebacks."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    except Exception:
        time.sleep(1.0)
        raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cast(a, dtype: str):
    """Cast a sharded array, keeping its sharding."""
    return jax.jit(lambda x: x.astype(dtype), out_shardings=a.sharding)(a)
