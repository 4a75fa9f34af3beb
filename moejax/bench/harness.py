"""Run `moejax serve` in a subprocess and compare servers side by side: the benchmark scripts and the
tests share this. No JAX here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from moejax.errors import UserError
from moejax.bench.loadgen import run_load, summarize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServerProcess:
    """`moejax serve` with `flags` on 127.0.0.1, port 0; `url` once it printed that it serves."""

    def __init__(self, *flags: str, startup_s: float = 600, env: dict | None = None):
        self.stderr = tempfile.TemporaryFile("w+")  # a pipe nobody reads would fill and block the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moejax", "serve", "--host", "127.0.0.1", "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, cwd=REPO, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.signalled = False
        deadline = time.time() + startup_s
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise UserError(f"serve.py {' '.join(flags)} exited with {self.proc.wait()}: "
                                f"{self.errors()[-2000:].strip()}")
            self.lines.append(line)
            if line.startswith("serving "):
                self.model, self.url = line[len("serving "):].strip().split(" at ")
                return
        self.proc.kill()
        raise UserError(f"serve.py {' '.join(flags)} did not start in {startup_s:.0f} s")

    def terminate(self):
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 120) -> tuple[int, str]:
        """SIGTERM (unless sent already), wait; (exit code, everything it printed)."""
        if self.proc.poll() is None and not self.signalled:
            self.terminate()
        try:
            out, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, "".join(self.lines) + out + self.errors()

    def errors(self) -> str:
        """What the server wrote to stderr so far."""
        self.stderr.seek(0)
        return self.stderr.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def server_runner(server: ServerProcess, workload, warmup: int = 0, **load) -> Callable[[], dict]:
    """A runner for `alternate`: the workload against `server` (run_load's options `load`), after
    `warmup` short requests the first time (untimed: first calls of each program shape). The warmup's
    prompts are the workload's reversed: the same lengths, but no prompt prefix a prefix cache could
    keep for the timed round (the workload's own first prompts made the first round's burst of
    requests hit the cache: p99 TTFT 124-150 ms there against 325-580 ms in later rounds)."""
    state = {"warm": warmup == 0}

    def run() -> dict:
        if not state["warm"]:
            warm = [(p[::-1], min(4, m)) for p, m in workload[:warmup]]
            asyncio.run(run_load(server.url, server.model, warm, **load))
            state["warm"] = True
        return summarize(*asyncio.run(run_load(server.url, server.model, workload, **load)))
    return run


def command_runner(argv: list[str]) -> Callable[[], dict]:
    """A runner for `alternate`: a command whose last stdout line is a summary as JSON. It finds
    this checkout's moejax even from another environment's python (the `.[hf]` peer's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

    def run() -> dict:
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env)
        if r.returncode != 0:
            raise UserError(f"{' '.join(argv[:2])} failed ({r.returncode}): {r.stderr.strip()[-1500:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])
    return run


def alternate(runners: dict[str, Callable[[], dict]], rounds: int, progress=print) -> dict:
    """Each runner in turn, `rounds` times (A B A B ...), each returning a `summarize` dict.
    Returns {name: {"runs": [summary per round], "median": {key: median over rounds}}}."""
    out = {name: {"runs": []} for name in runners}
    for r in range(rounds):
        for name, run in runners.items():
            summary = run()
            out[name]["runs"].append(summary)
            progress(f"round {r + 1}/{rounds} {name}: {summary['output_throughput']:.1f} output tok/s, "
                     f"TTFT p50 {summary['median_ttft_ms']:.0f} ms p99 {summary['p99_ttft_ms']:.0f} ms, "
                     f"{summary['failed']} failed")
    for name in runners:
        runs = out[name]["runs"]
        out[name]["median"] = {k: float(np.median([run[k] for run in runs])) for k in runs[0]
                               if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)}
    return out


def half_peak_latency(url: str, model: str, workload, idle_requests: int = 16, seed: int = 0,
                      progress=print) -> dict:
    """TTFT of an idle server (the first `idle_requests` requests one at a time), the peak request
    rate (the whole workload sent at once), and TTFT under Poisson arrivals at half that rate."""
    run = lambda wl, **kw: summarize(*asyncio.run(run_load(url, model, wl, seed=seed, **kw)))  # noqa: E731
    run(workload[:4], concurrency=1)  # warm the server's programs and this client up, untimed
    idle = run(workload[:idle_requests], concurrency=1)
    progress(f"idle: TTFT p50 {idle['median_ttft_ms']:.0f} ms, p99 {idle['p99_ttft_ms']:.0f} ms")
    peak = run(workload)
    rate = peak["request_throughput"]
    progress(f"peak (all {len(workload)} at once): {rate:.2f} req/s, {peak['output_throughput']:.0f} output tok/s")
    half = run(workload, request_rate=rate / 2)
    progress(f"half peak ({rate / 2:.2f} req/s, Poisson): TTFT p50 {half['median_ttft_ms']:.0f} ms, "
             f"p99 {half['p99_ttft_ms']:.0f} ms")
    return {"idle": idle, "peak": peak, "half_peak": half, "peak_request_rate": rate,
            "p99_ttft_half_over_idle_p99": half["p99_ttft_ms"] / idle["p99_ttft_ms"],
            "p99_ttft_half_over_idle_median": half["p99_ttft_ms"] / idle["median_ttft_ms"]}
