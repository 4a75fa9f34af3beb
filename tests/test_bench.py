"""scripts/bench.py runs several meshes side by side and writes every figure as JSON; bad input is
one line and exit code 2."""

import json

import pytest

from helpers import run_script


def _tiny_weight_bytes(tp: int, pp: int, expert_shards: int) -> int:
    """Float32 parameter bytes on one device of the seed layout, counted from tiny's dimensions
    (configs/tiny.yaml), not from moejax: heads and vocab over tp, layers over pp, experts over
    ep x tp; the router and norms whole."""
    D, H, K, G, F, E, V, L = 64, 8, 8, 4, 96, 16, 256, 4
    layer = (2 * D * H * K + 2 * D * G * K) // tp + 3 * (E // expert_shards) * D * F + D * E + 2 * D
    return 4 * ((L // pp) * layer + 2 * V * D // tp + D)


def test_bench_two_meshes_reports_figures_that_match_independent_counts(tmp_path):
    out = tmp_path / "bench.json"
    B, T, N = 4, 16, 3
    r = run_script("bench.py", "--config", "tiny", "--mesh", "1x1x1x1", "--mesh", "1x2x2x2", "--batch", B,
                   "--prompt-len", T, "--decode-steps", N, "--repeats", "1", "--dtype", "float32", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [m["mesh"] for m in res["meshes"]] == ["1x1x1x1", "1x2x2x2"]
    one, pipe = res["meshes"]
    assert one["weight_bytes_per_device"] == _tiny_weight_bytes(1, 1, 1) == 4 * 1_266_240  # README's count
    assert pipe["weight_bytes_per_device"] == _tiny_weight_bytes(tp=2, pp=2, expert_shards=4)
    # KV cache: k and v x layers x sequences x (T + N) positions x kv heads x head dim x 4 bytes
    assert one["kv_bytes_per_device"] == 2 * 4 * B * (T + N) * 4 * 8 * 4
    assert pipe["kv_bytes_per_device"] == 2 * (4 // 2) * (B // 2) * (T + N) * (4 // 2) * 8 * 4  # pp, dp x ep, tp
    for m, devices in ((one, 1), (pipe, 8)):
        assert m["devices"] == devices
        assert m["decode_bytes_per_step"] == devices * (m["weight_bytes_per_device"] + m["kv_bytes_per_device"] / 2)
        assert m["prefill_tokens_per_s"] == pytest.approx(B * T / m["prefill_times_s"][0])  # the raw timing
        assert m["decode_tokens_per_s"] == pytest.approx(B * N / m["decode_times_s"][0])
        assert m["moe"]["dropped"] == 0 and m["moe"]["computed_over_topk"] >= 1
        assert 0 < m["prefill_mfu"] < 1
    assert sum(one["hlo_collectives"].values()) == one["hlo_collectives"]["all-reduce"]  # 1 device: no exchange
    assert pipe["hlo_collectives"]["all-to-all"] > 0 and pipe["hlo_collectives"]["collective-permute"] > 0
    assert "| 1x2x2x2 |" in r.stdout


def test_bench_moe_runs_and_counts_rows_against_the_top_k_work(tmp_path):
    out = tmp_path / "moe.json"
    r = run_script("bench_moe.py", "--config", "tiny", "--tokens", "64", "--mesh", "1x1x2x2", "--dtype", "float32",
                   "--repeats", "1", "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    one, four = res["results"]
    assert (one["mesh"], one["devices"], four["mesh"], four["devices"]) == ("1x1x1x1", 1, "1x1x2x2", 4)
    assert one["ratio_to_1_device"] == 1.0 and four["median_ms"] > 0
    for m in res["results"]:
        assert m["dropped"] == 0 and m["computed_over_topk"] >= 1  # dropless: every top-k row is computed
    assert one["hlo"]["all-to-all"] == 0 and four["hlo"]["all-to-all"] > 0
    assert "| 1x1x2x2 | 4 |" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--mesh", "1x2x2"], "1x2x2"),
    (["--batch", "0"], "--batch 0"),
    (["--prompt-len", "10000", "--decode-steps", "1000"], "max_seq_len"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--quant", "int4"], "invalid choice: 'int4'"),
    (["--data", "configs/tiny.yaml", "--prompt-len", "200", "--decode-steps", "1"], "fewer than --batch x --prompt-len"),
])
def test_bench_bad_input_is_one_line_and_exit_code_2(args, message):
    r = run_script("bench.py", "--config", "tiny", *args, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_bench_kernels_reports_each_rate_from_its_own_timing(tmp_path):
    out = tmp_path / "kernels.json"
    r = run_script("bench_kernels.py", "--weight-mb", "4", "--repeats", "1", "--json", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    names = [k["kernel"] for k in res["kernels"]]
    assert names[0] == "read 4 MB (sum)" and sum(n.startswith("stream ") for n in names) == 3
    assert sum(n.startswith("matmul ") for n in names) == 4
    for k in res["kernels"]:
        assert k["xla"] > 0 and k["torch"] is None
        if k["unit"] == "GB/s":  # every row reads the same 4 MB weight
            assert k["xla"] * k["xla_s"] == pytest.approx(4 * 2**20 / 1e9)
    assert "| stream 8x4096x512 (weight GB/s) |" in r.stdout


@pytest.mark.parametrize("args, message", [(["--repeats", "0"], "--repeats 0"),
                                           (["--weight-mb", "0"], "--weight-mb 0")])
def test_bench_kernels_bad_input_is_one_line_and_exit_code_2(args, message):
    r = run_script("bench_kernels.py", *args, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
