"""The planner's table, its constants' provenance, the validation table and the picture."""

from __future__ import annotations

import dataclasses

from moejax.planner.comms import KINDS
from moejax.planner.shapes import Workload
from moejax.planner.layouts import Row
from moejax.planner.specs import Fractions, MachineSpec
from moejax.models import counts

SHORT = {"all-to-all": "a2a", "all-gather": "ag", "reduce-scatter": "rs", "all-reduce": "ar",
         "collective-permute": "cp"}


def constants(spec: MachineSpec, fr: Fractions) -> dict:
    """Every constant of the cost model with its value and where it comes from."""
    sheet = f"datasheet ({spec.source})"
    out = {k: {"value": getattr(spec, k), "source": sheet}
           for k in ("peak_matmul_flops_per_s", "hbm_bandwidth_bytes_per_s", "hbm_bytes",
                     "nvlink_bandwidth_bytes_per_s", "network_bandwidth_bytes_per_s", "gpus_per_node")}
    out["collective_latency_s"] = {"value": spec.collective_latency_s,
                                   "source": f"assumed, not measured ({spec.source})"}
    for k in ("matmul", "bandwidth", "layer_overhead_s", "round_overhead_s"):
        out[f"fraction.{k}" if k in ("matmul", "bandwidth") else k] = {"value": getattr(fr, k),
                                                                       "source": f"measured: {fr.source}"}
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def format_table(rows: list[Row], top: int) -> str:
    head = ("| # | mesh dp x pp x tp x ep | layout | memory GB/dev: params + KV + act = total (% of HBM) | "
            "prefill TFLOP/dev | prefill GB read/dev | prefill collective MB/dev a2a/ag/rs/ar/cp | M | bubble | "
            "TTFT s | prefill tok/ms/dev | prefill MFU | decode tok/s/dev | decode tok/s/replica |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    shown = [r for r in rows if r.feasible][:top]
    for i, r in enumerate(shown, 1):
        m, p, d = r.memory, r.prefill, r.decode
        mem = (f"{_gb(m['params_bytes'])} + {_gb(m['kv_bytes'])} + {_gb(m['activation_bytes'])} = "
               f"{_gb(m['total_bytes'])} ({100 * m['fraction']:.0f}%{'' if r.fits else ', DOES NOT FIT'})")
        coll = "/".join(f"{p['collective_bytes_per_device'][k] / 1e6:.0f}" for k in KINDS)
        lines.append(f"| {i if r.fits else '-'} | {r.mesh} | {r.layout} | {mem} | {p['flops_per_device'] / 1e12:.2f} | "
                     f"{p['bytes_per_device'] / 1e9:.1f} | {coll} | {p['microbatches']} | {p['bubble_fraction']:.2f} | "
                     f"{p['ttft_s']:.3f} | {p['prefill_tokens_per_ms_per_device']:.1f} | {p['mfu']:.2f} | "
                     f"{d['tokens_per_s_per_device']:.1f} | {d['tokens_per_s_per_replica']:.0f} |")
    return "\n".join(lines)


def format_plan(cfg, devices: int, wl: Workload, spec: MachineSpec, fr: Fractions, rows: list[Row],
                objective: str, top: int, notes: list[str]) -> str:
    usable = sum(r.feasible and r.fits for r in rows)
    too_big = sum(r.feasible and not r.fits for r in rows)
    unusable = [r for r in rows if not r.feasible]
    lines = [
        f"config {cfg.name}: {counts.param_count(cfg):,} parameters; {devices} x {spec.name}; batch {wl.batch} x "
        f"{wl.prompt_len}-token prompts, KV cache of {wl.context} positions, {wl.dtype}, MoE kernel {wl.kernel} "
        f"(executed / top-k expert rows in prefill: {wl.rows_factor:g}{'' if wl.expert_rows_factor else ', assumed'})",
        f"{len(rows)} layouts: {usable} usable and fit, {too_big} do not fit in memory, {len(unusable)} not usable by "
        f"the config; ranked by {objective}",
        format_table(rows, top),
    ]
    if too_big and top > usable:
        lines.append(f"(layouts that do not fit are ranked last, by memory; --json lists all {len(rows)})")
    if unusable:
        lines.append(f"not usable ({len(unusable)}), e.g. {unusable[0].mesh} {unusable[0].layout}: {unusable[0].reason}")
    lines.append(f"datasheet ({spec.source}): peak {spec.peak_matmul_flops_per_s / 1e12:.0f} TFLOP/s, HBM "
                 f"{spec.hbm_bandwidth_bytes_per_s / 1e12:.2f} TB/s and {spec.hbm_bytes / 1e9:.0f} GB, NVLink "
                 f"{spec.nvlink_bandwidth_bytes_per_s / 1e9:.0f} GB/s, network {spec.network_bandwidth_bytes_per_s / 1e9:.0f}"
                 f" GB/s per device, {spec.gpus_per_node} per node; assumed: collective latency "
                 f"{spec.collective_latency_s * 1e6:.0f} us")
    lines.append(f"measured: matmul {fr.matmul:.3f} of peak, HBM {fr.bandwidth:.3f} of datasheet, layer launch floor "
                 f"{fr.layer_overhead_s * 1e6:.0f} us, dropless round decision {fr.round_overhead_s * 1e6:.0f} us per "
                 f"MoE layer: {fr.source}")
    lines += notes
    return "\n".join(lines)


def plan_json(cfg, devices: int, wl: Workload, spec: MachineSpec, fr: Fractions, rows: list[Row],
              objective: str, notes: list[str]) -> dict:
    return {"config": cfg.name, "params_total": counts.param_count(cfg), "devices": devices, "objective": objective,
            "gpu": dataclasses.asdict(spec), "fractions": fr.as_dict(), "constants": constants(spec, fr),
            "workload": dataclasses.asdict(wl) | {"expert_rows_factor": wl.rows_factor},
            "layouts": [r.as_dict() for r in rows], "notes": notes}


def format_validation(points: list[dict], fitted: dict[str, Fractions], skipped: list[str]) -> str:
    lines = ["| machine | config | mesh | batch x prompt | metric | predicted | measured | error | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['machine']} | {p['config']} | {p['mesh']} | {p['batch']} x {p['prompt_len']} | {p['metric']} "
                     f"| {p['predicted']:.4g} | {p['measured']:.4g} | {100 * p['error']:+.1f}% | {p['file']} |")
    for machine in sorted({p["machine"] for p in points}):
        errs = [abs(p["error"]) for p in points if p["machine"] == machine]
        lines.append(f"{machine}: {len(errs)} predictions, max |error| {100 * max(errs):.1f}%, "
                     f"median {100 * sorted(errs)[len(errs) // 2]:.1f}%")
    for machine, fr in fitted.items():
        lines.append(f"{machine}: matmul {fr.matmul:.3f}, bandwidth {fr.bandwidth:.3f}, layer floor "
                     f"{fr.layer_overhead_s * 1e6:.1f} us, round decision {fr.round_overhead_s * 1e6:.1f} us "
                     f"({fr.source})")
    lines += [f"left out: {s}" for s in skipped]
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str, top: int, marked: tuple = ()) -> None:
    """Each usable layout's decode throughput against its TTFT; marker area by memory per device.
    The first `top` are numbered (listed in the corner); meshes in `marked` get a red star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = {"seed": "tab:blue", "ep-tp": "tab:orange"}
    feasible = [r for r in rows if r.feasible]
    for r in feasible:
        x, y = r.prefill["ttft_s"], r.decode["tokens_per_s_per_device"]
        size = 20 + 400 * min(r.memory["fraction"], 1.5)
        ax.scatter(x, y, s=size, alpha=0.55 if r.fits else 0.25, color=colors.get(r.layout, "tab:green"),
                   marker="o" if r.fits else "x", edgecolors="black" if r.fits else None, linewidths=0.4)
    best = [r for r in feasible if r.fits][:top]
    for i, r in enumerate(best, 1):
        ax.annotate(str(i), (r.prefill["ttft_s"], r.decode["tokens_per_s_per_device"]), fontsize=8,
                    xytext=(5, 3 + 7 * (i % 2)), textcoords="offset points")
    ax.text(0.99, 0.02, "\n".join(f"{i}: {r.mesh} {r.layout}" for i, r in enumerate(best, 1)), fontsize=8,
            transform=ax.transAxes, ha="right", va="bottom", bbox={"facecolor": "white", "alpha": 0.8})
    for r in feasible:
        if str(r.mesh) in marked:
            ax.scatter(r.prefill["ttft_s"], r.decode["tokens_per_s_per_device"], marker="*", s=250, color="red",
                       edgecolors="black", linewidths=0.5, zorder=3)
            ax.annotate(f"{r.mesh} {r.layout}", (r.prefill["ttft_s"], r.decode["tokens_per_s_per_device"]),
                        fontsize=8, color="red", xytext=(6, -10), textcoords="offset points")
    for name, c in colors.items():
        ax.scatter([], [], color=c, label=f"layout {name}")
    ax.scatter([], [], marker="x", color="grey", label="does not fit in memory")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted prefill TTFT (s)")
    ax.set_ylabel("predicted decode tokens/s per device")
    ax.set_title(title + "\nmarker area: memory per device (share of the GPU's)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
