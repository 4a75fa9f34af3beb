"""Request-level data parallelism: one engine per dp replica, each on its own (1, pp, tp, ep)
sub-mesh with its own copy of the parameters, and a router that sends each request to the
least-loaded engine. Replicas never communicate."""

from __future__ import annotations

import dataclasses
import threading

import jax

from moejax.models import transformer as model
from moejax.errors import UserError
from moejax.parallel.mesh import AXES, MeshShape, make_mesh
from moejax.serving.engine import Engine
from moejax.serving.request import Request


class QueueFull(Exception):
    pass


class EngineDead(Exception):
    pass


def replica_meshes(shape: MeshShape) -> list[tuple[int, jax.sharding.Mesh]]:
    """(dp index, mesh of shape 1 x pp x tp x ep) for each replica this process runs: every
    replica in a single-process run; in a multi-process run the replicas whose devices are all
    this process's (a replica split over processes would need every step broadcast to them)."""
    full = make_mesh(shape)
    out = []
    for r in range(shape.dp):
        devs = full.devices[r: r + 1]
        owners = {d.process_index for d in devs.flat}
        if len(owners) > 1:
            raise UserError(f"dp replica {r} of mesh {shape} spans processes {sorted(owners)}: serving needs each "
                            f"replica's pp x tp x ep = {shape.pp * shape.tp * shape.ep} devices in one process")
        if owners == {jax.process_index()}:
            out.append((r, jax.sharding.Mesh(devs, AXES)))
    return out


def replica_spec(rs: model.RunSpec) -> model.RunSpec:
    """The RunSpec of one replica: the same program on a dp = 1 mesh."""
    return dataclasses.replace(rs, shape=dataclasses.replace(rs.shape, dp=1))


class Router:
    """Sends each request to the engine holding the fewest requests (running + waiting; ties to
    the lowest index); 429 (QueueFull) when that engine already has `max_waiting` waiting."""

    def __init__(self, engines: list[Engine], max_waiting: int):
        self.engines, self.max_waiting = engines, max_waiting
        self._lock = threading.Lock()  # pick-and-submit is one step, so two requests see each other

    def submit(self, req: Request) -> Engine:
        with self._lock:
            alive = [e for e in self.engines if e.dead is None]
            if not alive:
                raise EngineDead(self.engines[0].dead)
            engine = min(alive, key=lambda e: (e.load(), e.index))
            if engine.waiting_count() >= self.max_waiting:
                raise QueueFull(f"every replica has {self.max_waiting} requests waiting (--max-waiting)")
            engine.submit(req)
            return engine

    @property
    def capacity(self) -> int:
        """The most requests (sequences) this router can ever hold at once: each live engine's slots
        plus `max_waiting`. A request of more sequences than this can never be admitted (a 400, not
        a 429 to retry)."""
        return sum(e.slots + self.max_waiting for e in self.engines if e.dead is None)

    @property
    def dead(self) -> str | None:
        errors = [e.dead for e in self.engines if e.dead]
        return errors[0] if len(errors) == len(self.engines) else None

    def stop(self):
        for e in self.engines:
            e.stop()
        for e in self.engines:
            e.thread.join(timeout=30)


def check_slots(slots: int, rs: model.RunSpec) -> int:
    """Slots per replica: a multiple of its batch shards, with >= 2 rows per shard on CPU."""
    per = replica_spec(rs).batch_multiple
    least = per * (2 if rs.platform == "cpu" else 1)
    if slots < least or slots % per:
        raise UserError(f"--slots {slots}: need a multiple of {per} (the replica's batch shards x microbatches), "
                        f"at least {least}")
    return slots

