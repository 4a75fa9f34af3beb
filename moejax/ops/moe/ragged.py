"""The `ragged` MoE kernels (moe.py): every served assignment in one exchange with no capacity
padding. Sorted by expert, the rows travel in one ragged all-to-all (emulated on CPU), the local
experts run as one grouped matmul per expert matrix (`grouped_matmul`: XLA's ragged_dot, Pallas
Mosaic-GPU or tokamax), and a second ragged all-to-all brings them back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.ops import quant as q8
from moejax.ops.layers import F32
from moejax.ops.moe.experts import expert_biases, glu

I32 = jnp.int32
GROUPED_GEMMS = {"ragged": "xla", "ragged-mgpu": "mgpu", "ragged-tokamax": "tokamax"}  # kernel -> grouped matmul
GPU_ONLY_KERNELS = ("ragged-mgpu", "ragged-tokamax")


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axes,
                    platform: str):
    """`jax.lax.ragged_all_to_all` over `axes`, emulated on CPU with a fixed-size all_to_all.

    The emulation has the documented semantics (slice i of `operand` goes to device i //
    (len / devices) and lands at that device's `output_offsets` as sent) and is what the CPU tests
    run; it moves padded [devices, rows, D] buffers, so it saves no bandwidth there."""
    if platform != "cpu":
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axes)
    n_dev, rows = send_sizes.shape[0], operand.shape[0]
    idx_SR = input_offsets[:, None] + jnp.arange(rows)[None, :]
    sent_SR = jnp.arange(rows)[None, :] < send_sizes[:, None]
    buf_SRD = jnp.where(sent_SR[..., None], operand[jnp.clip(idx_SR, 0, rows - 1)], 0)
    got_SRD = jax.lax.all_to_all(buf_SRD, axes, 0, 0, tiled=True)
    at_S = jax.lax.all_to_all(output_offsets, axes, 0, 0, tiled=True)
    dest_SR = jnp.where(jnp.arange(rows)[None, :] < recv_sizes[:, None],
                        at_S[:, None] + jnp.arange(rows)[None, :], output.shape[0])
    return output.at[dest_SR.reshape(-1)].set(got_SRD.reshape(n_dev * rows, -1), mode="drop")


def serve_ragged(x_ND, experts_A, served_A, weights_A, w, spec):
    """Every served assignment in one exchange with no capacity padding: sort by expert, ragged
    all-to-all to the expert's device, one grouped matmul (`ragged_dot`) per expert matrix over
    the local experts, ragged all-to-all back, unsort. Returns [A, D] weighted outputs and rows run.

    Received rows are laid out by source, then local expert; offsets for the way back are the
    forward offsets swapped (what was sent from input_offsets returns to input_offsets)."""
    n_tok, d = x_ND.shape
    E, S, k = spec.num_experts, spec.expert_shards, spec.top_k
    e_loc = E // S
    a = n_tok * k
    key_A = jnp.where(served_A, experts_A, E)  # unserved assignments sort last and are not sent
    order_A = jnp.argsort(key_A, stable=True)
    tokens_A = jnp.tile(jnp.arange(n_tok, dtype=I32), k)
    send_AD = x_ND[tokens_A[order_A]]
    count_E = jnp.zeros((E,), I32).at[experts_A].add(served_A.astype(I32))
    count_SL = count_E.reshape(S, e_loc)
    send_S = count_SL.sum(axis=1)
    in_off_S = _exclusive_cumsum(send_S)
    if S == 1:
        recv_SL, recv_AD, recv_off_S = count_SL, send_AD, in_off_S
        rows = a
    else:
        axes = spec.expert_axes
        recv_SL = jax.lax.all_to_all(count_SL, axes, 0, 0, tiled=True)  # [source, local expert]
        recv_S = recv_SL.sum(axis=1)
        recv_off_S = _exclusive_cumsum(recv_S)
        out_off_S = jax.lax.all_to_all(recv_off_S, axes, 0, 0, tiled=True)  # where my slices land
        rows = S * n_tok * min(k, e_loc)  # the most one device can receive
        recv_AD = ragged_exchange(send_AD, jnp.zeros((rows, d), send_AD.dtype), in_off_S, send_S, out_off_S,
                                  recv_S, axes, spec.platform)
    # group the received rows by local expert (they arrive by source, then expert)
    end_B = (recv_off_S[:, None] + jnp.cumsum(recv_SL, axis=1)).reshape(-1)  # end of each (source, expert) block
    block_R = jnp.searchsorted(end_B, jnp.arange(rows, dtype=I32), side="right")  # S * e_loc past the end
    expert_R = jnp.where(block_R < S * e_loc, block_R % e_loc, e_loc)
    group_order = jnp.argsort(expert_R, stable=True)
    group_L = recv_SL.sum(axis=0)
    rows_RD = recv_AD[group_order]
    out_dtype = F32 if spec.ffn_axis else x_ND.dtype
    cdt = x_ND.dtype
    expert_R = jnp.minimum(expert_R[group_order], e_loc - 1)  # each grouped row's local expert

    def grouped(x_RX, w_LXY):  # int8 weights: weight-only under either matmul form (scales per row's expert)
        if isinstance(w_LXY, (q8.Dequant, q8.Dynamic)):
            return grouped_matmul(x_RX, w_LXY.q.astype(cdt), group_L, impl) * w_LXY.s[expert_R, 0]
        return grouped_matmul(x_RX, w_LXY, group_L, impl)

    impl = GROUPED_GEMMS[spec.kernel]
    g_RF, u_RF = grouped(rows_RD, w["w1"]), grouped(rows_RD, w["w3"])
    bias = expert_biases(w, spec.expert_bias, spec.ffn_axis)
    if bias is not None:  # each row's expert's
        g_RF, u_RF = g_RF + bias[0][expert_R], u_RF + bias[1][expert_R]
    y_RD = grouped(glu(g_RF.astype(cdt), u_RF.astype(cdt), spec.act), w["w2"])
    if bias is not None:
        y_RD = y_RD + bias[2][expert_R]
    y_RD = jnp.where((jnp.arange(rows) < jnp.sum(group_L))[:, None], y_RD, 0.0)  # rows past the groups
    y_RD = jnp.zeros_like(y_RD).at[group_order].set(y_RD).astype(out_dtype)  # back to arrival order
    if S == 1:
        back_AD = y_RD
    else:
        back_AD = ragged_exchange(y_RD, jnp.zeros((a, d), out_dtype), recv_off_S, recv_S,
                                  jax.lax.all_to_all(in_off_S, spec.expert_axes, 0, 0, tiled=True), send_S,
                                  spec.expert_axes, spec.platform)
    got_AD = jnp.zeros((a, d), out_dtype).at[order_A].set(back_AD)
    return got_AD.astype(F32) * jnp.where(served_A, weights_A, 0.0)[:, None], jnp.sum(group_L)


def grouped_matmul(x_RX, w_GXY, group_G, impl: str):
    """Rows grouped by expert (the first group_G[0] rows for expert 0, ...) times their expert's
    matrix, as float32 [R, Y]; rows past the groups are undefined. 16-bit inputs give a 16-bit
    product (float32 accumulation inside each kernel), the only form XLA hands to cuDNN's grouped
    GEMM, per its source (cuDNN >= 9.22, sm80+; not yet seen on a GPU); with float32 results it
    lowers `ragged_dot` to a dense matmul over every group.
      xla      jax.lax.ragged_dot
      mgpu     jax.experimental.pallas.ops.gpu.ragged_dot_mgpu (Hopper); block sizes from
               MOEJAX_MGPU_BLOCKS="block_m,block_n,block_k,max_concurrent_steps,grid_block_n"
      tokamax  tokamax.ragged_dot(..., implementation="mosaic") (pip install tokamax; jax >= 0.11)"""
    out = x_RX.dtype if x_RX.dtype in (jnp.bfloat16, jnp.float16) else F32
    if impl == "xla":
        return jax.lax.ragged_dot(x_RX, w_GXY, group_G, preferred_element_type=out).astype(F32)
    if impl == "mgpu":
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

        return ragged_dot_mgpu.ragged_dot(x_RX, w_GXY, group_sizes=group_G,
                                          **mgpu_blocks(x_RX.shape[1], w_GXY.shape[2])).astype(F32)
    import tokamax

    return tokamax.ragged_dot(x_RX, w_GXY, group_sizes=group_G, implementation="mosaic").astype(F32)


def mgpu_blocks(k: int, n: int) -> dict:
    """Block sizes for the Mosaic-GPU kernel: MOEJAX_MGPU_BLOCKS, else 128 x 128 x 64 tiles, 4
    pipelined steps, each shrunk to divide the matmul's K and N."""
    import os

    given = os.environ.get("MOEJAX_MGPU_BLOCKS")
    bm, bn, bk, steps, gbn = map(int, given.split(",")) if given else (128, 128, 64, 4, 1)
    if not given:
        while n % (bn * gbn) and bn > 16:
            bn //= 2
        while k % bk and bk > 16:
            bk //= 2
    return dict(block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps, grid_block_n=gbn)
