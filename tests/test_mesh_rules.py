"""The mesh string, the rules table, the placement report and its bad-input errors."""

import json

import pytest
from jax.sharding import PartitionSpec as P

from helpers import run_script
from moejax.config.model import load_config
from moejax.errors import UserError
from moejax.parallel.mesh import MeshShape, parse_mesh
from moejax.models.placement import expert_ids, placement
from moejax.models.params import param_axes, param_specs
from moejax.parallel.rules import layout_from_dict, load_layout


def test_mesh_strings_parse_in_dp_pp_tp_ep_order():
    assert parse_mesh("4x2x4x4") == MeshShape(dp=4, pp=2, tp=4, ep=4)
    assert parse_mesh("1x1x1x1").size == 1


@pytest.mark.parametrize("text", ["4x2x4", "4x2x4x4x1", "axbxcxd", "", "4*2*4*4"])
def test_malformed_mesh_strings_are_rejected(text):
    with pytest.raises(UserError, match="malformed: expected DPxPPxTPxEP"):
        parse_mesh(text)


@pytest.mark.parametrize("text, axis", [("0x1x1x1", "dp=0"), ("1x-2x1x1", "pp=-2")])
def test_zero_or_negative_axes_are_rejected(text, axis):
    with pytest.raises(UserError, match=f"axis {axis} must be a positive integer"):
        parse_mesh(text)


def test_seed_layout_on_4x2x4x4_gives_every_device_one_distinct_expert_per_layer():
    cfg, lay, mesh = load_config("seed"), load_layout("seed"), parse_mesh("4x2x4x4")
    held = {}
    for t in range(4):
        for e in range(4):
            ids = expert_ids(lay, mesh, {"dp": 0, "pp": 0, "tp": t, "ep": e}, cfg.num_experts)
            assert len(ids) == 1
            held[(t, e)] = ids[0]
    assert sorted(held.values()) == list(range(16))


def test_every_parameter_sharding_comes_from_the_table():
    lay, cfg = load_layout("seed"), load_config("seed")
    specs = param_specs(lay, cfg)
    assert set(specs) == set(param_axes(cfg))
    assert specs["w1"] == P("pp", ("ep", "tp"), None, None)
    assert specs["wq"] == P("pp", None, "tp", None)
    assert specs["embed"] == P("tp", None)
    assert param_specs(load_layout("ep-tp"), cfg)["w2"] == P("pp", "ep", "tp", None)


def test_placement_of_the_seed_plan_passes_the_plans_checklist():
    rep = placement(load_config("seed"), load_layout("seed"), parse_mesh("4x2x4x4"), "float16", 8, 1024)
    pl = rep["placement"]
    assert rep["devices"] == 128 and rep["params_total"] == 452_346_368
    assert (pl["tp_group_size"], pl["layers_per_stage"], pl["experts_per_device_per_layer"]) == (4, 8, 1)
    assert set(rep["plan_checklist"].values()) == {"pass"}
    # per device: 8 layers x (attention/4 + one expert + router + norms) + vocab/4 of embedding and head
    layer = 4 * 512 * 512 // 4 + 3 * 512 * 1024 + 512 * 16 + 2 * 512
    assert pl["param_bytes_per_device"] == 2 * (8 * layer + 2 * 32000 * 512 // 4 + 512)
    # KV: 2 (k, v) x 8 layers x batch 8/16 padded to 16/16 = 1 sequence x 1024 x 4 heads x 32 x 2 bytes
    assert pl["kv_bytes_per_device"] == 2 * 8 * 1 * 1024 * 4 * 32 * 2


@pytest.mark.parametrize("config", ["seed", "seed-10b"])
def test_plan_command_prints_json_for_the_seed_configs(config):
    r = run_script("infer.py", "--mesh", "4x2x4x4", "--plan", "--json", "--config", config, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["mesh"] == {"dp": 4, "pp": 2, "tp": 4, "ep": 4} and rep["devices"] == 128
    assert rep["params_total"] == {"seed": 452_346_368, "seed-10b": 10_063_775_744}[config]
    for key in ("experts_per_device_per_layer", "tp_group_size", "layers_per_stage",
                "param_bytes_per_device", "kv_bytes_per_device"):
        assert key in rep["placement"]
    assert "plan checklist: 128 devices: pass" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--mesh", "4x2x4"], "mesh '4x2x4' is malformed"),
    (["--mesh", "4x0x4x4"], "axis pp=0 must be a positive integer"),
    (["--mesh", "1x1x3x1"], "num_heads=16 is not divisible by the 3 heads shards"),
    (["--mesh", "1x1x1x3"], "num_experts=16 is not divisible by the 3 experts shards"),
    (["--mesh", "1x3x1x1"], "num_layers=16 is not divisible by the 3 layers shards"),
    (["--mesh", "1x1x1x1", "--config", "configs/missing.yaml"], "unknown config 'configs/missing.yaml'"),
    (["--mesh", "1x1x1x1", "--layout", "meshes/missing.yaml"], "unknown layout 'meshes/missing.yaml'"),
])
def test_plan_bad_input_is_one_line_and_exit_code_2(args, message):
    r = run_script("infer.py", "--plan", *args, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_vocab_not_divisible_where_the_layout_splits_it(tmp_path):
    cfg = tmp_path / "odd-vocab.yaml"
    cfg.write_text(open("configs/tiny.yaml").read().replace("vocab_size: 256", "vocab_size: 258"))
    r = run_script("infer.py", "--plan", "--mesh", "1x1x4x1", "--config", str(cfg), timeout=120)
    assert r.returncode == 2 and "vocab_size=258 is not divisible by the 4 vocab shards" in r.stderr


def test_unknown_key_in_a_layout_file_is_named():
    with pytest.raises(UserError, match="unknown logical axis 'expertz'"):
        layout_from_dict({"rules": {"expertz": ["ep"]}}, "bad")
    with pytest.raises(UserError, match="unknown key 'rulez'"):
        layout_from_dict({"rulez": {}}, "bad")
    with pytest.raises(UserError, match="heads cannot use mesh axis 'ep'"):
        layout_from_dict({"rules": {"heads": ["ep"]}}, "bad")
