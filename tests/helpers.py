"""Shared test helpers: build a run on a mesh, compare against the float64 reference."""

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from moejax.models import transformer as model
from moejax.config.model import load_config
from moejax.inference.generate import put
from moejax.parallel.mesh import make_mesh, parse_mesh
from moejax.parallel.rules import load_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "data", "hf-mixtral-tiny")  # provenance: its README.md
RTOL = 1e-5  # relative error on logits: max |got - want| / max |want|


def rel_err(got, want) -> float:
    """max |got - want| over the whole tensor / max |want| over the whole tensor: one normalisation
    for every row, by the largest logit anywhere (a row of small logits is judged against it). For a
    bound per row (each position by its own largest logit), use `rel_err_per_row`."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def rel_err_per_row(got, want) -> float:
    """The largest over rows (all axes but the last) of max |got - want| / max |want| within the row."""
    want = np.asarray(want, np.float64)
    err = np.max(np.abs(np.asarray(got, np.float64) - want), axis=-1) / np.max(np.abs(want), axis=-1)
    return float(np.max(err))


@functools.lru_cache(maxsize=None)
def host_params(config: str, seed: int = 0, dtype: str = "float32") -> dict:
    """Stacked parameters as NumPy (identical whatever the mesh: drawn on one device)."""
    return {k: np.asarray(v) for k, v in model.init_params(load_config(config), seed, dtype).items()}


def setup(config: str, mesh: str, layout: str = "seed", **kw):
    """(RunSpec, mesh, serving params) for a config on a mesh."""
    cfg = load_config(config)
    shape = parse_mesh(mesh)
    m = make_mesh(shape)
    lay = load_layout(layout)
    rs = model.RunSpec(cfg, lay, shape, kw.pop("dtype", "float32"), **kw)
    stacked = {k: v.copy() for k, v in host_params(config).items()}
    shardings = model.param_shardings(m, lay, cfg)
    import jax

    params = {k: jax.device_put(v, shardings[k]) for k, v in stacked.items()}
    return rs, m, model.serving_params(params, rs, m)


def forward(config: str, mesh: str, tokens, layout: str = "seed", lengths=None, **kw):
    """Full logits [B, T, V] and MoE statistics."""
    rs, m, params = setup(config, mesh, layout, **kw)
    tokens = np.asarray(tokens, np.int32)
    if lengths is None:
        lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int32)
    logits, stats = model.build(rs, m, "forward")(params, put(m, rs.layout, "tokens", tokens),
                                                  put(m, rs.layout, "lengths", np.asarray(lengths, np.int32)))
    return np.asarray(logits), {k: np.asarray(v) for k, v in stats.items()}


_XLA_CACHE: list[str] = []


def xla_cache_dir() -> str:
    """This test process's persistent XLA compilation cache: a new directory, removed at exit."""
    if not _XLA_CACHE:
        _XLA_CACHE.append(tempfile.mkdtemp(prefix="moejax-tests-xla-"))
        atexit.register(shutil.rmtree, _XLA_CACHE[0], True)
    return _XLA_CACHE[0]


def command_env(env=None) -> dict:
    """The environment of a command a test starts: no XLA_FLAGS (commands provision their own
    devices) and one persistent XLA compilation cache per test process (every program, however
    quick to compile), so that commands compiling the same programs (the tiny config's parameter
    draws, a mesh's prefill) load them instead of compiling again. The cache starts empty (a
    directory of this process, removed at exit): nothing is read from an earlier session or from
    ~/.cache, and a cached executable is the one the same program compiled to. `env` overrides."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update({"JAX_COMPILATION_CACHE_DIR": xla_cache_dir(), "MOEJAX_CACHE_DIR": xla_cache_dir(),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    e.update(env or {})
    return e


def free_port_pair() -> int:
    """A port p with p and p + 1 free, below the kernel's ephemeral range: a port the kernel hands out
    (bind to 0, or the source port of any client connection, such as a coordinator's) could take
    p + 1 between this check and the server's bind."""
    import random
    import socket

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0]) if os.path.exists(
        "/proc/sys/net/ipv4/ip_local_port_range") else 32768
    for _ in range(100):
        port = random.randrange(10000, low - 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free consecutive ports below the ephemeral range")


def run_script(script: str, *args, env=None, timeout=600):
    e = command_env(env)
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=e, timeout=timeout)


def import_fixture(tmp_path_factory, hf_dir, name: str = "hf") -> str:
    """A Hugging Face fixture directory imported as a moejax checkpoint under a new temporary directory."""
    out = str(tmp_path_factory.mktemp("ck") / name)
    r = run_script("import_hf.py", hf_dir, out)
    assert r.returncode == 0, r.stderr
    return out
