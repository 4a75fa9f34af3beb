"""Expert parallelism: dropless sharded MoE equals the reference on every mesh and layout; drop and
reroute do exactly what they promise on routing built to overflow; the HLO has real all-to-alls."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import reference
from helpers import RTOL, forward, host_params, rel_err, setup
from moejax.models import transformer as model
from moejax.config.model import load_config
from moejax.inference.generate import put
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.ops.moe.dispatch import BATCHED_FRACTIONS, MoeSpec, moe_block, row_sizes
from moejax.ops.moe.ragged import ragged_exchange


@pytest.fixture(scope="module")
def case():
    tokens = np.random.default_rng(2).integers(0, 256, size=(16, 10)).astype(np.int32)
    return tokens, reference.forward(host_params("tiny"), load_config("tiny"), tokens)


@pytest.mark.parametrize("mesh", ["1x1x1x8", "1x1x2x4", "1x1x4x2", "2x1x2x2", "4x2x4x4"])
def test_dropless_sharded_moe_equals_reference_seed_layout(mesh, case):
    tokens, want = case
    got, stats = forward("tiny", mesh, tokens)
    assert rel_err(got, want) <= RTOL
    assert stats["dropped"].sum() == 0 and stats["load"].sum() == 4 * tokens.size * 2


@pytest.mark.parametrize("mesh", ["1x1x2x4", "2x1x2x2", "4x2x4x4"])
def test_dropless_sharded_moe_equals_reference_ep_tp_layout(mesh, case):
    tokens, want = case
    got, stats = forward("tiny", mesh, tokens, layout="ep-tp")
    assert rel_err(got, want) <= RTOL
    assert stats["load"].sum() == 4 * tokens.size * 2  # tp ranks share tokens: counted once


@pytest.mark.parametrize("mesh,layout", [("1x1x1x1", "seed"), ("1x1x2x4", "seed"), ("2x1x2x2", "seed"),
                                         ("4x2x4x4", "seed"), ("1x1x2x4", "ep-tp")])
def test_ragged_kernel_equals_reference(mesh, layout, case):
    # on CPU the ragged all-to-all is emulated with the documented semantics (moe_ragged.ragged_exchange);
    # the grouped matmul is jax.lax.ragged_dot itself
    tokens, want = case
    got, stats = forward("tiny", mesh, tokens, layout=layout, moe_kernel="ragged")
    assert rel_err(got, want) <= RTOL
    assert stats["load"].sum() == 4 * tokens.size * 2
    if layout == "seed":  # exactly the top-k rows run: no capacity padding
        assert stats["computed_rows"].sum() == stats["load"].sum()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the exact-row GPU kernels (cuDNN's grouped GEMM "
                    "through ragged_dot, Pallas Mosaic-GPU, tokamax) run on a GPU only; scripts/bench_gpu.sh runs "
                    "this before timing, and test_ragged_kernel_equals_reference covers the kernel's logic on CPU")
@pytest.mark.parametrize("kernel", ["ragged", "ragged-mgpu", "ragged-tokamax"])
def test_gpu_grouped_gemm_kernels_stay_within_bfloat16_rounding_of_the_reference(kernel, case):
    """In bfloat16 against the reference on the same bfloat16-rounded weights, with the bound of
    test_model's bfloat16 test ((sqrt(2 L) + 1) u per position); exactly the top-k rows run."""
    import ml_dtypes

    from helpers import rel_err_per_row

    if kernel == "ragged-tokamax":
        pytest.importorskip("tokamax", reason="tokamax is not installed on this GPU machine")
    tokens = case[0][:4]
    cfg = load_config("tiny")
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float64) for k, v in host_params("tiny").items()}
    got, stats = forward("tiny", "1x1x1x1", tokens, moe_kernel=kernel, dtype="bfloat16")
    assert rel_err_per_row(got, reference.forward(rounded, cfg, tokens)) <= (np.sqrt(2 * cfg.num_layers) + 1) * 2.0 ** -8
    assert stats["computed_rows"].sum() == stats["load"].sum()


@pytest.mark.parametrize("mesh,layout", [("1x1x1x1", "seed"), ("2x1x2x2", "seed"), ("4x2x4x4", "seed"),
                                         ("1x1x2x4", "ep-tp")])
def test_batched_kernel_equals_reference(mesh, layout, case):
    # every buffer row is computed (empty slots hold the zero row): no per-expert branches
    tokens, want = case
    got, stats = forward("tiny", mesh, tokens, layout=layout, moe_kernel="batched")
    assert rel_err(got, want) <= RTOL
    assert stats["load"].sum() == 4 * tokens.size * 2 and stats["dropped"].sum() == 0
    if layout == "seed":  # all 16 experts' whole buffers: at least the top-k rows
        assert stats["computed_rows"].sum() >= stats["load"].sum()
        assert stats["computed_rows"].sum() % 16 == 0


def test_row_sizes_step_by_a_quarter_of_the_mean_and_end_at_the_buffer():
    # seed prefill on one device, capacity factor 2: 256-row buffers, 128 rows per expert on average
    assert row_sizes(256, 128.0) == [64, 128, 160, 192, 256]
    assert row_sizes(160, 128.0) == [64, 128, 160]  # capacity factor 1.25: capped at the buffer
    assert row_sizes(8, 1.0) == [2, 8]  # decode, 8 tokens: never fewer than MIN_DOT_ROWS
    assert row_sizes(40, 7.5) == [4, 8, 10, 12, 40]  # ceil(f x m)


def _random_routing():
    """1,024 tokens and tiny-config MoE weights with a random router: top-2 of 16 experts puts
    128 +- ~11 rows on each expert."""
    cfg = load_config("tiny")
    rng = np.random.default_rng(0)
    d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_ffn
    w = {"moe_norm": np.ones(d, np.float32), "router": rng.standard_normal((d, e)).astype(np.float32),
         **{n: 0.1 * rng.standard_normal((e,) + s).astype(np.float32)
            for n, s in (("w1", (d, f)), ("w3", (d, f)), ("w2", (f, d)))}}
    return rng.standard_normal((1024, d)).astype(np.float32), w


def test_even_routing_computes_at_most_a_quarter_more_than_the_top_k_rows():
    x, w = _random_routing()
    _, stats = _run_moe(x, w, "dropless", 2.0, k=2)
    assert stats["load"].sum() == 2048 and stats["dropped"] == 0
    assert 1.0 <= stats["computed_rows"] / 2048 <= 1.25


def test_ragged_exchange_emulation_matches_the_documented_example():
    # the example of jax.lax.ragged_all_to_all's docstring, on an axis of 2 devices
    mesh = make_mesh(parse_mesh("1x1x1x2"))
    operand = np.array([[1, 2, 2], [3, 4, 0]], np.float32)
    args = dict(in_off=[[0, 1], [0, 1]], send=[[1, 2], [1, 1]], out_off=[[0, 0], [1, 2]], recv=[[1, 1], [2, 1]])
    f = jax.jit(jax.shard_map(
        lambda x, a, b, c, d: ragged_exchange(x[0, :, None], jnp.zeros((4, 1), x.dtype), a[0], b[0], c[0], d[0],
                                              ("ep",), "cpu")[None, :, 0],
        mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=False))
    got = f(operand, *(np.array(v, np.int32) for v in args.values()))
    np.testing.assert_array_equal(np.asarray(got), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_seed_layout_hlo_has_all_to_all_and_never_gathers_expert_weights():
    rs, mesh, params = setup("tiny", "4x2x4x4")
    tokens = put(mesh, rs.layout, "tokens", np.zeros((16, 10), np.int32))
    lengths = put(mesh, rs.layout, "lengths", np.full((16,), 10, np.int32))
    hlo = model.build(rs, mesh, "forward").lower(params, tokens, lengths).compile().as_text()
    assert "all-to-all" in hlo
    cfg = rs.cfg
    for line in hlo.splitlines():
        m = re.search(r"= \S+\[([\d,]*)\][^ ]* (all-gather|all-reduce|collective-permute)(-start)?\(", line)
        if m:
            dims = [int(d) for d in m.group(1).split(",") if d]
            assert cfg.expert_ffn not in dims, f"a collective moves expert weights: {line.strip()[:160]}"


# ---- crafted routing: 4 experts, router = 10 * identity, token scores set each token's ranking ----

PREFS = [[0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 3, 2], [0, 1, 3, 2], [0, 2, 3, 1],
         [1, 0, 2, 3], [2, 0, 1, 3], [3, 0, 1, 2]]


def _crafted(prefs):
    rng = np.random.default_rng(3)
    x = np.zeros((len(prefs), 4), np.float32)
    for t, order in enumerate(prefs):
        x[t, order] = [4.0, 3.0, 2.0, 1.0]
    w = {"moe_norm": np.ones(4, np.float32), "router": 10 * np.eye(4, dtype=np.float32),
         "w1": rng.normal(size=(4, 4, 6)).astype(np.float32), "w3": rng.normal(size=(4, 4, 6)).astype(np.float32),
         "w2": rng.normal(size=(4, 6, 4)).astype(np.float32)}
    return x, w


def _expert_out(x, w, t, e):
    h = x[t].astype(np.float64) / np.sqrt(np.mean(x[t].astype(np.float64) ** 2) + 1e-5)
    g = h @ w["w1"][e]
    return ((g / (1 + np.exp(-g))) * (h @ w["w3"][e])) @ w["w2"][e]


def _run_moe(x, w, policy, cf, k=1, kernel="buffers"):
    spec = MoeSpec(num_experts=w["router"].shape[1], top_k=k, policy=policy, capacity_factor=cf,
                   expert_axes=("ep",), expert_shards=1, ffn_axis=None, ffn_shards=1,
                   round_axes=("dp", "tp", "ep"), kernel=kernel)
    mesh = make_mesh(parse_mesh("1x1x1x1"))
    f = jax.jit(jax.shard_map(lambda x, v, w: moe_block(x, v, w, spec, 1e-5), mesh=mesh,
                              in_specs=P(), out_specs=P(), check_vma=False))
    if kernel == "buffers":  # one buffer per expert
        w = {k: list(v) if k in ("w1", "w3", "w2") else v for k, v in w.items()}
    y, stats = f(x, np.ones(len(x), bool), w)
    return np.asarray(y), {k: np.asarray(v) for k, v in stats.items()}


def test_drop_policy_drops_exactly_the_assignments_past_capacity():
    x, w = _crafted(PREFS)
    y, stats = _run_moe(x, w, "drop", cf=1.0)  # capacity = ceil(1.0 * 8 tokens * 1 / 4 experts) = 2
    # expert 0 is first choice of tokens 0-4: tokens 0 and 1 fit, 2, 3, 4 are dropped
    assert int(stats["dropped"]) == 3 and int(stats["rerouted"]) == 0
    assert stats["load"].tolist() == [5, 1, 1, 1]  # requested
    assert stats["served_load"].tolist() == [2, 1, 1, 1]  # what the experts ran
    for t in (2, 3, 4):
        assert np.all(y[t] == 0)
    for t, e in [(0, 0), (1, 0), (5, 1), (6, 2), (7, 3)]:
        np.testing.assert_allclose(y[t], _expert_out(x, w, t, e), rtol=1e-5, atol=1e-6)


def test_reroute_sends_overflow_to_the_next_best_expert_with_room():
    x, w = _crafted(PREFS)
    y, stats = _run_moe(x, w, "reroute", cf=1.0)
    # room after first choices: experts 1, 2, 3 have one slot each. Round 2: token 2 -> 1 (taken),
    # token 3 -> 1 (full: rejected), token 4 -> 2. Round 3: token 3 -> 3.
    assert int(stats["dropped"]) == 0 and int(stats["rerouted"]) == 3
    assert stats["load"].tolist() == [5, 1, 1, 1] and stats["served_load"].tolist() == [2, 2, 2, 2]
    for t, e in [(0, 0), (1, 0), (2, 1), (3, 3), (4, 2), (5, 1), (6, 2), (7, 3)]:
        np.testing.assert_allclose(y[t], _expert_out(x, w, t, e), rtol=1e-5, atol=1e-6)


def test_reroute_drops_only_when_no_expert_has_room():
    x, w = _crafted(PREFS + [[0, 1, 2, 3], [0, 1, 2, 3]])  # 10 tokens, capacity 4 x 3 = 12
    _, stats = _run_moe(x, w, "reroute", cf=1.0)
    assert int(stats["dropped"]) == 0 and int(stats["rerouted"]) == 4  # 7 want expert 0, 3 fit
    x, w = _crafted(PREFS + [[0, 1, 2, 3]] * 4)  # 12 tokens, capacity 4 x 3 = 12: still all placed
    _, stats = _run_moe(x, w, "reroute", cf=0.9)  # capacity ceil(0.9 * 12 / 4) = 3
    assert int(stats["dropped"]) == 0
    x, w = _crafted(PREFS + [[0, 1, 2, 3]] * 5)  # 13 tokens > 12 slots: exactly one is lost
    _, stats = _run_moe(x, w, "reroute", cf=0.9)  # ceil(0.9 * 13 / 4) = 3
    assert int(stats["dropped"]) == 1


def test_dropless_serves_an_overloaded_expert_in_extra_rounds():
    prefs = PREFS + [[0, 1, 2, 3]] * 12  # 20 tokens, 17 of them want expert 0
    x, w = _crafted(prefs)
    y, stats = _run_moe(x, w, "dropless", cf=0.25)  # rounds of max(ceil(0.25 * 20 / 4), MIN_ROWS) = 8 rows
    assert int(stats["dropped"]) == 0
    assert stats["served_load"].tolist() == stats["load"].tolist() == [17, 1, 1, 1]
    assert int(stats["exchanged_rows"]) == 3 * 4 * 8  # expert 0's 17 assignments take 3 rounds
    for t, order in enumerate(prefs):
        np.testing.assert_allclose(y[t], _expert_out(x, w, t, order[0]), rtol=1e-5, atol=1e-6)


def test_batched_kernel_sizes_one_round_by_the_fullest_queue():
    prefs = PREFS + [[0, 1, 2, 3]] * 12  # 20 tokens, 17 of them want expert 0; mean 5 rows per expert
    x, w = _crafted(prefs)
    y, stats = _run_moe(x, w, "dropless", cf=0.25, kernel="batched")
    assert row_sizes(20, 5.0, BATCHED_FRACTIONS) == [5, 7, 8, 10, 13, 15, 20]
    assert int(stats["dropped"]) == 0
    assert int(stats["exchanged_rows"]) == int(stats["computed_rows"]) == 4 * 20  # 17 rows: the 20-row size
    for t, order in enumerate(prefs):
        np.testing.assert_allclose(y[t], _expert_out(x, w, t, order[0]), rtol=1e-5, atol=1e-6)
    x, w = _crafted(PREFS)  # 8 tokens <= BATCHED_MIN_ROWS
    _, stats = _run_moe(x, w, "dropless", cf=0.25, kernel="batched")
    assert int(stats["computed_rows"]) == 4 * 8  # decode-sized batches: one static N-row round


def test_batched_kernel_on_even_routing_computes_the_fullest_queue_rounded_up():
    x, w = _random_routing()
    y, stats = _run_moe(x, w, "dropless", 2.0, k=2, kernel="batched")
    want, _ = _run_moe(x, w, "dropless", 2.0, k=2)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    # 1,024 tokens x top-2 over 16 experts: m = 128 rows per (source, expert); sizes m x BATCHED_FRACTIONS, then N
    size = min(s for s in (128, 160, 192, 256, 320, 384, 512, 768, 1024) if s >= stats["load"].max())
    assert int(stats["computed_rows"]) == 16 * size
    assert stats["computed_rows"] / 2048 <= 1.5  # a capacity factor of 2 computed 2x in every round


def test_top2_reroute_with_ample_capacity_equals_dropless():
    x, w = _crafted(PREFS)
    y_free, _ = _run_moe(x, w, "dropless", cf=2.0, k=2)
    y_rr, stats = _run_moe(x, w, "reroute", cf=4.0, k=2)
    assert int(stats["rerouted"]) == 0
    np.testing.assert_allclose(y_rr, y_free, rtol=1e-6)


def _probs(x):
    z = 10 * x.astype(np.float64) / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_top2_reroute_renormalises_each_tokens_weights_over_the_experts_that_served_it():
    x, w = _crafted(PREFS)
    y, stats = _run_moe(x, w, "reroute", cf=1.0, k=2)  # capacity ceil(1.0 * 8 * 2 / 4) = 4 per expert
    # first and second choices fill experts 0 and 1 (tokens 4's first and 5-7's second choice for
    # expert 0 are past capacity). Round 3: token 4 -> 3, token 5 -> 2 (its last room), tokens 6
    # and 7 -> 1 (full). Round 4: token 6 -> 3, token 7 -> 2 (full): token 7 keeps expert 3 alone.
    served = {0: [0, 1], 1: [0, 2], 2: [0, 1], 3: [0, 1], 4: [3, 2], 5: [1, 2], 6: [2, 3], 7: [3]}
    assert int(stats["rerouted"]) == 3 and int(stats["dropped"]) == 1
    assert stats["served_load"].tolist() == [4, 4, 4, 3] and stats["load"].tolist() == [8, 4, 3, 1]
    p = _probs(x)
    for t, experts in served.items():
        want = sum(p[t, e] / sum(p[t, experts]) * _expert_out(x, w, t, e) for e in experts)
        np.testing.assert_allclose(y[t], want, rtol=1e-5, atol=1e-6, err_msg=f"token {t}")
