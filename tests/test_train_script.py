"""scripts/train.py, eval.py and plot_train.py end to end: the same losses on two meshes, a resume that
continues bit-exactly, a kill -9 that loses nothing, eval.py equal to transformers, export round trip,
and bad input as one line with exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import FIXTURE, REPO, command_env, run_script
from moejax.checkpoint import store as checkpoint
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout

DATA = os.path.join(REPO, "data", "tinyshakespeare.txt")
COMMON = ["--config", "tiny", "--data", DATA, "--batch", "8", "--seq-len", "16", "--lr", "3e-3", "--warmup", "2",
          "--dtype", "float32", "--seed", "1", "--eval-windows", "8"]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(out, *extra, steps=6, mesh="1x1x1x1"):
    r = run_script("train.py", *COMMON, "--mesh", mesh, "--steps", steps, "--out", out, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "six")
    summary = _train(out, "--eval-every", "3")
    return out, summary


@pytest.mark.slow
def test_one_device_and_1x2x2x2_train_with_the_same_losses(six_steps, tmp_path):
    out, summary = six_steps
    one = _log(out)
    assert [r["step"] for r in one] == [1, 2, 3, 4, 5, 6] and "val_loss" in one[2] and "val_loss" in one[5]
    assert summary["final_train_loss"] == one[-1]["loss"] and summary["final_val_loss"] == one[-1]["val_loss"]
    assert one[-1]["loss"] < one[0]["loss"]
    _train(str(tmp_path / "eight"), "--eval-every", "3", mesh="1x2x2x2")
    eight = _log(str(tmp_path / "eight"))
    assert len(eight) == 6
    for a, b in zip(one, eight):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a["step"], a["loss"], b["loss"])


@pytest.mark.slow
def test_resume_continues_exactly_where_an_unbroken_run_goes(six_steps, tmp_path):
    out, _ = six_steps
    split = str(tmp_path / "split")
    _train(split, "--eval-every", "3", steps=3)
    r = run_script("train.py", *COMMON, "--steps", "6", "--out", split, "--eval-every", "3")
    assert r.returncode != 0 and "already holds a training run (step 3)" in r.stderr  # not without --resume
    _train(split, "--eval-every", "3", "--resume")
    want = _log(out)
    got = _log(split)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(want[3:], got[3:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)  # bit-equal
    assert got[-1]["val_loss"] == want[-1]["val_loss"]


_TMP = ".orbax-checkpoint-tmp"


@pytest.mark.slow
def test_a_run_killed_during_a_save_resumes_from_the_last_complete_step(tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(REPO, "scripts", "train.py"), *COMMON, "--steps", "400", "--save-every",
           "1", "--out", out]
    env = command_env()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = os.path.join(out, "state")
    deadline, caught = time.time() + 240, False
    while time.time() < deadline and p.poll() is None:
        names = os.listdir(state) if os.path.isdir(state) else []
        if any(_TMP in n for n in names) and any(n.isdigit() for n in names):
            os.kill(p.pid, signal.SIGKILL)  # mid-save: a temporary step directory exists
            caught = True
            break
        time.sleep(0.002)
    p.wait()
    assert caught, "never saw a save in progress"
    done = sorted(int(n) for n in os.listdir(state) if n.isdigit())
    assert done, os.listdir(state)
    r = run_script("train.py", *COMMON, "--steps", str(done[-1] + 2), "--save-every", "1", "--out", out,
                   "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [rec["step"] for rec in _log(out)]
    assert steps[-2:] == [done[-1] + 1, done[-1] + 2]


@pytest.mark.slow
def test_trained_model_exports_round_trips_and_serves(six_steps, tmp_path):
    out, summary = six_steps
    model_dir = summary["model"]
    r = run_script("export_hf.py", model_dir, str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    r = run_script("import_hf.py", str(tmp_path / "hf"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    mesh, lay = make_mesh(parse_mesh("1x1x1x1")), load_layout("seed")
    _, a, _ = checkpoint.restore(model_dir, mesh, lay)
    cfg, b, _ = checkpoint.restore(str(tmp_path / "back"), mesh, lay)
    for name in a:
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name
    r = run_script("infer.py", "--ckpt", model_dir, "--prompt", "ROMEO:", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"][0]) == 4
    r = run_script("plot_train.py", os.path.join(out, "log.jsonl"), str(tmp_path / "loss.png"))
    assert r.returncode == 0 and os.path.getsize(tmp_path / "loss.png") > 10_000, r.stderr


def test_eval_py_scores_windows_as_transformers_does(imported, tmp_path):
    ref = np.load(os.path.join(FIXTURE, "train_reference.npz"))
    ids = ref["full_input_ids"]  # [3, 20] byte values
    (tmp_path / "text.bin").write_bytes(bytes(ids.reshape(-1).astype(np.uint8)) + b"tail")  # partial window
    r = run_script("eval.py", "--ckpt", imported, "--data", str(tmp_path / "text.bin"), "--seq-len",
                   "20", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["windows"] == 3 and got["predicted_tokens"] == 3 * 19
    for key in ("ce_loss", "aux_loss"):
        assert abs(got[key] - float(ref[f"full_{key}"])) <= 1e-5 * float(ref[f"full_{key}"]), key
    assert abs(got["perplexity"] - np.exp(float(ref["full_ce_loss"]))) <= 1e-4 * got["perplexity"]


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/x.txt"], "no such file"),
    (["--data", "EMPTY"], "is empty"),
    (["--data", "SHORT"], "fewer than one window"),
    (["--seq-len", "300"], "must be in [2, 256]"),
    (["--batch", "5", "--mesh", "1x1x1x2"], "not a multiple of 2"),
    (["--resume"], "holds no complete train state"),
    (["--init-ckpt", "HF"], "does not match the checkpoint"),
    (["--lr", "1e30", "--warmup", "0", "--steps", "30"], "is not finite"),
])
def test_bad_input_is_one_line_and_exit_code_2(request, tmp_path, args, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"x" * 100)
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt")}
    if "HF" in args:
        subst["HF"] = request.getfixturevalue("imported")
    args = [subst.get(a, a) for a in args]  # given after COMMON, so these flags win
    r = run_script("train.py", *COMMON, "--steps", "2", "--out", str(tmp_path / "out"), *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    if "--lr" in args:  # the diverged run saved nothing and wrote no model
        assert not os.path.exists(tmp_path / "out" / "model")


def test_init_ckpt_without_config_trains_the_checkpoints_model(imported, tmp_path):
    """--init-ckpt alone takes the checkpoint's config (an imported family's, not the demo's): at
    a learning rate of 1e-30 (updates below float32 rounding) the model written after two steps is the
    checkpoint, tensor for tensor."""
    out = str(tmp_path / "out")
    r = run_script("train.py", "--init-ckpt", imported, "--data", DATA, "--batch", "2", "--seq-len", "16",
                   "--steps", "2", "--lr", "1e-30", "--warmup", "0", "--dtype", "float32", "--eval-windows", "2",
                   "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    mesh, lay = make_mesh(parse_mesh("1x1x1x1")), load_layout("seed")
    cfg_a, a, _ = checkpoint.restore(imported, mesh, lay)
    cfg_b, b, _ = checkpoint.restore(os.path.join(out, "model"), mesh, lay)
    assert cfg_b == cfg_a
    for name in a:
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name
