"""Measure the kernel rates that bound serving on this machine, XLA beside torch, in one run.

    python scripts/bench_kernels.py [--dtype bfloat16] [--repeats 7] [--weight-mb 128]
                                    [--compare-torch] [--json FILE]

bench.py reports how fast the model runs; this says why. On one device it times:
- read: the memory bandwidth of a plain reduction over a --weight-mb array (decode's roofline);
- stream Rx: a [R, 4096] x [4096, N] matmul whose weight is --weight-mb, for R = 1, 2, 8 rows (a
  decode step's expert and projection matmuls: the weight is read once from memory, so GB/s of
  weight is the figure to hold against `read`);
- matmul MxKxN: FLOP/s of 16 matmuls of a prefill shape (attention projections 1024x512x512, an
  expert's 160x512x1024), once as a dependent chain (one at a time) and once independent (XLA may
  run two at once on the shared cores).
--compare-torch times the same matmuls with torch (`x @ w.T`, the weight stored [out, in] as
torch's Linear keeps it) alternating with XLA's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time


from moejax.cli.common import ArgumentParser
from moejax.config.model import DTYPES
from moejax.errors import UserError

# SETTLE: each timed run follows an untimed run of the same kernel. The other library's worker
# threads spin-wait for a while after their last task, and on 2 cores that slowed XLA's short matmuls
# by up to 40% when timed right after torch; sleeping instead slowed both (cores idle down).


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--weight-mb", type=int, default=128,
                    help="size of the streamed weight; larger than the last-level cache (default 128)")
    ap.add_argument("--compare-torch", action="store_true", help="also time torch (pip install -e '.[hf]')")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    try:
        if args.repeats < 1:
            raise UserError(f"--repeats {args.repeats} must be >= 1")
        if args.weight_mb < 1:
            raise UserError(f"--weight-mb {args.weight_mb} must be >= 1")
        if args.compare_torch:
            from moejax.bench.peer import load_torch

            load_torch()
        res = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res['backend']} ({res['device_kind']}), {args.dtype}, medians of {args.repeats}")
    print("| kernel | XLA | " + ("torch | XLA / torch |" if args.compare_torch else ""))
    print("|---|---|" + ("---|---|" if args.compare_torch else ""))
    for r in res["kernels"]:
        row = f"| {r['kernel']} | {r['xla']:.1f} {r['unit']} |"
        if args.compare_torch:
            row += "-|-|" if r["torch"] is None else f" {r['torch']:.1f} {r['unit']} | {r['xla'] / r['torch']:.2f} |"
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    torch = None
    if args.compare_torch:
        import torch
    dt = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    k_dim = 4096
    n_dim = max(1, args.weight_mb * 2**20 // (k_dim * dt.itemsize))

    def host(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.05).astype(np.float32)

    def xla(fn, *arrays):
        c = jax.jit(fn).lower(*arrays).compile()
        return lambda: jax.block_until_ready(c(*arrays))

    def to_torch(a):
        return torch.from_numpy(a).to(getattr(torch, args.dtype))

    kernels = []

    def measure(name, unit, work, xla_run, torch_run=None):
        """Medians of --repeats timed runs after a warm-up; XLA and torch alternate (see SETTLE)."""
        print(f"timing {name}", file=sys.stderr, flush=True)
        runs = [xla_run] + ([torch_run] if torch_run else [])
        times = [[] for _ in runs]
        for i in range(args.repeats + 1):
            for f, ts in zip(runs, times):
                f()  # untimed: absorbs the other library's spinning threads (see SETTLE)
                t0 = time.perf_counter()
                f()
                if i:  # the first pass warms up
                    ts.append(time.perf_counter() - t0)
        t_x, t_t = statistics.median(times[0]), (statistics.median(times[1]) if torch_run else None)
        kernels.append({"kernel": name, "unit": unit, "xla": work / t_x, "xla_s": t_x,
                        "torch": None if t_t is None else work / t_t, "torch_s": t_t})

    w_np = host(k_dim, n_dim)
    w_x = jnp.asarray(w_np, dt)
    w_bytes = w_np.size * dt.itemsize
    w_t = to_torch(w_np.T.copy()) if torch else None  # [out, in], as torch's Linear stores it
    measure(f"read {w_bytes / 2**20:.0f} MB (sum)", "GB/s", w_bytes / 1e9,
            xla(lambda w: jnp.sum(w, dtype=jnp.float32), w_x))
    for r in (1, 2, 8):
        x_np = host(r, k_dim)
        x_x, x_t = jnp.asarray(x_np, dt), (to_torch(x_np) if torch else None)
        measure(f"stream {r}x{k_dim}x{n_dim} (weight GB/s)", "GB/s", w_bytes / 1e9,
                xla(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), x_x, w_x),
                (lambda: x_t @ w_t.T) if torch else None)
    w_x = w_t = None  # free the streamed weight before the matmuls
    chain = 16
    for m, k, n in ((1024, 512, 512), (160, 512, 1024)):
        ws_np = [host(k, n) for _ in range(chain)]
        ws_x = [jnp.asarray(w, dt) for w in ws_np]
        x_np = host(m, k)
        x_x = jnp.asarray(x_np, dt)
        gflop = 2 * m * k * n * chain / 1e9

        def dependent(x, ws):  # each matmul waits for the one before (n >= k: slice back to k columns)
            for w in ws:
                x = jnp.dot(x, w, preferred_element_type=jnp.float32)[:, :k].astype(x.dtype)
            return x

        def independent(x, ws):
            return [jnp.dot(x, w, preferred_element_type=jnp.float32) for w in ws]

        torch_run = None
        if torch:
            ws_t, x_t = [to_torch(w.T.copy()) for w in ws_np], to_torch(x_np)
            torch_run = lambda: [x_t @ w.T for w in ws_t]  # noqa: E731
        measure(f"matmul {m}x{k}x{n}, {chain} one at a time", "GFLOP/s", gflop, xla(dependent, x_x, ws_x))
        measure(f"matmul {m}x{k}x{n}, {chain} independent", "GFLOP/s", gflop, xla(independent, x_x, ws_x),
                torch_run)
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "dtype": args.dtype, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__ if torch else None,
            "torch_threads": torch.get_num_threads() if torch else None, "kernels": kernels}
