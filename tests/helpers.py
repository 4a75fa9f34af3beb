"""Shared test helpers: build a run on a mesh, compare against the float64 reference."""

import functools
import os
import subprocess
import sys

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


def run_script(script: str, *args, env=None, timeout=600):
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # scripts provision their own devices
    e.update(env or {})
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=e, timeout=timeout)
