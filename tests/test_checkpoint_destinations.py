"""No checkpoint tool deletes or writes into what it was given: a DST that is, is inside, contains or
links to the source is refused before any write (one line, exit 2), and every malformed field of a
Hugging Face config.json is one line and exit 2, never a traceback."""

import hashlib
import json
import os
import shutil

import pytest

from helpers import FIXTURE, REPO, run_script
from moejax.checkpoint.transaction import check_destination
from moejax.errors import UserError

V1 = os.path.join(REPO, "tests", "data", "ckpt-v1", "model")


def tree_digest(root: str) -> dict:
    """{relative path: sha256} of every file under root (what 'byte-identical' means here)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _one_line_exit_2(r, *needles):
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_reshard_into_the_directory_that_holds_src_is_refused_and_src_stays_byte_identical(tmp_path):
    outer = tmp_path / "outer"
    shutil.copytree(V1, outer / "inner")
    before = tree_digest(str(outer))
    r = run_script("reshard.py", outer / "inner", outer, "--mesh", "1x1x1x1", "--force")
    _one_line_exit_2(r, "contains SRC", "--force would delete")
    assert tree_digest(str(outer)) == before


@pytest.mark.parametrize("case", ["same", "inside", "contains", "link"])
def test_every_tool_refuses_a_destination_tied_to_its_source_before_writing(tmp_path, case):
    src = tmp_path / "src"
    shutil.copytree(V1, src)
    dst = {"same": src, "inside": src / "sub", "contains": tmp_path, "link": tmp_path / "link"}[case]
    if case == "link":
        os.symlink(src, dst)
    before = tree_digest(str(src))
    for sources in ({"SRC": str(src)}, {"CKPT": str(src)}, {"HF_DIR": str(src)}):
        with pytest.raises(UserError, match={"same": "same directory as", "inside": "inside", "contains": "contains",
                                             "link": "a link to"}[case]):
            check_destination(str(dst), sources, force=True)
    assert tree_digest(str(src)) == before


@pytest.mark.parametrize("tool,args", [
    ("reshard.py", ["{src}", "{src}/x", "--mesh", "1x1x1x1"]),
    ("quantize.py", ["{src}", "{src}"]),
    ("export_hf.py", ["{src}", "{link}", "--force"]),
    ("import_hf.py", ["{hf}", "{hf}/sub"]),
])
def test_each_checkpoint_command_refuses_it_in_one_line(tmp_path, tool, args):
    src, hf = tmp_path / "src", tmp_path / "hf"
    shutil.copytree(V1, src)
    shutil.copytree(FIXTURE, hf)
    os.symlink(src, tmp_path / "link")
    before = tree_digest(str(tmp_path))
    r = run_script(tool, *[a.format(src=src, hf=hf, link=tmp_path / "link") for a in args])
    _one_line_exit_2(r, "DST")
    assert tree_digest(str(tmp_path)) == before


def test_replacing_a_destination_that_is_a_link_replaces_the_link_not_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(V1, elsewhere)
    before = tree_digest(str(elsewhere))
    os.symlink(elsewhere, tmp_path / "dst")
    r = run_script("reshard.py", V1, tmp_path / "dst", "--mesh", "1x2x2x2", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not os.path.islink(tmp_path / "dst") and os.path.isdir(tmp_path / "dst")
    assert tree_digest(str(elsewhere)) == before
    assert not [n for n in os.listdir(tmp_path) if ".old-" in n or ".tmp-" in n]


def _config(tmp_path, change):
    hf = tmp_path / "hf"
    shutil.copytree(FIXTURE, hf)
    c = json.load(open(hf / "config.json"))
    c = change(c)
    with open(hf / "config.json", "w") as f:
        json.dump(c, f)
    return hf


def _drop(field):
    return lambda c: {k: v for k, v in c.items() if k != field}


@pytest.mark.parametrize("change,needle", [
    (_drop("num_attention_heads"), "missing field 'num_attention_heads'"),
    (lambda c: [c], "expected a JSON object"),
    (lambda c: {**_drop("head_dim")(c), "num_attention_heads": 0}, "num_attention_heads=0"),
    (lambda c: {**c, "rope_theta": "fast", "rope_parameters": None}, "rope_theta='fast' must be a number"),
    (lambda c: {**c, "max_position_embeddings": "long"}, "max_position_embeddings='long' must be an integer"),
    (lambda c: {**c, "num_hidden_layers": 2.5}, "num_hidden_layers=2.5 must be an integer"),
    (lambda c: {**c, "rope_parameters": [1]}, "rope_parameters must be a JSON object"),
    (lambda c: {**c, "model_type": "qwen9_moe"}, "model family 'qwen9_moe' is not implemented; valid: deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe"),
    (lambda c: {**c, "rms_norm_eps": 10 ** 400}, "rms_norm_eps="),
])
def test_a_malformed_config_json_is_one_line_and_exit_code_2(tmp_path, change, needle):
    hf = _config(tmp_path, change)
    r = run_script("import_hf.py", hf, tmp_path / "out")
    _one_line_exit_2(r, needle)
    assert not os.path.exists(tmp_path / "out")
