"""Machine constants of the cost model. Datasheet figures come from a spec file (`gpus/*.yaml`);
the achieved fractions of them come from measured runs (`calibrate.py`), never from code."""

from __future__ import annotations

import dataclasses
import os

from moejax.config.model import load_yaml
from moejax.errors import UserError

GPU_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "gpus")


@dataclasses.dataclass(frozen=True)
class MachineSpec:
    """Datasheet figures of one device and its links."""

    name: str
    peak_matmul_flops_per_s: float  # dense 16-bit tensor-core peak
    hbm_bandwidth_bytes_per_s: float
    hbm_bytes: float
    nvlink_bandwidth_bytes_per_s: float  # per device, one direction, inside a node
    network_bandwidth_bytes_per_s: float  # per device, one direction, between nodes
    gpus_per_node: int
    collective_latency_s: float  # per collective call (an assumption unless the file says otherwise)
    shared_host: bool = False  # simulated CPU devices: every device's work runs on the same cores
    source: str = ""

    @property
    def ridge_flops_per_byte(self) -> float:
        return self.peak_matmul_flops_per_s / self.hbm_bandwidth_bytes_per_s


@dataclasses.dataclass(frozen=True)
class Fractions:
    """What the cost model fits from measured runs: achieved fractions of the datasheet rates and
    fixed costs the rates do not explain."""

    matmul: float  # achieved matmul FLOP/s / peak
    bandwidth: float  # achieved HBM read bytes/s / datasheet bandwidth
    layer_overhead_s: float  # per layer and step: kernel launches (a floor under the step's time)
    round_overhead_s: float  # per MoE layer whose dropless round size is decided at run time
    # (pmax + lax.switch / while: a device-to-host sync on GPU)
    source: str = "not calibrated"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


NUMBERS = ("peak_matmul_flops_per_s", "hbm_bandwidth_bytes_per_s", "hbm_bytes", "nvlink_bandwidth_bytes_per_s",
           "network_bandwidth_bytes_per_s", "collective_latency_s")


def shipped_gpus() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(GPU_DIR) if f.endswith(".yaml")) if os.path.isdir(GPU_DIR) else []


def load_spec(name_or_path: str) -> MachineSpec:
    """`h100`, `h200` (gpus/NAME.yaml) or a spec file's path."""
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(GPU_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        raise UserError(f"unknown GPU {name_or_path!r}: no such spec file; shipped: {', '.join(shipped_gpus())} "
                        f"(or a YAML file with {', '.join(NUMBERS)}, gpus_per_node)")
    d = load_yaml(path)
    fields = {f.name for f in dataclasses.fields(MachineSpec)} - {"source"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(fields))}")
    values = {"name": str(d.get("name", os.path.splitext(os.path.basename(path))[0]))}
    for key in NUMBERS:
        try:
            v = float(d[key])
        except KeyError:
            raise UserError(f"{path}: missing key {key!r}") from None
        except (TypeError, ValueError):
            raise UserError(f"{path}: {key}={d[key]!r} must be a number") from None
        if not v > 0 and not (key == "collective_latency_s" and v == 0):
            raise UserError(f"{path}: {key}={d[key]!r} must be positive")
        values[key] = v
    g = d.get("gpus_per_node")
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise UserError(f"{path}: gpus_per_node={g!r} must be a positive integer")
    shared = d.get("shared_host", False)
    if not isinstance(shared, bool):
        raise UserError(f"{path}: shared_host={shared!r} must be true or false")
    shown = os.path.relpath(path, os.path.dirname(GPU_DIR)) if os.path.abspath(path).startswith(GPU_DIR) else path
    return MachineSpec(gpus_per_node=g, shared_host=shared, source=shown, **values)


def sampled_cpu_spec(matmul_flops_per_s: float, bandwidth_bytes_per_s: float) -> MachineSpec:
    """Simulated CPU devices of one bench.py run: the rates are the roofs bench.py sampled on the
    same cores beside the model (this VM drifts 1.6-2.2x over minutes, so no fixed figure holds),
    and the devices share them."""
    return MachineSpec(name="cpu (roofs sampled in the run)", peak_matmul_flops_per_s=matmul_flops_per_s,
                       hbm_bandwidth_bytes_per_s=bandwidth_bytes_per_s, hbm_bytes=24e9,
                       nvlink_bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                       network_bandwidth_bytes_per_s=bandwidth_bytes_per_s, gpus_per_node=1 << 20,
                       collective_latency_s=0.0, shared_host=True, source="bench.py JSON")
