#!/usr/bin/env python
"""Check that transformers loads a moejax export and computes the fixture's logits (the `.[hf]` extra).
Not run in CI (no torch there); the family tests check the export's tensors and config fields instead.

    moejax ckpt import-hf tests/data/hf-glm4-moe-tiny /tmp/g && moejax ckpt export-hf /tmp/g /tmp/gx
    python scripts/hf_export_check.py /tmp/gx tests/data/hf-glm4-moe-tiny

Prints one JSON line: the export, the fixture, max |logits - fixture logits| (the fixture's
reference.npz, made by scripts/hf_family_fixtures.py) and whether they are equal within 1e-5 relative.
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="a directory written by `moejax ckpt export-hf`")
    ap.add_argument("fixture", help="a tests/data/hf-*-tiny directory (its reference.npz)")
    args = ap.parse_args()
    ref = np.load(os.path.join(args.fixture, "reference.npz"))
    model = transformers.AutoModelForCausalLM.from_pretrained(args.export, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor(ref["input_ids"])).logits.float().numpy()
    diff = float(np.max(np.abs(logits - ref["logits"])))
    print(json.dumps({"export": args.export, "fixture": args.fixture, "max_abs_diff": diff,
                      "equal": diff <= 1e-5 * float(np.max(np.abs(ref["logits"])))}))


if __name__ == "__main__":
    main()
