"""The 4D device mesh `(dp, pp, tp, ep)`: parsing `DPxPPxTPxEP` strings and building meshes.

Importing this module does not start JAX: scripts call `provision_host_devices` first.
"""

from __future__ import annotations

import dataclasses
import os
import re

from moejax.errors import UserError

AXES = ("dp", "pp", "tp", "ep")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    dp: int
    pp: int
    tp: int
    ep: int

    @property
    def size(self) -> int:
        return self.dp * self.pp * self.tp * self.ep

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.dp}x{self.pp}x{self.tp}x{self.ep}"


def parse_mesh(text: str) -> MeshShape:
    """`4x2x4x4` -> MeshShape(dp=4, pp=2, tp=4, ep=4)."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*-?\d+(\s*x\s*-?\d+){3}\s*", text):
        raise UserError(f"mesh {text!r} is malformed: expected DPxPPxTPxEP, four positive integers "
                        f"joined by 'x', e.g. 4x2x4x4")
    sizes = [int(s) for s in text.replace(" ", "").split("x")]
    for name, s in zip(AXES, sizes):
        if s <= 0:
            raise UserError(f"mesh {text!r}: axis {name}={s} must be a positive integer")
    return MeshShape(*sizes)


COLLECTIVE_TIMEOUT_S = 1800


def provision_host_devices(n: int, exact: bool = False) -> bool:
    """Ask XLA for `n` simulated host (CPU) devices. Must run before JAX initialises its backends.
    `exact`: replace a larger count too (each process of a multi-process run brings exactly its
    share). Returns True when the flag was changed (the caller reports it once JAX says the
    backend is CPU)."""
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if m and (int(m.group(1)) == n or (int(m.group(1)) > n and not exact)):
        return False
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    flags = f"{flags} --xla_force_host_platform_device_count={n}"
    if n > 1 and "collective_call_terminate_timeout" not in flags:
        # simulated devices share the cores: a device can reach a collective minutes after the
        # first one on a busy 128-device run (XLA:CPU aborts the process after 40 s by default)
        flags += f" --xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_S}"
    os.environ["XLA_FLAGS"] = flags.strip()
    return True


def make_mesh(shape: MeshShape, devices=None):
    """A `jax.sharding.Mesh` over the first `shape.size` devices of the default backend."""
    import jax
    import numpy as np

    devices = list(jax.devices() if devices is None else devices)
    if shape.size > len(devices):
        kind = devices[0].platform if devices else "no"
        hint = "" if kind != "cpu" else (" (set XLA_FLAGS=--xla_force_host_platform_device_count="
                                         f"{shape.size} before JAX starts, as scripts/infer.py does)")
        raise UserError(f"mesh {shape} needs {shape.size} devices; this machine has {len(devices)} "
                        f"{kind} device(s){hint}")
    grid = np.array(devices[: shape.size], dtype=object).reshape(shape.dp, shape.pp, shape.tp, shape.ep)
    return jax.sharding.Mesh(grid, AXES)


def mesh_shape_of(mesh) -> MeshShape:
    return MeshShape(*(int(mesh.shape[a]) for a in AXES))
