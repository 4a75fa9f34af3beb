#!/usr/bin/env python
"""Serve the MoE model over an OpenAI-compatible HTTP API with continuous batching: one engine per
dp replica (each on its own pp x tp x ep devices), requests routed to the least-loaded one.

    python scripts/serve.py --ckpt runs/shakespeare/model --mesh 1x1x1x1 --port 8000
    python scripts/serve.py --mesh 2x1x2x2 --config configs/tiny.yaml --slots 8 --port 0   # port 0: any free port

Prints `serving MODEL at http://HOST:PORT` once it accepts requests. Ctrl-C or SIGTERM stops
accepting, lets running requests finish (up to --drain-timeout seconds), then exits.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax.cli import ArgumentParser, distributed_settings, guarded, limit_malloc_arenas, use_compile_cache  # noqa: E402  (no JAX yet: devices come first)
from moejax.config import DTYPES, KERNELS, POLICIES, QUANT_MATMULS, QUANT_SCHEMES  # noqa: E402
from moejax.errors import UserError  # noqa: E402
from moejax.mesh import parse_mesh, provision_host_devices  # noqa: E402


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    ap.add_argument("--mesh", default="1x1x1x1", help="DPxPPxTPxEP; each of the dp replicas is an engine")
    ap.add_argument("--config", help="model config (default configs/seed.yaml, or the checkpoint's with --ckpt)")
    ap.add_argument("--ckpt", help="moejax checkpoint directory (without it: random weights)")
    ap.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint directory's "
                    "name, or the config's file name for random weights)")
    ap.add_argument("--layout", default="meshes/seed.yaml", help="sharding rules (file or name in meshes/)")
    ap.add_argument("--slots", type=int, default=8, help="decode slots (KV-cache rows) per replica")
    ap.add_argument("--max-len", type=int, help="KV-cache positions per slot: prompt + max_tokens must fit "
                    "(default: the config's max_seq_len, at most 2048)")
    ap.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens per slot per prefill call (a power of two >= 16; longer prompts are chunked "
                         "so that decoding slots wait at most one chunk)")
    ap.add_argument("--prefill-budget", type=int, default=1024,
                    help="tokens (prompts x padded chunk length) per batch shard per prefill call: more prefills "
                         "short prompts together, less bounds how long one call delays the decoding slots")
    ap.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                    help="static: infer.py-style fixed batches (admit only when every slot is free), for comparison")
    ap.add_argument("--max-waiting", type=int, default=64, help="requests waiting per replica before 429")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed); process i of a "
                    "multi-process run listens on port + i")
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--no-warmup", action="store_true", help="compile each prefill shape on first use")
    ap.add_argument("--seed", type=int, default=0, help="seed for random weights")
    ap.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: the config's)")
    ap.add_argument("--capacity-policy", default="dropless", choices=POLICIES)
    ap.add_argument("--capacity-factor", type=float)
    ap.add_argument("--moe-kernel", default="auto", choices=KERNELS)
    ap.add_argument("--microbatches", type=int, help="pipeline microbatches of a decode step (default as infer.py)")
    ap.add_argument("--quant", choices=QUANT_SCHEMES, help="int8 weights (infer.py --help); a checkpoint made by "
                    "scripts/quantize.py is served as stored")
    ap.add_argument("--quant-matmul", default="auto", choices=QUANT_MATMULS,
                    help="int8 matmul form (infer.py --help); auto: dynamic on CPU, dequant on GPU")
    ap.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-process runs")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    return ap.parse_args(argv)


def run(args):
    shape = parse_mesh(args.mesh)
    dist = distributed_settings(args)
    nproc = dist[1] if dist else 1
    if shape.size % nproc:
        raise UserError(f"mesh {shape} ({shape.size} devices) does not split over {nproc} processes")
    provision_host_devices(shape.size // nproc, exact=dist is not None)
    for name in ("slots", "prefill_budget", "max_waiting", "max_len", "microbatches"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} {v} must be >= 1")
    if args.prefill_chunk < 16 or args.prefill_chunk & (args.prefill_chunk - 1):
        raise UserError(f"--prefill-chunk {args.prefill_chunk} must be a power of two >= 16")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in [0, 65535]")
    if args.drain_timeout < 0:
        raise UserError(f"--drain-timeout {args.drain_timeout} must be >= 0 seconds")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UserError("--served-model-name is empty")
    from moejax.checkpoint import load_weights, resolve_quant, serving_config
    from moejax.rules import load_layout

    layout = load_layout(args.layout)
    cfg = serving_config(args.ckpt, args.config)
    quant = resolve_quant(args.ckpt, args.quant)
    name = (os.path.basename(os.path.normpath(args.ckpt)) if args.ckpt
            else os.path.splitext(os.path.basename(args.config or "configs/seed.yaml"))[0])
    layout.validate(cfg, shape)
    max_len = args.max_len or min(cfg.max_seq_len, 2048)
    if max_len > cfg.max_seq_len:
        raise UserError(f"--max-len {max_len} exceeds the config's max_seq_len {cfg.max_seq_len}")

    import jax
    import uvicorn

    use_compile_cache()
    if dist:
        jax.distributed.initialize(coordinator_address=dist[0], num_processes=dist[1], process_id=dist[2])
    port = args.port + (jax.process_index() if dist and args.port else 0)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # before compiling: a port in use is found in a second, not after minutes
        sock.bind((args.host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{port}: {e.strerror}") from None
    from moejax import model
    from moejax.pipeline import default_microbatches
    from moejax.serving.api import ServedModel, create_app
    from moejax.serving.engine import Engine
    from moejax.serving.metrics import Metrics
    from moejax.serving.replicas import Router, check_slots, replica_meshes

    dtype = args.dtype or cfg.param_dtype
    if jax.default_backend() == "cpu" and dtype == "float16" and not args.dtype:
        dtype = "bfloat16"
        print("computing in bfloat16: XLA:CPU has no native float16 matmul (pass --dtype float16 to insist)")
    replica = dataclasses.replace(shape, dp=1)  # what each engine runs on
    batch_shards = layout.shards("batch", replica)
    micro = args.microbatches or default_microbatches(shape.pp, args.slots, batch_shards)
    policy_cf = {"dropless": 2.0, "drop": 1.25, "reroute": 1.25}[args.capacity_policy]
    rs = model.RunSpec(cfg, layout, replica, dtype, args.capacity_policy, args.capacity_factor or policy_cf, micro,
                       args.moe_kernel, quant=quant, quant_matmul=args.quant_matmul)
    check_slots(args.slots, rs)
    served = ServedModel(args.served_model_name or name, max_len, cfg.vocab_size)
    metrics = Metrics(served.id, shape.dp, args.slots)
    engines = []
    for index, mesh in replica_meshes(shape):
        params = model.serving_params(load_weights(args.ckpt, cfg, args.seed, dtype, mesh, layout, quant), rs, mesh)
        static = args.batching == "static"  # a whole batch of prompts in one prefill call, as infer.py
        budget = args.slots // batch_shards * args.prefill_chunk if static else args.prefill_budget
        eng = Engine(rs, mesh, params, slots=args.slots, max_len=max_len, chunk=args.prefill_chunk,
                     budget=budget, index=index, metrics=metrics, static=static)
        if not args.no_warmup:
            eng.warmup()
        print(f"replica {index}: {mesh.devices.size} device(s), {args.slots} slots x {max_len} positions, "
              f"compiled in {eng.compile_s:.1f} s ({rs.kernel} MoE kernel, {dtype})", flush=True)
        engines.append(eng)
    router = Router(engines, args.max_waiting)
    for eng in engines:
        eng.start()

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1]
                print(f"serving {served.id} at http://{args.host}:{bound}", flush=True)

    config = uvicorn.Config(create_app(router, metrics, served), host=args.host, port=port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout)
    # uvicorn handles SIGINT / SIGTERM while it runs (stop accepting, drain), then re-raises the
    # signal to the handlers it found: make those no-ops so that the engines stop cleanly here
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server = Server(config)
    try:
        server.run(sockets=[sock])  # returns after SIGINT / SIGTERM, once running requests finish (or the drain
        # timeout passes)
    finally:
        router.stop()
    print("stopped", flush=True)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if argv is None:
        limit_malloc_arenas()
    return guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
