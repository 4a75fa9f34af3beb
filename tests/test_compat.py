"""What the code before the package restructuring wrote and printed still reads and prints the same.

tests/data/ckpt-v1/ holds checkpoints written by commit 42cbf67 (float32 and int8) with the SHA-256 of
every tensor that code restored, the tokens it generated from them, and the tokens and expert loads of
`scripts/infer.py --mesh 4x2x4x4` on random seed weights in both dtypes (its README says how).
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, run_script
from moejax.checkpoint import store as checkpoint
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout

V1 = os.path.join(REPO, "tests", "data", "ckpt-v1")
EXPECTED = json.load(open(os.path.join(V1, "expected.json")))


@pytest.mark.parametrize("name", ["model", "model-int8"])
@pytest.mark.parametrize("mesh", ["1x1x1x1", "1x2x2x2"])
def test_a_checkpoint_written_before_the_restructuring_restores_bit_identically(name, mesh):
    cfg, params, meta = checkpoint.restore(os.path.join(V1, name), make_mesh(parse_mesh(mesh)), load_layout("seed"))
    got = {n: [str(a.dtype), list(a.shape), hashlib.sha256(np.asarray(a).tobytes()).hexdigest()]
           for n, a in sorted(params.items())}
    assert got == EXPECTED["restored_sha256"][name]
    assert cfg.family == "mixtral" and sorted(meta) == EXPECTED["meta_keys"]


@pytest.mark.parametrize("name", ["model", "model-int8"])
def test_a_checkpoint_written_before_the_restructuring_generates_the_same_tokens(name):
    gen = EXPECTED["generate"]
    for mesh in gen["meshes"]:
        r = run_script("infer.py", "--ckpt", os.path.join(V1, name), "--mesh", mesh, *gen["args"], "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["generated_ids"] == gen[name], mesh


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # commands provision their own devices


def _infer_4x2x4x4(command: list) -> dict:
    r = subprocess.run(command + ["--mesh", "4x2x4x4", "--json"], capture_output=True, text=True,
                       cwd="/", env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_infer_on_the_deployment_mesh_prints_what_it_printed_before():
    """The README's first command, from another working directory: same tokens, same expert loads
    in every layer. (Its float32 twin, `moejax infer --dtype float32` on 4x2x4x4, was dropped for the
    suite's time, 66-83 s: float32 sharded runs are compared with the reference on smaller meshes.)"""
    want = EXPECTED["infer_4x2x4x4"]["default"]
    got = _infer_4x2x4x4([sys.executable, os.path.join(REPO, "scripts", "infer.py")])
    assert got["dtype"] == want["dtype"]
    assert got["generated_ids"] == want["generated_ids"]
    assert got["moe"]["requested_tokens_per_expert"] == want["requested_tokens_per_expert"]
