"""Plan a layout: every (dp, pp, tp, ep) of N devices under both layouts, with memory, work,
collectives and predicted times from a cost model calibrated on measured bench.py runs.

    moejax plan --config seed-10b --devices 128 [--mesh DPxPPxTPxEP ...] [--gpu h100|h200|FILE] [--batch B]
        [--prompt-len T] [--context S] [--objective throughput|ttft|memory] [--top K]
        [--calibrate bench.json ...] [--plot OUT.png] [--json]
    moejax plan --calibrate A.json ... --validate B.json ... [--json]

Datasheet constants come from the GPU spec file (gpus/NAME.yaml); the achieved fractions are fitted
to --calibrate (default: the GPU runs in results/gpu/). With --validate, the fractions are fitted on the
points of the --calibrate files and every point of the --validate files is predicted against its
measurement. With --json the last stdout line is the result as JSON.
"""

from __future__ import annotations

import glob
import json
import os

from moejax.cli.common import ArgumentParser, guarded
from moejax.config.model import DTYPES
from moejax.errors import UserError
from moejax.planner.layouts import OBJECTIVES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_calibration() -> list[str]:
    """bench.py results among results/gpu/*.json (kernels.json is bench_kernels.py's)."""
    def is_bench(path):
        with open(path) as f:
            return "meshes" in json.load(f)
    return [p for p in sorted(glob.glob(os.path.join(REPO, "results", "gpu", "*.json"))) if is_bench(p)]


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--config", default="seed")
    ap.add_argument("--devices", type=int)
    ap.add_argument("--mesh", action="append", help="DPxPPxTPxEP: evaluate only this mesh (repeatable)")
    ap.add_argument("--gpu", default="h200", help="h100, h200 (gpus/NAME.yaml) or a spec file")
    ap.add_argument("--layout", action="append", help="layouts to consider (default: seed and ep-tp)")
    ap.add_argument("--batch", type=int, default=256, help="sequences in flight over all devices")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--context", type=int, help="KV cache positions per sequence (default: prompt + 256, at most "
                                                "the config's max_seq_len)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--microbatches", type=int, help="default: 2 x pp bounded by the rows per batch shard")
    ap.add_argument("--expert-rows-factor", type=float,
                    help="executed / top-k expert rows in prefill (routing skew; default 1.5 for the batched kernel)")
    ap.add_argument("--objective", default="throughput", choices=OBJECTIVES,
                    help="throughput: decode tokens/s per device; ttft: prefill time; memory: share of the GPU")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--calibrate", nargs="+", help="bench.py JSON files to fit the fractions on (default: results/gpu/*.json)")
    ap.add_argument("--validate", nargs="+", help="bench.py JSON files to predict against their measurements")
    ap.add_argument("--plot", help="write the throughput-against-TTFT picture here (PNG)")
    ap.add_argument("--mark", action="append", default=[], help="DPxPPxTPxEP to mark with a star in the picture")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def run_validation(args) -> None:
    from moejax.planner import calibrate, report

    if not args.calibrate:
        raise UserError("--validate needs --calibrate A.json ... (the points the constants are fitted on)")
    overlap = sorted(set(map(os.path.abspath, args.calibrate)) & set(map(os.path.abspath, args.validate)))
    if overlap:
        raise UserError(f"{overlap[0]} is in both --calibrate and --validate: validate on other points")
    cal, skipped = calibrate.load_points(args.calibrate)
    val, skipped_val = calibrate.load_points(args.validate)
    fitted = calibrate.fit_by_machine(cal, [os.path.relpath(f, REPO) for f in args.calibrate])
    points = calibrate.validate(fitted, val)
    for p in points:
        p["file"] = os.path.relpath(p["file"], REPO)
    print(report.format_validation(points, fitted, skipped + skipped_val))
    if args.json:
        print(json.dumps({"points": points, "fitted": {m: f.as_dict() for m, f in fitted.items()},
                          "calibration_files": args.calibrate, "left_out": skipped + skipped_val}))


def run_plan(args) -> None:
    from moejax.config.model import load_config
    from moejax.parallel.mesh import parse_mesh
    from moejax.planner import calibrate, report
    from moejax.planner.shapes import Workload
    from moejax.planner.layouts import plan
    from moejax.planner.specs import load_spec
    from moejax.parallel.rules import load_layout

    only = [parse_mesh(m) for m in args.mesh or []]
    if args.devices is None and only:
        args.devices = only[0].size
    if args.devices is None:
        raise UserError("--devices N is required (the number of GPUs to plan for)")
    for m in only:
        if m.size != args.devices:
            raise UserError(f"--mesh {m} has {m.size} devices, not --devices {args.devices}")
    if args.devices < 1:
        raise UserError(f"--devices {args.devices} must be a positive integer")
    for flag, v in (("--batch", args.batch), ("--prompt-len", args.prompt_len), ("--top", args.top)):
        if v < 1:
            raise UserError(f"{flag} {v} must be >= 1")
    if args.microbatches is not None and args.microbatches < 1:
        raise UserError(f"--microbatches {args.microbatches} must be >= 1")
    if args.expert_rows_factor is not None and not args.expert_rows_factor >= 1:
        raise UserError(f"--expert-rows-factor {args.expert_rows_factor} must be >= 1 (executed rows include the top-k rows)")
    cfg = load_config(args.config)
    spec = load_spec(args.gpu)
    layouts = [load_layout(name) for name in (args.layout or ["seed", "ep-tp"])]
    if args.prompt_len > cfg.max_seq_len:
        raise UserError(f"--prompt-len {args.prompt_len} exceeds config {cfg.name}'s max_seq_len {cfg.max_seq_len}")
    context = args.context if args.context is not None else min(args.prompt_len + 256, cfg.max_seq_len)
    if not args.prompt_len <= context <= cfg.max_seq_len:
        raise UserError(f"--context {context} must be between --prompt-len {args.prompt_len} and the config's "
                        f"max_seq_len {cfg.max_seq_len}")
    files = args.calibrate or default_calibration()
    points, _ = calibrate.load_points(files)
    fitted = calibrate.fit_by_machine(points, [os.path.relpath(f, REPO) for f in files])
    gpus = {m: f for m, f in fitted.items() if m != "cpu"}
    if not gpus:
        raise UserError(f"no GPU run among --calibrate {' '.join(files)}: the fractions of a GPU's datasheet "
                        f"need a measured GPU run")
    machine = next((m for m in gpus if calibrate.GPU_SPECS.get(m) == spec.name), sorted(gpus)[0])
    fr = gpus[machine]
    notes = []
    if calibrate.GPU_SPECS.get(machine) != spec.name:
        notes.append(f"note: the fractions were measured on {machine} and are applied to {spec.name}'s datasheet")
    notes.append("note: collective costs are datasheet link rates plus the assumed latency: no multi-GPU run "
                 "has been measured to calibrate them")
    wl = Workload(batch=args.batch, prompt_len=args.prompt_len, context=context, dtype=args.dtype, kernel="batched",
                  microbatches=args.microbatches, expert_rows_factor=args.expert_rows_factor)
    rows = plan(cfg, layouts, args.devices, wl, spec, fr, args.objective, only)
    print(report.format_plan(cfg, args.devices, wl, spec, fr, rows, args.objective, args.top, notes))
    if args.plot:
        report.plot(rows, args.plot, f"{cfg.name} on {args.devices} x {spec.name}, batch {wl.batch} x {wl.prompt_len}",
                    min(args.top, 5), tuple(str(parse_mesh(m)) for m in args.mark))
        print(f"picture: {args.plot}")
    if args.json:
        print(json.dumps(report.plan_json(cfg, args.devices, wl, spec, fr, rows, args.objective, notes)))


def run(args) -> None:
    if args.validate:
        run_validation(args)
    else:
        run_plan(args)


def main(argv=None) -> int:
    return guarded(run, parse_args(argv))
