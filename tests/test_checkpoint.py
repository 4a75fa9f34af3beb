"""Checkpoints: the Hugging Face fixture reproduces transformers, import/export round-trips, reshard
moves values bit-exactly across meshes, a killed save never harms an earlier step, bad input is refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import FIXTURE, REPO, RTOL, host_params, rel_err, run_script
from moejax.checkpoint import store as checkpoint
from moejax.models import counts
from moejax.models import transformer as model
from moejax.inference.generate import Generator, put
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout
from moejax.inference.sampling import Sampling



def _restore(ckpt, mesh_text, micro=1):
    shape = parse_mesh(mesh_text)
    mesh = make_mesh(shape)
    lay = load_layout("seed")
    cfg, stacked, meta = checkpoint.restore(ckpt, mesh, lay)
    rs = model.RunSpec(cfg, lay, shape, meta["dtype"], microbatches=micro)
    return rs, mesh, model.serving_params(stacked, rs, mesh)


@pytest.mark.parametrize("mesh, micro", [("1x1x1x1", 1), ("1x2x2x2", 1)])
def test_hf_fixture_reproduces_transformers_logits_and_greedy_tokens(imported, mesh, micro):
    ref = np.load(os.path.join(FIXTURE, "reference.npz"))
    rs, m, params = _restore(imported, mesh, micro)
    ids = ref["input_ids"].astype(np.int32)
    lengths = np.full((ids.shape[0],), ids.shape[1], np.int32)
    logits, _ = model.build(rs, m, "forward")(params, put(m, rs.layout, "tokens", ids),
                                              put(m, rs.layout, "lengths", lengths))
    assert rel_err(logits, ref["logits"]) <= RTOL  # README's bound (measured 1.8e-7)
    prompts = ids.tolist()
    gen = Generator(rs, m, params, len(prompts), ids.shape[1], ids.shape[1] + 16)
    res = gen.generate(prompts, 16, Sampling(), eos_id=None, keep_logits=True)
    assert res["generated_ids"] == ref["generated_ids"].tolist()
    assert rel_err(np.stack(res["step_logits"], 1), ref["gen_logits"]) <= RTOL


def test_import_then_export_gives_the_original_tensors(imported, tmp_path):
    from safetensors.numpy import load_file

    r = run_script("export_hf.py", imported, str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    want = load_file(os.path.join(FIXTURE, "model.safetensors"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["num_key_value_heads"] == 2 and cfg["num_local_experts"] == 4
    # sharded export with an index reads back the same
    r = run_script("export_hf.py", imported, str(tmp_path / "sharded"), "--max-shard-gb", "0.0002")
    assert r.returncode == 0, r.stderr
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    shards = {}
    for f in set(index["weight_map"].values()):
        part = load_file(str(tmp_path / "sharded" / f))
        assert all(index["weight_map"][k] == f for k in part)
        shards.update(part)
    assert set(shards) == set(want) and all(np.array_equal(shards[k], want[k]) for k in want)
    r = run_script("import_hf.py", str(tmp_path / "sharded"), str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    one, lay = make_mesh(parse_mesh("1x1x1x1")), load_layout("seed")
    _, again, _ = checkpoint.restore(str(tmp_path / "again"), one, lay)
    _, first, _ = checkpoint.restore(imported, one, lay)
    for n in first:
        assert np.array_equal(np.asarray(again[n]), np.asarray(first[n])), n


def test_reshard_across_meshes_is_bit_exact_and_keeps_logits(tmp_path):
    shape = parse_mesh("1x2x2x2")
    mesh = make_mesh(shape)
    lay = load_layout("seed")
    from moejax.config.model import load_config

    cfg = load_config("tiny")
    stacked = model.init_params(cfg, 0, "float32", mesh, lay)
    checkpoint.save(str(tmp_path / "a"), stacked, cfg, lay, "float32", "1x2x2x2")
    r = run_script("reshard.py", tmp_path / "a", tmp_path / "b", "--mesh", "4x2x4x4", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["verified"] and rep["bytes_moved"] == counts.param_count(cfg) * 4
    r = run_script("reshard.py", tmp_path / "b", tmp_path / "c", "--mesh", "1x1x1x1", "--layout", "ep-tp")
    assert r.returncode == 0, r.stderr
    one = make_mesh(parse_mesh("1x1x1x1"))
    _, back, meta = checkpoint.restore(str(tmp_path / "c"), one, lay)
    assert meta["mesh"] == "1x1x1x1" and meta["layout"] == "ep-tp"
    for n, v in host_params("tiny").items():
        assert np.array_equal(np.asarray(back[n]), v), n
    tokens = np.random.default_rng(5).integers(0, 256, (2, 9)).astype(np.int32)
    rs, m, params = _restore(str(tmp_path / "c"), "1x1x1x1")
    lengths = np.full((2,), 9, np.int32)
    got = model.build(rs, m, "forward")(params, put(m, lay, "tokens", tokens), put(m, lay, "lengths", lengths))[0]
    from helpers import forward

    want, _ = forward("tiny", "1x1x1x1", tokens)
    assert np.array_equal(np.asarray(got), want)


def test_reshard_casts_dtype_and_refuses_to_overwrite_without_force(imported, tmp_path):
    r = run_script("reshard.py", imported, tmp_path / "bf", "--mesh", "1x2x2x2", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    before = sorted(os.listdir(tmp_path / "bf"))
    r = run_script("reshard.py", imported, tmp_path / "bf", "--mesh", "1x1x1x1")
    assert r.returncode == 2 and "exists: pass --force" in r.stderr
    assert sorted(os.listdir(tmp_path / "bf")) == before
    meta, _ = checkpoint.read_meta(str(tmp_path / "bf"))
    assert meta["dtype"] == "bfloat16"
    r = run_script("reshard.py", imported, tmp_path / "bf", "--mesh", "1x1x1x1", "--force")
    assert r.returncode == 0, r.stderr
    assert checkpoint.read_meta(str(tmp_path / "bf"))[0]["dtype"] == "float32"


_SAVER = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from moejax.checkpoint import store as checkpoint
from moejax.config.model import load_config
from moejax.parallel.rules import load_layout
from moejax.models import transformer as model
cfg = load_config("tiny")
lay = load_layout("seed")
checkpoint.save(sys.argv[1], model.init_params(cfg, 0, "float32"), cfg, lay, "float32", "1x1x1x1", step=0)
big = load_config("seed")
params = {{n: np.full(s, 0.5, np.float32) for n, s in __import__("moejax.models.params", fromlist=["x"]).param_shapes(big).items()}}
print("saving", flush=True)
checkpoint.save(sys.argv[1], params, big, lay, "float32", "1x1x1x1", step=1)
print("saved", flush=True)
"""


def test_a_save_killed_midway_leaves_the_earlier_step_restorable(tmp_path):
    d = str(tmp_path / "ck")
    p = subprocess.Popen([sys.executable, "-c", _SAVER.format(repo=REPO), d], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert p.stdout.readline().strip() == "saving"
    deadline = time.time() + 120  # kill once the step's files are being written (after its checksums)
    while not any("tmp" in f for f in os.listdir(d)) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    leftovers = os.listdir(d)
    assert any("tmp" in f for f in leftovers), f"the save finished before the kill: {leftovers}"
    meta, step = checkpoint.read_meta(d)
    assert step == 0 and meta["config"]["name"] == "tiny"
    _, back, _ = checkpoint.restore(d, make_mesh(parse_mesh("1x1x1x1")), load_layout("seed"))
    for n, v in host_params("tiny").items():
        assert np.array_equal(np.asarray(back[n]), v), n


def test_bad_checkpoints_are_one_line_errors_and_nothing_is_modified(imported, tmp_path):
    cases = []
    cases.append((["--ckpt", str(tmp_path / "missing")], "no such directory"))
    (tmp_path / "empty").mkdir()
    cases.append((["--ckpt", str(tmp_path / "empty")], "holds no complete step"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(imported, corrupt)
    for root, _, files in os.walk(corrupt):
        for f in files:
            path = os.path.join(root, f)
            if os.path.getsize(path) > 10000:  # the tensor data: cut it short
                with open(path, "r+b") as fh:
                    fh.truncate(100)
    cases.append((["--ckpt", str(corrupt)], "parameters unreadable (truncated)"))
    cases.append((["--ckpt", imported, "--config", "tiny"], "does not match the checkpoint: num_layers=4 there"))
    cases.append((["--ckpt", imported, "--mesh", "1x1x8x1"], "num_heads=4 is not divisible by the 8 heads shards"))
    for args, message in cases:
        before = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(imported) for f in fs}
        base = ["--mesh", "1x1x1x1", "--prompt-ids", "[[1, 2]]", "--max-new-tokens", "2"]
        if "--mesh" in args:
            base = base[2:]
        r = run_script("infer.py", *base, *args, timeout=120)
        assert r.returncode == 2, (args, r.stderr[-500:])
        assert message in r.stderr and r.stderr.strip().count("\n") == 0, (args, r.stderr[-500:])
        assert before == {f: os.path.getsize(os.path.join(r_, f)) for r_, _, fs in os.walk(imported) for f in fs}


def test_import_refuses_what_moejax_does_not_implement(tmp_path):
    bad = tmp_path / "sliding"
    shutil.copytree(FIXTURE, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["sliding_window"] = 4096
    json.dump(cfg, open(bad / "config.json", "w"))
    r = run_script("import_hf.py", str(bad), str(tmp_path / "out"))
    assert r.returncode == 2 and "sliding_window=4096 is not supported" in r.stderr
    assert not os.path.exists(tmp_path / "out")
    r = run_script("import_hf.py", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and "no readable config.json" in r.stderr
