"""A damaged checkpoint is refused (checksums saved with every tensor and
checked on restore, import and reshard), OUT/DST that is a regular file is refused, user errors name
the file and the real reason while a bug stays a traceback, and reshard verifies what it wrote
from disk against SRC after the declared cast."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import FIXTURE, REPO, run_script
from moejax.checkpoint import format as ckformat
from moejax.checkpoint import store as checkpoint
from moejax.errors import UserError
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout



def _largest_data_file(ckpt):
    return max(glob.glob(os.path.join(ckpt, "0", "params", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _damage_as_in_the_issue(path):
    """Zero 4 KB in the middle of the file and cut its last 100 bytes (a bad disk, a partial copy)."""
    n = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(n // 2)
        f.write(b"\0" * 4096)
        f.truncate(n - 100)


def _one_line(r, code=2):
    """The error: one line of its own (after any progress line), no traceback."""
    assert r.returncode == code, r.stderr[-2000:]
    lines = r.stderr.rstrip().split("\n")
    assert lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    # only progress lines ('\r' reads as a newline in text mode) before it
    assert all(re.fullmatch(r"([a-z ]+ \d+/\d+)?", x) for x in lines[:-1]), r.stderr[-2000:]
    return lines[-1]


def test_the_issues_damaged_checkpoint_is_refused_by_infer_reshard_and_export(imported, tmp_path):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(imported, damaged)
    data = _largest_data_file(damaged)
    _damage_as_in_the_issue(data)
    r = run_script("infer.py", "--mesh", "1x1x1x1", "--ckpt", damaged, "--prompt-ids", "[[1, 2, 3, 4]]",
                   "--max-new-tokens", "8", timeout=120)
    line = _one_line(r)
    assert os.path.basename(data) in line and "damaged" in line, line
    r = run_script("reshard.py", damaged, tmp_path / "resharded", "--mesh", "1x2x2x2", timeout=120)
    assert os.path.basename(data) in _one_line(r)
    r = run_script("export_hf.py", damaged, tmp_path / "exported", timeout=120)
    assert os.path.basename(data) in _one_line(r)
    assert sorted(os.listdir(tmp_path)) == ["damaged"]  # nothing written


def test_checksums_do_not_depend_on_the_mesh_or_where_they_are_computed():
    import jax
    import ml_dtypes
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    host = {"a": rng.standard_normal((4, 8, 6)).astype(np.float32),
            "b": rng.standard_normal((8, 5)).astype(ml_dtypes.bfloat16), "c": np.float32(3.5)}
    mesh = make_mesh(parse_mesh("1x2x2x2"))
    dev = {"a": jax.device_put(host["a"], NamedSharding(mesh, P("pp", ("tp", "ep")))),
           "b": jax.device_put(host["b"], NamedSharding(mesh, P(("tp", "pp")))), "c": jax.numpy.float32(3.5)}
    want = ckformat.tensor_checksums(host)
    assert ckformat.tensor_checksums(dev) == want
    assert ckformat.checksum_of_blocks(host["a"][i] for i in range(4)) == want["a"]
    # an independent reference for the definition, on a tiny array
    bits = host["a"].reshape(-1).view(np.uint32).astype(np.uint64)
    w = (np.arange(bits.size, dtype=np.uint64) * 2654435761 + 1) % 2**32
    assert want["a"] == f"{int(bits.sum() % 2**32):08x}-{int((bits * w).sum() % 2**32):08x}"
    moved = host["a"].copy()
    moved[0, 0, :2] = moved[0, 0, 1::-1]  # swapping two elements keeps the plain sum
    assert ckformat.tensor_checksums({"a": moved})["a"] != want["a"]


def test_a_checkpoint_without_checksums_restores_with_one_warning(imported, tmp_path, capfd):
    old = str(tmp_path / "old")
    shutil.copytree(imported, old)
    path = os.path.join(old, "0", "meta", "metadata")
    meta = json.load(open(path))
    del meta["checksums"]
    json.dump(meta, open(path, "w"))
    mesh, lay = make_mesh(parse_mesh("1x1x1x1")), load_layout("seed")
    _, a, _ = checkpoint.restore(old, mesh, lay)
    _, b, _ = checkpoint.restore(imported, mesh, lay)
    checkpoint.restore(old, mesh, lay)
    err = capfd.readouterr().err
    assert err.count("saved without checksums") == 1 and repr(old) in err, err
    for n in b:
        assert np.array_equal(np.asarray(a[n]), np.asarray(b[n])), n


@pytest.mark.parametrize("script, extra", [("import_hf.py", [FIXTURE]), ("export_hf.py", ["CKPT"]),
                                           ("reshard.py", ["CKPT", "--mesh", "1x1x1x1"]),
                                           ("reshard.py", ["CKPT", "--mesh", "1x1x1x1", "--force"])])
def test_out_or_dst_that_is_a_regular_file_is_one_line_and_exit_code_2(script, extra, imported, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    args = [imported if a == "CKPT" else a for a in extra]
    r = run_script(script, *args[:1], target, *args[1:], timeout=120)
    assert "is not a directory" in _one_line(r) and target.read_text() == "keep me"


def test_metadata_errors_name_the_file_and_the_reason(imported, tmp_path):
    cases = {"missing": lambda d: os.remove(os.path.join(d, "0", "meta", "metadata")),
             "garbled": lambda d: open(os.path.join(d, "0", "meta", "metadata"), "w").write('{"format": '),
             "no-meta": lambda d: shutil.rmtree(os.path.join(d, "0", "meta"))}
    want = {"missing": "metadata: No such file", "garbled": "metadata is not valid JSON",
            "no-meta": "has no 'meta' item: not a moejax checkpoint"}
    for name, damage in cases.items():
        d = str(tmp_path / name)
        shutil.copytree(imported, d)
        damage(d)
        with pytest.raises(UserError, match=want[name]):
            checkpoint.read_meta(d)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        checkpoint.read_meta(str(f))


def test_import_errors_name_the_file_and_the_reason(tmp_path, monkeypatch):
    from moejax.checkpoint import hf

    trunc = tmp_path / "trunc"
    shutil.copytree(FIXTURE, trunc)
    n = os.path.getsize(trunc / "model.safetensors")
    with open(trunc / "model.safetensors", "r+b") as f:
        f.truncate(n - 100)
    r = run_script("import_hf.py", trunc, tmp_path / "out")
    line = _one_line(r)
    assert "model.safetensors" in line and "truncated" in line and not os.path.exists(tmp_path / "out")
    shard = tmp_path / "shard"
    shutil.copytree(FIXTURE, shard)
    os.rename(shard / "model.safetensors", shard / "part-1.safetensors")
    from safetensors import safe_open

    with safe_open(str(shard / "part-1.safetensors"), framework="numpy") as f:
        names = list(f.keys())
    index = {"weight_map": {k: "part-1.safetensors" if i % 2 else "part-2.safetensors" for i, k in enumerate(names)}}
    json.dump(index, open(shard / "model.safetensors.index.json", "w"))
    r = run_script("import_hf.py", shard, tmp_path / "out")
    line = _one_line(r)
    assert "part-2.safetensors" in line and "No such file" in line, line
    # a permission problem says so (tests run as root, where chmod does not deny: simulate the open)
    real_open = open

    def denied(path, *a, **k):
        if str(path).endswith("config.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(UserError, match="config.json: Permission denied"):
        hf.config_from_hf(FIXTURE)


_BUGGY = """
import sys
sys.path.insert(0, {repo!r})
import orbax.checkpoint as ocp
real = ocp.CheckpointManager.restore
def restore(self, step, args=None, **kw):
    if 'params' in getattr(args, 'keys', lambda: [])():
        raise TypeError("a bug inside the restore")
    return real(self, step, args=args, **kw)
ocp.CheckpointManager.restore = restore
sys.argv = ["infer.py"] + sys.argv[1:]
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def test_a_bug_during_restore_is_a_traceback_and_exit_code_1(imported):
    code = _BUGGY.format(repo=REPO, script=os.path.join(REPO, "scripts", "infer.py"))
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "MALLOC_ARENA_MAX": "2"}  # no re-exec
    r = subprocess.run([sys.executable, "-c", code, "--mesh", "1x1x1x1", "--ckpt", imported, "--prompt-ids",
                        "[[1, 2]]", "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" in r.stderr and "TypeError: a bug inside the restore" in r.stderr
    assert "corrupt" not in r.stderr and "error: checkpoint" not in r.stderr


_DAMAGING_SAVE = """
import glob, os, sys
sys.path.insert(0, {repo!r})
from moejax.checkpoint import blocks as ckstream
real = ckstream.StepWriter.finish
def finish(self, meta):
    real(self, meta)
    data = max(glob.glob(os.path.join(self.params_dir, "d", "*")), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        f.write(bytes(64))
ckstream.StepWriter.finish = finish
sys.argv = ["import_hf.py"] + sys.argv[1:]
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def test_import_reads_back_what_it_wrote_and_removes_a_damaged_result(tmp_path):
    code = _DAMAGING_SAVE.format(repo=REPO, script=os.path.join(REPO, "scripts", "import_hf.py"))
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "MALLOC_ARENA_MAX": "2"}  # no re-exec
    r = subprocess.run([sys.executable, "-c", code, FIXTURE, str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=120)
    line = _one_line(r)
    assert "damaged" in line and re.search(r"/out\.tmp-\d+/0/params/d/", line), line  # the file, by its checksum
    assert os.listdir(tmp_path) == []  # no OUT, no temporary directory


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reshard_catches_an_injected_mismatch_and_leaves_no_destination(imported, tmp_path, dtype):
    r = run_script("reshard.py", imported, tmp_path / "dst", "--mesh", "1x2x2x2", "--dtype", dtype,
                   env={"MOEJAX_RESHARD_TEST_DAMAGE": "w2"}, timeout=180)
    line = _one_line(r)
    assert "verification failed: tensor(s) w2 " in line and "nothing was written" in line, line
    assert os.listdir(tmp_path) == []  # no DST, no temporary directory


def _config_with(tmp_path, change):
    d = tmp_path / "hf"
    d.mkdir()
    cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
    cfg.update(change)
    json.dump(cfg, open(d / "config.json", "w"))
    return str(d)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "llama3", "factor": 8.0}},
     "rope_parameters rope_type='llama3' is not supported (moejax implements default, linear, yarn)"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling rope_type='dynamic' is not supported"),
])
def test_import_refuses_biases_and_rope_scaling_it_does_not_compute(change, message, tmp_path):
    from moejax.checkpoint import hf

    with pytest.raises(UserError, match=re.escape(message)):
        hf.config_from_hf(_config_with(tmp_path, change))


@pytest.mark.parametrize("change, theta, scaling", [
    # a legacy rope_scaling object replaces rope_parameters (transformers 5.x's convert_rope_params_to_dict)
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5}, 5e5,
     {"rope_type": "linear", "factor": 2.0}),
    # yarn without original_max_position_embeddings: max_position_embeddings (standardize_rope_params)
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}, 1e4,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 131072}),
    # a top-level original_max_position_embeddings wins, and a missing factor is max / original
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "original_max_position_embeddings": 8},
      "original_max_position_embeddings": 4096}, 1e4,
     {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096}),
])
def test_import_reads_rope_scaling_as_transformers_standardizes_it(change, theta, scaling, tmp_path):
    from moejax.checkpoint import hf

    cfg = hf.config_from_hf(_config_with(tmp_path, change))
    assert (cfg.rope_theta, cfg.rope) == (theta, scaling)
