"""The package's shape: imports point one way, each job has one place, the Mixtral table is today's
model exactly, and every command resolves the same flags to the same run spec."""

import ast
import os

import pytest
from jax.sharding import PartitionSpec as P

from helpers import REPO
from moejax.cli import flags
from moejax.config.model import load_config
from moejax.models import counts, registry
from moejax.models.params import param_axes, param_shapes, param_specs, quant_dims
from moejax.parallel.mesh import parse_mesh
from moejax.parallel.rules import load_layout

PKG = os.path.join(REPO, "moejax")
MAX_LINES = 420  # "split a file before it passes ~400 lines"


def _modules() -> dict:
    """{dotted module name: path} of every module in the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, name: str, modules: dict) -> set:
    """The package modules `path` imports, anywhere in it (module level or inside functions)."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):  # imports for type annotations only are not dependencies
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    got = set()
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            got.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            got.add(base)
            got.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in got if m in modules and m != name}


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_the_import_graph_has_no_cycles(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _product(m: str) -> bool:
    return not (m.startswith("moejax.cli") or m.startswith("moejax.bench") or m == "moejax.__main__")


def test_nothing_outside_the_benchmark_packages_imports_them(graph):
    """moejax.bench (clients, peers, rooflines) is used by the `moejax bench` commands only."""
    bad = {m: sorted(d for d in deps if d.startswith("moejax.bench")) for m, deps in graph.items()
           if not (m.startswith("moejax.bench") or m.startswith("moejax.cli.bench"))}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_product_never_imports_the_commands(graph):
    bad = {m: sorted(d for d in deps if d.startswith("moejax.cli")) for m, deps in graph.items() if _product(m)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_only_the_command_package_parses_flags():
    for name, path in _modules().items():
        if name.startswith("moejax.cli"):
            continue
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "argparse" not in names, f"{name} imports argparse"
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("parse_args", "add_argument"), f"{name} parses flags ({node.attr})"


def test_shared_code_never_branches_on_a_family_name():
    families = set(registry.FAMILIES)
    for name, path in _modules().items():
        if any(name.startswith(f"moejax.models.{f}") for f in families):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not families & set(consts), f"{name}:{node.lineno} compares with a family name"


def test_no_file_in_the_package_passes_the_size_limit():
    sizes = {name: sum(1 for _ in open(path)) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_the_platform_is_read_only_in_the_run_spec():
    """jax.default_backend() is read where a RunSpec is made (and by commands and benchmarks), never
    in the per-device code, which takes the run spec's platform."""
    readers = set()
    for name, path in _modules().items():
        if "default_backend()" in open(path).read():
            readers.add(name)
    assert {m for m in readers if _product(m)} == {"moejax.models.runspec"}


# ---- the Mixtral table is the model as it was -------------------------------------------------

# What moejax/rules.py and ModelConfig.layer_params held before the family boundary (commit 42cbf67).
BEFORE_AXES = {
    "embed": ("vocab", None), "final_norm": (None,), "lm_head": (None, "vocab"), "attn_norm": ("layers", None),
    "wq": ("layers", None, "heads", None), "wk": ("layers", None, "kv_heads", None),
    "wv": ("layers", None, "kv_heads", None), "wo": ("layers", "heads", None, None), "moe_norm": ("layers", None),
    "router": ("layers", None, None), "w1": ("layers", "experts", None, "expert_ffn"),
    "w3": ("layers", "experts", None, "expert_ffn"), "w2": ("layers", "experts", "expert_ffn", None)}
BEFORE_QUANT_DIMS = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w1": (2,), "w3": (2,), "w2": (2,)}


def _before_shapes(c):
    L, E, D, H, G, K, F, V = (c.num_layers, c.num_experts, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
                              c.expert_ffn, c.vocab_size)
    return {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V), "attn_norm": (L, D), "wq": (L, D, H, K),
            "wk": (L, D, G, K), "wv": (L, D, G, K), "wo": (L, H, K, D), "moe_norm": (L, D), "router": (L, D, E),
            "w1": (L, E, D, F), "w3": (L, E, D, F), "w2": (L, E, F, D)}


@pytest.mark.parametrize("config", ["seed", "seed-10b", "tiny", "tiny-mha"])
def test_the_mixtral_table_reproduces_the_shapes_axes_and_quant_dims_of_before(config):
    cfg = load_config(config)
    assert registry.family_of(cfg).model_type == "mixtral"
    assert param_shapes(cfg) == _before_shapes(cfg)
    assert param_axes(cfg) == BEFORE_AXES
    assert quant_dims(cfg) == BEFORE_QUANT_DIMS
    q = param_shapes(cfg, "int8")
    for name, dims in BEFORE_QUANT_DIMS.items():
        assert q[name + "_scale"] == tuple(1 if i in dims else n for i, n in enumerate(_before_shapes(cfg)[name]))
    D, H, G, K, F, E = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.expert_ffn, cfg.num_experts
    assert counts.layer_params(cfg) == {"attn_norm": D, "wq": D * H * K, "wk": D * G * K, "wv": D * G * K,
                                        "wo": H * K * D, "moe_norm": D, "router": D * E, "w1": E * D * F,
                                        "w3": E * D * F, "w2": E * F * D}
    assert param_specs(load_layout("seed"), cfg)["w1"] == P("pp", ("ep", "tp"), None, None)


def test_an_unknown_family_is_one_line_naming_the_valid_ones():
    from moejax.config.model import config_from_dict
    from moejax.errors import UserError

    cfg = config_from_dict({**{k: v for k, v in load_config("tiny").__dict__.items() if k != "name"},
                            "family": "qwen9_moe"}, "x")
    with pytest.raises(UserError, match="model family 'qwen9_moe' is not implemented; valid: deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe"):
        registry.family_of(cfg)


# ---- one run spec for the same flags ----------------------------------------------------------

def _parsers():
    from moejax.cli import eval as eval_cmd
    from moejax.cli import infer, serve, train
    from moejax.cli.bench import model as bench_model

    return {"infer": infer.parse_args, "serve": serve.parse_args, "bench model": bench_model.parse_args,
            "eval": lambda a: eval_cmd.parse_args(a + ["--ckpt", "x", "--data", "y", "--seq-len", "8"]),
            "train": lambda a: train.fill_defaults(train.parse_args(a + ["--config", "tiny"]))}


@pytest.mark.parametrize("given", [
    [],
    ["--capacity-policy", "drop"],
    ["--capacity-policy", "reroute", "--moe-kernel", "batched", "--microbatches", "2"],
    ["--capacity-policy", "dropless", "--capacity-factor", "3.5", "--dtype", "bfloat16"],
])
def test_every_command_resolves_the_same_flags_to_the_same_run_spec(given):
    cfg, lay, shape = load_config("tiny"), load_layout("seed"), parse_mesh("1x2x2x2")
    dtype = ["--dtype", "float32"] if "--dtype" not in given else []  # commands' own defaults differ on purpose
    specs = {}
    for name, parse in _parsers().items():
        args = parse(["--mesh", "1x2x2x2"] + given + dtype)
        specs[name] = flags.run_spec(args, cfg, lay, shape, batch=8, platform="cpu", training=False)
    assert all(rs == specs["infer"] for rs in specs.values()), specs


@pytest.mark.parametrize("policy,factor", [("dropless", 2.0), ("drop", 1.25), ("reroute", 1.25)])
def test_the_benchmark_measures_the_capacity_factor_that_infer_runs(policy, factor):
    """bench.py --capacity-policy drop used to measure capacity factor 2.0 while infer.py ran 1.25."""
    from moejax.cli import infer
    from moejax.cli.bench import model as bench_model
    from moejax.cli.bench import moe as bench_moe

    cfg, lay, shape = load_config("tiny"), load_layout("seed"), parse_mesh("1x1x1x1")
    for parse in (infer.parse_args, bench_model.parse_args, bench_moe.parse_args):
        rs = flags.run_spec(parse(["--capacity-policy", policy]), cfg, lay, shape, batch=4, platform="cpu")
        assert rs.capacity_factor == factor, parse


def test_float16_computes_in_bfloat16_on_cpu_unless_asked():
    cfg = load_config("seed")
    assert flags.compute_dtype(None, cfg, "cpu")[0] == "bfloat16"
    assert flags.compute_dtype("float16", cfg, "cpu") == ("float16", None)
    assert flags.compute_dtype(None, cfg, "gpu") == ("float16", None)


def test_the_orbax_handler_names_written_into_streamed_steps_are_the_ones_orbax_writes(tmp_path):
    """blocks.StepWriter writes steps without orbax; they must carry what orbax's own save records."""
    import importlib
    import json

    from moejax.checkpoint import store
    from moejax.checkpoint.format import ORBAX_HANDLERS
    from moejax.models import transformer

    for item, path in ORBAX_HANDLERS.items():
        module, _, cls = path.rpartition(".")
        assert hasattr(importlib.import_module(module), cls), (item, path)
    cfg = load_config("tiny-mha")
    store.save(str(tmp_path / "c"), transformer.init_params(cfg, 0, "float32"), cfg, load_layout("seed"), "float32",
               "1x1x1x1", step=0)
    written = json.load(open(tmp_path / "c" / "0" / "_CHECKPOINT_METADATA"))["item_handlers"]
    assert written == ORBAX_HANDLERS
