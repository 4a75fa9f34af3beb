"""Training on the 4D mesh: the serving program's forward (model.py) under `jax.grad`, optax AdamW,
ZeRO-1 optimizer moments, and resumable train-state checkpoints.

Master parameters are float32 in the stacked checkpoint layout ([L, ...], the family's table, models/params.py);
each step casts them to the compute dtype, splits them into the serving layout inside its jit
(`model.to_serving`), so gradients arrive stacked, and applies
    clip_by_global_norm -> AdamW (no weight decay on norms) with linear warmup + cosine decay.
A sigmoid router's correction bias (`router_bias`, no gradient) is then moved by DeepSeek-V3's
auxiliary-loss-free balancing rule (`balance_bias`) in the same jit, from the loads of that step's forward.
Adam's moments are sharded like their parameters and further split over `dp` (ZeRO-1): XLA's SPMD
partitioner all-gathers each update over dp before it meets the (dp-replicated) parameter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.checkpoint import store as checkpoint
from moejax.models import transformer as model
from moejax.errors import UserError
from moejax.inference.generate import put, round_up
from moejax.training.loss import Scorer
from moejax.models.params import init_kind, param_shapes

STATE_FORMAT = "moejax-train-state-1"


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Optimizer and schedule settings (nanoGPT / MaxText defaults where the flags are silent)."""

    steps: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this
    z_coef: float = 0.0  # router z-loss coefficient (off by default)
    balance: str = "hf"  # load-balancing loss: HF's (all layers together) or per-layer (loss.py)
    bias_rate: float = 0.0  # aux-loss-free balancing: router_bias += rate x sign(mean load - load) a step

    def __post_init__(self):
        if self.steps < 1:
            raise UserError(f"--steps {self.steps} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr} must be a positive number")
        if self.warmup < 0:
            raise UserError(f"--warmup {self.warmup} must be >= 0")
        if not (self.weight_decay >= 0 and self.clip > 0 and self.z_coef >= 0):
            raise UserError(f"--weight-decay {self.weight_decay}, --clip {self.clip} and --z-loss-coef "
                            f"{self.z_coef}: need weight decay >= 0, clip > 0, z-loss coefficient >= 0")
        if not (self.bias_rate >= 0 and math.isfinite(self.bias_rate)):
            raise UserError(f"--bias-update-rate {self.bias_rate} must be a number >= 0 (0: off)")


def learning_rate(h: Hyper):
    """Update i (0-based): lr x (i+1)/(warmup+1) while warming up, then cosine to lr x min_lr_ratio
    at the last step (nanoGPT's schedule: the first step already moves the parameters)."""
    def lr(count):
        count = jnp.asarray(count, jnp.float32)
        warm = h.lr * (count + 1) / (h.warmup + 1)
        done = jnp.clip((count - h.warmup) / max(1, h.steps - h.warmup), 0.0, 1.0)
        floor = h.lr * h.min_lr_ratio
        cos = floor + 0.5 * (h.lr - floor) * (1 + jnp.cos(jnp.pi * done))
        return jnp.where(count < h.warmup, warm, cos)
    return lr


def optimizer(h: Hyper, cfg) -> optax.GradientTransformation:
    """AdamW with weight decay on the family's matrices only (its table's `init: normal` rows): not on
    norms, biases, or a correction bias the balancing rule trains (whose gradient is zero, so Adam leaves
    it as it is)."""
    decay = {n: init_kind(cfg, n) == "normal" for n in param_shapes(cfg)}
    return optax.chain(optax.clip_by_global_norm(h.clip),
                       optax.adamw(learning_rate(h), b1=h.b1, b2=h.b2, eps=h.eps, weight_decay=h.weight_decay,
                                   mask=decay))


BIAS = "router_bias"  # the correction bias of sigmoid routers [MoE layers, E] (models/rows.py)


def check_bias_rate(cfg, rate: float) -> None:
    """A balancing rate needs a router with a correction bias (one line otherwise)."""
    if rate and BIAS not in param_shapes(cfg):
        raise UserError(f"--bias-update-rate {rate}: config {cfg.name}'s router ({cfg.router}, family {cfg.family}) "
                        f"has no correction bias to update; only sigmoid_topk routers (glm4_moe) have one")


def balance_bias(bias_ME, load_LE, moe_layers, rate: float):
    """DeepSeek-V3's auxiliary-loss-free balancing, one step: each MoE layer's correction bias
    moves by `rate` towards its underloaded experts, bias[m, e] += rate x sign(mean_e load - load[e]),
    where load_LE [L, E] counts the step's top-k assignments of valid tokens in every layer (dense
    layers: zeros, skipped) and row m of bias_ME [MoE layers, E] is layer moe_layers[m]'s."""
    load_ME = jnp.asarray(load_LE)[np.asarray(moe_layers)].astype(jnp.float32)
    return bias_ME + rate * jnp.sign(load_ME.mean(axis=1, keepdims=True) - load_ME)


def load_ratios(load_LE, moe_layers):
    """Each MoE layer's max / mean expert load [MoE layers] (0 where a layer saw no token)."""
    load_ME = jnp.asarray(load_LE)[np.asarray(moe_layers)].astype(jnp.float32)
    mean_M = load_ME.mean(axis=1)
    return jnp.where(mean_M > 0, load_ME.max(axis=1) / jnp.maximum(mean_M, 1e-9), 0.0)


def zero1_spec(spec: P, shape, mesh_shape) -> P:
    """`spec` with dp added to the largest dimension it still divides (ZeRO-1); unchanged if dp is
    1, already used, or divides no dimension."""
    dp = mesh_shape.dp
    parts = [() if p is None else (p,) if isinstance(p, str) else tuple(p) for p in spec]
    parts += [()] * (len(shape) - len(parts))
    if dp == 1 or any("dp" in p for p in parts):
        return spec
    for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
        n = math.prod(getattr(mesh_shape, a) for a in parts[d])
        if shape[d] % (n * dp) == 0:
            parts[d] = parts[d] + ("dp",)
            return P(*[None if not p else p[0] if len(p) == 1 else p for p in parts])
    return spec


def _param_name(path) -> str:
    return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


class Trainer:
    """The compiled train and eval steps of one run (config, layout, mesh, dtype, batch shape)."""

    def __init__(self, rs: model.RunSpec, mesh, hyper: Hyper, batch: int, seq_len: int):
        if batch % rs.batch_multiple:
            raise UserError(f"--batch {batch} is not a multiple of {rs.batch_multiple} (batch shards x "
                            f"microbatches on mesh {rs.shape}); try {round_up(batch, rs.batch_multiple)}")
        self.rs, self.mesh, self.hyper, self.batch, self.seq_len = rs, mesh, hyper, batch, seq_len
        lay, shapes = rs.layout, param_shapes(rs.cfg)
        self.param_sh = model.param_shardings(mesh, lay, rs.cfg)
        self.tx = optimizer(hyper, rs.cfg)
        abstract = {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=self.param_sh[n]) for n, s in shapes.items()}
        opt_shape = jax.eval_shape(self.tx.init, abstract)
        self.opt_sh = jax.tree_util.tree_map_with_path(
            lambda path, a: NamedSharding(mesh, P()) if a.ndim == 0 else NamedSharding(
                mesh, zero1_spec(self.param_sh[_param_name(path)].spec, a.shape, rs.shape)), opt_shape)
        self.opt_abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                         opt_shape, self.opt_sh)
        check_bias_rate(rs.cfg, hyper.bias_rate)
        self.scorer = Scorer(rs, mesh, hyper.z_coef, hyper.balance, loads=True)
        tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=NamedSharding(mesh, lay.act_spec("tokens")))
        lens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, lay.act_spec("lengths")))
        step = jax.jit(self._step, donate_argnums=(0, 1), out_shardings=(self.param_sh, self.opt_sh, None))
        self.compiled = step.lower(abstract, self.opt_abstract, tok, lens).compile()
        self.lengths = put(mesh, lay, "lengths", np.full((batch,), seq_len, np.int32))

    def _step(self, params, opt_state, tokens_BT, lengths_B):
        (_, metrics), grads = jax.value_and_grad(self.scorer.loss_of, has_aux=True)(params, tokens_BT, lengths_B)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        updates, opt_state = self.tx.update(grads, opt_state, params)
        # a non-finite loss poisons the new state; the caller stops before saving it
        params = optax.apply_updates(params, updates)
        cfg, load_LE = self.rs.cfg, metrics.pop("load")
        metrics["load_ratio_per_layer"] = load_ratios(load_LE, cfg.moe_layers)
        if BIAS in params:  # zero gradient and no decay: AdamW left it as it was
            if self.hyper.bias_rate:
                params = {**params, BIAS: balance_bias(params[BIAS], load_LE, cfg.moe_layers, self.hyper.bias_rate)}
            metrics["bias_min"], metrics["bias_max"] = jnp.min(params[BIAS]), jnp.max(params[BIAS])
        return params, opt_state, {**metrics, "grad_norm": grad_norm}

    def init_opt(self, params):
        return jax.jit(self.tx.init, out_shardings=self.opt_sh)(params)

    def step(self, params, opt_state, tokens_BT: np.ndarray):
        """One optimizer step on host tokens [batch, seq_len]; returns device-side metrics."""
        return self.compiled(params, opt_state, put(self.mesh, self.rs.layout, "tokens", tokens_BT), self.lengths)

    def evaluate(self, params, windows: np.ndarray, lengths: np.ndarray | None = None) -> dict:
        return self.scorer.evaluate(params, windows, lengths)

    def bytes_per_device(self) -> dict:
        """Master parameters and optimizer state held by one device (from their shardings)."""
        def per_device(tree):
            leaves = jax.tree.leaves(tree)
            return int(sum(np.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize for a in leaves))
        abstract = {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=self.param_sh[n])
                    for n, s in param_shapes(self.rs.cfg).items()}
        mem = self.compiled.memory_analysis()
        return {"param_bytes_per_device": per_device(abstract), "optimizer_bytes_per_device":
                per_device(self.opt_abstract), "step_temp_bytes_per_device":
                int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None}


# ---- train-state checkpoints ------------------------------------------------------------------

def _state_manager(directory: str, create: bool) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(create=create, read_only=not create, enable_async_checkpointing=False,
                                        max_to_keep=2)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts, item_names=("params", "opt", "meta"))


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def latest_state_step(directory: str) -> int | None:
    if not os.path.isdir(directory):
        return None
    mgr = _state_manager(directory, create=False)
    try:
        return mgr.latest_step()
    finally:
        mgr.close()


def save_state(directory: str, step: int, params, opt_state, meta: dict) -> None:
    """Parameters (stacked, float32), optimizer state and `meta` as step `step`. Orbax writes into
    a temporary directory and renames it when complete: a save killed midway loses nothing."""
    mgr = _state_manager(directory, create=True)
    try:
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               opt=ocp.args.StandardSave(_flat(opt_state)),
                                               meta=ocp.args.JsonSave({"format": STATE_FORMAT, **meta})))
        mgr.wait_until_finished()
    finally:
        mgr.close()


def restore_state(directory: str, trainer: Trainer):
    """(step, params, opt_state, meta) of the latest complete train state, on the trainer's mesh."""
    step = latest_state_step(directory)
    if step is None:
        raise UserError(f"--resume: {directory!r} holds no complete train state to resume from")
    shapes = param_shapes(trainer.rs.cfg)
    target = {n: jax.ShapeDtypeStruct(s, jnp.float32, sharding=trainer.param_sh[n]) for n, s in shapes.items()}
    mgr = _state_manager(directory, create=False)
    try:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("format") != STATE_FORMAT:
            raise UserError(f"{directory!r} step {step} is not a moejax train state")
        stored = checkpoint.config_of(meta)
        checkpoint.check_config(trainer.rs.cfg, stored)
        got = mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target), opt=ocp.args.StandardRestore(_flat(trainer.opt_abstract))))
    finally:
        mgr.close()
    treedef = jax.tree.structure(trainer.opt_abstract)
    opt_state = jax.tree.unflatten(treedef, [got["opt"][k] for k in _flat(trainer.opt_abstract)])
    return step, got["params"], opt_state, meta


def state_meta(rs: model.RunSpec, mesh_text: str, step: int, seed: int, hyper: Hyper, extra: dict) -> dict:
    return {"step": step, "seed": seed, "config": dataclasses.asdict(rs.cfg), "layout": rs.layout.name,
            "mesh": mesh_text, "dtype": rs.dtype, "hyper": dataclasses.asdict(hyper), **extra}


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def init_or_load(rs: model.RunSpec, mesh, seed: int, init_ckpt: str | None):
    """Float32 master parameters: random from `seed`, or a moejax checkpoint's (its config must be
    the run's)."""
    if init_ckpt is None:
        return model.init_params(rs.cfg, seed, "float32", mesh, rs.layout)
    meta, _ = checkpoint.read_meta(init_ckpt)  # refuse another config before reading any tensor
    checkpoint.refuse_quantized(meta, init_ckpt, "training")
    checkpoint.check_config(rs.cfg, checkpoint.config_of(meta))
    _, params, _ = checkpoint.restore(init_ckpt, mesh, rs.layout, dtype="float32")
    return params

