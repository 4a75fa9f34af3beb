#!/usr/bin/env python
"""Write eval/shakespeare-mc.jsonl: a small multiple-choice task over the validation split of
data/tinyshakespeare.txt (the last 10%, which the demo models never trained on), for lm-evaluation-
harness (eval/shakespeare_mc.yaml; scripts/lm_eval_compare.py). Each item is a line of verse cut
before its last word: the context is the two lines before it plus that line's start, the choices are
the true last word and three words drawn from the same split, the label the true word's index.
Deterministic (numpy's default_rng(0)); no network, no extra packages.

    python scripts/make_shakespeare_mc.py [--items 40] [--out eval/shakespeare-mc.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(REPO, "eval", "shakespeare-mc.jsonl"))
    args = ap.parse_args(argv)
    text = open(os.path.join(REPO, "data", "tinyshakespeare.txt"), encoding="utf-8").read()
    val = text[int(len(text) * 0.9):]
    lines = val.split("\n")
    words = sorted({w for w in re.findall(r"[a-z]{4,}", val)})
    rng = np.random.default_rng(0)
    # verse lines of 6+ words ending in a plain lower-case word and a punctuation mark, with two lines before
    cands = [i for i in range(2, len(lines)) if re.fullmatch(r"[A-Za-z ,';]+ [a-z]{4,}[,.;:!?]", lines[i])
             and len(lines[i].split()) >= 6 and lines[i - 1] and lines[i - 2] and not lines[i - 1].endswith(":")]
    picked = sorted(rng.choice(len(cands), size=args.items, replace=False).tolist())
    items = []
    for k in picked:
        i = cands[k]
        head, last = lines[i][:-1].rsplit(" ", 1)
        others = [w for w in rng.choice(words, size=8, replace=False).tolist() if w != last][:3]
        choices = others + [last]
        order = rng.permutation(4).tolist()
        choices = [choices[j] for j in order]
        items.append({"context": "\n".join(lines[i - 2:i] + [head]), "choices": choices,
                      "label": choices.index(last)})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
