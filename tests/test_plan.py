"""The layout planner: its memory and FLOP figures against the placement report and the config's
analytic counts, its collective bytes against compiled HLO, feasibility, bad input, calibration."""

import json
import math
import os

import numpy as np
import pytest
from helpers import REPO, run_script

from moejax.config.model import load_config
from moejax.parallel.mesh import parse_mesh
from moejax.models.placement import placement
from moejax.parallel.rules import load_layout
from moejax.planner import calibrate
from moejax.planner.comms import collectives, hlo_bytes_by_kind
from moejax.planner.costmodel import phase_cost, work
from moejax.planner.shapes import Workload, shapes
from moejax.planner.layouts import evaluate, meshes_of, plan
from moejax.planner.specs import Fractions, load_spec
from moejax.models import counts

FR = Fractions(matmul=0.5, bandwidth=0.6, layer_overhead_s=1e-4, round_overhead_s=2e-4)
CPU_RUN = os.path.join(REPO, "results", "cpu-seed-1x1x1x1-4x2x4x4.json")


@pytest.mark.parametrize("config,mesh,layout", [("seed", "4x2x4x4", "seed"), ("seed-10b", "2x2x4x2", "ep-tp"),
                                                ("tiny", "1x1x1x1", "seed"), ("tiny-glm", "1x2x2x2", "seed"),
                                                ("tiny-glm", "2x1x2x2", "ep-tp")])
def test_memory_per_device_is_the_placement_reports(config, mesh, layout):
    cfg, lay, shape = load_config(config), load_layout(layout), parse_mesh(mesh)
    wl = Workload(batch=48, prompt_len=64, context=200)
    row = evaluate(cfg, lay, shape, wl, load_spec("h200"), FR)
    want = placement(cfg, lay, shape, "bfloat16", 48, 200)["placement"]
    assert row.memory["params_bytes"] == want["param_bytes_per_device"]
    assert row.memory["kv_bytes"] == want["kv_bytes_per_device"]
    assert row.memory["total_bytes"] == want["param_bytes_per_device"] + want["kv_bytes_per_device"] + \
        row.memory["activation_bytes"]


@pytest.mark.parametrize("config,mesh,layout,micro", [("seed", "4x2x4x4", "seed", 2), ("seed-10b", "2x2x4x2", "ep-tp", 4),
                                                      ("tiny", "1x1x1x1", "seed", 1), ("tiny", "1x4x2x1", "ep-tp", 4),
                                                      ("tiny-glm", "1x2x2x2", "seed", 2), ("tiny-glm", "2x1x2x2", "ep-tp", 2),
                                                      ("tiny-glm", "1x4x2x1", "ep-tp", 4)])
def test_flops_summed_over_devices_are_the_configs_analytic_count(config, mesh, layout, micro):
    """With exactly the top-k expert rows and no padding, every device's layer FLOPs add up to the
    config's count for the batch; the head runs on last positions only, on every stage, and under
    ep-tp every tp rank routes the same (gathered) tokens. tiny-glm: a dense first layer, a shared
    expert and its ffn slices over tp, the stages' layer kinds differing on 1x2x2x2 and 1x4x2x1."""
    cfg, lay, shape = load_config(config), load_layout(layout), parse_mesh(mesh)
    B, T, S = 64, 96, 300  # B fills every batch shard x microbatch of these meshes
    wl = Workload(batch=B, prompt_len=T, context=S, microbatches=micro)
    head = 2 * cfg.d_model * cfg.vocab_size
    for phase, per_token, tokens in (("prefill", counts.flops_per_token_prefill(cfg, T), B * T),
                                     ("decode", counts.flops_per_token_decode(cfg, S), B)):
        s = shapes(cfg, lay, shape, wl, phase)
        assert s.b_pad == B
        w = work(cfg, lay, shape, wl, s, rows_factor=1.0)
        layers = shape.size * s.micro * sum(w.flops.values())
        routed_again = (shape.tp - 1) if lay.mesh_axes("expert_ffn") else 0
        router = 2 * cfg.d_model * cfg.num_experts * len(cfg.moe_layers)
        assert layers == pytest.approx(tokens * (per_token - head + routed_again * router), rel=1e-12)
        assert shape.size * w.flops_program["head"] / shape.pp == pytest.approx(B * head, rel=1e-12)


def test_stages_of_different_layer_kinds_are_costed_apart():
    """tiny-glm on 1x2x2x2: stage 0 runs the dense layer 0 and MoE layer 1, stage 1 two MoE layers. The
    per-device figures are the stages' mean; the pipeline step is the slower stage's."""
    from moejax.planner.shapes import mean_mix, stage_mix

    cfg, lay, shape = load_config("tiny-glm"), load_layout("seed"), parse_mesh("1x2x2x2")
    wl = Workload(batch=32, prompt_len=64, context=128, microbatches=2)
    s = shapes(cfg, lay, shape, wl, "prefill")
    mixes = [stage_mix(cfg, 2, st) for st in range(2)]
    assert [(m.moe, m.dense) for m in mixes] == [(1, 1), (2, 0)]
    per_stage = [work(cfg, lay, shape, wl, s, mix=m) for m in mixes]
    mean = work(cfg, lay, shape, wl, s)
    assert mean_mix(cfg, 2).moe == 1.5
    assert "dense layers' FFN" in per_stage[0].flops and "dense layers' FFN" not in per_stage[1].flops
    for part in ("flops", "bytes"):
        total = lambda w: sum(getattr(w, part).values())  # noqa: E731
        assert total(mean) == pytest.approx((total(per_stage[0]) + total(per_stage[1])) / 2, rel=1e-12)
    spec = load_spec("h200")
    c = phase_cost(cfg, lay, shape, wl, spec, FR, "prefill")
    roofs = [max(sum(w.flops.values()) / (spec.peak_matmul_flops_per_s * FR.matmul),
                 sum(w.bytes.values()) / (spec.hbm_bandwidth_bytes_per_s * FR.bandwidth)) for w in per_stage]
    assert max(c.step["compute"], c.step["memory"]) in [pytest.approx(r, rel=1e-12) for r in roofs]
    assert c.seconds >= c.steps * max(roofs)


@pytest.mark.parametrize("mesh,layout", [("1x2x2x2", "seed"), ("2x1x2x2", "ep-tp")])
def test_placement_is_what_serving_holds(mesh, layout):
    """The placement report's parameter bytes are the serving buffers on a device: tiny-glm's MoE and
    dense stacks count one buffer per local slot that holds their kind on some stage."""
    import jax
    from helpers import setup

    rs, _, params = setup("tiny-glm", mesh, layout)
    dev = jax.devices()[0]
    held = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(params) for s in leaf.addressable_shards
               if s.device == dev)
    assert held == placement(rs.cfg, rs.layout, rs.shape, "float32", 8, 32)["placement"]["param_bytes_per_device"]


def _compiled_hlo(config: str, mesh: str, layout: str, mode: str, B: int, T: int) -> tuple:
    from helpers import setup

    from moejax.models import cache as kv_cache
    from moejax.models import transformer as model
    from moejax.inference.generate import put

    rs, m, params = setup(config, mesh, layout, dtype="float32", moe_kernel="buffers")
    tok = put(m, rs.layout, "tokens", np.ones((B, T if mode == "prefill" else 1), np.int32))
    lengths = put(m, rs.layout, "lengths", np.full((B,), T, np.int32))
    cache = kv_cache.init_cache(rs, m, B, 2 * T)
    return rs, model.build(rs, m, mode).lower(params, tok, lengths, cache).compile().as_text()


@pytest.mark.parametrize("config,mesh,layout,mode", [
    ("tiny", "1x2x2x2", "seed", "prefill"), ("tiny", "1x2x2x2", "seed", "decode"), ("tiny", "2x1x2x2", "ep-tp", "prefill"),
    ("tiny-glm", "1x2x2x2", "seed", "prefill"), ("tiny-glm", "1x2x2x2", "ep-tp", "decode"),
    ("tiny-glm", "2x1x2x2", "ep-tp", "prefill")])
def test_collective_bytes_equal_the_compiled_programs(config, mesh, layout, mode):
    """Bytes of every collective kind, summed over the call sites of the compiled HLO (bench.py's
    count), against the planner's inventory. XLA may fold the all-reduce of MoE counters that are
    constant zero under dropless (dropped, rerouted: 4 bytes a layer each); nothing else differs.
    tiny-glm: the shared expert's and the dense layer's gathers and reduce-scatters over tp; on pp=2
    slot 0 holds the dense layer on stage 0 and a MoE layer on stage 1 (a switch: both in the HLO)."""
    from moejax.planner.hlo import collective_bytes

    B, T = 8, 16
    rs, hlo = _compiled_hlo(config, mesh, layout, mode, B, T)
    wl = Workload(batch=B, prompt_len=T, context=2 * T, dtype="float32", kernel="buffers", microbatches=1)
    want = hlo_bytes_by_kind(collectives(rs.cfg, rs.layout, rs.shape, wl, shapes(rs.cfg, rs.layout, rs.shape, wl, mode)))
    got = collective_bytes(hlo)
    assert got["all-to-all"] > 0
    for kind in ("all-to-all", "all-gather", "reduce-scatter", "collective-permute"):
        assert got[kind] == want[kind], kind
    folded = 2 * 4 * rs.cfg.num_layers // rs.shape.pp
    assert 0 <= want["all-reduce"] - got["all-reduce"] <= folded
    if layout == "seed":
        assert got == want


def _divides(cfg, lay, m) -> bool:
    sizes = {"layers": cfg.num_layers, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
             "experts": cfg.num_experts, "expert_ffn": cfg.expert_ffn, "vocab": cfg.vocab_size}
    return all(n % math.prod(getattr(m, a) for a in lay.mesh_axes(k)) == 0 for k, n in sizes.items())


@pytest.mark.parametrize("config,devices", [("tiny", 32), ("seed", 128)])
def test_layouts_the_config_cannot_divide_are_never_feasible(config, devices):
    cfg = load_config(config)
    layouts = [load_layout("seed"), load_layout("ep-tp")]
    rows = plan(cfg, layouts, devices, Workload(batch=64, prompt_len=32, context=64), load_spec("h100"), FR, "ttft")
    by_name = {lay.name: lay for lay in layouts}
    assert {str(m) for m in meshes_of(devices)} == {str(r.mesh) for r in rows}
    assert len({str(m) for m in meshes_of(devices)}) == len(meshes_of(devices))
    assert all(m.size == devices for m in meshes_of(devices))
    for r in rows:
        assert r.feasible == _divides(cfg, by_name[r.layout], r.mesh), (r.mesh, r.layout)
        assert r.feasible or "not divisible" in r.reason
    assert any(not r.feasible for r in rows) and any(r.feasible for r in rows)
    ttfts = [r.prefill["ttft_s"] for r in rows if r.feasible and r.fits]
    assert ttfts == sorted(ttfts)


def test_pipeline_bubble_and_steps_follow_the_schedule():
    cfg, lay = load_config("seed"), load_layout("seed")
    wl = Workload(batch=64, prompt_len=128, context=256, microbatches=4)
    for pp in (1, 2, 4):
        c = phase_cost(cfg, lay, parse_mesh(f"1x{pp}x2x2"), wl, load_spec("h200"), FR, "prefill")
        assert c.steps == 4 + pp - 1 and c.bubble == pytest.approx((pp - 1) / (4 + pp - 1))


def test_fit_recovers_the_times_of_known_constants():
    """Measurements made by the model itself from known constants are fitted back to within 1%."""
    points, _ = calibrate.load_points([CPU_RUN])
    truth = Fractions(matmul=0.3, bandwidth=0.2, layer_overhead_s=3e-4, round_overhead_s=1e-3)
    for p in points:
        p.measured = {k: v for k, v in calibrate.predict(p, truth).items() if k in p.measured}
    fitted = calibrate.fit(points, "synthetic")
    for p in points:
        got = calibrate.predict(p, fitted)
        for k, v in p.measured.items():
            assert got[k] == pytest.approx(v, rel=0.01), (p.mesh, k)


def _one_line_error(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    _one_line_error(run_script("plan.py", "--devices", "0"), "--devices 0")
    _one_line_error(run_script("plan.py", "--devices", "8", "--gpu", "a100"), "'a100'", "h100", "h200")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npeak_matmul_flops_per_s: fast\n")
    _one_line_error(run_script("plan.py", "--devices", "8", "--gpu", bad), "peak_matmul_flops_per_s", "number")
    _one_line_error(run_script("plan.py", "--validate", CPU_RUN), "--calibrate")


def test_plan_and_validation_end_to_end(tmp_path):
    spec = tmp_path / "small.yaml"  # an H200 with 1 GB: the one-device layout does not fit
    spec.write_text(open(os.path.join(REPO, "gpus", "h200.yaml")).read().replace("hbm_bytes: 141.0e9", "hbm_bytes: 1.0e9"))
    png = tmp_path / "plan.png"
    r = run_script("plan.py", "--config", "seed", "--devices", "4", "--gpu", spec, "--plot", png, "--json",
                   "--calibrate", CPU_RUN, *[os.path.join(REPO, "results", "gpu", f) for f in ("sized-10b-decode-b64.json",
                                                                                       "sized-seed-prefill-8x1024.json")])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    rows = out["layouts"]
    assert len(rows) == len(meshes_of(4)) * 2 - sum(m.tp == 1 for m in meshes_of(4))  # ep-tp = seed at tp 1
    fitting = [x for x in rows if x["feasible"] and x["fits"]]
    speeds = [x["decode"]["tokens_per_s_per_device"] for x in fitting]
    assert speeds == sorted(speeds, reverse=True)
    one = next(x for x in rows if x["mesh"] == "4x1x1x1")
    assert not one["fits"] and one["memory"]["fraction"] > 1  # listed, not dropped
    assert out["constants"]["hbm_bandwidth_bytes_per_s"]["source"].startswith("datasheet")
    assert out["constants"]["fraction.matmul"]["source"].startswith("measured")
    assert png.stat().st_size > 10_000

    r = run_script("plan.py", "--calibrate", CPU_RUN, "--validate",
                   os.path.join(REPO, "results", "cpu-seed-1x1x1x1-4x2x4x4-run2.json"), "--json")
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout.strip().splitlines()[-1])["points"]
    assert {(p["mesh"], p["metric"]) for p in points} == {(m, k) for m in ("1x1x1x1", "4x2x4x4")
                                                          for k in calibrate.METRICS}
    for p in points:
        assert p["error"] == pytest.approx(p["predicted"] / p["measured"] - 1, rel=1e-12)


def test_the_planner_counts_the_servers_cache_ring_windows_and_latents():
    """KV bytes per device as the server keeps them: gpt-oss-120b's 18 sliding layers hold rings of 128
    positions beside 18 full rows; DeepSeek-V3 keeps 576 latent values per token per layer, replicated over
    tp; a sliding layer's attention reads at most its window (attended positions)."""
    from moejax.models import counts
    from moejax.models.placement import placement

    lay, ctx = load_layout("seed"), 8192
    oss = load_config("gpt-oss-120b")
    full = placement(oss, lay, parse_mesh("1x1x1x8"), "bfloat16", 64, ctx)["placement"]["kv_bytes_per_device"]
    ring = placement(oss, lay, parse_mesh("1x1x1x8"), "bfloat16", 64, ctx, ring=True)["placement"]["kv_bytes_per_device"]
    per_position = 64 // 8 * 2 * oss.num_kv_heads * oss.head_dim * 2  # rows per device x (k, v) x bfloat16
    assert full == 36 * ctx * per_position and ring == (18 * 128 + 18 * ctx) * per_position
    assert counts.attended_positions(oss, ctx, False) == (128 + ctx) / 2
    ds = load_config("deepseek-v3")
    got = placement(ds, lay, parse_mesh("1x1x4x16"), "bfloat16", 64, ctx, ring=True)["placement"]["kv_bytes_per_device"]
    assert got == 61 * (64 // 16) * ctx * 576 * 2  # batch over ep 16, not split over tp 4
