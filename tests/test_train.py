"""Training: the loss and its gradients equal transformers', every mesh's gradients and optimizer step
equal one device's, the optimizer state is split over dp, and the data windows are reproducible."""

import os

import jax
import numpy as np
import pytest

from helpers import FIXTURE, REPO, forward, host_params
from moejax.training import data
from moejax.checkpoint import hf
from moejax.models import transformer as model
from moejax.training import trainer as train
from moejax.config.model import load_config
from moejax.inference.generate import put
from moejax.training.loss import Scorer
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout

GRAD_RTOL = 1e-4  # per tensor: max |got - want| / max |want| (the bound against torch autograd)
MESH_RTOL = 1e-5  # float32, sharded against one device


def _rel(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _run(cfg, mesh_text, micro=1, layout="seed", **kw):
    shape = parse_mesh(mesh_text)
    return model.RunSpec(cfg, load_layout(layout), shape, "float32", microbatches=micro, training=True, **kw), \
        make_mesh(shape)


def _placed(params, rs, mesh):
    sh = model.param_shardings(mesh, rs.layout, rs.cfg)
    return {k: jax.device_put(np.asarray(v, np.float32), sh[k]) for k, v in params.items()}


def _loss_and_grads(params, rs, mesh, tokens, lengths, balance="hf"):
    scorer = Scorer(rs, mesh, balance=balance)
    b = -(-len(tokens) // rs.batch_multiple) * rs.batch_multiple  # pad with empty rows
    toks = np.zeros((b, tokens.shape[1]), np.int32)
    toks[: len(tokens)] = tokens
    lens = np.zeros((b,), np.int32)
    lens[: len(tokens)] = lengths
    fn = jax.jit(jax.value_and_grad(scorer.loss_of, has_aux=True))
    (_, metrics), grads = fn(_placed(params, rs, mesh), put(mesh, rs.layout, "tokens", toks),
                             put(mesh, rs.layout, "lengths", lens))
    return {k: float(v) for k, v in metrics.items()}, {k: np.asarray(v) for k, v in grads.items()}


@pytest.fixture(scope="module")
def hf_reference():
    cfg, params = hf.read_hf(FIXTURE)
    return cfg, params, np.load(os.path.join(FIXTURE, "train_reference.npz"))


@pytest.mark.parametrize("case, mesh, micro", [("full", "1x1x1x1", 1), ("masked", "1x1x1x1", 1),
                                               ("masked", "1x2x2x2", 2)])
def test_loss_and_gradients_equal_transformers(hf_reference, case, mesh, micro):
    cfg, params, ref = hf_reference
    tokens = ref[f"{case}_input_ids"]
    lengths = ref["masked_lengths"] if case == "masked" else np.full((len(tokens),), tokens.shape[1])
    rs, m = _run(cfg, mesh, micro)
    metrics, grads = _loss_and_grads(params, rs, m, tokens, lengths)
    assert np.float32(cfg.router_aux_loss_coef) == ref["router_aux_loss_coef"]  # read from config.json
    for key in ("ce_loss", "aux_loss", "loss"):
        want = float(ref[f"{case}_{key}"])
        assert abs(metrics[key] - want) <= 1e-5 * abs(want), (key, metrics[key], want)
    assert metrics["predicted_tokens"] == int(np.sum(np.asarray(lengths) - 1))
    for name, g in grads.items():
        assert _rel(g, ref[f"{case}_grad/{name}"]) <= GRAD_RTOL, name


MESHES = [("1x2x2x2", 2), ("2x2x1x2", 2), ("1x1x2x4", 2)]


@pytest.fixture(scope="module")
def tiny_batch():
    return np.random.default_rng(3).integers(0, 256, size=(8, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def one_device(tiny_batch):
    cfg = load_config("tiny")
    rs, m = _run(cfg, "1x1x1x1")
    metrics, grads = _loss_and_grads(host_params("tiny"), rs, m, tiny_batch, np.full((8,), 12))
    return metrics, grads, _one_step(cfg, "1x1x1x1", 1, tiny_batch)


def _one_step(cfg, mesh_text, micro, tokens):
    rs, m = _run(cfg, mesh_text, micro)
    tr = train.Trainer(rs, m, train.Hyper(steps=10, lr=1e-2, warmup=0), len(tokens), tokens.shape[1])
    params = _placed(host_params("tiny"), rs, m)
    params, _, metrics = tr.step(params, tr.init_opt(params), tokens)
    return {k: np.asarray(v) for k, v in params.items()}, float(metrics["loss"]), tr


@pytest.mark.parametrize("mesh, micro", MESHES)
def test_gradients_and_one_optimizer_step_equal_one_device(one_device, tiny_batch, mesh, micro):
    cfg = load_config("tiny")
    want_metrics, want_grads, (want_params, want_loss, _) = one_device
    rs, m = _run(cfg, mesh, micro)
    metrics, grads = _loss_and_grads(host_params("tiny"), rs, m, tiny_batch, np.full((8,), 12))
    assert abs(metrics["loss"] - want_metrics["loss"]) <= MESH_RTOL * want_metrics["loss"]
    for name in want_grads:
        assert _rel(grads[name], want_grads[name]) <= MESH_RTOL, name
    params, loss, tr = _one_step(cfg, mesh, micro, tiny_batch)
    assert abs(loss - want_loss) <= MESH_RTOL * want_loss
    # AdamW's first update is lr * g / (|g| + eps) per entry (after clipping g by c): an entry's
    # gradient error delta moves it by at most lr * c * delta / (c |g| + eps), which is what the
    # update may differ by once the gradients agree to MESH_RTOL of each tensor's largest entry
    c = min(1.0, 1.0 / np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in want_grads.values())))
    for name in want_params:
        g = want_grads[name].astype(np.float64)
        bound = 1e-2 * c * MESH_RTOL * np.max(np.abs(g)) / (c * np.abs(g) + 1e-8) + 1e-9
        diff = np.abs(params[name].astype(np.float64) - want_params[name])
        assert np.all(diff <= bound), (name, float(np.max(diff / bound)))
    if rs.shape.dp > 1:  # ZeRO-1: Adam's moments are split over dp as well
        mem = tr.bytes_per_device()
        opt_specs = {str(s.spec) for s in jax.tree.leaves(tr.opt_sh)}
        assert any("dp" in s for s in opt_specs)
        assert mem["optimizer_bytes_per_device"] < 2 * mem["param_bytes_per_device"]


def test_ep_tp_layout_and_remat_give_the_same_gradients(one_device, tiny_batch):
    cfg = load_config("tiny")
    _, want, _ = one_device
    for mesh, layout, remat in (("1x2x2x2", "ep-tp", False), ("1x2x2x1", "seed", True)):
        rs, m = _run(cfg, mesh, 2, layout, remat=remat)
        _, grads = _loss_and_grads(host_params("tiny"), rs, m, tiny_batch, np.full((8,), 12))
        for name in want:
            assert _rel(grads[name], want[name]) <= MESH_RTOL, (mesh, layout, name)


@pytest.mark.parametrize("policy", ["drop", "reroute"])
def test_drop_and_reroute_train(tiny_batch, policy):
    cfg = load_config("tiny")
    rs, m = _run(cfg, "1x1x2x2", capacity_factor=1.0, policy=policy)
    tr = train.Trainer(rs, m, train.Hyper(steps=10, lr=1e-2, warmup=0), 8, 12)
    params = _placed(host_params("tiny"), rs, m)
    opt = tr.init_opt(params)
    losses = []
    for _ in range(4):
        params, opt, metrics = tr.step(params, opt, tiny_batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses


def test_per_layer_balance_loss_is_the_mean_of_each_layers_own():
    cfg = load_config("tiny")
    rs, m = _run(cfg, "1x2x1x1")
    tokens = np.random.default_rng(5).integers(0, 256, size=(4, 10)).astype(np.int32)
    metrics, _ = _loss_and_grads(host_params("tiny"), rs, m, tokens, np.full((4,), 10), balance="per-layer")
    _, stats = forward("tiny", "1x1x1x1", tokens)
    want = np.mean([cfg.num_experts * np.sum(stats["load"][l] / tokens.size * stats["prob_sum"][l] / tokens.size)
                    for l in range(cfg.num_layers)])
    assert abs(metrics["aux_loss_per_layer"] - want) <= 1e-5 * want
    assert abs(metrics["loss"] - metrics["ce_loss"] - cfg.router_aux_loss_coef * want) <= 1e-6


def test_learning_rate_warms_up_linearly_then_follows_the_cosine():
    h = train.Hyper(steps=110, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lr = train.learning_rate(h)
    assert np.isclose(float(lr(0)), 1e-3 / 11) and np.isclose(float(lr(9)), 1e-3 * 10 / 11)
    assert np.isclose(float(lr(10)), 1e-3)
    assert np.isclose(float(lr(60)), 1e-4 + 0.5 * 0.9e-3)  # halfway through the cosine
    assert np.isclose(float(lr(110)), 1e-4)


def test_weight_decay_skips_norms_and_moments_are_split_over_dp():
    rs, m = _run(load_config("tiny"), "2x1x1x2")
    tr = train.Trainer(rs, m, train.Hyper(steps=5, lr=1e-2, warmup=0, weight_decay=0.5), 4, 8)
    for sh, a in zip(jax.tree.leaves(tr.opt_sh), jax.tree.leaves(tr.opt_abstract)):
        assert a.ndim == 0 or "dp" in str(sh.spec), sh.spec  # every moment of the tiny config splits
    params = {k: np.asarray(v) for k, v in host_params("tiny").items()}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    updates, _ = tr.tx.update(zeros, tr.tx.init(params), params)
    for name, u in updates.items():  # with zero gradients only the decay moves a parameter
        decay = 0.0 if name.endswith("norm") else -1e-2 / 1 * 0.5
        np.testing.assert_allclose(np.asarray(u), decay * params[name], rtol=1e-5, atol=1e-9, err_msg=name)


def test_training_windows_are_a_function_of_seed_and_step():
    text = data.read_bytes(os.path.join(REPO, "data", "tinyshakespeare.txt"))
    tr, va = data.split(text, "train"), data.split(text, "val")
    assert (len(tr), len(va)) == (1_003_854, 111_540)  # nanoGPT shakespeare_char's split
    a = data.random_windows(tr, 4, 16, seed=1, step=7)
    assert np.array_equal(a, data.random_windows(tr, 4, 16, seed=1, step=7))
    assert not np.array_equal(a, data.random_windows(tr, 4, 16, seed=1, step=8))
    assert bytes(a[0].astype(np.uint8)) in bytes(tr)
    w = data.consecutive_windows(np.arange(50, dtype=np.uint8), 16)
    assert w.shape == (3, 16) and w[2, 0] == 32  # the partial last window is dropped


def test_router_aux_loss_coef_travels_through_hf_config(tmp_path):
    import dataclasses
    import json

    cfg = dataclasses.replace(load_config("tiny"), router_aux_loss_coef=0.25)
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg)))
    assert json.loads((tmp_path / "config.json").read_text())["router_aux_loss_coef"] == 0.25
    assert hf.config_from_hf(str(tmp_path)).router_aux_loss_coef == 0.25
