"""The sharded MoE transformer: one `jax.shard_map` program over the whole (dp, pp, tp, ep) mesh.

Per device: embedding on vocab shards over tp -> the local layers of this stage, each the family's
per-device layer (the Family's `layer`, e.g. models/blocks.py), in the staggered schedule of parallel/pipeline.py ->
final norm and head on vocab shards. Which parameters exist and how they are laid out comes from
the family's table (models/params.py); nothing here names a family.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config.model import ModelConfig
from moejax.models.cache import cache_specs
from moejax.models.params import (base_name, expert_names, init_kind, layer_names, param_axes, param_dtypes, param_shapes,
                                  param_specs, quant_dims, row, scale_name, stacks_every_layer)
from moejax.models.runspec import RunSpec
from moejax.ops import layers
from moejax.ops import quant as q8
from moejax.ops.layers import F32, mm
from moejax.ops.moe.dispatch import STACKED_KERNELS
from moejax.parallel.mesh import mesh_shape_of
from moejax.parallel.pipeline import staggered
from moejax.parallel.rules import Layout

MOE_COUNTERS = ("dropped", "rerouted", "exchanged_rows", "computed_rows")  # per layer
ROUTER_SUMS = ("prob_sum", "z_sum")  # per layer, float32: what the training losses need (loss.py)
MODES = ("forward", "prefill", "decode", "extend", "mixed")


# ---- parameters ------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("kind", "shape", "dtype"))
def _init_one(key, *, kind: str, shape: tuple, dtype: str):
    """One tensor's draw; compiled once per (kind, shape, dtype), not once per tensor."""
    if kind in ("ones", "zeros"):
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, F32)).astype(dtype)


def init_params(cfg: ModelConfig, seed: int, dtype: str, mesh=None, layout: Layout | None = None):
    """Random parameters (normal, std 0.02; norms 1, biases 0), the same whatever the mesh.

    Each tensor is drawn whole on one local device, then laid out: generating it under sharded jit
    makes every simulated CPU device hold large RNG temporaries at once (25 GB for the seed config
    on 128 devices). Every process draws the same values, so multi-process placement is a slice."""
    shapes = param_shapes(cfg)
    dtypes = param_dtypes(cfg, dtype)
    key = jax.random.key(seed)
    shardings = None if mesh is None else param_shardings(mesh, layout, cfg)
    params = {}
    for i, name in enumerate(sorted(shapes)):
        value = _init_one(jax.random.fold_in(key, i), kind=init_kind(cfg, name), shape=tuple(shapes[name]),
                          dtype=dtypes[name])
        if shardings is None:
            params[name] = value
        elif jax.process_count() == 1:
            params[name] = jax.device_put(value, shardings[name])
        else:
            host = np.asarray(value)
            params[name] = jax.make_array_from_callback(host.shape, shardings[name], lambda idx: host[idx])
        del value
    return params


def param_shardings(mesh, layout: Layout, cfg: ModelConfig, quant: str | None = None) -> dict:
    return {n: NamedSharding(mesh, s) for n, s in param_specs(layout, cfg, quant).items()}


def is_layer_param(cfg: ModelConfig, name: str) -> bool:
    return base_name(name) in layer_names(cfg)


def is_expert_param(cfg: ModelConfig, name: str) -> bool:
    return base_name(name) in expert_names(cfg)


def serving_params(params: dict, rs: RunSpec, mesh) -> dict:
    """Stacked layer tensors [L, ...] -> one buffer per local layer l: [pp, ...] holding layer
    s * L/pp + l on stage s; expert tensors further split per local expert j: [pp, shards, D, F]
    holding expert i * E_loc + j on expert shard i. Same bytes on the same devices, but inside
    shard_map every layer and expert is a whole buffer: slicing a stacked tensor there copies the
    weights on every call. Pops the stacked tensors from `params` as it goes (peak ~ one copy)."""
    if q8.is_quantized(params) != bool(rs.quant):
        raise ValueError(f"parameters {'are' if q8.is_quantized(params) else 'are not'} quantized; "
                         f"the run's quant is {rs.quant}")
    out = {n: v for n, v in params.items() if not is_layer_param(rs.cfg, n)}
    specs = serving_specs(rs)
    for name in [n for n in params if is_layer_param(rs.cfg, n)]:
        out_sh = jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs[name], is_leaf=lambda x: isinstance(x, P))
        out[name] = jax.jit(functools.partial(split_layer_tensor, name, rs=rs), out_shardings=out_sh)(params.pop(name))
    return out


def split_layer_tensor(name: str, w, rs: RunSpec):
    """One stacked layer tensor [L, ...] in the serving layout (`serving_params`). Traceable: the
    training step runs it inside its jit, so gradients arrive in the stacked layout. A stack of one
    kind of layer (MoE or dense, in a model mixing both) gives each local slot a [pp, ...] buffer of the
    rows its stages hold there (zeros on a stage whose layer there is of the other kind), or () where no
    stage holds that kind."""
    pp = rs.shape.pp
    lp = rs.cfg.num_layers // pp
    shards = rs.layout.shards("experts", rs.shape)
    e_loc = rs.cfg.num_experts // shards
    expert = is_expert_param(rs.cfg, name)
    def unstack(a, axis: int):  # lax.split transposes to one concatenate; per-index slices
        # transpose to a zero-padded full-size gradient each, summed (3 x 2.1 s a seed step)
        return [piece.squeeze(axis) for piece in jax.lax.split(a, [1] * a.shape[axis], axis=axis)]

    def per_expert(buf):  # [pp, E, ...] -> [pp, shards, E_loc, ...], or a tuple over local experts
        buf = buf.reshape((pp, shards, e_loc) + buf.shape[2:])
        return buf if rs.kernel in STACKED_KERNELS else tuple(unstack(buf, 2))

    if stacks_every_layer(rs.cfg, row(rs.cfg, name)):
        if expert:
            w = w.reshape((pp, lp, shards, e_loc) + w.shape[2:])
            if rs.kernel in STACKED_KERNELS:  # local experts stacked: [pp, shards, E_loc, D, F]
                return tuple(unstack(w, 1))
            return tuple(tuple(unstack(wl, 2)) for wl in unstack(w, 1))
        return tuple(unstack(w.reshape((pp, lp) + w.shape[1:]), 1))
    slots = []
    for rows in rs.cfg.slot_rows(row(rs.cfg, name).kind, pp):
        if max(rows) < 0:
            slots.append(())
            continue
        buf = jnp.stack([w[i] if i >= 0 else jnp.zeros(w.shape[1:], w.dtype) for i in rows])
        slots.append(per_expert(buf) if expert else buf)
    return tuple(slots)


def to_serving(params: dict, rs: RunSpec) -> dict:
    """The whole stacked parameter dict in the serving layout, traceably (see `serving_params`)."""
    return {n: split_layer_tensor(n, v, rs) if is_layer_param(rs.cfg, n) else v for n, v in params.items()}


def serving_specs(rs: RunSpec) -> dict:
    """PartitionSpecs of the `serving_params` pytree: per local layer, and for expert tensors per
    local expert ([pp, shards, D, F] each) or, under the batched and ragged kernels, all local experts in one
    [pp, shards, E_loc, D, F] buffer."""
    pp = rs.shape.pp
    e_loc = rs.cfg.num_experts // rs.layout.shards("experts", rs.shape)

    def serving(name, spec):
        if not is_layer_param(rs.cfg, name):
            return spec
        if is_expert_param(rs.cfg, name) and rs.kernel in STACKED_KERNELS:
            one = P(spec[0], spec[1], None, *spec[2:])
        elif is_expert_param(rs.cfg, name):
            one = (spec,) * e_loc
        else:
            one = spec
        return tuple(() if max(rows) < 0 else one for rows in rs.cfg.slot_rows(row(rs.cfg, name).kind, pp))
    axes = param_axes(rs.cfg, rs.quant, stacked=False)
    return {name: serving(name, rs.layout.spec(a)) for name, a in axes.items()}


# ---- per-device code (inside shard_map) ---------------------------------------------------------

def _embed(tokens_BT, embed_VD, vocab_axis):
    if vocab_axis is None:
        return embed_VD[tokens_BT]
    v_loc = embed_VD.shape[0]
    local_BT = tokens_BT - jax.lax.axis_index(vocab_axis) * v_loc
    hit_BT = (local_BT >= 0) & (local_BT < v_loc)
    x_BTD = jnp.where(hit_BT[..., None], embed_VD[jnp.clip(local_BT, 0, v_loc - 1)], 0)
    return jax.lax.psum(x_BTD, vocab_axis)


def _local(a, expert: bool = False):
    """Drop the unit stage axis (and expert-shard axis) of a serving buffer: a bitcast, not a copy."""
    if isinstance(a, tuple):  # per local expert: [1, 1, D, F] each
        return [x.reshape(x.shape[2:]) for x in a]
    if expert:  # batched and ragged kernels: [1, 1, E_loc, D, F]
        return a.reshape(a.shape[2:])
    return a.reshape(a.shape[1:])


def traced_layer(rs: RunSpec):
    """The family's layer with `rs` as a jitted function of (x, valid, w, side, mode, kv, row0, slot),
    mode and slot static: a stage's layers of one kind (`slot_kinds`) are traced and lowered once and
    called per layer instead of traced once per layer (the seed's 16 layers); XLA inlines the calls,
    so the compiled program is the unrolled one. One per program trace."""
    layer_fn = rs.family.layer
    if rs.remat:  # keep only each layer's input for the backward pass; recompute the rest
        layer_fn = jax.checkpoint(layer_fn, static_argnums=(4, 7, 8))

    @functools.partial(jax.jit, static_argnums=(4, 7))
    def decoder_layer(x, valid, w, side, mode, kv, row0, slot):  # the name the lowered program calls
        return layer_fn(x, valid, w, side, mode, kv, row0, rs, slot)
    return decoder_layer


def slot_kinds(rs: RunSpec) -> list[int]:
    """For each local layer slot, the first slot whose layers are of the same kind on every stage
    (sliding window, MoE or dense: all a layer may read from its slot index, Family.layer)."""
    cfg, pp = rs.cfg, rs.shape.pp
    lp = cfg.num_layers // pp
    moe = cfg.slot_rows("moe", pp)
    first: dict[tuple, int] = {}
    return [first.setdefault(tuple((cfg.layer_window(s * lp + l), moe[l][s] >= 0) for s in range(pp)), l)
            for l in range(lp)]


def _device_program(params, tokens_BT, lengths_B, cache, starts_B=None, rows_B=None, *, rs: RunSpec, mode: str,
                    every_position: bool = False, ext=None):
    """What one device runs. tokens_BT: [B/batch_shards, T]; lengths_B: prompt lengths (prefill,
    forward), the position of the new token (decode and mixed, -1 for padding rows) or the number of
    new tokens (extend, 0 for padding rows). extend only: the new tokens of row b sit at positions
    starts_B[b], ... of this device's cache row rows_B[b]; every_position: the head at every
    position of the chunk (logits [B, T, V]: prompt logprobs), not only at each row's last.
    mixed: tokens_BT [S, 1] and lengths_B are a decode step of this device's S cache rows, and
    ext = (tokens_RL, counts_R, starts_R, rows_R) an extend of R rows in the same forward: the
    S + R x L tokens go through the layers as one sequence [1, S + R L] (every weight read once);
    only attention treats the two groups apart. Logits: the S decode rows, then the R rows' last."""
    cfg, m_count = rs.cfg, rs.microbatches
    side_ext = {}
    if mode == "mixed":
        if m_count != 1:
            raise ValueError("a mixed step runs one microbatch")
        ext_tok, counts_R, starts_R, rows_R = ext
        s, (r, ln) = tokens_BT.shape[0], ext_tok.shape
        ext_pos = jnp.maximum(starts_R, 0)[:, None] + jnp.arange(ln)
        side_ext = {"row": rows_R[None], "ext_pos": ext_pos[None],
                    "last": jnp.concatenate([jnp.arange(s), s + jnp.arange(r) * ln + jnp.maximum(counts_R, 1) - 1])[None]}
        mixed_pos = jnp.concatenate([jnp.maximum(lengths_B, 0), ext_pos.reshape(-1)])[None]
        mixed_valid = jnp.concatenate([lengths_B >= 0, (jnp.arange(ln)[None] < counts_R[:, None]).reshape(-1)])[None]
        tokens_BT = jnp.concatenate([tokens_BT.reshape(-1), ext_tok.reshape(-1)])[None]
        lengths_B = jnp.zeros((1,), jnp.int32)
    b_loc, t = tokens_BT.shape
    mb = b_loc // m_count
    vocab_axis = "tp" if rs.layout.mesh_axes("vocab") and rs.shape.tp > 1 else None
    x_BTD = _embed(tokens_BT, params["embed"], vocab_axis).astype(rs.dtype)
    if cfg.pad_token_id is not None:  # as torch's Embedding(padding_idx): the pad row is never trained
        x_BTD = jnp.where((tokens_BT == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(x_BTD), x_BTD)
    if mode == "decode":
        pos_BT = jnp.maximum(lengths_B, 0)[:, None]
        valid_BT = (lengths_B >= 0)[:, None]
    elif mode == "extend":
        pos_BT = jnp.maximum(starts_B, 0)[:, None] + jnp.arange(t)
        valid_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
    elif mode == "mixed":
        pos_BT, valid_BT = mixed_pos, mixed_valid
    else:
        pos_BT = jnp.broadcast_to(jnp.arange(t), (b_loc, t))
        valid_BT = pos_BT < lengths_B[:, None]
    split = lambda a: a.reshape((m_count, mb) + a.shape[1:])
    side_M = {"pos": split(pos_BT), "valid": split(valid_BT), "len": split(lengths_B), **side_ext}
    if mode == "extend":
        side_M["row"] = split(rows_B)
    layers_loc = cfg.num_layers // rs.shape.pp
    stats0 = {"load": jnp.zeros((layers_loc, cfg.num_experts), jnp.int32),
              "served_load": jnp.zeros((layers_loc, cfg.num_experts), jnp.int32),
              **{k: jnp.zeros((layers_loc,), jnp.int32) for k in MOE_COUNTERS},
              "prob_sum": jnp.zeros((layers_loc, cfg.num_experts), F32), "z_sum": jnp.zeros((layers_loc,), F32)}
    layer_fn = traced_layer(rs)
    kind_slot = slot_kinds(rs)
    names = [n for n in params if is_layer_param(cfg, n)]
    experts = {n for n in names if is_expert_param(cfg, n)}
    form = rs.quant_form

    def stage_fn(x_BTD, side, mi, state):
        kv_all, stats = state
        row0 = mi * mb
        for l in range(layers_loc):
            w = {name: _local(params[name][l], name in experts) for name in names
                 if not (isinstance(params[name][l], tuple) and not params[name][l])}  # () : not on this slot
            if rs.quant:  # each int8 matrix with its scales, in the platform's matmul form
                for name in quant_dims(cfg):
                    if name in w:
                        w[name] = q8.pair(w[name], w.pop(scale_name(name)), form)
            kv = None if kv_all is None else tuple(_local(c[l]) for c in kv_all)
            x_BTD, kv, st = layer_fn(x_BTD, side["valid"], w, side, mode, kv, row0, kind_slot[l])
            if kv is not None:
                kv_all = tuple(c[:l] + (n[None],) + c[l + 1:] for c, n in zip(kv_all, kv))
            stats = {k: stats[k].at[l].add(st[k]) for k in stats}
        return x_BTD, (kv_all, stats)

    def emit(y_BTD, side):
        if mode == "forward" or every_position:
            return y_BTD
        if mode == "mixed":
            return y_BTD[0, side["last"]]
        last_B = jnp.zeros_like(side["len"]) if mode == "decode" else jnp.maximum(side["len"], 1) - 1
        return y_BTD[jnp.arange(y_BTD.shape[0]), last_B]

    outs, (cache, stats) = staggered(stage_fn, emit, split(x_BTD), side_M, (cache, stats0),
                                     stages=rs.shape.pp, axis="pp")
    h = outs.reshape((-1,) + outs.shape[2:])
    h = layers.rmsnorm(h, params["final_norm"], cfg.rms_norm_eps)
    head = params["lm_head"] if "lm_head" in params else params["embed"].T  # tied: [D, V/tp] either way
    logits = mm("...d,dv->...v", h, head)
    stats = jax.tree.map(lambda a: jax.lax.psum(a, rs.layout.token_axes()), stats)
    return logits, cache, stats


def stats_specs(lay: Layout) -> dict:
    """PartitionSpecs of the MoE statistics `_device_program` returns (per layer, over pp)."""
    return {"load": lay.act_spec("moe_counts"), "served_load": lay.act_spec("moe_counts"),
            "prob_sum": lay.act_spec("moe_counts"),
            **{k: P("pp") for k in MOE_COUNTERS + ("z_sum",)}}


def build(rs: RunSpec, mesh, mode: str, every_position: bool = False):
    """A jitted function for `mode`, taking `serving_params`:
      forward(params, tokens_BT, lengths_B)              -> logits_BTV f32, stats
      prefill(params, tokens_BT, lengths_B, cache)       -> logits_BV f32, cache, stats
      decode(params, tokens_B1, positions_B, cache)      -> logits_BV f32, cache, stats
      extend(params, tokens_BT, counts_B, starts_B, rows_B, cache) -> logits_BV f32, cache, stats
      mixed(params, tokens_S1, positions_S, tokens_RT, counts_R, starts_R, rows_R, cache)
                                                          -> logits_(S+R)V f32, cache, stats
    B must be a multiple of rs.batch_multiple. extend writes row b's first counts_B[b] tokens at
    positions starts_B[b], ... of cache row rows_B[b] (an index into the cache rows of row b's own
    batch shard) and attends to that row's earlier positions: a prompt chunk of one slot of a
    continuous-batching engine (serving/engine.py); its logits are at each row's last new token, or
    with `every_position` (extend only) at every position of the chunk: logits_BTV f32, the prompt
    logprobs of an echo request (a separate program: the others never compute [B, T, V]). mixed is
    a decode step of S rows and an extend of R rows as one forward (`_device_program`); its logits
    are, per batch shard, that shard's S/shards decode rows, then its R/shards extend rows."""
    if mode not in MODES or (every_position and mode != "extend"):
        raise ValueError(mode)
    if mesh_shape_of(mesh) != rs.shape:
        raise ValueError(f"mesh {mesh_shape_of(mesh)} does not match the run's {rs.shape}")
    lay = rs.layout
    param_specs = serving_specs(rs)
    cache_spec = cache_specs(rs)
    stats_spec = stats_specs(lay)
    logits_spec = lay.act_spec("logits" if mode == "forward" or every_position else "last_logits")
    fn = functools.partial(_device_program, rs=rs, mode=mode, every_position=every_position)
    if mode == "forward":
        body = lambda p, tok, ln: (lambda r: (r[0], r[2]))(fn(p, tok, ln, None))
        in_specs = (param_specs, lay.act_spec("tokens"), lay.act_spec("lengths"))
        out_specs = (logits_spec, stats_spec)
        donate = ()
    elif mode == "mixed":
        def body(p, tok, pos, etok, counts, starts, rows, cache):
            return fn(p, tok, pos, cache, ext=(etok, counts, starts, rows))
        lengths = lay.act_spec("lengths")
        in_specs = (param_specs, lay.act_spec("tokens"), lengths, lay.act_spec("tokens"), lengths, lengths, lengths,
                    cache_spec)
        out_specs = (logits_spec, cache_spec, stats_spec)
        donate = (7,)
    elif mode == "extend":
        body = lambda p, tok, counts, starts, rows, cache: fn(p, tok, counts, cache, starts, rows)
        lengths = lay.act_spec("lengths")
        in_specs = (param_specs, lay.act_spec("tokens"), lengths, lengths, lengths, cache_spec)
        out_specs = (logits_spec, cache_spec, stats_spec)
        donate = (5,)
    else:
        body = fn
        in_specs = (param_specs, lay.act_spec("tokens"), lay.act_spec("lengths"), cache_spec)
        out_specs = (logits_spec, cache_spec, stats_spec)
        donate = (3,)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)
