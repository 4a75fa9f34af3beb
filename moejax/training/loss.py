"""The training loss on the 4D mesh, exactly as Hugging Face `MixtralForCausalLM` defines it.

    loss = CE + router_aux_loss_coef x aux + z_coef x z

CE: next-token cross-entropy in float32, position t predicting token t+1, mean over the predicted
tokens of every sequence (t + 1 < its length: padding is ignored). aux: `load_balancing_loss_func`
with every MoE layer's router rows taken together: E x sum_e (tokens routed to e / rows) x (mean
router probability of e), where rows = MoE layers x valid tokens and a token counts once per top-k
slot (2.0 for top-2 when routing is perfectly even). HF's sum over layers treats expert e of every
layer as one expert (transformers #28255), so layers can stay skewed in opposite directions while
aux sits at its minimum; `balance="per-layer"` trains on the mean over layers of each layer's own
aux instead (Switch / GShard), and both are reported. z: mean over the same rows of
logsumexp(router logits)^2 (ST-MoE's router z-loss; off unless z_coef > 0).

The forward is the serving program's (`model._device_program` in `forward` mode: tp attention,
the expert all-to-all, the staggered pipeline); this file only adds the loss on top, inside the
same `shard_map`. `jax.grad` is taken outside it, so every collective is transposed by JAX.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax.models import transformer as model
from moejax.models.params import row
from moejax.inference.generate import put, round_up
from moejax.errors import UserError
from moejax.ops.layers import F32

METRICS = ("loss", "ce_loss", "aux_loss", "aux_loss_per_layer", "z_loss", "max_load_ratio", "predicted_tokens")
BALANCE = ("hf", "per-layer")  # which load-balancing loss the total uses


def _cross_entropy_sum(logits_BTV, targets_BT, mask_BT, vocab_axis):
    """Summed CE of the masked positions; logits may hold only this device's vocabulary shard."""
    logits_BTV = logits_BTV.astype(F32)
    m_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
    if vocab_axis is not None:
        m_BT = jax.lax.pmax(m_BT, vocab_axis)
    sum_BT = jnp.sum(jnp.exp(logits_BTV - m_BT[..., None]), axis=-1)
    v_loc = logits_BTV.shape[-1]
    local_BT = targets_BT - (jax.lax.axis_index(vocab_axis) * v_loc if vocab_axis is not None else 0)
    hit_BT = (local_BT >= 0) & (local_BT < v_loc)
    target_BT = jnp.take_along_axis(logits_BTV, jnp.clip(local_BT, 0, v_loc - 1)[..., None], axis=-1)[..., 0]
    target_BT = jnp.where(hit_BT, target_BT, 0.0)
    if vocab_axis is not None:
        sum_BT = jax.lax.psum(sum_BT, vocab_axis)
        target_BT = jax.lax.psum(target_BT, vocab_axis)
    ce_BT = jnp.log(sum_BT) + m_BT - target_BT
    return jnp.sum(jnp.where(mask_BT, ce_BT, 0.0))


def _device_loss(params, tokens_BT, lengths_B, *, rs: model.RunSpec, z_coef: float, balance: str, loads: bool):
    """What one device runs: the model's forward, then the loss terms summed over the mesh (and,
    with `loads`, this stage's per-layer expert loads [L/pp, E], summed over the token axes)."""
    cfg, lay = rs.cfg, rs.layout
    logits_BTV, _, stats = model._device_program(params, tokens_BT, lengths_B, None, rs=rs, mode="forward")
    vocab_axis = "tp" if lay.mesh_axes("vocab") and rs.shape.tp > 1 else None
    t = tokens_BT.shape[1]
    mask_BT = jnp.arange(t - 1)[None, :] + 1 < lengths_B[:, None]
    ce_sum = _cross_entropy_sum(logits_BTV[:, :-1], tokens_BT[:, 1:], mask_BT, vocab_axis)
    batch_axes = lay.mesh_axes("batch")
    predicted = jnp.sum(mask_BT, dtype=jnp.int32)
    tokens = jnp.sum(jnp.clip(lengths_B, 0, t), dtype=jnp.int32)
    if batch_axes:
        ce_sum, predicted, tokens = jax.lax.psum((ce_sum, predicted, tokens), batch_axes)
    # router statistics are already summed over the devices that see distinct tokens; add the
    # stages' layers together (HF concatenates every layer's router rows)
    load_LE, prob_LE = stats["load"].astype(F32), stats["prob_sum"]
    load_E, prob_E, z_sum = load_LE.sum(0), prob_LE.sum(0), stats["z_sum"].sum()
    tok = jnp.maximum(tokens, 1).astype(F32)
    aux_layers = cfg.num_experts * jnp.sum((load_LE / tok) * (prob_LE / tok))  # this stage's layers
    mean_L = load_LE.mean(axis=1)
    ratio = jnp.max(jnp.where(mean_L > 0, load_LE.max(axis=1) / jnp.maximum(mean_L, 1e-9), 0.0))
    if rs.shape.pp > 1:
        load_E, prob_E, z_sum, aux_layers = jax.lax.psum((load_E, prob_E, z_sum, aux_layers), "pp")
        ratio = jax.lax.pmax(ratio, "pp")
    moe_layers = len(cfg.moe_layers)  # HF pools the router rows of the MoE layers only
    rows = moe_layers * tok
    aux = cfg.num_experts * jnp.sum((load_E / rows) * (prob_E / rows))
    aux_per_layer = aux_layers / moe_layers
    z = z_sum / rows
    ce = ce_sum / jnp.maximum(predicted, 1).astype(F32)
    loss = ce + cfg.router_aux_loss_coef * (aux if balance == "hf" else aux_per_layer) + z_coef * z
    metrics = {"loss": loss, "ce_loss": ce, "aux_loss": aux, "aux_loss_per_layer": aux_per_layer, "z_loss": z,
               "max_load_ratio": ratio, "predicted_tokens": predicted}
    if loads:
        metrics["load"] = stats["load"]
    return loss, metrics


def build_loss(rs: model.RunSpec, mesh, z_coef: float = 0.0, balance: str = "hf", loads: bool = False):
    """loss(serving_params, tokens_BT, lengths_B) -> (loss, metrics), all replicated scalars; with
    `loads`, metrics also hold "load": every layer's expert loads [L, E] int32 (top-k assignments of
    valid tokens; dense layers 0), which the balancing rule of sigmoid routers reads (trainer.py).
    Differentiable with `jax.grad` in the parameters; B must be a multiple of rs.batch_multiple."""
    if balance not in BALANCE:
        raise UserError(f"load-balancing loss {balance!r}; valid: {', '.join(BALANCE)}")
    lay = rs.layout
    body = functools.partial(_device_loss, rs=rs, z_coef=float(z_coef), balance=balance, loads=loads)
    out_specs = (P(), {k: P() for k in METRICS} | ({"load": lay.act_spec("moe_counts")} if loads else {}))
    return jax.shard_map(body, mesh=mesh, in_specs=(model.serving_specs(rs), lay.act_spec("tokens"),
                                                     lay.act_spec("lengths")),
                         out_specs=out_specs, check_vma=False)


class Scorer:
    """The loss of stacked parameters (any dtype; cast to the run's) on host token windows."""

    def __init__(self, rs: model.RunSpec, mesh, z_coef: float = 0.0, balance: str = "hf", loads: bool = False):
        self.rs, self.mesh, self.loads = rs, mesh, loads
        self.loss = build_loss(rs, mesh, z_coef, balance, loads)
        self._compiled = {}

    def loss_of(self, params, tokens_BT, lengths_B):
        """Traceable: cast, split into the serving layout, run the sharded loss. A correction bias
        stays float32, as the router adds it: in bfloat16 it would be rounded to 2^-10 (about
        0.001, the size of DeepSeek-V3's balancing steps) once |bias| reaches 0.125."""
        keep = {n for n in params if row(self.rs.cfg, n).f32}  # a sigmoid router's weight and bias stay float32
        cast = {n: v if n in keep else v.astype(self.rs.dtype) for n, v in params.items()}
        return self.loss(model.to_serving(cast, self.rs), tokens_BT, lengths_B)

    def evaluate(self, params, windows: np.ndarray, lengths: np.ndarray | None = None) -> dict:
        """The loss terms of the windows [n, T] scored as one batch (padded with empty rows)."""
        n, t = windows.shape
        b = round_up(n, self.rs.batch_multiple)
        toks = np.zeros((b, t), np.int32)
        toks[:n] = windows
        lens = np.zeros((b,), np.int32)
        lens[:n] = t if lengths is None else lengths
        fn = self._compiled.get((b, t))
        if fn is None:
            fn = self._compiled[(b, t)] = jax.jit(self.loss_of)
        lay = self.rs.layout
        _, metrics = fn(params, put(self.mesh, lay, "tokens", toks), put(self.mesh, lay, "lengths", lens))
        out = {k: float(v) for k, v in metrics.items() if k != "load"}
        if "load" in metrics:  # each MoE layer's max / mean expert load
            load_ME = np.asarray(metrics["load"], np.float64)[list(self.rs.cfg.moe_layers)]
            mean_M = load_ME.mean(axis=1)
            out["load_ratio_per_layer"] = [float(m and x / m) for x, m in zip(load_ME.max(axis=1), mean_M)]
        return out
