"""The quantised weight formats Hugging Face checkpoints ship, dequantised on the host (NumPy only)
to exactly the values transformers 5.24 loads, one tensor or one expert's slice at a time:

- FP8 e4m3 with per-block inverse scales (DeepSeek-V3): `<x>` of dtype F8_E4M3 beside `<x>_scale_inv`
  [ceil(R/b0), ceil(C/b1)]; `integrations/finegrained_fp8._dequantize_fp8_weight`.
- MXFP4 (gpt-oss experts): `<x>_blocks` [E, R, G, 16] u8 and `<x>_scales` [E, R, G] u8 stand for
  `<x>` [E, 32G, R]; `integrations/mxfp4.convert_moe_packed_tensors`.

Both give float32 (exact: a product of two floats rounded once); the import casts to the
checkpoint's dtype, which is what transformers' load-time dequantisation does too.
"""

from __future__ import annotations

import json
import math

import numpy as np

from moejax.errors import UserError

FP8, MXFP4 = "fp8_e4m3_block", "mxfp4"  # the keys of import_hf's "converted" count
FP8_BLOCK = (128, 128)  # FineGrainedFP8Config's default weight_block_size
_READS = "'fp8' (e4m3 weights with block scales, weight_scale_inv) and 'mxfp4' (gpt-oss experts)"

# the 16 e2m1 values by nibble: sign bit 3, then 0, .5, 1, 1.5, 2, 3, 4, 6
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


def fp8_block(c: dict, path: str) -> tuple[int, int]:
    """The FP8 block [rows, cols] of config.json `c` (quantization_config.weight_block_size; 128 x 128
    when absent); a quantisation moejax does not read is one line naming it."""
    q = c.get("quantization_config")
    if q is None:
        return FP8_BLOCK
    if not isinstance(q, dict):
        raise UserError(f"{path}: quantization_config must be an object, not {type(q).__name__}")
    method = q.get("quant_method")
    if method == "mxfp4":
        return FP8_BLOCK
    if method != "fp8":
        raise UserError(f"{path}: quantization_config.quant_method {method!r} is not a format moejax reads; "
                        f"it reads {_READS}")
    block = q.get("weight_block_size", list(FP8_BLOCK))
    for field, value, ok in (("weight_block_size", block, block is not None),
                             ("fmt", q.get("fmt", "e4m3"), q.get("fmt", "e4m3") == "e4m3"),
                             ("expert_dtype", q.get("expert_dtype", "fp8"), q.get("expert_dtype", "fp8") == "fp8")):
        if not ok:
            raise UserError(f"{path}: quantization_config: 'fp8' with {field}={json.dumps(value)} is not a format "
                            f"moejax reads; it reads {_READS}")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UserError(f"{path}: quantization_config.weight_block_size={json.dumps(block)} must be two positive "
                        f"integers [rows, cols]")
    return tuple(block)


def np_dtype(name: str):
    """The NumPy dtype of a safetensors dtype name moejax reads; None for the others."""
    import ml_dtypes

    return {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
            "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
            "U8": np.dtype(np.uint8)}.get(name)


def fp8_scale_shape(shape, block) -> list:
    """The weight_scale_inv shape of an FP8 tensor [..., R, C]: [..., ceil(R/b0), ceil(C/b1)]."""
    return list(shape[:-2]) + [math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])]


def dequantize_fp8(w_RC: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    """float32(w) times its block's scale_inv, over the last two dims (the last row and column blocks
    cropped): `_dequantize_fp8_weight(w, scale_inv, block, torch.float32)`. One column block at a
    time, so no second weight-sized array is made."""
    b0, b1 = block
    rows = w_RC.shape[-2]
    out = w_RC.astype(np.float32)
    s = np.repeat(scale_inv.astype(np.float32), b0, axis=-2)[..., :rows, :]  # [..., R, ceil(C/b1)]
    for j in range(s.shape[-1]):
        out[..., j * b1:(j + 1) * b1] *= s[..., j:j + 1]
    return out


def mxfp4_shapes_fit(blocks_shape, scales_shape) -> bool:
    return len(blocks_shape) >= 3 and blocks_shape[-1] == 16 and list(scales_shape) == list(blocks_shape[:-1])


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., R, G, 16] nibble pairs and [..., R, G] exponents -> [..., 32G, R] float32: the low nibble
    of byte k is value 2k of its group of 32, the high one value 2k + 1; each scaled by
    2**(scale - 127) with ldexp (2**128 overflows; 0 stays 0); the last two dims swapped (for
    [E, R, G, 16], convert_moe_packed_tensors' transpose(1, 2))."""
    v = np.empty(blocks.shape[:-1] + (32,), np.float32)
    v[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    v[..., 1::2] = FP4_VALUES[blocks >> 4]
    with np.errstate(over="ignore"):  # 2**128 and beyond are inf, as in torch.ldexp
        v = np.ldexp(v, (scales.astype(np.int32) - 127)[..., None])
    return np.swapaxes(v.reshape(blocks.shape[:-2] + (-1,)), -1, -2)
