#!/usr/bin/env python
"""What Hugging Face transformers makes of quantised weights, recorded for tests/test_hf_formats.py (the
`.[hf]` extra: pip install -e '.[hf]'). Not run in CI: CI reads what this wrote.

    python scripts/hf_format_fixtures.py [--out tests/data/hf-formats.json]

The inputs are tests/format_cases.py's (shared with the test, so they cannot drift apart):
  mxfp4-all-nibbles-all-exponents-{float32,bfloat16}
        convert_moe_packed_tensors(blocks, scales, dtype): every exponent byte 0..255 meets every
        nibble in the low and the high position of a byte
  fp8-<shape>-block<b0>x<b1>-scale-{float32,float8_e8m0fnu}
        _dequantize_fp8_weight(weight, scale_inv, block, torch.float32): every e4m3 byte (NaNs
        included), partial last blocks, stacked experts, float32 scales from 2**-30 to 2**20 of
        both signs and ue8m0 scales with the NaN byte
  fp8-load-256x384-block128x128-bfloat16
        Fp8Dequantize._dequantize_one(weight, scale_inv, output_dtype=torch.bfloat16): the load path
Per case the fixture keeps the function, the sha256 of the inputs, and of the output: dtype, shape,
the sha256 of its bytes with every NaN replaced by one canonical NaN, its NaN / inf / -0 counts, 16
sample values and the digests of 32 equal parts of it (for readable failures: which part differs).
Also the versions that computed it. Deterministic: the same inputs give the same bytes.
"""

import argparse
import json
import os
import sys

import ml_dtypes
import numpy as np
import torch
import transformers
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import format_cases  # noqa: E402

_TORCH = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
          "float8_e8m0fnu": torch.float8_e8m0fnu, "float32": torch.float32}


def to_torch(x: np.ndarray) -> torch.Tensor:
    """The torch tensor of the same bits (float8 and bfloat16 through their bytes)."""
    x = np.ascontiguousarray(x)
    if x.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e8m0fnu"):
        return torch.from_numpy(x.view({1: np.uint8, 2: np.uint16}[x.itemsize])).view(_TORCH[x.dtype.name])
    return torch.from_numpy(x)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def run(case: dict) -> np.ndarray:
    i, a = {k: to_torch(v) for k, v in case["inputs"].items()}, case["args"]
    if case["function"].endswith("convert_moe_packed_tensors"):
        out = convert_moe_packed_tensors(i["blocks"], i["scales"], dtype=_TORCH[a["dtype"]])
    elif case["function"].endswith("_dequantize_fp8_weight"):
        out = _dequantize_fp8_weight(i["weight"], i["scale_inv"], a["block_size"], _TORCH[a["dtype"]])
    elif case["function"].endswith("Fp8Dequantize._dequantize_one"):
        assert a["block_size"] == [128, 128]  # _dequantize_one's block: the weight and scale shapes' ratio
        out = Fp8Dequantize(None)._dequantize_one(i["weight"], i["scale_inv"], output_dtype=_TORCH[a["output_dtype"]])
    else:
        raise ValueError(case["function"])
    out = to_numpy(out)
    assert out.dtype.name == case["dtype"], (case["name"], out.dtype)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=format_cases.FIXTURE)
    args = ap.parse_args()
    record = {"versions": {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
              "cases": {}}
    for case in format_cases.cases():
        out = run(case)
        record["cases"][case["name"]] = {"function": case["function"], "args": case["args"],
                                         "inputs_sha256": format_cases.input_digest(case["inputs"]),
                                         **format_cases.summary(out)}
        print(f"{case['name']}: {out.dtype.name} {list(out.shape)} {record['cases'][case['name']]['sha256'][:16]}")
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"{args.out}: {len(record['cases'])} cases, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
