"""The training loop: steps over (seed, step)-drawn windows, validation, the step log, train states.

Step s trains on windows drawn from (seed, s) alone, so a resumed run sees exactly the batches of
an unbroken one. A non-finite loss or gradient norm stops the run before anything of that step is
saved, with the last saved step named.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax

from moejax.errors import UserError
from moejax.training import data
from moejax.training import trainer as train


def fit(trainer: train.Trainer, params, opt_state, train_split, val, *, start: int, steps: int, seed: int,
        eval_every: int, save_every: int, log_path: str, state_dir: str, state_meta: Callable[[int], dict],
        saved: int | None, t0: float, on_step: Callable[[int, dict], None] | None = None):
    """Steps start + 1 .. steps. Returns (params, opt_state, the last step's record, tokens/s per step).
    Validates every `eval_every` steps and at the end; saves a train state every `save_every` steps
    and at the end; appends one JSON record per step to `log_path` (`wall_s` counts from `t0`)."""
    batch, seq_len = trainer.batch, trainer.seq_len
    record, rates = {}, []
    hyper = trainer.hyper
    tick = time.time()
    for step in range(start + 1, steps + 1):
        tokens = data.random_windows(train_split, batch, seq_len, seed, step)
        params, opt_state, metrics = trainer.step(params, opt_state, tokens)
        metrics = {k: v.tolist() if v.ndim else float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        rate = batch * seq_len / (now - tick)
        tick = now
        rates.append(rate)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            kept = f"step {saved} in {state_dir}" if saved is not None else "none was saved"
            raise UserError(f"step {step}: loss {metrics['loss']} / gradient norm {metrics['grad_norm']} is not "
                            f"finite; training stopped and nothing from this step on was saved (last checkpoint: {kept}); "
                            f"try a lower --lr (now {hyper.lr})")
        record = {"step": step, **{k: metrics[k] for k in ("loss", "ce_loss", "aux_loss", "aux_loss_per_layer",
                                                             "z_loss", "grad_norm", "max_load_ratio",
                                                             "load_ratio_per_layer")},
                  **{k: metrics[k] for k in ("bias_min", "bias_max") if k in metrics},  # a correction bias's range
                  "lr": float(train.learning_rate(hyper)(step - 1)), "tokens_per_s": rate}
        if (eval_every and step % eval_every == 0) or step == steps:
            val_metrics = trainer.evaluate(params, val)
            record["val_loss"] = val_metrics["ce_loss"]
            record["val_max_load_ratio"] = val_metrics["max_load_ratio"]
            record["val_load_ratio_per_layer"] = val_metrics["load_ratio_per_layer"]
            tick = time.time()  # evaluation time does not count against the step rate
        record["wall_s"] = time.time() - t0
        train.append_jsonl(log_path, record)
        if on_step:
            on_step(step, record)
        if (save_every and step % save_every == 0) or step == steps:
            train.save_state(state_dir, step, params, opt_state, state_meta(step))
            saved = step
            tick = time.time()
    return params, opt_state, record, rates
