"""The crafted inputs of the quantised-format tests (NumPy and ml_dtypes only, no torch), shared by
scripts/hf_format_fixtures.py, which records what transformers makes of them in tests/data/hf-formats.json,
and tests/test_hf_formats.py, which checks moejax.checkpoint.hf_formats against that record: both build
the inputs here, so they cannot drift apart.

Each case (`cases()`) names the transformers function its recorded output is from and holds that
function's array arguments as NumPy arrays. An output is recorded as the sha256 of
its bytes with every NaN replaced by one canonical NaN (their payloads are not specified), so a compare
is bit for bit without storing the output itself."""

from __future__ import annotations

import hashlib
import json
import math
import os

import ml_dtypes
import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf-formats.json")

MXFP4_DTYPES = ("float32", "bfloat16")
FP8_SHAPES = [((200, 300), (128, 128)),  # a partial last block in both dims
              ((3, 200, 300), (128, 128)),  # stacked experts
              ((70, 100), (32, 48))]
FP8_SCALE_DTYPES = ("float32", "float8_e8m0fnu")
FP8_LOAD = "fp8-load-256x384-block128x128-bfloat16"

_UINT = {2: np.uint16, 4: np.uint32}
_CANONICAL_NAN = {2: 0x7FC0, 4: 0x7FC00000}  # quiet NaN, sign clear, no payload (bfloat16, float32)
N_SAMPLES = 16
N_CHUNKS = 32


def mxfp4_inputs():
    """blocks [2, 256, 16, 16], scales [2, 256, 16]: row r of each expert has exponent byte r (0..255,
    the limits included) and its 16 groups hold all 256 bytes, so every scale meets every nibble in both
    the low (even) and high (odd) position; expert 1 holds them in another order."""
    b = np.arange(256, dtype=np.uint8).reshape(16, 16)
    blocks = np.stack([np.broadcast_to(b, (256, 16, 16)), np.broadcast_to(b[::-1, ::-1].T, (256, 16, 16))])
    scales = np.stack([np.repeat(np.arange(256, dtype=np.uint8)[:, None], 16, 1)] * 2)
    scales[1] = scales[1][::-1]
    return np.ascontiguousarray(blocks), np.ascontiguousarray(scales)


def every_e4m3_byte(shape, seed=0) -> np.ndarray:
    """float8_e4m3fn of `shape` holding every byte value (0x7f and 0xff are NaN in e4m3fn), shuffled."""
    n = int(np.prod(shape))
    x = np.resize(np.arange(256, dtype=np.uint8), n)
    np.random.default_rng(seed).shuffle(x)
    return x.reshape(shape).view(ml_dtypes.float8_e4m3fn)


def scale_grid(shape, block) -> tuple:
    """[..., ceil(R/b0), ceil(C/b1)] (computed here, not by the code under test)."""
    return tuple(shape[:-2]) + (math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def fp8_scales(shape, block, scale_dtype: str) -> np.ndarray:
    grid = scale_grid(shape, block)
    rng = np.random.default_rng(1)
    if scale_dtype == "float32":  # magnitudes from 2**-30 to 2**20, both signs
        s = rng.uniform(0.5, 1, grid) * 2.0 ** rng.integers(-30, 21, grid) * rng.choice([-1, 1], grid)
        return s.astype(np.float32)
    s = rng.integers(0, 256, grid).astype(np.uint8)  # ue8m0: powers of two, the NaN byte 0xff included
    s.reshape(-1)[0] = 255
    return s.view(ml_dtypes.float8_e8m0fnu)


def mxfp4_name(out_dtype: str) -> str:
    return f"mxfp4-all-nibbles-all-exponents-{out_dtype}"


def fp8_name(shape, block, scale_dtype: str) -> str:
    return f"fp8-{'x'.join(map(str, shape))}-block{block[0]}x{block[1]}-scale-{scale_dtype}"


def cases() -> list[dict]:
    """Every case: name, function (transformers'), inputs {argument: array}, args (the others), dtype
    of the output."""
    blocks, scales = mxfp4_inputs()
    out = [{"name": mxfp4_name(d), "function": "transformers.integrations.mxfp4.convert_moe_packed_tensors",
            "inputs": {"blocks": blocks, "scales": scales}, "args": {"dtype": d}, "dtype": d}
           for d in MXFP4_DTYPES]
    for shape, block in FP8_SHAPES:
        for sd in FP8_SCALE_DTYPES:
            out.append({"name": fp8_name(shape, block, sd),
                        "function": "transformers.integrations.finegrained_fp8._dequantize_fp8_weight",
                        "inputs": {"weight": every_e4m3_byte(shape), "scale_inv": fp8_scales(shape, block, sd)},
                        "args": {"block_size": list(block), "dtype": "float32"}, "dtype": "float32"})
    # transformers' load path (Fp8Dequantize, which needs whole blocks): float32 product, cast once
    out.append({"name": FP8_LOAD, "function": "transformers.integrations.finegrained_fp8.Fp8Dequantize._dequantize_one",
                "inputs": {"weight": every_e4m3_byte((256, 384)),
                           "scale_inv": np.random.default_rng(2).uniform(1e-4, 1e-1, (2, 3)).astype(np.float32)},
                "args": {"block_size": [128, 128], "output_dtype": "bfloat16"}, "dtype": "bfloat16"})
    return out


def _bits(x: np.ndarray) -> np.ndarray:
    """The bit patterns of float32 / bfloat16 `x`, every NaN made the canonical one."""
    x = np.ascontiguousarray(x)
    u = x.view(_UINT[x.dtype.itemsize]).copy()
    u[np.isnan(x.astype(np.float32))] = _CANONICAL_NAN[x.dtype.itemsize]
    return u


def digest(x: np.ndarray) -> str:
    """sha256 of `x`'s bytes (C order), NaNs canonical."""
    return hashlib.sha256(_bits(x).tobytes()).hexdigest()


def input_digest(inputs: dict) -> str:
    """sha256 over the inputs' names, dtypes, shapes and bytes (tells a changed generator from a bug)."""
    h = hashlib.sha256()
    for k, v in inputs.items():
        h.update(f"{k}:{v.dtype.name}:{list(v.shape)}\n".encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def chunk_digests(x: np.ndarray) -> list[str]:
    """The first 12 hex digits of the sha256 of each of N_CHUNKS equal runs of `x`'s flat elements (the
    last one shorter), NaNs canonical: which part of an output differs."""
    u = _bits(x).reshape(-1)
    step = -(-u.size // N_CHUNKS)
    return [hashlib.sha256(u[i:i + step].tobytes()).hexdigest()[:12] for i in range(0, u.size, step)]


def sample_index(shape) -> list[int]:
    """N_SAMPLES flat indices spread over an output of `shape`."""
    n = int(np.prod(shape))
    return sorted({int(i) for i in np.linspace(0, n - 1, N_SAMPLES).round()})


def summary(x: np.ndarray) -> dict:
    """What the fixture records of an output: dtype, shape, digest, counts, a few values (flat index:
    repr of the value as a float) and the digests of its 32 parts."""
    f = x.astype(np.float32)
    flat = f.reshape(-1)
    return {"dtype": x.dtype.name, "shape": list(x.shape), "sha256": digest(x),
            "nan": int(np.isnan(f).sum()), "inf": int(np.isinf(f).sum()),
            "negative_zero": int(((f == 0) & np.signbit(f)).sum()),
            "samples": {str(i): repr(float(flat[i])) for i in sample_index(x.shape)},
            "chunks": chunk_digests(x)}


def load() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)
