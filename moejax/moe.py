"""The expert-parallel MoE layer, per device, inside `jax.shard_map`.

  route -> place (capacity policy) -> pack [E, C, D] -> all_to_all -> local experts -> all_to_all back
  -> combine

Buffers have fixed capacity C per (source device, expert) pair: ragged all-to-all does not run on
XLA:CPU. `dropless` serves overflow in further rounds of the same exchange until every assignment
is served; `drop` and `reroute` run one round.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.layers import F32, mm, rmsnorm

POLICIES = ("dropless", "drop", "reroute")
I32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """Static facts one device needs to run the MoE layer (mesh axes come from the layout)."""

    num_experts: int  # E
    top_k: int
    policy: str
    capacity_factor: float
    expert_axes: tuple  # the all-to-all group, major to minor
    expert_shards: int  # devices in that group
    ffn_axis: str | None  # 'tp' when each expert's F dimension is split (partial sums)
    ffn_shards: int
    round_axes: tuple  # every axis but pp: a stage's devices agree on the dropless round count

    def capacity(self, n_tokens: int) -> int:
        # at least 2 rows: XLA:CPU upcasts bf16 matrix-vector dots to float32 (copying the weights)
        return max(2, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts))


def route(h_ND, router_DE, top_k: int):
    """Router logits in the model dtype, softmax in float32, top-k, renormalise (Mixtral)."""
    logits_NE = mm("nd,de->ne", h_ND, router_DE).astype(h_ND.dtype)
    probs_NE = jax.nn.softmax(logits_NE.astype(F32), axis=-1)
    _, experts_NK = jax.lax.top_k(probs_NE, top_k)
    return probs_NE, experts_NK.astype(I32)


def queue_positions(experts_A, live_A, num_experts: int):
    """Position of each live assignment in its expert's queue, in assignment order, and counts."""
    onehot_AE = (experts_A[:, None] == jnp.arange(num_experts, dtype=I32)) & live_A[:, None]
    csum_AE = jnp.cumsum(onehot_AE.astype(I32), axis=0)
    pos_A = jnp.take_along_axis(csum_AE, experts_A[:, None], axis=1)[:, 0] - 1
    return pos_A, csum_AE[-1]


def reroute(probs_NE, experts_A, placed_A, valid_A, capacity: int, top_k: int):
    """Move each assignment past capacity to its token's next-best expert that has room.

    Rounds r = k .. E-1: every token with an unplaced assignment proposes its r-th ranked expert
    (if it does not hold it already); proposals are accepted in token order while the expert has
    room; an accepted proposal takes the token's first unplaced slot. What is left is dropped.
    """
    n_tok, n_exp = probs_NE.shape
    order_NE = jnp.argsort(-probs_NE, axis=-1, stable=True).astype(I32)
    e_NK = experts_A.reshape(top_k, n_tok).T
    placed_NK = placed_A.reshape(top_k, n_tok).T
    unplaced_NK = valid_A.reshape(top_k, n_tok).T & ~placed_NK
    rerouted_NK = jnp.zeros_like(unplaced_NK)
    held_NE = jnp.zeros((n_tok, n_exp), bool).at[jnp.arange(n_tok)[:, None], e_NK].set(True)
    taken_E = jnp.zeros((n_exp,), I32).at[experts_A].add(placed_A.astype(I32))
    room_E = capacity - taken_E
    for r in range(top_k, n_exp):
        cand_N = order_NE[:, r]
        propose_N = unplaced_NK.any(axis=1) & ~jnp.take_along_axis(held_NE, cand_N[:, None], 1)[:, 0]
        onehot_NE = (cand_N[:, None] == jnp.arange(n_exp, dtype=I32)) & propose_N[:, None]
        rank_N = jnp.take_along_axis(jnp.cumsum(onehot_NE.astype(I32), 0), cand_N[:, None], 1)[:, 0] - 1
        accept_N = propose_N & (rank_N < room_E[cand_N])
        accepted_NE = onehot_NE & accept_N[:, None]
        room_E = room_E - accepted_NE.sum(0, dtype=I32)
        held_NE = held_NE | accepted_NE
        slot_N = jnp.argmax(unplaced_NK, axis=1)
        hit_NK = (jnp.arange(top_k)[None, :] == slot_N[:, None]) & accept_N[:, None]
        e_NK = jnp.where(hit_NK, cand_N[:, None], e_NK)
        unplaced_NK = unplaced_NK & ~hit_NK
        rerouted_NK = rerouted_NK | hit_NK
    return e_NK.T.reshape(-1), (valid_A & ~unplaced_NK.T.reshape(-1)), rerouted_NK.T.reshape(-1)


def expert_ffn(rows_ERD, w1_EDF, w3_EDF, w2_EFD, out_dtype):
    """SwiGLU per local expert, batched over its received rows: down(silu(gate(x)) * up(x))."""
    cdt = rows_ERD.dtype
    g_ERF = mm("erd,edf->erf", rows_ERD, w1_EDF).astype(cdt)
    u_ERF = mm("erd,edf->erf", rows_ERD, w3_EDF).astype(cdt)
    a_ERF = jax.nn.silu(g_ERF) * u_ERF
    return mm("erf,efd->erd", a_ERF, w2_EFD).astype(out_dtype)


def exchange(buf_ECD, spec: MoeSpec):
    """all_to_all over the expert axes: send block i of the E axis to expert shard i."""
    if spec.expert_shards == 1:
        return buf_ECD
    return jax.lax.all_to_all(buf_ECD, spec.expert_axes, 0, 0, tiled=True)


def serve_round(x_pad_ND, experts_A, slot_A, in_round_A, weights_A, w, capacity: int, spec: MoeSpec):
    """One exchange: pack, all_to_all, local experts, all_to_all back, weighted gather [A, D]."""
    n_rows = x_pad_ND.shape[0] - 1  # last row is the zero row empty slots point at
    E, C, D = spec.num_experts, capacity, x_pad_ND.shape[1]
    flat_A = jnp.where(in_round_A, experts_A * C + slot_A, E * C)
    tokens_A = jnp.tile(jnp.arange(n_rows, dtype=I32), spec.top_k)
    slot_token_EC = jnp.full((E * C,), n_rows, I32).at[flat_A].set(tokens_A, mode="drop").reshape(E, C)
    send_ECD = x_pad_ND[slot_token_EC]
    recv_ECD = exchange(send_ECD, spec)  # [shards * E_loc, C, D]: block s came from source s
    e_loc = E // spec.expert_shards
    rows_ERD = recv_ECD.reshape(spec.expert_shards, e_loc, C, D).transpose(1, 0, 2, 3)
    rows_ERD = rows_ERD.reshape(e_loc, spec.expert_shards * C, D)
    out_dtype = F32 if spec.ffn_axis else x_pad_ND.dtype  # partial sums stay float32
    out_ERD = expert_ffn(rows_ERD, w["w1"], w["w3"], w["w2"], out_dtype)
    out_ECD = out_ERD.reshape(e_loc, spec.expert_shards, C, D).transpose(1, 0, 2, 3).reshape(E, C, D)
    back_ECD = exchange(out_ECD, spec)
    got_AD = back_ECD.reshape(E * C, D)[jnp.where(in_round_A, flat_A, 0)]
    return got_AD.astype(F32) * jnp.where(in_round_A, weights_A, 0.0)[:, None]


def moe_block(x_ND, valid_N, w, spec: MoeSpec, eps: float):
    """The MoE sub-layer for this device's tokens: returns y_ND (float32) and statistics.

    x_ND: [N, D] tokens this device dispatches (its 1/tp share when tokens are split over tp).
    w: this device's layer parameters: moe_norm_D, router_DE, w1_EDF, w3_EDF, w2_EFD (local experts).
    """
    if spec.ffn_axis:  # every tp rank serves the same tokens with its slice of F
        x_ND = jax.lax.all_gather(x_ND, spec.ffn_axis, axis=0, tiled=True)
        valid_N = jax.lax.all_gather(valid_N, spec.ffn_axis, axis=0, tiled=True)
    n_tok, d = x_ND.shape
    k = spec.top_k
    h_ND = rmsnorm(x_ND, w["moe_norm"], eps)
    probs_NE, experts_NK = route(h_ND, w["router"], k)
    experts_A = experts_NK.T.reshape(-1)  # assignment a = slot * N + token: first choices first
    valid_A = jnp.tile(valid_N, k)
    pos_A, load_E = queue_positions(experts_A, valid_A, spec.num_experts)
    capacity = spec.capacity(n_tok)
    rerouted_A = jnp.zeros_like(valid_A)
    if spec.policy == "dropless":
        served_A = valid_A
    else:
        served_A = valid_A & (pos_A < capacity)
        if spec.policy == "reroute":
            experts_A, served_A, rerouted_A = reroute(probs_NE, experts_A, served_A, valid_A, capacity, k)
            pos_A, _ = queue_positions(experts_A, served_A, spec.num_experts)
    p_NK = jnp.take_along_axis(probs_NE, experts_A.reshape(k, n_tok).T, axis=1)
    keep_NK = (served_A if spec.policy == "reroute" else valid_A).reshape(k, n_tok).T
    denom_N = jnp.sum(jnp.where(keep_NK, p_NK, 0.0), axis=1, keepdims=True)
    weights_A = (p_NK / jnp.where(denom_N > 0, denom_N, 1.0)).T.reshape(-1)

    h_pad_ND = jnp.concatenate([h_ND, jnp.zeros((1, d), h_ND.dtype)], axis=0)

    def one_round(r, y_ND):
        lo = r * capacity
        in_round_A = served_A & (pos_A >= lo) & (pos_A < lo + capacity)
        got_AD = serve_round(h_pad_ND, experts_A, pos_A - lo, in_round_A, weights_A, w, capacity, spec)
        return y_ND + got_AD.reshape(k, n_tok, d).sum(axis=0)

    y_ND = jnp.zeros((n_tok, d), F32)
    if spec.policy == "dropless":  # as many rounds as the fullest queue anywhere needs
        most = jax.lax.pmax(jnp.max(jnp.where(valid_A, pos_A + 1, 0)), spec.round_axes)
        rounds = (most + capacity - 1) // capacity
        y_ND = jax.lax.fori_loop(0, rounds, one_round, y_ND)
    else:
        y_ND = one_round(0, y_ND)
    if spec.ffn_axis:
        y_ND = jax.lax.psum_scatter(y_ND, spec.ffn_axis, scatter_dimension=0, tiled=True)
    stats = {
        "load": load_E,
        "dropped": jnp.sum(valid_A & ~served_A, dtype=I32),
        "rerouted": jnp.sum(rerouted_A, dtype=I32),
    }
    if spec.ffn_axis:  # tp ranks routed the same tokens: only rank 0 counts them
        stats = {kk: jnp.where(jax.lax.axis_index(spec.ffn_axis) == 0, v, 0) for kk, v in stats.items()}
    return y_ND, stats
