"""Draw a training log: train and validation loss, and the expert load ratio, against steps.

    python scripts/plot_train.py runs/shakespeare/log.jsonl docs/shakespeare-loss.png [--wall]

--wall puts wall-clock seconds (compilation and evaluation included) on the x axis instead.
"""

from __future__ import annotations

import json
import os


from moejax.cli.common import ArgumentParser, guarded
from moejax.errors import UserError


def read_log(path: str) -> list[dict]:
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"log {path!r}: cannot read ({e.strerror})") from None
    records = []
    for i, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"log {path!r} line {i} is not JSON: expected train.py's --json-log output") from None
        if not isinstance(r, dict) or "step" not in r or "loss" not in r:
            raise UserError(f"log {path!r} line {i} has no step/loss: expected train.py's --json-log output")
        records.append(r)
    if not records:
        raise UserError(f"log {path!r} is empty")
    by_step = {r["step"]: r for r in records}  # a resumed run appends: the last record of a step wins
    return [by_step[s] for s in sorted(by_step)]


def run(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(args.log)
    xkey = "wall_s" if args.wall else "step"
    x = [r[xkey] for r in records]
    fig, (ax_loss, ax_load) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 1.4])
    ax_loss.plot(x, [r["ce_loss"] for r in records], lw=0.8, alpha=0.7, label="train cross-entropy")
    val = [(r[xkey], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "o-", color="C3", label="validation cross-entropy")
        ax_loss.annotate(f"{val[-1][1]:.3f}", val[-1], textcoords="offset points", xytext=(-10, 8), color="C3")
    ax_loss.set_ylabel("nats / byte")
    ax_loss.set_ylim(top=min(4.0, max(r["ce_loss"] for r in records) + 0.1))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title(os.path.basename(os.path.dirname(os.path.abspath(args.log))) or args.log)
    ax_load.plot(x, [r["max_load_ratio"] for r in records], lw=0.8, color="C2", label="train batch")
    vload = [(r[xkey], r["val_max_load_ratio"]) for r in records if r.get("val_max_load_ratio") is not None]
    if vload:
        ax_load.plot(*zip(*vload), "o-", color="C4", label="validation")
    ax_load.axhline(1.0, color="gray", lw=0.5)
    ax_load.set_ylabel("max / mean\nexpert load")
    ax_load.set_xlabel("wall-clock seconds (compilation included)" if args.wall else "step")
    ax_load.grid(alpha=0.3)
    ax_load.legend()
    fig.tight_layout()
    try:
        fig.savefig(args.out, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {args.out!r} ({e.strerror})") from None
    print(f"wrote {args.out} ({len(records)} steps)")


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("log", help="train.py's log.jsonl")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--wall", action="store_true", help="x axis in wall-clock seconds")
    return guarded(run, ap.parse_args(argv))
