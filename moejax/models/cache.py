"""The KV cache of the serving and generation programs: what it holds per token (keys and values per
kv head, or multi-head latent attention's latent and shared RoPE key), its buffers' shapes and
shardings, its allocation, and the in-device copies of a cached prompt prefix (between rows, and
between rows and the prefix cache's block pool)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from moejax.config.model import ModelConfig
from moejax.models.runspec import RunSpec
from moejax.ops.attention import cache_dtype
from moejax.parallel.rules import ACT_AXES


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> tuple:
    """The stacked shape of each cache buffer: keys and values [L, B, S, G, K], or under latent attention
    one buffer [L, B, S, 1, kv_lora_rank + qk_rope_head_dim] (ops/mla.py: the latent and the shared
    RoPE key, all a layer keeps per token)."""
    if cfg.latent_attention:
        return ((cfg.num_layers, batch, max_len, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim),)
    return ((cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim),) * 2


def cache_axes(cfg: ModelConfig) -> str:
    """The ACT_AXES entry of the cache buffers: the latent is replicated over the heads' axis (each
    device's heads read all of it), keys and values split with their heads."""
    return "latent_cache" if cfg.latent_attention else "kv_cache"


def cache_values_per_token(cfg: ModelConfig, layout=None, mesh=None) -> int:
    """Values the cache keeps per token per layer: all heads', or with a layout and mesh one device's."""
    axes = ACT_AXES[cache_axes(cfg)][3:]
    return sum(math.prod(d // (layout.shards(a, mesh) if layout is not None and a else 1) for d, a in zip(s[3:], axes))
               for s in cache_shapes(cfg, 1, 1))


def cache_specs(rs: RunSpec) -> tuple:
    """PartitionSpecs of the cache pytree: a tuple over buffers of a tuple over local layers."""
    lp = rs.cfg.num_layers // rs.shape.pp
    return ((rs.layout.act_spec(cache_axes(rs.cfg)),) * lp,) * len(cache_shapes(rs.cfg, 1, 1))


def slot_lengths(cfg: ModelConfig, pp: int, max_len: int, ring: bool) -> list[int]:
    """Positions each local layer slot's buffers hold: max_len, or under `ring` the sliding window
    where every stage's layer in that slot slides by the same window (a ring: ops/attention.py)."""
    lp = cfg.num_layers // pp
    out = []
    for slot in range(lp):
        windows = {cfg.layer_window(s * lp + slot) for s in range(pp)}
        w = windows.pop() if len(windows) == 1 else None
        out.append(min(w, max_len) if ring and w is not None else max_len)
    return out


def init_cache(rs: RunSpec, mesh, batch: int, max_len: int, ring: bool = False):
    """Preallocated cache: per buffer of `cache_shapes` (k and v, or the latent), a tuple over local
    layers l of [pp, B, S_l, ...] buffers (layer s * L/pp + l on stage s) in `cache_dtype`, sharded like
    attention; S_l from `slot_lengths` (`ring`: sliding layers keep a ring of their window, the
    server's choice; prefill, which writes a prompt from position 0, needs whole rows). One buffer per
    layer, as for the parameters: updating one layer of a stacked [L, ...] cache copied the whole cache."""
    lengths = slot_lengths(rs.cfg, rs.shape.pp, max_len, ring)
    sharding = NamedSharding(mesh, rs.layout.act_spec(cache_axes(rs.cfg)))
    dtype = cache_dtype(rs.dtype)
    out = []
    for shape in cache_shapes(rs.cfg, batch, max_len):
        shapes = [(rs.shape.pp,) + shape[1:2] + (n,) + shape[3:] for n in lengths]
        out.append(jax.jit(lambda shapes=shapes: tuple(jnp.zeros(s, dtype) for s in shapes),
                           out_shardings=(sharding,) * len(shapes))())
    return tuple(out)


def copy_prefix(rs: RunSpec, mesh):
    """A jitted (cache, src_Q, dst_Q, n_Q) -> cache, Q = the batch shards: on each shard q whose
    dst_Q[q] >= 0, positions [0, n_Q[q]) of its cache row dst_Q[q] become those of its row src_Q[q]
    (rows indexed within the shard), in every layer; the other shards change nothing. A request that
    reuses a cached prompt prefix gets its keys and values this way (serving/prefix.py): a copy
    inside each device, no communication."""
    cache_spec = cache_specs(rs)
    vec = rs.layout.act_spec("lengths")

    def body(cache, src, dst, n):
        def one(c):  # [1, B_loc, S, ...]: this stage's layer, this shard's rows
            d = jnp.where(dst[0] < 0, c.shape[1], dst[0])  # out of range: dropped
            s = jnp.clip(src[0], 0, c.shape[1] - 1)
            keep = (jnp.arange(c.shape[2]) < n[0])[:, None, None]
            row = jnp.where(keep, c[0, s], c[0, jnp.minimum(d, c.shape[1] - 1)])
            return c.at[0, d].set(row, mode="drop")
        return jax.tree.map(one, cache)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(cache_spec, vec, vec, vec),
                           out_specs=cache_spec, check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,))


def move_blocks(rs: RunSpec, mesh, block: int):
    """A jitted (cache, pool, row_Q, save_QM, to_QM, load_QM, at_QM) -> (cache, pool), Q = the batch
    shards, M = blocks per row: the prefix cache's pool copies (serving/prefix.py). `pool` is a cache of
    rows of `block` positions (`init_cache(rs, mesh, blocks, block)`), each row one pool block. On each
    shard q whose row_Q[q] >= 0 (rows and blocks indexed within the shard), in every layer: first the
    row's block save[q, i] goes to pool block to[q, i], then pool block load[q, i] to the row's block
    at[q, i], for every i whose entry is >= 0; a copy inside each device, no communication."""
    cache_spec = cache_specs(rs)
    vec, mat = rs.layout.act_spec("lengths"), rs.layout.act_spec("tokens")

    def one(c, p, row, save, to, load, at):  # c [1, B_loc, S, ...], p [1, P_loc, block, ...]
        nb, n_pool = c.shape[2] // block, p.shape[1]
        r = jnp.clip(row, 0, c.shape[1] - 1)
        blocks = c[0, r, :nb * block].reshape((nb, block) + c.shape[3:])
        to = jnp.where((row >= 0) & (save >= 0), to, n_pool)  # out of range: dropped
        p = p.at[0, to].set(blocks[jnp.clip(save, 0, nb - 1)], mode="drop")
        at = jnp.where((row >= 0) & (load >= 0), at, nb)
        blocks = blocks.at[at].set(p[0, jnp.clip(load, 0, n_pool - 1)], mode="drop")
        return c.at[0, r, :nb * block].set(blocks.reshape((nb * block,) + c.shape[3:])), p

    def body(cache, pool, row, save, to, load, at):
        leaves, tree = jax.tree.flatten(cache)
        out = [one(c, p, row[0], save[0], to[0], load[0], at[0]) for c, p in zip(leaves, jax.tree.leaves(pool))]
        return tree.unflatten([o[0] for o in out]), tree.unflatten([o[1] for o in out])

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(cache_spec, cache_spec, vec, mat, mat, mat, mat),
                           out_specs=(cache_spec, cache_spec), check_vma=False)
    return jax.jit(mapped, donate_argnums=(0, 1))
