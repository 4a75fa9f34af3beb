"""Quantised Hugging Face weights: FP8 e4m3 with block scales (DeepSeek-V3) and MXFP4 experts (gpt-oss)
dequantise bit for bit to transformers' own values, for every code and every exponent (transformers'
outputs of format_cases' inputs are recorded in data/hf-formats.json by scripts/hf_format_fixtures.py:
their sha256 with NaNs canonical); an import of a checkpoint stored that way gives exactly the
dequantised tensors and says how many it converted; one expert is read alone; a quantisation moejax
does not read is one line and exit code 2. Needs neither torch nor transformers."""

import functools
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import format_cases
from helpers import FIXTURE, REPO, command_env
from moejax.checkpoint import hf, hf_formats
from moejax.checkpoint import store as checkpoint
from moejax.errors import UserError
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout

_UINT = {2: np.uint16, 4: np.uint32}


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal bit patterns, every NaN counted equal to any NaN (their payloads are not specified)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    nan = np.isnan(got.astype(np.float32))
    if not np.array_equal(nan, np.isnan(want.astype(np.float32))):
        return False
    u = _UINT[got.dtype.itemsize]
    return np.array_equal(got.view(u)[~nan], want.view(u)[~nan])


# ---- the functions, against transformers' (data/hf-formats.json) -------------------------------------

@functools.cache
def _cases() -> dict:
    return {c["name"]: c for c in format_cases.cases()}


@functools.cache
def _recorded() -> dict:
    return format_cases.load()["cases"]


def _assert_transformers_gives(name: str, got: np.ndarray) -> None:
    """`got` is, bit for bit (NaNs canonical), what transformers gave for case `name`'s inputs."""
    want, case = _recorded()[name], _cases()[name]
    assert set(_recorded()) == set(_cases()), "the cases changed: rerun scripts/hf_format_fixtures.py"
    assert format_cases.input_digest(case["inputs"]) == want["inputs_sha256"], \
        f"{name}: the inputs changed since data/hf-formats.json was written: rerun scripts/hf_format_fixtures.py"
    assert (got.dtype.name, list(got.shape)) == (want["dtype"], want["shape"]), name
    mine = format_cases.summary(got)
    if mine["sha256"] != want["sha256"]:
        differ = {i: (mine["samples"][i], v) for i, v in want["samples"].items() if mine["samples"][i] != v}
        counts = {k: (mine[k], want[k]) for k in ("nan", "inf", "negative_zero") if mine[k] != want[k]}
        step = -(-got.size // format_cases.N_CHUNKS)
        parts = [f"[{i * step}, {min((i + 1) * step, got.size)})"
                 for i, (a, b) in enumerate(zip(mine["chunks"], want["chunks"])) if a != b]
        pytest.fail(f"{name}: moejax's output is not transformers' (sha256 {mine['sha256'][:16]} != "
                    f"{want['sha256'][:16]}); flat elements that differ somewhere in {len(parts)} of "
                    f"{len(want['chunks'])} parts: {', '.join(parts[:4])}{' ...' if len(parts) > 4 else ''}; "
                    f"samples that differ, index: (moejax, transformers): {differ}; counts that differ: {counts}")


@pytest.mark.parametrize("dtype", format_cases.MXFP4_DTYPES)
def test_mxfp4_equals_transformers_for_every_nibble_in_both_positions_and_every_exponent(dtype):
    blocks, scales = format_cases.mxfp4_inputs()
    got = hf_formats.dequantize_mxfp4(blocks, scales)
    assert got.shape == (2, 16 * 32, 256) and got.dtype == np.float32  # [E, 32G, R]
    if dtype == "bfloat16":  # what transformers loads into a bfloat16 model: our float32, rounded once
        got = got.astype(ml_dtypes.bfloat16)
    _assert_transformers_gives(format_cases.mxfp4_name(dtype), got)
    f = got.astype(np.float32)
    assert np.isinf(f).any() and (f == 0).any() and np.signbit(f[f == 0]).any()  # the limits were reached


def test_mxfp4_one_expert_equals_that_expert_of_the_whole_tensor():
    blocks, scales = format_cases.mxfp4_inputs()
    whole = hf_formats.dequantize_mxfp4(blocks, scales)
    assert all(_same(hf_formats.dequantize_mxfp4(blocks[e], scales[e]), whole[e]) for e in range(2))


@pytest.mark.parametrize("shape,block", format_cases.FP8_SHAPES)
@pytest.mark.parametrize("scale_dtype", format_cases.FP8_SCALE_DTYPES)
def test_fp8_equals_transformers_with_partial_last_blocks_and_every_byte(shape, block, scale_dtype):
    w = format_cases.every_e4m3_byte(shape)
    s = format_cases.fp8_scales(shape, block, scale_dtype)
    assert list(s.shape) == hf_formats.fp8_scale_shape(shape, block)
    got = hf_formats.dequantize_fp8(w, s, block)
    assert got.dtype == np.float32
    _assert_transformers_gives(format_cases.fp8_name(shape, block, scale_dtype), got)
    # the limits were reached: the NaN codes (and the NaN scale) give NaN, a zero code a signed zero
    assert np.isnan(got).any() and (got == 0).any() and np.signbit(got[got == 0]).any()


def test_fp8_load_time_dequantisation_into_bfloat16_is_ours_rounded_once():
    """transformers' load path (Fp8Dequantize, which needs whole blocks) multiplies in float32 and casts
    once to the model's dtype, as the import does."""
    inputs = _cases()[format_cases.FP8_LOAD]["inputs"]
    got = hf_formats.dequantize_fp8(inputs["weight"], inputs["scale_inv"], (128, 128)).astype(ml_dtypes.bfloat16)
    _assert_transformers_gives(format_cases.FP8_LOAD, got)


# ---- import: the Mixtral fixture stored as FP8 and as MXFP4 -------------------------------------------
# The values wanted are hf_formats' dequantisations, which the tests above show are transformers'.

def _fp8_quantise(w: np.ndarray, block) -> tuple:
    """A plain block quantiser: scale_inv = block amax / 448, codes rounded by ml_dtypes."""
    b0, b1 = block
    grid = hf_formats.fp8_scale_shape(w.shape, block)
    s = np.ones(grid, np.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            s[i, j] = max(float(np.abs(w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]).max()), 1e-12) / 448
    full = np.repeat(np.repeat(s, b0, 0), b1, 1)[:w.shape[0], :w.shape[1]]
    return (w / full).astype(ml_dtypes.float8_e4m3fn), s


def _mxfp4_quantise(t_ECR: np.ndarray) -> tuple:
    """The blocks [E, R, C/32, 16] and scales [E, R, C/32] that stand for t [E, C, R]: per group of 32,
    the exponent that brings its largest value within 6, then the nearest e2m1 code."""
    x = np.swapaxes(t_ECR, 1, 2)  # [E, R, C]
    g = x.reshape(x.shape[:2] + (-1, 32))
    exp = np.ceil(np.log2(np.maximum(np.abs(g).max(-1), 2.0 ** -100) / 6)).astype(np.int32)
    codes = np.abs(np.ldexp(g, -exp[..., None])[..., None] - hf_formats.FP4_VALUES).argmin(-1).astype(np.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).astype(np.uint8)


_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e8m0fnu": "F8_E8M0",
             "uint8": "U8"}


def _save_safetensors(path, tensors: dict, metadata: dict) -> None:
    """A safetensors file as the format defines it (safetensors.numpy has no float8): the header's
    length (u64 little-endian), the JSON header (padded with spaces to 8 bytes), the tensors' bytes."""
    header, off = {"__metadata__": metadata}, 0
    for k in sorted(tensors):
        n = tensors[k].nbytes
        header[k] = {"dtype": _ST_DTYPE[tensors[k].dtype.name], "shape": list(tensors[k].shape),
                     "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[k]).tobytes())


def _rewrite(tmp_path, name, tensors, quantization_config, fixture=FIXTURE):
    out = tmp_path / name
    shutil.copytree(fixture, out)
    cfg = json.load(open(out / "config.json"))
    json.dump({**cfg, "quantization_config": quantization_config}, open(out / "config.json", "w"))
    _save_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    return out


def _fixture():
    from safetensors.numpy import load_file

    return load_file(os.path.join(FIXTURE, "model.safetensors"))


def _assert_imported(ckpt, hf_dir, want: dict):
    """Every moejax tensor of `ckpt` is `want` (HF name -> HF tensor), through the family's map."""
    cfg, params, _ = checkpoint.restore(str(ckpt), make_mesh(parse_mesh("1x1x1x1")), load_layout("seed"))
    params = {n: np.asarray(a) for n, a in params.items()}
    for hf_name, name, idx, fn in hf.hf_tensors(hf.config_from_hf(str(hf_dir))):
        assert np.array_equal(params[name][idx], fn(want[hf_name])), hf_name


def _moejax(*args, **kw):
    return subprocess.run([sys.executable, "-m", "moejax", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=command_env(), timeout=600, **kw)


def test_an_fp8_checkpoint_imports_as_transformers_dequantises_it(tmp_path):
    """Every attention and expert matrix stored as FP8 in 32 x 48 blocks (64 and 128 are no multiple of
    48: partial blocks): the import holds transformers' dequantised values, counts 32 tensors and says so."""
    t = _fixture()
    stored, want = dict(t), dict(t)
    for k, w in t.items():
        if k.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")):
            stored[k], stored[k + "_scale_inv"] = _fp8_quantise(w, (32, 48))
            want[k] = hf_formats.dequantize_fp8(stored[k], stored[k + "_scale_inv"], (32, 48))
            assert not np.array_equal(want[k], w)  # lossy: the values imported are the dequantised ones
    src = _rewrite(tmp_path, "fp8", stored, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                             "weight_block_size": [32, 48]})
    r = _moejax("ckpt", "import-hf", src, tmp_path / "ck", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["converted"] == {"fp8_e4m3_block": 32, "mxfp4": 0}
    assert "dequantised 32 FP8 e4m3 block-scaled tensors to float32" in r.stdout
    _assert_imported(tmp_path / "ck", src, want)


def _mxfp4_fixture(tmp_path):
    """The fixture with transformers 5.x's fused experts (gate_up_proj [E, 2F, D], down_proj [E, D, F])
    stored as MXFP4; (its directory, HF name -> the tensor transformers loads, the packed tensors)."""
    t = _fixture()
    stored = {k: v for k, v in t.items() if ".experts." not in k}
    want, packed = dict(t), {}
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts."  # the hub's per-expert names
        f = f"model.layers.{layer}.mlp.experts."  # transformers 5.x's fused ones
        fused = {"gate_up_proj": np.stack([np.concatenate([t[f"{p}{e}.w1.weight"], t[f"{p}{e}.w3.weight"]])
                                           for e in range(4)]),
                 "down_proj": np.stack([t[f"{p}{e}.w2.weight"] for e in range(4)])}
        for k, v in fused.items():
            blocks, scales = _mxfp4_quantise(v)
            stored[f + k + "_blocks"], stored[f + k + "_scales"] = packed[f + k] = blocks, scales
            d = hf_formats.dequantize_mxfp4(blocks, scales)
            assert d.shape == v.shape and not np.array_equal(d, v)
            for e in range(4):
                if k == "gate_up_proj":
                    want[f"{p}{e}.w1.weight"], want[f"{p}{e}.w3.weight"] = d[e, :128], d[e, 128:]
                else:
                    want[f"{p}{e}.w2.weight"] = d[e]
    return _rewrite(tmp_path, "mxfp4", stored, {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}), \
        want, packed


def test_an_mxfp4_fused_expert_checkpoint_imports_as_transformers_dequantises_it(tmp_path):
    from moejax.checkpoint.hf_import import import_hf

    src, want, _ = _mxfp4_fixture(tmp_path)
    rep = import_hf(str(src), str(tmp_path / "ck"))
    assert rep["converted"] == {"fp8_e4m3_block": 0, "mxfp4": 4} and rep["verified"]  # 2 layers x gate_up, down
    _assert_imported(tmp_path / "ck", src, want)


def test_fused_fp8_expert_tensors_import_expert_by_expert(tmp_path):
    """gate_up_proj [E, 2F, D] in FP8 with 48 x 32 blocks and a 3-D scale_inv [E, ceil(2F/48), D/32]: a
    block straddles gate and up (F = 128 is no multiple of 48); each expert is dequantised, then cut."""
    t = _fixture()
    stored = {k: v for k, v in t.items() if ".experts." not in k}
    want = dict(t)
    for layer in range(2):
        p, f = f"model.layers.{layer}.block_sparse_moe.experts.", f"model.layers.{layer}.mlp.experts."
        gate_up = np.stack([np.concatenate([t[f"{p}{e}.w1.weight"], t[f"{p}{e}.w3.weight"]]) for e in range(4)])
        down = np.stack([t[f"{p}{e}.w2.weight"] for e in range(4)])
        for k, v in (("gate_up_proj", gate_up), ("down_proj", down)):
            q = [_fp8_quantise(v[e], (48, 32)) for e in range(4)]
            stored[f + k], stored[f + k + "_scale_inv"] = np.stack([a for a, _ in q]), np.stack([b for _, b in q])
            d = hf_formats.dequantize_fp8(stored[f + k], stored[f + k + "_scale_inv"], (48, 32))
            for e in range(4):
                if k == "gate_up_proj":
                    want[f"{p}{e}.w1.weight"], want[f"{p}{e}.w3.weight"] = d[e, :128], d[e, 128:]
                else:
                    want[f"{p}{e}.w2.weight"] = d[e]
    src = _rewrite(tmp_path, "fp8-fused", stored, {"quant_method": "fp8", "weight_block_size": [48, 32]})
    from moejax.checkpoint.hf_import import import_hf

    assert import_hf(str(src), str(tmp_path / "ck"))["converted"] == {"fp8_e4m3_block": 4, "mxfp4": 0}
    _assert_imported(tmp_path / "ck", src, want)


def test_one_expert_of_an_mxfp4_tensor_is_read_alone(tmp_path, monkeypatch):
    """An expert's matrix reads that expert's blocks and scales (a 1/E share), not the fused tensor."""
    src, want, packed = _mxfp4_fixture(tmp_path)
    reader = hf.HFReader(str(src), hf.config_from_hf(str(src)))
    read = []
    pread = os.preadv

    def counted(fd, bufs, off):
        read.append(sum(len(b) for b in bufs))
        return pread(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", counted)
    try:
        for name, which, e in [("w1", "gate_up_proj", 2), ("w3", "gate_up_proj", 3), ("w2", "down_proj", 1)]:
            read.clear()
            got = reader.unit(name, (1, e))
            blocks, scales = packed[f"model.layers.1.mlp.experts.{which}"]
            assert sum(read) == (blocks.nbytes + scales.nbytes) // 4  # one of the 4 experts
            hf_name = f"model.layers.1.block_sparse_moe.experts.{e}.{name}.weight"
            assert np.array_equal(got, reader.units[(name, (1, e))][1](want[hf_name]))
    finally:
        reader.close()


def test_gpt_oss_mxfp4_experts_import_one_expert_at_a_time(tmp_path, monkeypatch):
    """gpt-oss's hub form: every expert of a layer in one MXFP4 tensor (gate_up_proj_blocks [E, 2F, D/32,
    16] for [E, D, 2F], gate and up interleaved). The import holds the dequantised values through the
    family's map, and each expert's matrix reads that expert's blocks and scales alone (1/E of them), so
    neither a read nor a written block is ever a layer's whole tensor (gpt-oss-120b's: 8.5 GB float32)."""
    from safetensors.numpy import load_file

    from moejax.checkpoint.hf_import import import_hf

    fixture = os.path.join(REPO, "tests", "data", "hf-gpt-oss-tiny")
    t = load_file(os.path.join(fixture, "model.safetensors"))
    stored, want, packed = dict(t), dict(t), {}
    for k in [k for k in t if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _mxfp4_quantise(t[k])
        del stored[k]
        stored[k + "_blocks"], stored[k + "_scales"] = packed[k] = blocks, scales
        want[k] = hf_formats.dequantize_mxfp4(blocks, scales)
        assert want[k].shape == t[k].shape and not np.array_equal(want[k], t[k])
    src = _rewrite(tmp_path, "gpt-oss-mxfp4", stored, {"quant_method": "mxfp4"}, fixture)
    rep = import_hf(str(src), str(tmp_path / "ck"))
    assert rep["converted"] == {"fp8_e4m3_block": 0, "mxfp4": 4}  # 2 layers x gate_up, down
    _assert_imported(tmp_path / "ck", src, want)

    reader = hf.HFReader(str(src), hf.config_from_hf(str(src)))
    read, pread = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: read.append(sum(len(b) for b in bufs)) or
                        pread(fd, bufs, off))
    try:
        for name, which in [("w1", "gate_up_proj"), ("w3", "gate_up_proj"), ("w2", "down_proj")]:
            read.clear()
            reader.unit(name, (1, 5))
            blocks, scales = packed[f"model.layers.1.mlp.experts.{which}"]
            assert sum(read) == (blocks.nbytes + scales.nbytes) // 8  # one of the 8 experts
    finally:
        reader.close()


# ---- what moejax does not read -------------------------------------------------------------------------

@pytest.mark.parametrize("q,needle", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not a format moejax reads"),
    ({"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors' is not"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is not"),
    ({"bits": 4}, "quant_method None is not"),
    ({"quant_method": "fp8", "weight_block_size": None}, "'fp8' with weight_block_size=null is not"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "'fp8' with fmt=\"e5m2\" is not"),
    ({"quant_method": "fp8", "expert_dtype": "fp4"}, "'fp8' with expert_dtype=\"fp4\" is not"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size=[128] must be two positive"),
])
def test_a_quantisation_moejax_does_not_read_is_one_line_naming_it(tmp_path, q, needle):
    out = tmp_path / "hf"
    out.mkdir()
    json.dump({**json.load(open(os.path.join(FIXTURE, "config.json"))), "quantization_config": q},
              open(out / "config.json", "w"))
    with pytest.raises(UserError) as e:
        hf.config_from_hf(str(out))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert "must be" in msg or msg.endswith("it reads 'fp8' (e4m3 weights with block scales, weight_scale_inv) and "
                                            "'mxfp4' (gpt-oss experts)"), msg


def test_import_of_an_unread_quantisation_exits_2_with_one_line(tmp_path):
    src = _rewrite(tmp_path, "awq", _fixture(), {"quant_method": "awq", "bits": 4})
    r = _moejax("ckpt", "import-hf", src, tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "quant_method 'awq' is not a format moejax reads; it reads 'fp8'" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_an_fp8_tensor_without_its_scales_is_one_line(tmp_path):
    t = _fixture()
    k = "model.layers.0.self_attn.q_proj.weight"
    src = _rewrite(tmp_path, "noscale", {**t, k: _fp8_quantise(t[k], (128, 128))[0]}, {"quant_method": "fp8"})
    from moejax.checkpoint.hf_import import import_hf

    with pytest.raises(UserError) as e:
        import_hf(str(src), str(tmp_path / "out"))
    assert f"{k!r} is F8_E4M3 [64, 64]; moejax reads FP8 matrices with block scales" in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()
