"""The sharded Mixtral forward: one `jax.shard_map` program over the whole (dp, pp, tp, ep) mesh.

Per device, per layer (N = tokens of this device's batch shard, replicated over tp):
  attention on local heads -> psum_scatter over tp (each tp rank now owns N/tp tokens)
  -> MoE over the expert axes (moe.py) -> all_gather over tp.
Stages run their layers in the staggered schedule of pipeline.py; embedding and head use vocab
shards over tp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import layers
from moejax import quant as q8
from moejax.config import KERNELS, POLICIES, ModelConfig
from moejax.layers import F32, mm
from moejax.mesh import AXES, MeshShape, mesh_shape_of
from moejax.moe import STACKED_KERNELS, MoeSpec, moe_block, resolve_kernel
from moejax.moe_ragged import GPU_ONLY_KERNELS
from moejax.pipeline import staggered
from moejax.rules import QUANT_INPUT_DIMS, Layout, param_shapes, scale_name
from moejax.errors import UserError

LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "moe_norm", "router", "w1", "w3", "w2")
EXPERT_PARAMS = ("w1", "w3", "w2")
MOE_COUNTERS = ("dropped", "rerouted", "exchanged_rows", "computed_rows")  # per layer
ROUTER_SUMS = ("prob_sum", "z_sum")  # per layer, float32: what the training losses need (loss.py)
MODES = ("forward", "prefill", "decode", "extend")


def base_name(name: str) -> str:
    """A quantized matrix's scale is laid out like the matrix: `w1_scale` -> `w1`."""
    return name.removesuffix("_scale")


def is_layer_param(name: str) -> bool:
    return base_name(name) in LAYER_PARAMS


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything static about a compiled program."""

    cfg: ModelConfig
    layout: Layout
    shape: MeshShape
    dtype: str = "float32"  # parameter and compute dtype; matmuls accumulate in float32
    policy: str = "dropless"
    capacity_factor: float = 2.0
    microbatches: int = 1
    moe_kernel: str = "auto"  # config.KERNELS (moe.resolve_kernel, moe's docstring)
    training: bool = False  # differentiable MoE rounds; `auto` picks the batched kernel everywhere
    remat: bool = False  # recompute each layer's activations in the backward pass (jax.checkpoint)
    quant: str | None = None  # "int8": the params hold int8 matrices and their scales (quant.py)
    quant_matmul: str = "auto"  # auto, dequant, dynamic (quant.py)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise UserError(f"capacity policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.moe_kernel not in KERNELS:
            raise UserError(f"MoE kernel {self.moe_kernel!r}; valid: {', '.join(KERNELS)}")
        if self.moe_kernel in GPU_ONLY_KERNELS and jax.default_backend() != "gpu":
            raise UserError(f"MoE kernel {self.moe_kernel} runs on a GPU only (this is {jax.default_backend()}); "
                            f"ragged is the same exact-row kernel with jax.lax.ragged_dot")
        if self.moe_kernel == "ragged-tokamax":
            try:
                import tokamax  # noqa: F401
            except ImportError:
                raise UserError("MoE kernel ragged-tokamax needs tokamax: pip install tokamax (jax >= 0.11)") from None
        if not self.capacity_factor > 0:
            raise UserError(f"capacity factor {self.capacity_factor} must be > 0")
        if self.microbatches < 1:
            raise UserError(f"microbatches={self.microbatches} must be >= 1")
        q8.check_scheme(self.quant)
        q8.resolve_matmul(self.quant_matmul, "cpu")  # validates the name
        if self.quant and self.training:
            raise UserError("training takes float parameters: drop --quant (quantize the trained checkpoint "
                            "with scripts/quantize.py)")
        self.layout.validate(self.cfg, self.shape)

    @property
    def batch_multiple(self) -> int:
        """Batch sizes must be a multiple of this (the caller pads)."""
        return self.layout.shards("batch", self.shape) * self.microbatches

    def moe_spec(self) -> MoeSpec:
        ffn = self.layout.mesh_axes("expert_ffn")
        return MoeSpec(
            num_experts=self.cfg.num_experts, top_k=self.cfg.experts_per_token, policy=self.policy,
            capacity_factor=self.capacity_factor, expert_axes=self.layout.mesh_axes("experts"),
            expert_shards=self.layout.shards("experts", self.shape),
            ffn_axis=ffn[0] if ffn and self.shape.tp > 1 else None,
            ffn_shards=self.layout.shards("expert_ffn", self.shape),
            round_axes=tuple(a for a in AXES if a != "pp"), kernel=self.kernel, differentiable=self.training)

    @property
    def kernel(self) -> str:
        if self.training and self.moe_kernel == "auto":
            return "batched"  # every expert is busy in training: per-expert branches save nothing
        return resolve_kernel(self.moe_kernel, jax.default_backend())


# ---- parameters ------------------------------------------------------------------------------

def _init_one(name: str, shape, key, dtype):
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, F32)).astype(dtype)


def init_params(cfg: ModelConfig, seed: int, dtype: str, mesh=None, layout: Layout | None = None):
    """Random parameters (normal, std 0.02; norms 1), the same whatever the mesh.

    Each tensor is drawn whole on one local device, then laid out: generating it under sharded jit
    makes every simulated CPU device hold large RNG temporaries at once (25 GB for the seed config
    on 128 devices). Every process draws the same values, so multi-process placement is a slice."""
    shapes = param_shapes(cfg)
    key = jax.random.key(seed)
    shardings = None if mesh is None else param_shardings(mesh, layout)
    params = {}
    for i, name in enumerate(sorted(shapes)):
        draw = jax.jit(functools.partial(_init_one, name, shapes[name], dtype=dtype))
        value = draw(jax.random.fold_in(key, i))
        if shardings is None:
            params[name] = value
        elif jax.process_count() == 1:
            params[name] = jax.device_put(value, shardings[name])
        else:
            host = np.asarray(value)
            params[name] = jax.make_array_from_callback(host.shape, shardings[name], lambda idx: host[idx])
        del value
    return params


def param_shardings(mesh, layout: Layout) -> dict:
    return {n: NamedSharding(mesh, s) for n, s in layout.param_specs().items()}


def serving_params(params: dict, rs: RunSpec, mesh) -> dict:
    """Stacked layer tensors [L, ...] -> one buffer per local layer l: [pp, ...] holding layer
    s * L/pp + l on stage s; expert tensors further split per local expert j: [pp, shards, D, F]
    holding expert i * E_loc + j on expert shard i. Same bytes on the same devices, but inside
    shard_map every layer and expert is a whole buffer: slicing a stacked tensor there copies the
    weights on every call. Pops the stacked tensors from `params` as it goes (peak ~ one copy)."""
    if q8.is_quantized(params) != bool(rs.quant):
        raise ValueError(f"parameters {'are' if q8.is_quantized(params) else 'are not'} quantized; "
                         f"the run's quant is {rs.quant}")
    out = {n: v for n, v in params.items() if not is_layer_param(n)}
    specs = serving_specs(rs)
    for name in [n for n in params if is_layer_param(n)]:
        out_sh = jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs[name], is_leaf=lambda x: isinstance(x, P))
        out[name] = jax.jit(functools.partial(split_layer_tensor, name, rs=rs), out_shardings=out_sh)(params.pop(name))
    return out


def split_layer_tensor(name: str, w, rs: RunSpec):
    """One stacked layer tensor [L, ...] in the serving layout (`serving_params`). Traceable: the
    training step runs it inside its jit, so gradients arrive in the stacked layout."""
    pp = rs.shape.pp
    lp = rs.cfg.num_layers // pp
    shards = rs.layout.shards("experts", rs.shape)
    e_loc = rs.cfg.num_experts // shards
    def unstack(a, axis: int):  # lax.split transposes to one concatenate; per-index slices
        # transpose to a zero-padded full-size gradient each, summed (3 x 2.1 s a seed step)
        return [piece.squeeze(axis) for piece in jax.lax.split(a, [1] * a.shape[axis], axis=axis)]

    if base_name(name) in EXPERT_PARAMS:
        w = w.reshape((pp, lp, shards, e_loc) + w.shape[2:])
        if rs.kernel in STACKED_KERNELS:  # local experts stacked: [pp, shards, E_loc, D, F]
            return tuple(unstack(w, 1))
        return tuple(tuple(unstack(wl, 2)) for wl in unstack(w, 1))
    return tuple(unstack(w.reshape((pp, lp) + w.shape[1:]), 1))


def to_serving(params: dict, rs: RunSpec) -> dict:
    """The whole stacked parameter dict in the serving layout, traceably (see `serving_params`)."""
    return {n: split_layer_tensor(n, v, rs) if is_layer_param(n) else v for n, v in params.items()}


def serving_specs(rs: RunSpec) -> dict:
    """PartitionSpecs of the `serving_params` pytree: per local layer, and for expert tensors per
    local expert ([pp, shards, D, F] each) or, under the batched and ragged kernels, all local experts in one
    [pp, shards, E_loc, D, F] buffer."""
    lp = rs.cfg.num_layers // rs.shape.pp
    e_loc = rs.cfg.num_experts // rs.layout.shards("experts", rs.shape)

    def serving(name, spec):
        if base_name(name) in EXPERT_PARAMS and rs.kernel in STACKED_KERNELS:
            return (P(spec[0], spec[1], None, *spec[2:]),) * lp
        if base_name(name) in EXPERT_PARAMS:
            return ((spec,) * e_loc,) * lp
        return (spec,) * lp if is_layer_param(name) else spec
    return {name: serving(name, spec) for name, spec in rs.layout.param_specs(rs.quant).items()}


def cache_shape(cfg: ModelConfig, batch: int, max_len: int):
    return (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)


def init_cache(rs: RunSpec, mesh, batch: int, max_len: int):
    """Preallocated KV cache (k, v), each a tuple over local layers l of [pp, B, S, G, K] buffers
    (layer s * L/pp + l on stage s) in `cache_dtype`, sharded like attention. One buffer per layer,
    as for the parameters: updating one layer of a stacked [L, ...] cache copied the whole cache."""
    lp = rs.cfg.num_layers // rs.shape.pp
    shape = (rs.shape.pp,) + cache_shape(rs.cfg, batch, max_len)[1:]
    sharding = NamedSharding(mesh, rs.layout.act_spec("kv_cache"))
    dtype = cache_dtype(rs.dtype)
    zeros = jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for _ in range(lp)), out_shardings=(sharding,) * lp)
    return zeros(), zeros()


# ---- per-device code (inside shard_map) ---------------------------------------------------------

def _embed(tokens_BT, embed_VD, vocab_axis):
    if vocab_axis is None:
        return embed_VD[tokens_BT]
    v_loc = embed_VD.shape[0]
    local_BT = tokens_BT - jax.lax.axis_index(vocab_axis) * v_loc
    hit_BT = (local_BT >= 0) & (local_BT < v_loc)
    x_BTD = jnp.where(hit_BT[..., None], embed_VD[jnp.clip(local_BT, 0, v_loc - 1)], 0)
    return jax.lax.psum(x_BTD, vocab_axis)


def cache_dtype(dtype):
    """The KV cache holds 16-bit floats as their uint16 bit patterns: XLA:CPU scatters bfloat16 by
    converting the whole cache to float32 and back (5x slower, 2x the cache in temporaries), and a
    bitcast to uint16 around the scatter became two copies of the cache."""
    return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def _bits(x, dtype):
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _attention(x_BTD, w, side, mode, kv, row0, rs: RunSpec):
    """Attention on this device's heads. Returns the partial (over tp) output [B, T, D] f32 and kv."""
    cfg, cdt = rs.cfg, x_BTD.dtype
    h_BTD = layers.rmsnorm(x_BTD, w["attn_norm"], cfg.rms_norm_eps)
    b, t, d = x_BTD.shape
    heads = lambda w_: q8.reshape(w_, (d,), (-1,))  # 2-D dots: XLA:CPU runs [.., H, K] contractions 2-3x slower
    q_BTHK = q8.matmul("btd,dj->btj", h_BTD, heads(w["wq"])).astype(cdt).reshape(b, t, -1, cfg.head_dim)
    k_BTGK = q8.matmul("btd,dj->btj", h_BTD, heads(w["wk"])).astype(cdt).reshape(b, t, -1, cfg.head_dim)
    v_BTGK = q8.matmul("btd,dj->btj", h_BTD, heads(w["wv"])).astype(cdt).reshape(b, t, -1, cfg.head_dim)
    cos, sin = layers.rope_tables(side["pos"], cfg.head_dim, cfg.rope_theta, cdt)
    q_BTHK, k_BTGK = layers.apply_rope(q_BTHK, cos, sin), layers.apply_rope(k_BTGK, cos, sin)
    if mode == "decode":
        mb = x_BTD.shape[0]
        pos_B = side["pos"][:, 0]
        rows_B = jnp.where(side["valid"][:, 0], row0 + jnp.arange(mb), kv[0].shape[0])
        kv = tuple(c.at[rows_B, pos_B].set(_bits(n[:, 0], c.dtype), mode="drop")
                   for c, n in zip(kv, (k_BTGK, v_BTGK)))
        k_BSGK, v_BSGK = (_bits(jax.lax.dynamic_slice_in_dim(c, row0, mb, axis=0), cdt) for c in kv)
        mask_BTS = (jnp.arange(k_BSGK.shape[1])[None, :] <= pos_B[:, None])[:, None, :]
        out_BTHK = layers.attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS=mask_BTS)
    elif mode == "extend":  # rows of the cache named per sequence; T new tokens at positions pos_BT
        rows_B, pos_BT = side["row"], side["pos"]
        write_BT = jnp.where(side["valid"], rows_B[:, None], kv[0].shape[0])  # padding: dropped
        kv = tuple(c.at[write_BT, pos_BT].set(_bits(n, c.dtype), mode="drop") for c, n in zip(kv, (k_BTGK, v_BTGK)))
        k_BSGK, v_BSGK = (_bits(c[rows_B], cdt) for c in kv)
        mask_BTS = jnp.arange(k_BSGK.shape[1])[None, None, :] <= pos_BT[:, :, None]
        out_BTHK = layers.attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS=mask_BTS)
    else:
        out_BTHK = layers.attention(q_BTHK, k_BTGK, v_BTGK, causal=True)
        if mode == "prefill":
            kv = tuple(jax.lax.dynamic_update_slice(c, _bits(n, c.dtype), (row0, 0, 0, 0))
                       for c, n in zip(kv, (k_BTGK, v_BTGK)))
    return q8.matmul("btj,jd->btd", out_BTHK.reshape(b, t, -1), q8.reshape(w["wo"], (-1,), (d,))), kv


def _layer(x_BTD, valid_BT, w, side, mode, kv, row0, rs: RunSpec):
    """One decoder layer on one device. x_BTD is identical on the tp ranks before and after."""
    b, t, d = x_BTD.shape
    tp = rs.shape.tp
    if jax.default_backend() == "cpu":  # a device whose rows are all padding skips its attention
        # (4x2x4x4, 8 prompts on 16 batch shards: prefill 2926 -> 2709 ms, decode step 721 -> 524 ms);
        # on GPU a conditional costs a device-to-host sync, and batches fill their shards there
        o_BTD, kv = jax.lax.cond(jnp.any(valid_BT), lambda: _attention(x_BTD, w, side, mode, kv, row0, rs),
                                 lambda: (jnp.zeros((b, t, d), F32), kv))
    else:
        o_BTD, kv = _attention(x_BTD, w, side, mode, kv, row0, rs)
    n = b * t
    n_pad = -(-n // tp) * tp
    x_ND = jnp.pad(x_BTD.reshape(n, d), ((0, n_pad - n), (0, 0)))
    valid_N = jnp.pad(valid_BT.reshape(n), (0, n_pad - n))
    o_ND = jnp.pad(o_BTD.reshape(n, d), ((0, n_pad - n), (0, 0)))
    if tp > 1:  # each tp rank takes a distinct 1/tp share of the tokens, fully summed
        o_ND = jax.lax.psum_scatter(o_ND, "tp", scatter_dimension=0, tiled=True)
        share = n_pad // tp
        start = jax.lax.axis_index("tp") * share
        x_ND = jax.lax.dynamic_slice_in_dim(x_ND, start, share)
        valid_N = jax.lax.dynamic_slice_in_dim(valid_N, start, share)
    x_ND = x_ND + o_ND.astype(x_ND.dtype)
    y_ND, stats = moe_block(x_ND, valid_N, w, rs.moe_spec(), rs.cfg.rms_norm_eps)
    x_ND = x_ND + y_ND.astype(x_ND.dtype)
    if tp > 1:
        x_ND = jax.lax.all_gather(x_ND, "tp", axis=0, tiled=True)
    return x_ND[:n].reshape(b, t, d), kv, stats


def _local(a, name: str = ""):
    """Drop the unit stage axis (and expert-shard axis) of a serving buffer: a bitcast, not a copy."""
    if isinstance(a, tuple):  # per local expert: [1, 1, D, F] each
        return [x.reshape(x.shape[2:]) for x in a]
    if base_name(name) in EXPERT_PARAMS:  # batched and ragged kernels: [1, 1, E_loc, D, F]
        return a.reshape(a.shape[2:])
    return a.reshape(a.shape[1:])


def _device_program(params, tokens_BT, lengths_B, cache, starts_B=None, rows_B=None, *, rs: RunSpec, mode: str):
    """What one device runs. tokens_BT: [B/batch_shards, T]; lengths_B: prompt lengths (prefill,
    forward), the position of the new token (decode, -1 for padding rows) or the number of new
    tokens (extend, 0 for padding rows). extend only: the new tokens of row b sit at positions
    starts_B[b], ... of this device's cache row rows_B[b]."""
    cfg, m_count = rs.cfg, rs.microbatches
    b_loc, t = tokens_BT.shape
    mb = b_loc // m_count
    vocab_axis = "tp" if rs.layout.mesh_axes("vocab") and rs.shape.tp > 1 else None
    x_BTD = _embed(tokens_BT, params["embed"], vocab_axis).astype(rs.dtype)
    if mode == "decode":
        pos_BT = jnp.maximum(lengths_B, 0)[:, None]
        valid_BT = (lengths_B >= 0)[:, None]
    elif mode == "extend":
        pos_BT = jnp.maximum(starts_B, 0)[:, None] + jnp.arange(t)
        valid_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
    else:
        pos_BT = jnp.broadcast_to(jnp.arange(t), (b_loc, t))
        valid_BT = pos_BT < lengths_B[:, None]
    split = lambda a: a.reshape((m_count, mb) + a.shape[1:])
    side_M = {"pos": split(pos_BT), "valid": split(valid_BT), "len": split(lengths_B)}
    if mode == "extend":
        side_M["row"] = split(rows_B)
    layers_loc = len(params["wq"])
    stats0 = {"load": jnp.zeros((layers_loc, cfg.num_experts), jnp.int32),
              "served_load": jnp.zeros((layers_loc, cfg.num_experts), jnp.int32),
              **{k: jnp.zeros((layers_loc,), jnp.int32) for k in MOE_COUNTERS},
              "prob_sum": jnp.zeros((layers_loc, cfg.num_experts), F32), "z_sum": jnp.zeros((layers_loc,), F32)}
    layer_fn = _layer
    if rs.remat:  # keep only each layer's input for the backward pass; recompute the rest
        layer_fn = jax.checkpoint(_layer, static_argnums=(4, 7))

    def stage_fn(x_BTD, side, mi, state):
        kv_all, stats = state
        row0 = mi * mb
        for l in range(layers_loc):
            w = {name: _local(params[name][l], name) for name in params if is_layer_param(name)}
            if rs.quant:  # each int8 matrix with its scales, in the backend's matmul form
                form = q8.resolve_matmul(rs.quant_matmul, jax.default_backend())
                for name in QUANT_INPUT_DIMS:
                    w[name] = q8.pair(w[name], w.pop(scale_name(name)), form)
            kv = None if kv_all is None else (_local(kv_all[0][l]), _local(kv_all[1][l]))
            x_BTD, kv, st = layer_fn(x_BTD, side["valid"], w, side, mode, kv, row0, rs)
            if kv is not None:
                kv_all = tuple(c[:l] + (n[None],) + c[l + 1:] for c, n in zip(kv_all, kv))
            stats = {k: stats[k].at[l].add(st[k]) for k in stats}
        return x_BTD, (kv_all, stats)

    def emit(y_BTD, side):
        if mode == "forward":
            return y_BTD
        last_B = jnp.zeros_like(side["len"]) if mode == "decode" else jnp.maximum(side["len"], 1) - 1
        return y_BTD[jnp.arange(y_BTD.shape[0]), last_B]

    outs, (cache, stats) = staggered(stage_fn, emit, split(x_BTD), side_M, (cache, stats0),
                                     stages=rs.shape.pp, axis="pp")
    h = outs.reshape((b_loc,) + outs.shape[2:])
    h = layers.rmsnorm(h, params["final_norm"], cfg.rms_norm_eps)
    logits = mm("...d,dv->...v", h, params["lm_head"])
    stats = jax.tree.map(lambda a: jax.lax.psum(a, rs.layout.token_axes()), stats)
    return logits, cache, stats


def stats_specs(lay: Layout) -> dict:
    """PartitionSpecs of the MoE statistics `_device_program` returns (per layer, over pp)."""
    return {"load": lay.act_spec("moe_counts"), "served_load": lay.act_spec("moe_counts"),
            "prob_sum": lay.act_spec("moe_counts"),
            **{k: P("pp") for k in MOE_COUNTERS + ("z_sum",)}}


def build(rs: RunSpec, mesh, mode: str):
    """A jitted function for `mode`, taking `serving_params`:
      forward(params, tokens_BT, lengths_B)              -> logits_BTV f32, stats
      prefill(params, tokens_BT, lengths_B, cache)       -> logits_BV f32, cache, stats
      decode(params, tokens_B1, positions_B, cache)      -> logits_BV f32, cache, stats
      extend(params, tokens_BT, counts_B, starts_B, rows_B, cache) -> logits_BV f32, cache, stats
    B must be a multiple of rs.batch_multiple. extend writes row b's first counts_B[b] tokens at
    positions starts_B[b], ... of cache row rows_B[b] (an index into the cache rows of row b's own
    batch shard) and attends to that row's earlier positions: a prompt chunk of one slot of a
    continuous-batching engine (serving/engine.py); its logits are at each row's last new token."""
    if mode not in MODES:
        raise ValueError(mode)
    if mesh_shape_of(mesh) != rs.shape:
        raise ValueError(f"mesh {mesh_shape_of(mesh)} does not match the run's {rs.shape}")
    lay = rs.layout
    lp = rs.cfg.num_layers // rs.shape.pp
    param_specs = serving_specs(rs)
    cache_spec = (lay.act_spec("kv_cache"),) * lp
    stats_spec = stats_specs(lay)
    logits_spec = lay.act_spec("logits" if mode == "forward" else "last_logits")
    fn = functools.partial(_device_program, rs=rs, mode=mode)
    if mode == "forward":
        body = lambda p, tok, ln: (lambda r: (r[0], r[2]))(fn(p, tok, ln, None))
        in_specs = (param_specs, lay.act_spec("tokens"), lay.act_spec("lengths"))
        out_specs = (logits_spec, stats_spec)
        donate = ()
    elif mode == "extend":
        body = lambda p, tok, counts, starts, rows, cache: fn(p, tok, counts, cache, starts, rows)
        lengths = lay.act_spec("lengths")
        in_specs = (param_specs, lay.act_spec("tokens"), lengths, lengths, lengths, (cache_spec, cache_spec))
        out_specs = (logits_spec, (cache_spec, cache_spec), stats_spec)
        donate = (5,)
    else:
        body = fn
        in_specs = (param_specs, lay.act_spec("tokens"), lay.act_spec("lengths"), (cache_spec, cache_spec))
        out_specs = (logits_spec, (cache_spec, cache_spec), stats_spec)
        donate = (3,)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)

