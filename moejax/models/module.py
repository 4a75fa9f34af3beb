"""Flax NNX container for the parameters: one `nnx.Param` per tensor, tagged with its logical axes.

Layer tensors are stacked on a leading layer axis so that pipeline stages own contiguous slices.
The forward itself is the shard_map program in models/transformer.py; `MoeModel.__call__` runs it on one device.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from moejax.models import transformer as model
from moejax.config.model import ModelConfig
from moejax.parallel.mesh import MeshShape, make_mesh
from moejax.models.params import param_axes
from moejax.parallel.rules import load_layout


class MoeModel(nnx.Module):
    """Any family's stacked parameters as NNX params, each with its logical axes."""

    def __init__(self, cfg: ModelConfig, *, seed: int = 0, dtype: str = "float32", params: dict | None = None):
        self.cfg = cfg
        self.dtype = dtype
        params = model.init_params(cfg, seed, dtype) if params is None else params
        self.names = tuple(param_axes(cfg))
        for name, axes in param_axes(cfg).items():
            setattr(self, name, nnx.Param(params[name], logical_axes=axes))

    def params(self) -> dict:
        """The plain {name: array} pytree the sharded programs take."""
        return {name: getattr(self, name)[...] for name in self.names}

    def __call__(self, tokens_BT) -> np.ndarray:
        """Full-sequence logits [B, T, V] (float32) on one device, dropless."""
        shape = MeshShape(1, 1, 1, 1)
        mesh = make_mesh(shape)
        layout = load_layout("seed")
        rs = model.RunSpec(self.cfg, layout, shape, self.dtype)
        tokens_BT = np.asarray(tokens_BT, np.int32)
        lengths_B = np.full((tokens_BT.shape[0],), tokens_BT.shape[1], np.int32)
        params = model.serving_params(self.params(), rs, mesh)
        logits, _ = model.build(rs, mesh, "forward")(params, tokens_BT, lengths_B)
        return np.asarray(logits)
