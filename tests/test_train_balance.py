"""Auxiliary-loss-free balancing of sigmoid routers (DeepSeek-V3; `--bias-update-rate`): the rule on a
hand-built load matrix, the same biases and losses on one device and on 1x2x2x2, a resume that
continues bit-exactly, and the refusal for a router without a correction bias."""

import dataclasses
import json
import os

import numpy as np
import pytest

from helpers import REPO, run_script
from moejax.config.model import load_config
from moejax.errors import UserError
from moejax.models import transformer as model
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout
from moejax.training import data
from moejax.training import trainer as train
from moejax.training.loop import fit

DATA = os.path.join(REPO, "data", "tinyshakespeare.txt")
# configs/glm-balance.yaml made smaller: 4 layers (layer 0 dense, so both stages of pp=2 hold MoE layers
# and stage 0 a dense one too), 8 experts in 4 groups, top-2 within the best 2 groups
CFG = dataclasses.replace(load_config("configs/glm-balance.yaml"), d_model=32, num_heads=2, num_kv_heads=2,
                          head_dim=16, num_experts=8, expert_ffn=16, shared_expert_ffn=16, dense_ffn=32)
HYPER = train.Hyper(steps=3, lr=1e-2, warmup=0, bias_rate=0.01)
BATCH, SEQ, SEED = 8, 16, 1


def _trainer(mesh_text: str, micro: int = 1):
    shape = parse_mesh(mesh_text)
    rs = model.RunSpec(CFG, load_layout("seed"), shape, "float32", microbatches=micro, training=True)
    m = make_mesh(shape)
    return train.Trainer(rs, m, HYPER, BATCH, SEQ), m


def _train_split():
    return data.split(data.read_bytes(DATA), "train")


def _steps(mesh_text: str, micro: int = 1):
    """Three steps from the seed's initial weights: (trainer, losses, metrics, final params as NumPy)."""
    tr, m = _trainer(mesh_text, micro)
    params = model.init_params(CFG, SEED, "float32", m, tr.rs.layout)
    opt = tr.init_opt(params)
    split, records = _train_split(), []
    for step in (1, 2, 3):
        params, opt, metrics = tr.step(params, opt, data.random_windows(split, BATCH, SEQ, SEED, step))
        records.append({k: np.asarray(v) for k, v in metrics.items()})
    return tr, records, {k: np.asarray(v) for k, v in params.items()}


@pytest.fixture(scope="module")
def one_device():
    return _steps("1x1x1x1")


def test_the_rule_moves_each_moe_layers_bias_towards_its_underloaded_experts():
    load_LE = np.array([[9, 0, 0, 0],    # a dense layer: never read (its loads are 0 in a real forward)
                        [5, 1, 1, 1],    # mean 2
                        [2, 2, 2, 2],    # even: sign 0, nothing moves
                        [0, 3, 1, 0]])   # mean 1: expert 2 exactly at the mean
    bias_ME = np.array([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -0.25]], np.float32)
    got = np.asarray(train.balance_bias(bias_ME, load_LE, (1, 2, 3), 0.125))
    want = bias_ME + 0.125 * np.array([[-1, 1, 1, 1], [0, 0, 0, 0], [1, -1, 0, 1]], np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(train.balance_bias(bias_ME, load_LE, (1, 2, 3), 0.0)), bias_ME)
    ratios = np.asarray(train.load_ratios(load_LE, (1, 2, 3)))
    np.testing.assert_allclose(ratios, [2.5, 1.0, 3.0])
    with pytest.raises(UserError, match="must be a number >= 0"):
        train.Hyper(steps=1, lr=1e-3, bias_rate=-0.001)
    with pytest.raises(UserError, match="no correction bias"):
        train.check_bias_rate(load_config("tiny"), 0.001)
    train.check_bias_rate(load_config("tiny"), 0.0)  # off: any router


@pytest.mark.slow  # compiles the 8-device step: about 22 s of CPU
def test_one_device_and_1x2x2x2_give_the_same_biases_and_losses(one_device):
    _, want, want_params = one_device
    bias = want_params["router_bias"]
    assert bias.shape == (3, 8) and np.any(bias != 0)
    # every step moves every entry by -0.01, 0 or +0.01
    assert np.allclose(np.round(bias / 0.01), bias / 0.01, atol=1e-4) and np.max(np.abs(bias)) <= 0.0300001
    _, got, got_params = _steps("1x2x2x2", micro=2)
    for a, b in zip(want, got):
        assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * float(a["loss"])
        np.testing.assert_array_equal(a["load_ratio_per_layer"], b["load_ratio_per_layer"])  # integer loads
        assert (float(a["bias_min"]), float(a["bias_max"])) == (float(b["bias_min"]), float(b["bias_max"]))
    np.testing.assert_allclose(got_params["router_bias"], bias, rtol=0, atol=1e-7)


def test_a_resumed_run_equals_an_unbroken_one_bit_for_bit(one_device, tmp_path):
    tr, want, want_params = one_device
    params = model.init_params(CFG, SEED, "float32", tr.mesh, tr.rs.layout)
    opt = tr.init_opt(params)
    state, log = str(tmp_path / "state"), str(tmp_path / "log.jsonl")
    val = data.spaced_windows(data.split(data.read_bytes(DATA), "val"), 2, SEQ)
    meta = lambda step: train.state_meta(tr.rs, "1x1x1x1", step, SEED, HYPER, {})
    kw = dict(seed=SEED, eval_every=0, save_every=0, log_path=log, state_dir=state, state_meta=meta, t0=0.0)
    fit(tr, params, opt, _train_split(), val, start=0, steps=1, saved=None, **kw)  # saves step 1
    del params, opt
    start, params, opt, _ = train.restore_state(state, tr)
    assert start == 1
    params, _, _, _ = fit(tr, params, opt, _train_split(), val, start=1, steps=3, saved=1, **kw)
    with open(log) as f:
        got = [json.loads(line) for line in f]
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(want, got):
        assert float(a["loss"]) == b["loss"] and float(a["grad_norm"]) == b["grad_norm"]  # bit-equal
        assert (float(a["bias_min"]), float(a["bias_max"])) == (b["bias_min"], b["bias_max"])
        assert len(b["load_ratio_per_layer"]) == 3
    assert len(got[-1]["val_load_ratio_per_layer"]) == 3
    for name, v in want_params.items():
        np.testing.assert_array_equal(np.asarray(params[name]), v, err_msg=name)


def test_a_router_without_a_correction_bias_is_refused_in_one_line(tmp_path):
    r = run_script("train.py", "--config", "tiny", "--data", DATA, "--steps", "1", "--batch", "2", "--seq-len", "8",
                   "--bias-update-rate", "0.001", "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "--bias-update-rate 0.001" in r.stderr and "no correction bias" in r.stderr
    assert not os.path.exists(tmp_path / "run")
