"""Rooflines measured beside a benchmark: the devices' matmul rate and memory bandwidth (bench.py,
bench_train.py)."""

from __future__ import annotations

import statistics
import time


class Rooflines:
    """Matmul FLOP/s and memory bandwidth of the mesh's devices together, sampled once per timed
    repeat beside the model's runs (this machine's speed drifts), reported as medians. A sample is
    the fastest of 3 runs: a roof is the best the devices do."""

    def __init__(self, mesh, dtype: str):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        n = mesh.devices.size
        all_axes = tuple(mesh.axis_names)
        sharded = NamedSharding(mesh, P(all_axes))
        # (M, K, N) per device; the roof is the fastest: XLA:CPU's rate depends on the shape (float32
        # ran the square one slower than the model's own matmuls, which put MFU above 1). Simulated
        # CPU devices share the host's cores, so their rows shrink with n: the arrays held for 128
        # devices stay ~0.5 GB (full-size ones added 2 GB to the 4x2x4x4 run's peak RSS).
        if jax.default_backend() == "cpu":
            shapes = [(max(128, 1024 // n), 1024, 1024), (max(128, 2048 // n), 512, 1024)]
        else:
            shapes = [(8192, 8192, 8192)]
        mat = jax.jit(jax.shard_map(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype),
                                    mesh=mesh, in_specs=(P(all_axes), P(all_axes)), out_specs=P(all_axes)))
        self.matmuls = [(2 * n * m * k * nn, mat, jax.device_put(jnp.ones((n * m, k), dtype), sharded),
                         jax.device_put(jnp.ones((n * k, nn), dtype), sharded))  # each device its own [K, N]
                        for m, k, nn in shapes]
        words = (64 if jax.default_backend() == "cpu" else 2048) * 2**20 // n  # elements read per device
        self.big = jax.device_put(jnp.ones((n * words,), dtype), sharded)
        self.read = jax.jit(jax.shard_map(lambda x: jnp.sum(x, dtype=jnp.float32)[None], mesh=mesh,
                                          in_specs=P(all_axes), out_specs=P(all_axes)))
        self.flops, self.bandwidth = [], []  # compiled in the first sample's untimed runs

    def sample(self):
        import jax

        def seconds(f, *args):  # fastest of 3 after an untimed run (compiles, or settles after the model)
            jax.block_until_ready(f(*args))
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts.append(time.perf_counter() - t0)
            return min(ts)

        self.flops.append(max(work / seconds(f, a, b) for work, f, a, b in self.matmuls))
        self.bandwidth.append(self.big.size * self.big.dtype.itemsize / seconds(self.read, self.big))

    def result(self) -> dict:
        return {"matmul_flops_per_s": statistics.median(self.flops),
                "bandwidth_bytes_per_s": statistics.median(self.bandwidth)}
