"""Checkpoints at real size: import, reshard and export stream in bounded blocks and give
bit for bit what the whole-tensor path gave, on 1 to 128 devices; a tiny memory bound forces many
blocks and still verifies; make_checkpoint.py is deterministic and its two formats agree; a kill
midway leaves the destination absent and the source intact; an unwritable or full destination is
one line and exit code 2."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from helpers import FIXTURE, REPO, host_params, run_script
from moejax.checkpoint import store as checkpoint
from moejax.models import transformer as model
from moejax.config.model import load_config
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout
from moejax.models import counts

TINY_GB = "0.0002"  # 200 KB: blocks of a few rows, hundreds of them for the tiny model


def _report(r):
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _restored(ckpt, mesh_text, layout="seed"):
    _, params, meta = checkpoint.restore(str(ckpt), make_mesh(parse_mesh(mesh_text)), load_layout(layout))
    return {n: np.asarray(a) for n, a in params.items()}, meta


def test_sliced_reshard_is_bit_exact_on_1_to_128_devices_under_a_tiny_bound(tmp_path):
    cfg, lay = load_config("tiny"), load_layout("seed")
    mesh = make_mesh(parse_mesh("1x2x2x2"))
    checkpoint.save(str(tmp_path / "a"), model.init_params(cfg, 0, "float32", mesh, lay), cfg, lay, "float32",
                    "1x2x2x2")  # the whole-tensor writer (orbax)
    rep = _report(run_script("reshard.py", tmp_path / "a", tmp_path / "b", "--mesh", "4x2x4x4",
                             "--max-memory-gb", TINY_GB, "--json"))
    assert rep["verified"] and rep["blocks"] > 200 and rep["block_bytes"] < 20000
    rep = _report(run_script("reshard.py", tmp_path / "b", tmp_path / "c", "--mesh", "1x1x1x1", "--layout", "ep-tp",
                             "--dtype", "bfloat16", "--max-memory-gb", TINY_GB, "--json"))
    assert rep["verified"] and rep["dtype"] == "bfloat16"
    want = host_params("tiny")
    for mesh_text in ("1x1x1x1", "1x2x2x2", "4x2x4x4"):  # what the streaming writer wrote, read by restore
        got, meta = _restored(tmp_path / "b", mesh_text)
        assert meta["mesh"] == "4x2x4x4"
        for n, v in want.items():
            assert np.array_equal(got[n], v), (mesh_text, n)
    got, meta = _restored(tmp_path / "c", "2x1x2x2", "ep-tp")
    for n, v in want.items():
        assert got[n].dtype == ml_dtypes.bfloat16 and np.array_equal(got[n], v.astype(ml_dtypes.bfloat16)), n
    # the checksums saved with the streamed checkpoints are those of the whole tensors
    assert checkpoint.read_meta(str(tmp_path / "b"))[0]["checksums"] == checkpoint.read_meta(str(tmp_path / "a"))[0]["checksums"]


def test_make_checkpoint_is_deterministic_and_its_formats_round_trip_through_import_and_export(tmp_path):
    a = _report(run_script("make_checkpoint.py", "--config", "tiny", "--out", tmp_path / "a", "--seed", "3", "--json"))
    _report(run_script("make_checkpoint.py", "--config", "tiny", "--out", tmp_path / "b", "--seed", "3",
                       "--mesh", "1x2x2x2", "--max-memory-gb", TINY_GB, "--json"))
    sums = checkpoint.read_meta(str(tmp_path / "a"))[0]["checksums"]
    assert sums == checkpoint.read_meta(str(tmp_path / "b"))[0]["checksums"]
    assert a["bytes"] == counts.param_count(load_config("tiny")) * 4
    got, _ = _restored(tmp_path / "b", "1x1x1x1")
    assert 0.018 < got["w1"].std() < 0.022 and np.all(got["attn_norm"] == 1)
    _report(run_script("make_checkpoint.py", "--config", "tiny", "--out", tmp_path / "hf", "--seed", "3",
                       "--format", "hf", "--max-shard-gb", "0.001", "--json"))
    _report(run_script("import_hf.py", tmp_path / "hf", tmp_path / "imp", "--max-memory-gb", TINY_GB, "--json"))
    assert checkpoint.read_meta(str(tmp_path / "imp"))[0]["checksums"] == sums
    _report(run_script("export_hf.py", tmp_path / "imp", tmp_path / "exp", "--max-shard-gb", "0.001", "--json"))
    from safetensors.numpy import load_file

    for f in os.listdir(tmp_path / "hf"):
        if f.endswith(".safetensors"):
            want, back = load_file(str(tmp_path / "hf" / f)), load_file(str(tmp_path / "exp" / f))
            assert set(want) == set(back) and all(np.array_equal(want[k], back[k]) for k in want), f


def test_streaming_import_equals_the_whole_tensor_import(imported, tmp_path):
    """`imported` is the fixture through import_hf.py; the values are the fixture's HF tensors."""
    from safetensors.numpy import load_file

    from moejax.checkpoint import hf

    cfg = hf.config_from_hf(FIXTURE)
    _report(run_script("import_hf.py", FIXTURE, tmp_path / "s", "--max-memory-gb", TINY_GB, "--json"))
    got, _ = _restored(tmp_path / "s", "1x2x2x2")
    tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
    for hf_name, name, idx, fn in hf.hf_tensors(cfg):
        assert np.array_equal(got[name][idx], fn(tensors[hf_name])), hf_name
    assert checkpoint.read_meta(str(tmp_path / "s"))[0]["checksums"] == checkpoint.read_meta(imported)[0]["checksums"]


def _kill_when_writing(args, tmp_dir_prefix, parent):
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", args[0]), *map(str, args[1:])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "XLA_FLAGS": ""})
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not any(
            f.startswith(tmp_dir_prefix) for f in os.listdir(parent)):
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "finished before the kill"


def test_an_import_or_reshard_killed_midway_leaves_no_destination_and_the_source_intact(imported, tmp_path):
    before = checkpoint.read_meta(imported)[0]["checksums"]
    _kill_when_writing(["reshard.py", imported, tmp_path / "dst", "--mesh", "1x2x2x2", "--max-memory-gb", "0.000002"],
                       "dst.tmp-", tmp_path)
    assert not os.path.exists(tmp_path / "dst")
    _kill_when_writing(["import_hf.py", FIXTURE, tmp_path / "imp", "--max-memory-gb", "0.000002"], "imp.tmp-", tmp_path)
    assert not os.path.exists(tmp_path / "imp")
    got, _ = _restored(imported, "1x1x1x1")  # restore checks the source against its checksums
    assert checkpoint.read_meta(imported)[0]["checksums"] == before
    _report(run_script("reshard.py", imported, tmp_path / "dst", "--mesh", "1x2x2x2", "--json"))
    assert "dst" in os.listdir(tmp_path)
    assert not any(f.startswith("dst.tmp-") for f in os.listdir(tmp_path))  # the killed run's leftovers removed


def _no_space(limit_bytes):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return pre


@pytest.mark.parametrize("script, extra", [("reshard.py", ["CKPT", "--mesh", "1x1x1x1"]),
                                           ("import_hf.py", [FIXTURE]), ("export_hf.py", ["CKPT"]),
                                           ("make_checkpoint.py", ["--config", "tiny", "--out"])])
def test_a_full_disk_or_an_unwritable_destination_is_one_line_and_exit_code_2(script, extra, imported, tmp_path):
    args = [imported if a == "CKPT" else a for a in extra]
    dst = tmp_path / "dst"
    cmd = [sys.executable, os.path.join(REPO, "scripts", script), *map(str, args), str(dst)]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_no_space(20000), timeout=120,
                       env={**os.environ, "XLA_FLAGS": "", "MALLOC_ARENA_MAX": "2"})
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: writing") and "File too large" in line, r.stderr[-2000:]
    assert not os.path.exists(dst) and os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    cmd[-1] = str(tmp_path / "file" / "dst")  # a destination under a regular file cannot be created
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "XLA_FLAGS": ""})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "Not a directory" in r.stderr, r.stderr


def test_the_tiled_transpose_export_uses_equals_numpys():
    from moejax.models.hf_map import transpose

    m = np.random.default_rng(0).standard_normal((100, 3001)).astype(np.float16)  # past the tiled threshold
    assert np.array_equal(transpose(m), m.T) and transpose(m).flags.c_contiguous
    b = m.astype(ml_dtypes.bfloat16)
    assert np.array_equal(transpose(b).view(np.uint16), b.T.view(np.uint16))


def test_a_quantized_checkpoint_reshards_streaming_bit_equal(tmp_path):
    _report(run_script("make_checkpoint.py", "--config", "tiny", "--out", tmp_path / "f", "--json"))
    r = run_script("quantize.py", tmp_path / "f", tmp_path / "q")
    assert r.returncode == 0, r.stderr[-2000:]
    _report(run_script("reshard.py", tmp_path / "q", tmp_path / "r", "--mesh", "1x2x2x2", "--max-memory-gb", TINY_GB,
                       "--json"))
    want, _ = _restored(tmp_path / "q", "1x1x1x1")
    got, meta = _restored(tmp_path / "r", "1x2x2x2")
    assert meta["quant"] == "int8" and {str(a.dtype) for a in got.values()} == {"float32", "int8"}
    for n, v in want.items():
        assert np.array_equal(got[n], v), n
