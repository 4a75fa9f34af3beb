"""The expert-parallel MoE layer, per device, inside `jax.shard_map`.

  route -> place (capacity policy) -> pack [E, C, D] -> all_to_all -> local experts -> all_to_all back
  -> combine

Buffers have fixed capacity C per (source device, expert) pair: ragged all-to-all does not run on
XLA:CPU. `dropless` serves overflow in further rounds of the same exchange until every assignment
is served; `drop` and `reroute` run one round. Three kernels run the local experts:
  buffers  one `lax.switch` per expert over static row counts (CPU: an idle expert reads nothing)
  batched  the same buffers, all local experts as one batched matmul over every buffer row (GPU: no
           per-expert conditionals, each of which costs a device-to-host sync there); dropless runs
           one round whose buffer length (m .. 6m or N, m the mean) fits the fullest queue
  ragged   no capacity padding: ragged all-to-all and grouped matmuls, exactly the top-k rows; the
           grouped matmul is `jax.lax.ragged_dot` (ragged), jax's Pallas Mosaic-GPU kernel
           (ragged-mgpu, Hopper) or tokamax's (ragged-tokamax): moe_ragged.py
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moejax.ops.layers import F32, rmsnorm
from moejax.ops.moe.experts import Act, expert_biases, swiglu, swiglu_batched
from moejax.ops.moe.ragged import GROUPED_GEMMS, serve_ragged
from moejax.ops.moe.router import ROUTERS

STACKED_KERNELS = ("batched",) + tuple(GROUPED_GEMMS)  # each layer's local experts as one [E_loc, D, F] tensor
I32 = jnp.int32
MIN_ROWS = 8  # buffer rows an expert gets from a source at least (<= N)
MIN_DOT_ROWS = 2  # XLA:CPU upcasts bf16 matrix-vector (1-row) dots to float32 copies of the weights
BATCHED_MIN_ROWS = 64  # batched kernel: up to this many tokens (decode) take one round of N-row buffers;
# a GPU reads an expert's weights in the same time for 1 or 64 rows (64 FLOPs per weight byte is
# under its ridge), and a data-dependent round count would cost a device-to-host sync per layer


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
    kernel: str = "buffers"  # or "batched" or one of GROUPED_GEMMS (module docstring)
    differentiable: bool = False  # training: dropless runs one round sized by a switch, never a
    # loop with a data-dependent trip count (which reverse-mode autodiff cannot transpose)
    router: str = "softmax_topk"  # router.py ROUTERS key: how a token picks its experts
    renormalize: bool = True  # weight a token's experts by their top-k probabilities renormalised to 1
    n_group: int = 1  # sigmoid_topk's group-limited choice (router.py)
    topk_group: int = 1
    routed_scale: float = 1.0  # the routed experts' weights are multiplied by this
    platform: str = "cpu"  # the run's platform (RunSpec.platform): CPU emulates ragged_all_to_all
    router_logit_bias: bool = False  # the router's logits add `router_logit_bias` [E]
    expert_bias: bool = False  # the experts' projections add b1, b3, b2 (experts.py)
    act: Act = Act()  # the experts' activation (experts.py)

    def capacity(self, n_tokens: int) -> int:
        """Assignments an expert accepts from one source under `drop` / `reroute`."""
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts))

    def buffer_rows(self, n_tokens: int) -> int:
        """Rows per (source, expert) buffer. Under `dropless` the capacity is only a round size: at
        least MIN_ROWS (or the N tokens, the most one expert can get from a source), so that small
        batches (decode) never need a second round."""
        rows = self.capacity(n_tokens)
        if self.policy == "dropless":
            rows = max(rows, min(n_tokens, MIN_ROWS))
            if self.kernel == "batched" and n_tokens <= BATCHED_MIN_ROWS:
                rows = n_tokens  # one static round
        return max(rows, MIN_DOT_ROWS)


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


SIZE_FRACTIONS = (0.5, 1.0, 1.25, 1.5)  # of an expert's mean rows m; R (the whole buffer) comes last
BATCHED_FRACTIONS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)  # batched kernel: of the mean rows per
# (source, expert) pair; N, which always fits, comes last
TRAIN_FRACTIONS = (1.25, 1.5, 2.0, 3.0)  # training: every branch is compiled twice (forward and backward),
# and a trained router keeps the fullest queue near 1.25-1.5x the mean


def row_sizes(r: int, mean_rows: float, fractions=SIZE_FRACTIONS) -> list[int]:
    """Static row counts an expert may compute: m/2, m, 5m/4 and 3m/2 for a mean of m rows per
    expert, and R. Near-even routing then computes ~1.13x the top-k rows (R/4 steps computed 1.25x:
    with a capacity factor of 2, half the experts fell just past m and computed 3m/2)."""
    return sorted({r} | {min(r, max(MIN_DOT_ROWS, math.ceil(f * mean_rows))) for f in fractions})


def expert_on_rows(rows_RD, n_rows, mean_rows: float, w1_DF, w3_DF, w2_FD, out_dtype, act: Act = Act(), b=None):
    """The expert on the first `n_rows` rows (the filled ones, compacted to the front).

    One `lax.switch` picks the smallest of the `row_sizes` that covers n_rows, and an expert that
    received nothing computes nothing and never reads its weights (what makes decode fast). Loops
    over row tiles were measured 1.5-2x slower on XLA:CPU: a while loop per expert per layer costs
    more than the rows it saves. Returns the outputs [R, D] (zeros past the computed rows) and the
    rows computed."""
    r, d = rows_RD.shape
    sizes = row_sizes(r, mean_rows)

    def run(size):
        def f(rows_RD):
            y_RD = swiglu(rows_RD[:size], w1_DF, w3_DF, w2_FD, out_dtype, act, b)
            return jnp.pad(y_RD, ((0, r - size), (0, 0)))
        return f

    branches = [lambda rows_RD: jnp.zeros((r, d), out_dtype)] + [run(size) for size in sizes]
    which = jnp.where(n_rows == 0, 0, jnp.searchsorted(jnp.array(sizes), n_rows) + 1)
    computed = jnp.array([0] + sizes, I32)[which]
    return jax.lax.switch(which, branches, rows_RD), computed


def exchange(buf_ECD, spec: MoeSpec):
    """all_to_all over the expert axes: send block i of the E axis to expert shard i."""
    if spec.expert_shards == 1:
        return buf_ECD
    return jax.lax.all_to_all(buf_ECD, spec.expert_axes, 0, 0, tiled=True)


def serve_round(x_pad_ND, experts_A, slot_A, in_round_A, weights_A, w, capacity: int, spec: MoeSpec):
    """One exchange: pack, all_to_all, local experts, all_to_all back. Returns the weighted expert
    outputs per assignment [A, D] and the rows this device's experts computed."""
    n_rows = x_pad_ND.shape[0] - 1  # last row is the zero row empty slots point at
    E, C, D = spec.num_experts, capacity, x_pad_ND.shape[1]
    flat_A = jnp.where(in_round_A, experts_A * C + slot_A, E * C)
    tokens_A = jnp.tile(jnp.arange(n_rows, dtype=I32), spec.top_k)
    slot_token_EC = jnp.full((E * C,), n_rows, I32).at[flat_A].set(tokens_A, mode="drop").reshape(E, C)
    send_ECD = x_pad_ND[slot_token_EC]
    recv_ECD = exchange(send_ECD, spec)  # [shards * E_loc, C, D]: block s came from source s
    n_src, e_loc = spec.expert_shards, E // spec.expert_shards
    rows_SLCD = recv_ECD.reshape(n_src, e_loc, C, D)
    out_dtype = F32 if spec.ffn_axis else x_pad_ND.dtype  # partial sums stay float32
    if spec.kernel == "batched":  # empty slots hold the zero row; what they compute is never read
        rows_LRD = rows_SLCD.transpose(1, 0, 2, 3).reshape(e_loc, n_src * C, D)
        y_LRD = swiglu_batched(rows_LRD, w["w1"], w["w3"], w["w2"], out_dtype, spec.act,
                               expert_biases(w, spec.expert_bias, spec.ffn_axis))
        out_ECD = y_LRD.reshape(e_loc, n_src, C, D).transpose(1, 0, 2, 3).reshape(E, C, D)
        computed = jnp.asarray(e_loc * n_src * C, I32)
    else:  # the row counts travel too: each expert computes only its filled rows
        sent_E = jnp.zeros((E,), I32).at[experts_A].add(in_round_A.astype(I32))
        got_SL = exchange(sent_E, spec).reshape(n_src, e_loc)  # rows filled in each received block
        out_ECD, computed = local_experts_switched(rows_SLCD, got_SL, w, n_rows, spec, out_dtype)
    back_ECD = exchange(out_ECD, spec)
    got_AD = back_ECD.reshape(E * C, D)[jnp.where(in_round_A, flat_A, 0)]
    return got_AD.astype(F32) * jnp.where(in_round_A, weights_A, 0.0)[:, None], computed


def local_experts_switched(rows_SLCD, got_SL, w, n_rows: int, spec: MoeSpec, out_dtype):
    """The buffers kernel: each local expert on its filled rows through `expert_on_rows`. Returns
    the outputs [E, C, D] in the received layout and the rows computed."""
    n_src, e_loc, C, D = rows_SLCD.shape
    E = spec.num_experts
    mean_rows = n_src * n_rows * spec.top_k / E  # an expert's rows per round under even routing
    outs, computed = [], 0
    for j in range(e_loc):
        rows_RD = rows_SLCD[:, j].reshape(n_src * C, D)
        filled_R = (jnp.arange(C)[None, :] < got_SL[:, j, None]).reshape(-1)
        if n_src > 1:  # move the filled rows of every source to the front
            order_R = jnp.argsort(~filled_R, stable=True)
            rows_RD = rows_RD[order_R]
        y_RD, n = expert_on_rows(rows_RD, jnp.sum(filled_R, dtype=I32), mean_rows, w["w1"][j], w["w3"][j],
                                 w["w2"][j], out_dtype, spec.act, expert_biases(w, spec.expert_bias, spec.ffn_axis, j))
        computed = computed + n
        if n_src > 1:
            y_RD = jnp.zeros_like(y_RD).at[order_R].set(y_RD)
        outs.append(y_RD.reshape(n_src, C, D))
    return jnp.stack(outs, axis=1).reshape(E, C, D), computed


def resolve_kernel(kernel: str, backend: str) -> str:
    """`auto`: buffers on CPU (an idle expert reads no weights), batched elsewhere. On an H200 (jax
    0.11.2) the batched kernel's seed-10b prefill ran 5.2x faster than the ragged one, whose
    `ragged_dot` XLA lowers to a dense matmul over every expert, and 2x faster than per-expert
    branches (docs/PERFORMANCE.md)."""
    if kernel == "auto":
        return "buffers" if backend == "cpu" else "batched"
    return kernel


def _per_token(got_AD, k: int):
    """Sum each token's k weighted expert outputs (assignment a = slot * N + token). Explicit adds:
    XLA:CPU's fused reduce over k took 5 ms for 1024 tokens."""
    n_tok = got_AD.shape[0] // k
    y_ND = got_AD[:n_tok]
    for j in range(1, k):
        y_ND = y_ND + got_AD[j * n_tok:(j + 1) * n_tok]
    return y_ND


def zero_stats(num_experts: int) -> dict:
    """`moe_block`'s statistics of a layer without routed experts (a dense layer)."""
    e = jnp.zeros((num_experts,), I32)
    return {"load": e, "served_load": e, "dropped": jnp.zeros((), I32), "rerouted": jnp.zeros((), I32),
            "exchanged_rows": jnp.zeros((), I32), "computed_rows": jnp.zeros((), I32),
            "prob_sum": jnp.zeros((num_experts,), F32), "z_sum": jnp.zeros((), F32)}


def moe_block(x_ND, valid_N, w, spec: MoeSpec, eps: float):
    """The MoE sub-layer for this device's tokens: returns y_ND (float32) and statistics.

    x_ND: [N, D] tokens this device dispatches (its 1/tp share when tokens are split over tp).
    w: this device's layer parameters: moe_norm_D, router_DE, and lists over its local experts of
    w1_DF, w3_DF, w2_FD (and b1_F, b3_F, b2_D under `spec.expert_bias`).
    """
    if spec.ffn_axis:  # every tp rank serves the same tokens with its slice of F
        x_ND = jax.lax.all_gather(x_ND, spec.ffn_axis, axis=0, tiled=True)
        valid_N = jax.lax.all_gather(valid_N, spec.ffn_axis, axis=0, tiled=True)
    n_tok, d = x_ND.shape
    k = spec.top_k
    h_ND = rmsnorm(x_ND, w["moe_norm"], eps)
    score_NE, experts_NK, probs_NE, lse_N = ROUTERS[spec.router](
        h_ND, w, k, spec.n_group, spec.topk_group, w["router_logit_bias"] if spec.router_logit_bias else None)
    experts_A = experts_NK.T.reshape(-1)  # assignment a = slot * N + token: first choices first
    valid_A = jnp.tile(valid_N, k)
    pos_A, load_E = queue_positions(experts_A, valid_A, spec.num_experts)
    capacity = spec.capacity(n_tok)
    rows = spec.buffer_rows(n_tok)  # >= capacity
    rerouted_A = jnp.zeros_like(valid_A)
    if spec.policy == "dropless":
        served_A = valid_A
    else:
        served_A = valid_A & (pos_A < capacity)
        if spec.policy == "reroute":
            experts_A, served_A, rerouted_A = reroute(score_NE, experts_A, served_A, valid_A, capacity, k)
            pos_A, _ = queue_positions(experts_A, served_A, spec.num_experts)
    p_NK = jnp.take_along_axis(score_NE, experts_A.reshape(k, n_tok).T, axis=1)
    keep_NK = (served_A if spec.policy == "reroute" else valid_A).reshape(k, n_tok).T
    denom_N = jnp.sum(jnp.where(keep_NK, p_NK, 0.0), axis=1, keepdims=True)
    if spec.renormalize:
        p_NK = p_NK / jnp.where(denom_N > 0, denom_N, 1.0)
    if spec.routed_scale != 1.0:
        p_NK = p_NK * spec.routed_scale
    weights_A = p_NK.T.reshape(-1)

    h_pad_ND = jnp.concatenate([h_ND, jnp.zeros((1, d), h_ND.dtype)], axis=0)

    def one_round(r, carry, size=rows):
        y_ND, computed = carry
        lo = r * size
        in_round_A = served_A & (pos_A >= lo) & (pos_A < lo + size)
        got_AD, n = serve_round(h_pad_ND, experts_A, pos_A - lo, in_round_A, weights_A, w, size, spec)
        return y_ND + _per_token(got_AD, k), computed + n

    carry = (jnp.zeros((n_tok, d), F32), jnp.zeros((), I32))
    if spec.kernel in GROUPED_GEMMS:  # one exchange, no capacity padding, whatever the policy
        got_AD, computed = serve_ragged(h_ND, experts_A, served_A, weights_A, w, spec)
        y_ND = _per_token(got_AD, k)
        exchanged = jnp.sum(served_A, dtype=I32)
    elif spec.policy == "dropless" and rows < n_tok:
        most = jax.lax.pmax(jnp.max(jnp.where(valid_A, pos_A + 1, 0)), spec.round_axes)  # fullest queue anywhere
        if spec.kernel == "batched" or spec.differentiable:  # one round, buffers as long as the
            # fullest queue needs (rounded up to one of a few static sizes)
            fractions = TRAIN_FRACTIONS if spec.differentiable else BATCHED_FRACTIONS
            sizes = row_sizes(n_tok, n_tok * k / spec.num_experts, fractions)  # the last is N
            which = jnp.searchsorted(jnp.array(sizes, I32), most)
            branches = [lambda c, size=size: one_round(0, c, size) for size in sizes]
            y_ND, computed = jax.lax.switch(which, branches, carry)
            exchanged = spec.num_experts * jnp.array(sizes, I32)[which]
        else:  # as many rounds of `rows` as the fullest queue needs
            rounds = (most + rows - 1) // rows
            y_ND, computed = jax.lax.fori_loop(0, rounds, one_round, carry)
            exchanged = rounds * spec.num_experts * rows
    else:  # capacity-limited, or buffers as long as the N tokens (decode): one round, no pmax, since
        # an expert gets at most N rows from a source (a token's k experts are distinct)
        y_ND, computed = one_round(0, carry)
        exchanged = spec.num_experts * rows
    if spec.ffn_axis:
        y_ND = jax.lax.psum_scatter(y_ND, spec.ffn_axis, scatter_dimension=0, tiled=True)
    stats = {
        "load": load_E,  # requested: every valid top-k choice, before drop / reroute
        "served_load": jnp.zeros_like(load_E).at[experts_A].add(served_A.astype(I32)),  # what experts ran
        "dropped": jnp.sum(valid_A & ~served_A, dtype=I32),
        "rerouted": jnp.sum(rerouted_A, dtype=I32),
        "exchanged_rows": jnp.asarray(exchanged, I32),  # padding included (compare with load, the top-k work)
        "computed_rows": computed // spec.ffn_shards,  # expert rows this device ran (F-slices: a share)
        # the load-balancing and z losses' sums over this device's valid tokens (differentiable)
        "prob_sum": jnp.sum(jnp.where(valid_N[:, None], probs_NE, 0.0), axis=0),
        "z_sum": jnp.sum(jnp.where(valid_N, lse_N * lse_N, 0.0)),
    }
    return y_ND, stats
