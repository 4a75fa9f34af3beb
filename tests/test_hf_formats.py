"""Quantised Hugging Face weights: FP8 e4m3 with block scales (DeepSeek-V3) and MXFP4 experts (gpt-oss)
dequantise bit for bit to transformers' own values, for every code and every exponent; an import of a
checkpoint stored that way gives exactly the dequantised tensors and says how many it converted; one
expert is read alone; a quantisation moejax does not read is one line and exit code 2."""

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from helpers import FIXTURE, REPO, command_env
from moejax.checkpoint import hf, hf_formats
from moejax.checkpoint import store as checkpoint
from moejax.errors import UserError
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout

from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

_UINT = {2: np.uint16, 4: np.uint32}


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal bit patterns, every NaN counted equal to any NaN (their payloads are not specified)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    nan = np.isnan(got.astype(np.float32))
    if not np.array_equal(nan, np.isnan(want.astype(np.float32))):
        return False
    u = _UINT[got.dtype.itemsize]
    return np.array_equal(got.view(u)[~nan], want.view(u)[~nan])


def _torch(x: np.ndarray) -> torch.Tensor:
    """The torch tensor of the same bits (float8 and bfloat16 through their bytes)."""
    tdt = {np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn, np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
           np.dtype(ml_dtypes.float8_e8m0fnu): torch.float8_e8m0fnu}.get(x.dtype)
    if tdt is None:
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.from_numpy(np.ascontiguousarray(x).view(_UINT.get(x.itemsize, np.uint8))).view(tdt)


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ---- the functions, against transformers' --------------------------------------------------------------

def _all_mxfp4_cases():
    """blocks [2, 256, 16, 16], scales [2, 256, 16]: row r of each expert has exponent byte r (0..255,
    the limits included) and its 16 groups hold all 256 bytes, so every scale meets every nibble in both
    the low (even) and high (odd) position; expert 1 holds them in another order."""
    b = np.arange(256, dtype=np.uint8).reshape(16, 16)
    blocks = np.stack([np.broadcast_to(b, (256, 16, 16)), np.broadcast_to(b[::-1, ::-1].T, (256, 16, 16))])
    scales = np.stack([np.repeat(np.arange(256, dtype=np.uint8)[:, None], 16, 1)] * 2)
    scales[1] = scales[1][::-1]
    return np.ascontiguousarray(blocks), np.ascontiguousarray(scales)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_equals_transformers_for_every_nibble_in_both_positions_and_every_exponent(dtype):
    blocks, scales = _all_mxfp4_cases()
    got = hf_formats.dequantize_mxfp4(blocks, scales)
    assert got.shape == (2, 16 * 32, 256) and got.dtype == np.float32  # [E, 32G, R]
    want = convert_moe_packed_tensors(_torch(blocks), _torch(scales), dtype=getattr(torch, dtype))
    if dtype == "bfloat16":  # what transformers loads into a bfloat16 model: our float32, rounded once
        got = got.astype(ml_dtypes.bfloat16)
    assert _same(got, _numpy(want))
    assert np.isinf(got).any() and (got == 0).any() and np.signbit(got[got == 0]).any()  # the limits were reached


def test_mxfp4_one_expert_equals_that_expert_of_the_whole_tensor():
    blocks, scales = _all_mxfp4_cases()
    whole = hf_formats.dequantize_mxfp4(blocks, scales)
    assert all(_same(hf_formats.dequantize_mxfp4(blocks[e], scales[e]), whole[e]) for e in range(2))


def _every_e4m3_byte(shape, seed=0):
    """uint8 of `shape` holding every byte value (0x7f and 0xff are NaN in e4m3fn), in a shuffled order."""
    n = int(np.prod(shape))
    x = np.resize(np.arange(256, dtype=np.uint8), n)
    np.random.default_rng(seed).shuffle(x)
    return x.reshape(shape).view(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)),  # a partial last block in both dims
                                         ((3, 200, 300), (128, 128)),  # stacked experts
                                         ((70, 100), (32, 48))])
@pytest.mark.parametrize("scale_dtype", ["float32", "float8_e8m0fnu"])
def test_fp8_equals_transformers_with_partial_last_blocks_and_every_byte(shape, block, scale_dtype):
    w = _every_e4m3_byte(shape)
    grid = hf_formats.fp8_scale_shape(shape, block)
    rng = np.random.default_rng(1)
    if scale_dtype == "float32":  # magnitudes from 2**-30 to 2**20, both signs
        s = rng.uniform(0.5, 1, grid) * 2.0 ** rng.integers(-30, 21, grid) * rng.choice([-1, 1], grid)
        s = s.astype(np.float32)
    else:  # ue8m0: powers of two, the NaN byte 0xff included
        s = rng.integers(0, 256, grid).astype(np.uint8)
        s.reshape(-1)[0] = 255
        s = s.view(ml_dtypes.float8_e8m0fnu)
    got = hf_formats.dequantize_fp8(w, s, block)
    want = _dequantize_fp8_weight(_torch(w), _torch(s), list(block), torch.float32)
    assert got.dtype == np.float32 and _same(got, want.numpy())


def test_fp8_load_time_dequantisation_into_bfloat16_is_ours_rounded_once():
    """transformers' load path (Fp8Dequantize, which needs whole blocks) multiplies in float32 and casts
    once to the model's dtype, as the import does."""
    w = _every_e4m3_byte((256, 384))
    s = np.random.default_rng(2).uniform(1e-4, 1e-1, (2, 3)).astype(np.float32)
    want = Fp8Dequantize(None)._dequantize_one(_torch(w), _torch(s), output_dtype=torch.bfloat16)
    assert _same(hf_formats.dequantize_fp8(w, s, (128, 128)).astype(ml_dtypes.bfloat16), _numpy(want))


# ---- import: the Mixtral fixture stored as FP8 and as MXFP4 -------------------------------------------

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


def _rewrite(tmp_path, name, tensors, quantization_config):
    from safetensors.torch import save_file

    out = tmp_path / name
    shutil.copytree(FIXTURE, out)
    cfg = json.load(open(out / "config.json"))
    json.dump({**cfg, "quantization_config": quantization_config}, open(out / "config.json", "w"))
    save_file({k: _torch(v) for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
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
            want[k] = _dequantize_fp8_weight(_torch(stored[k]), _torch(stored[k + "_scale_inv"]), [32, 48],
                                             torch.float32).numpy()
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
            d = convert_moe_packed_tensors(_torch(blocks), _torch(scales), dtype=torch.float32).numpy()
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
            d = _dequantize_fp8_weight(_torch(stored[f + k]), _torch(stored[f + k + "_scale_inv"]), [48, 32],
                                       torch.float32).numpy()
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
