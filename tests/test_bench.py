"""scripts/bench.py runs several meshes side by side and writes every figure as JSON; bad input is
one line and exit code 2."""

import json

import pytest

from helpers import run_script


def test_bench_two_meshes_writes_the_figures(tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--config", "tiny", "--mesh", "1x1x1x1", "--mesh", "1x2x2x2", "--batch", "4",
                   "--prompt-len", "16", "--decode-steps", "3", "--repeats", "1", "--dtype", "float32",
                   "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [m["mesh"] for m in res["meshes"]] == ["1x1x1x1", "1x2x2x2"]
    for m in res["meshes"]:
        assert m["prefill_tokens_per_s"] == pytest.approx(4 * 16 / m["ttft_s"])
        assert m["decode_tokens_per_s"] > 0 and 0 < m["prefill_mfu"] < 1
        assert m["moe"]["dropped"] == 0
        assert m["decode_bytes_per_s"] == pytest.approx(m["decode_bytes_per_step"] * 3 / sum(m["decode_times_s"]))
        assert m["decode_fraction_of_roofline"] == pytest.approx(m["decode_bytes_per_s"] / m["bandwidth_bytes_per_s"])
    one, pipe = res["meshes"]
    assert sum(one["hlo_collectives"].values()) == one["hlo_collectives"]["all-reduce"]  # 1 device: no exchange
    assert pipe["hlo_collectives"]["all-to-all"] > 0 and pipe["hlo_collectives"]["collective-permute"] > 0
    assert "| 1x2x2x2 |" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--mesh", "1x2x2"], "1x2x2"),
    (["--batch", "0"], "--batch 0"),
    (["--prompt-len", "10000", "--decode-steps", "1000"], "max_seq_len"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
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
