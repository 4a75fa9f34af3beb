"""Serve the MoE model over an OpenAI-compatible HTTP API with continuous batching: one engine per
dp replica (each on its own pp x tp x ep devices), requests routed to the least-loaded one.

    moejax serve --ckpt runs/shakespeare/model --mesh 1x1x1x1 --port 8000
    moejax serve --mesh 2x1x2x2 --config configs/tiny.yaml --slots 8 --port 0   # port 0: any free port
(`python scripts/serve.py ...` is the same command.)

Prints `serving MODEL at http://HOST:PORT` once it accepts requests. Ctrl-C or SIGTERM stops
accepting, lets running requests finish (up to --drain-timeout seconds; a second signal stops at
once), ends the rest with an error, then exits: 0 when every request finished, 3 when the stop cut
some short (docs/SERVING.md, "Limits" and "Stopping").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import socket
import sys

from moejax.cli import flags
from moejax.cli.common import ArgumentParser, distributed_settings, guarded, use_compile_cache  # no JAX yet
from moejax.errors import UserError
from moejax.parallel.mesh import parse_mesh, provision_host_devices
from moejax.serving import server as srv  # no JAX either: the limits' defaults


def parse_args(argv):
    ap = ArgumentParser(__doc__)
    flags.add_mesh(ap)  # each of the dp replicas is an engine
    flags.add_model(ap)
    flags.add_tokenizer(ap, chat=True)
    ap.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint directory's "
                    "name, or the config's file name for random weights)")
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
    ap.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                    help="reuse the keys and values of a prompt prefix a cache row already holds (blocks of 16 "
                         "tokens; docs/SERVING.md); --no-enable-prefix-caching computes every prompt")
    ap.add_argument("--prefix-pool", type=int, default=None, metavar="TOKENS",
                    help="positions per replica of the prefix cache's block pool, which keeps the prompt blocks "
                         "of rows given to other requests (default: as many as the slots' rows hold, slots x "
                         "--max-len, which doubles the KV cache's memory; 0: only prefixes still in a row)")
    ap.add_argument("--sliding-window-cache", choices=("ring", "full"), default="ring",
                    help="ring: a sliding-window layer keeps a ring of its window's positions per slot (GPT-OSS: "
                         "128 of --max-len), which holds no reusable prompt prefix, so prefix caching is off for "
                         "such models; full: whole rows, and prefix caching")
    ap.add_argument("--mixed-steps", action=argparse.BooleanOptionalAction, default=True,
                    help="run the decode step and the prompt chunks as one forward (--no-mixed-steps: two calls)")
    ap.add_argument("--max-waiting", type=int, default=64, help="requests waiting per replica before 429")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed); process i of a "
                    "multi-process run listens on port + i")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="seconds running requests may take to finish after SIGINT / SIGTERM (a second signal: none)")
    ap.add_argument("--no-warmup", action="store_true", help="compile each prefill shape on first use")
    ap.add_argument("--background-warmup", action="store_true",
                    help="compile the decode step, start serving, and compile the prefill shapes on a thread (the "
                         "seed config: serving after 27 s cold / 16 s cached instead of 188 / 63-74 s; a request "
                         "whose shape is not compiled yet waits for it; a line says when all are; docs/SERVING.md)")
    ap.add_argument("--seed", type=int, default=0, help="seed for random weights")
    flags.add_dtype(ap)
    flags.add_moe(ap)
    flags.add_quant(ap)
    flags.add_multiprocess(ap)
    # limits and access (docs/SERVING.md, "Limits")
    ap.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on every path but /health and /metrics "
                    f"(default: ${srv.API_KEY_ENV}; none: an open server, with a warning unless --host is loopback)")
    ap.add_argument("--max-body-bytes", type=int, default=srv.DEFAULT_MAX_BODY_BYTES,
                    help="largest request body; a larger one is answered 413 unread")
    ap.add_argument("--body-timeout", type=float, default=srv.DEFAULT_BODY_TIMEOUT,
                    help="seconds a client may take to upload a request body (408 after)")
    ap.add_argument("--header-timeout", type=float, default=srv.DEFAULT_HEADER_TIMEOUT,
                    help="seconds a connection may take to send a request's line and headers (closed after)")
    ap.add_argument("--timeout-keep-alive", type=float, default=srv.DEFAULT_KEEP_ALIVE,
                    help="seconds an idle kept-alive connection stays open")
    ap.add_argument("--limit-concurrency", type=int,
                    help=f"connections + requests before new requests get 503 (default "
                         f"{srv.DEFAULT_LIMIT_CONCURRENCY}, or what the file-descriptor limit allows)")
    return ap.parse_args(argv)


def limits_and_options(args):
    """(api.Limits, server.ServeOptions) from the flags of the block above; UserError for a bad one."""
    from moejax.serving.api import Limits
    from moejax.serving.server import ServeOptions, resolve_api_key

    limits = Limits(args.max_body_bytes, args.body_timeout, resolve_api_key(args.api_key))
    options = ServeOptions(args.host, args.drain_timeout, args.limit_concurrency, args.timeout_keep_alive,
                           args.header_timeout).validate()
    return limits, options


def show_engine_progress() -> None:
    """The engines' progress lines (logging INFO of moejax.serving: the background warmup's end) on
    stdout beside the command's own, their warnings and errors on stderr; once each (not also through
    a root handler that a library may have installed, nor twice when `run` is called again)."""
    import logging

    log = logging.getLogger("moejax.serving")
    log.handlers = []
    for stream, keep in ((sys.stdout, lambda r: r.levelno < logging.WARNING),
                         (sys.stderr, lambda r: r.levelno >= logging.WARNING)):
        h = logging.StreamHandler(stream)
        h.setFormatter(logging.Formatter("%(message)s"))
        h.addFilter(keep)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


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
    if args.prefix_pool is not None and args.prefix_pool < 0:
        raise UserError(f"--prefix-pool {args.prefix_pool} must be >= 0 positions")
    if args.prefill_chunk < 16 or args.prefill_chunk & (args.prefill_chunk - 1):
        raise UserError(f"--prefill-chunk {args.prefill_chunk} must be a power of two >= 16")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port} must be in [0, 65535]")
    if args.drain_timeout < 0:
        raise UserError(f"--drain-timeout {args.drain_timeout} must be >= 0 seconds")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UserError("--served-model-name is empty")
    limits, options = limits_and_options(args)
    show_engine_progress()
    from moejax.serving.server import exposure_warning

    warning = exposure_warning(args.host, limits.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from moejax.checkpoint.store import load_weights, resolve_quant, serving_config
    from moejax.parallel.rules import load_layout

    layout = load_layout(args.layout)
    cfg = serving_config(args.ckpt, args.config)
    quant = resolve_quant(args.ckpt, args.quant)
    name = (os.path.basename(os.path.normpath(args.ckpt)) if args.ckpt
            else os.path.splitext(os.path.basename(args.config or "configs/seed.yaml"))[0])
    layout.validate(cfg, shape)
    tok = flags.tokenizer(args, cfg)
    max_len = args.max_len or min(cfg.max_seq_len, 2048)
    if max_len > cfg.max_seq_len:
        raise UserError(f"--max-len {max_len} exceeds the config's max_seq_len {cfg.max_seq_len}")

    import jax

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
    from moejax.models import transformer as model
    from moejax.serving.api import create_app
    from moejax.serving.protocol import ServedModel
    from moejax.serving.engine import Engine
    from moejax.serving.prefix import BLOCK
    from moejax.serving.metrics import Metrics
    from moejax.serving.replicas import Router, check_slots, replica_meshes

    dtype, note = flags.compute_dtype(args.dtype, cfg, jax.default_backend())
    if note:
        print(note)
    replica = dataclasses.replace(shape, dp=1)  # what each engine runs on
    batch_shards = layout.shards("batch", replica)
    rs = flags.run_spec(args, cfg, layout, replica, batch=args.slots, platform=jax.default_backend(), dtype=dtype,
                        quant=quant)
    check_slots(args.slots, rs)
    meshes = replica_meshes(shape)
    rs, _ = flags.measured_kernel(rs, meshes[0][1], (args.slots, args.prefill_budget))
    served = ServedModel(args.served_model_name or name, max_len, cfg.vocab_size, tok,
                         os.path.abspath(args.ckpt) if args.ckpt else None)
    metrics = Metrics(served.id, shape.dp, args.slots)
    engines = []
    for index, mesh in meshes:
        params = model.serving_params(load_weights(args.ckpt, cfg, args.seed, dtype, mesh, layout, quant), rs, mesh)
        static = args.batching == "static"  # a whole batch of prompts in one prefill call, as infer.py
        budget = args.slots // batch_shards * args.prefill_chunk if static else args.prefill_budget
        eng = Engine(rs, mesh, params, slots=args.slots, max_len=max_len, chunk=args.prefill_chunk,
                     budget=budget, index=index, metrics=metrics, static=static, mixed=args.mixed_steps,
                     prefix_cache=args.enable_prefix_caching, ring_cache=args.sliding_window_cache == "ring",
                     prefix_pool=args.prefix_pool)
        if not args.no_warmup:
            eng.warmup(background=args.background_warmup)
        print(f"replica {index}: {mesh.devices.size} device(s), {args.slots} slots x {max_len} positions, "
              f"compiled in {eng.compile_s:.1f} s ({rs.kernel} MoE kernel, {dtype})", flush=True)
        if eng.pool_blocks and index == 0:
            size = sum(a.nbytes for a in jax.tree.leaves(eng.programs.pool)) / 2**20
            print(f"prefix cache: a pool of {eng.pool_blocks} blocks of {BLOCK} positions per replica "
                  f"({size:.1f} MiB; --prefix-pool)", flush=True)
        if eng.ring and index == 0:
            print(f"sliding-window layers keep rings of {cfg.sliding_window} positions per slot; prefix caching is "
                  f"off with them (--sliding-window-cache full keeps whole rows and prefix caching)", flush=True)
        engines.append(eng)
    router = Router(engines, args.max_waiting)
    # what start-up built (weights, programs, tokenizer) lives as long as the server: out of the cyclic
    # collector's generations, so its full collections stop walking it while requests wait (vLLM's choice)
    gc.collect()
    gc.freeze()
    for eng in engines:
        eng.start()
    from moejax.serving.server import serve

    app = create_app(router, metrics, served, limits)
    try:  # returns after SIGINT / SIGTERM, once the drain is over (moejax/serving/server.py)
        code = serve(app, sock, options, lambda bound: print(f"serving {served.id} at http://{args.host}:{bound}",
                                                             flush=True))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the stop is decided: a signal now changes nothing
            signal.signal(sig, signal.SIG_IGN)
        router.stop()
    print("stopped", flush=True)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    code = []
    return guarded(lambda a: code.append(run(a)), args) or (code[0] if code else 0)

