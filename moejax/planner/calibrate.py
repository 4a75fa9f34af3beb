"""Fitting the cost model's fractions to bench.py results, and predicted against measured.

A point is one mesh of one bench.py JSON file. Its inputs are what the run was asked to do (config,
layout, mesh, batch, prompt length, decode steps, dtype, MoE kernel, microbatches) and the executed
over top-k expert rows it measured (`moe.computed_over_topk`): that depends on how the random
weights route, not on the machine. The machine is the spec of its device kind (datasheet), or on
CPU the roofs bench.py sampled in the same run. Fractions are fitted per machine kind by least
squares on log(predicted / measured) of TTFT and decode tokens/s.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from moejax.config.model import load_config
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh
from moejax.parallel.rules import load_layout
from moejax.planner.costmodel import phase_cost
from moejax.planner.shapes import Workload
from moejax.planner.specs import Fractions, MachineSpec, load_spec, sampled_cpu_spec

METRICS = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")
FITTED = ("ttft_s", "decode_tokens_per_s")  # prefill tokens/s is batch x prompt / TTFT: not a second point
GPU_SPECS = {"NVIDIA H200": "h200", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100": "h100"}
MODELLED_KERNELS = ("batched", "buffers")


@dataclasses.dataclass
class Point:
    file: str
    mesh: str
    machine: str  # "cpu" or the GPU's device kind
    config: str
    layout: str
    workload: Workload
    measured: dict
    roofs: tuple  # (matmul FLOP/s, bandwidth bytes/s) bench.py sampled in the run

    @property
    def label(self) -> str:
        w = self.workload
        return f"{self.config} {self.mesh} B{w.batch} T{w.prompt_len} {self.file}"


def load_points(paths: list[str]) -> tuple[list[Point], list[str]]:
    """Points of bench.py JSON files, and a line per mesh left out (with why)."""
    points, skipped = [], []
    for path in paths:
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise UserError(f"{path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        need = ("config", "layout", "dtype", "backend", "batch", "prompt_len", "decode_steps", "meshes")
        if not isinstance(d, dict) or any(k not in d for k in need):
            raise UserError(f"{path}: not a bench.py result (needs keys {', '.join(need)})")
        machine = "cpu" if d["backend"] == "cpu" else d.get("device_kind", "?")
        # simulated devices share one host: its rates are the fastest roofs sampled in the run (on
        # 128 devices each device's slice of the sample is small and reads at half the host's rate)
        host = (max(m["matmul_roofline_flops_per_s"] for m in d["meshes"]),
                max(m["bandwidth_bytes_per_s"] for m in d["meshes"]))
        for m in d["meshes"]:
            kernel = m.get("moe_kernel")
            why = None
            if kernel is None:
                why = "older bench.py run (per-expert branches with a device-to-host sync each, since replaced)"
            elif kernel not in MODELLED_KERNELS:
                why = f"MoE kernel {kernel} is not modelled (only {' and '.join(MODELLED_KERNELS)})"
            elif m.get("quant"):
                why = f"{m['quant']} weights are not modelled"
            if why:
                skipped.append(f"{path} {m['mesh']}: {why}")
                continue
            T, N = d["prompt_len"], d["decode_steps"]
            wl = Workload(batch=d["batch"], prompt_len=T, context=T + N, dtype=d["dtype"], kernel=kernel,
                          microbatches=m["microbatches"], expert_rows_factor=m["moe"]["computed_over_topk"],
                          skip_padding_attention=machine == "cpu")
            measured = {k: m[k] for k in METRICS if m.get(k) is not None}
            roofs = host if machine == "cpu" else (m["matmul_roofline_flops_per_s"], m["bandwidth_bytes_per_s"])
            points.append(Point(path, m["mesh"], machine, d["config"], d["layout"], wl, measured, roofs))
    return points, skipped


def machine_spec(p: Point) -> MachineSpec:
    if p.machine == "cpu":
        return sampled_cpu_spec(*p.roofs)
    if p.machine not in GPU_SPECS:
        raise UserError(f"{p.file}: no spec file for device kind {p.machine!r}; known: {', '.join(GPU_SPECS)}")
    return load_spec(GPU_SPECS[p.machine])


def predict(p: Point, fr: Fractions) -> dict:
    cfg, layout, mesh, spec = load_config(p.config), load_layout(p.layout), parse_mesh(p.mesh), machine_spec(p)
    w = p.workload
    pre = phase_cost(cfg, layout, mesh, w, spec, fr, "prefill")
    out = {"ttft_s": pre.seconds, "prefill_tokens_per_s": w.batch * w.prompt_len / pre.seconds}
    if "decode_tokens_per_s" in p.measured:
        out["decode_tokens_per_s"] = w.batch / phase_cost(cfg, layout, mesh, w, spec, fr, "decode").seconds
    return out


def _fractions(x, source: str) -> Fractions:
    matmul, bandwidth, layer, rounds = np.exp(x)
    return Fractions(float(min(matmul, 1.0)), float(min(bandwidth, 1.0)), float(layer), float(rounds), source)


START = np.log([0.5, 0.5, 1e-4, 1e-4])


def fit(points: list[Point], source: str) -> Fractions:
    """Least squares on log(predicted / measured), with a faint pull towards START so that a
    constant the points cannot see stays put instead of drifting."""
    if not points:
        raise UserError("no calibration points (bench.py JSON meshes with the batched or buffers kernel)")

    def loss(x):
        fr = _fractions(x, source)
        err = 0.0
        for p in points:
            got = predict(p, fr)
            err += sum(math.log(got[k] / p.measured[k]) ** 2 for k in FITTED if k in p.measured)
        return err + 1e-4 * float(np.sum((x - START) ** 2)) + 10 * float(np.sum(np.maximum(x[:2], 0) ** 2))

    return _fractions(nelder_mead(loss, START), source)


def nelder_mead(f, x0, step: float = 1.0, iters: int = 600, tol: float = 1e-9):
    """A plain Nelder-Mead minimiser (numpy only; the constants are few)."""
    n = len(x0)
    simplex = [np.array(x0, float)] + [np.array(x0, float) + step * np.eye(n)[i] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tol:
            break
        centre = np.mean(simplex[:-1], axis=0)
        reflected = centre + (centre - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centre + 2 * (centre - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centre + 0.5 * (simplex[-1] - centre)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex]
                values = [f(x) for x in simplex]
    return simplex[int(np.argmin(values))]


def fit_by_machine(points: list[Point], files: list[str]) -> dict[str, Fractions]:
    by = {}
    for p in points:
        by.setdefault(p.machine, []).append(p)
    used = lambda ps: ", ".join(f for f in files if any(p.file.endswith(f) for p in ps))
    return {m: fit(ps, f"fitted to {len(ps)} points ({m}) of {used(ps)}") for m, ps in by.items()}


def validate(fitted: dict[str, Fractions], points: list[Point]) -> list[dict]:
    """Predicted against measured for every metric of every point; error = predicted / measured - 1."""
    out = []
    for p in points:
        if p.machine not in fitted:
            raise UserError(f"{p.file} {p.mesh}: no calibration point on {p.machine!r} to fit its constants")
        got = predict(p, fitted[p.machine])
        for k in METRICS:
            if k in p.measured:
                out.append({"mesh": p.mesh, "metric": k, "predicted": got[k], "measured": p.measured[k],
                            "error": got[k] / p.measured[k] - 1, "machine": p.machine, "config": p.config,
                            "file": p.file, "batch": p.workload.batch, "prompt_len": p.workload.prompt_len})
    return out
