"""Pipeline parallelism: the staggered schedule gives the same logits as one stage, for any M; each
stage holds only its own layers, and the compiled program never moves another stage's weights."""

import re

import jax
import numpy as np
import pytest

from helpers import RTOL, forward, rel_err, setup
from moejax.config.model import load_config
from moejax.models import transformer as model
from moejax.models.params import layer_names
from moejax.inference.generate import put
from moejax.parallel.pipeline import bubble_fraction


@pytest.fixture(scope="module")
def unpipelined():
    tokens = np.random.default_rng(4).integers(0, 256, size=(64, 8)).astype(np.int32)
    return tokens, forward("tiny", "1x1x1x1", tokens)[0]


@pytest.mark.parametrize("mesh, micro", [
    ("1x2x2x2", 1), ("1x2x2x2", 4), ("2x2x1x2", 1), ("2x2x1x2", 4),
    ("1x4x1x2", 1), ("1x4x1x2", 8), ("4x2x4x4", 1), ("4x2x4x4", 4),
])
def test_pipelined_forward_equals_one_stage(mesh, micro, unpipelined):
    tokens, want = unpipelined
    got, stats = forward("tiny", mesh, tokens, microbatches=micro)
    assert rel_err(got, want) <= RTOL
    assert stats["load"].sum() == 4 * tokens.size * 2  # bubble steps count nothing


def test_bubble_fraction():
    assert bubble_fraction(4, 2) == pytest.approx(1 / 5)
    assert bubble_fraction(1, 4) == pytest.approx(3 / 4)


def _layer_bytes_on_device0(params):
    dev = jax.devices()[0]
    total = 0
    for a in jax.tree.leaves({n: params[n] for n in layer_names(load_config("seed"))}):
        total += sum(s.data.nbytes for s in a.addressable_shards if s.device == dev)
    return total


@pytest.mark.parametrize("stages", [2, 4])
def test_each_stage_holds_only_its_own_layers(stages):
    _, _, one = setup("tiny", "1x1x1x1")
    _, _, piped = setup("tiny", f"1x{stages}x1x1")
    assert _layer_bytes_on_device0(piped) * stages == _layer_bytes_on_device0(one)


def test_compiled_pipeline_moves_no_weights_between_stages():
    rs, mesh, params = setup("tiny", "1x2x1x1", microbatches=2)
    tokens = put(mesh, rs.layout, "tokens", np.zeros((4, 8), np.int32))
    lengths = put(mesh, rs.layout, "lengths", np.full((4,), 8, np.int32))
    hlo = model.build(rs, mesh, "forward").lower(params, tokens, lengths).compile().as_text()
    assert "collective-permute" in hlo  # activations move stage to stage
    assert not re.search(r"all-gather(-start)?\(", hlo)
    smallest_layer_weight = 64 * 8 * 8  # wq of one layer (D x H x K elements); activations are smaller
    for line in hlo.splitlines():
        m = re.search(r"= f32\[([\d,]*)\][^ ]* (all-reduce|collective-permute)(-start)?\(", line)
        if m:
            n = int(np.prod([int(d) for d in m.group(1).split(",") if d]))
            dims = [int(d) for d in m.group(1).split(",") if d]
            assert 96 not in dims and n < smallest_layer_weight, line.strip()[:160]
