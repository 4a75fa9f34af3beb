"""int8 weights: per-output-channel symmetric quantization of the attention and expert matrices.

`quantize` turns each matrix of a family's table that names int8 input dims (`models/params.py`
`quant_dims`; stacked, any mesh) into int8 values q and
a float32 scale per output channel, s = max |w| / 127 over the input dimensions, so w ~ q * s with
|w - q * s| <= s / 2. Embeddings, norms, the router and the head stay in the model's dtype.

Inside the serving program a quantized matrix is a pair, and the matmul's form is the backend's
(`RunSpec.quant_matmul`, `auto` picks it):
  dequant  x @ q.astype(x.dtype), then * s per output channel: weight-only, for XLA on GPU to fuse
           the conversion into the GEMM and read half the bytes of bfloat16 weights (not yet
           measured on a GPU).
  dynamic  each row of x quantized to int8 on the fly (its own scale, max |x| / 127 over the
           contracted dimension this device holds), int8 x int8 -> int32 matmul, * (row scale * s).
           XLA:CPU materialises a converted copy of the weights under `dequant` (1.3x slower than
           bfloat16 in a 16-expert decode microbenchmark), while its int8 dot ran 2x faster than
           bfloat16 for 2-row expert blocks: the CPU's form, at the cost of rounding activations too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config.model import QUANT_MATMULS, QUANT_SCHEMES
from moejax.errors import UserError

F32 = jnp.float32
SCALE_SUFFIX = "_scale"  # a quantized matrix `w1` has its scales in `w1_scale`


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def check_scheme(quant: str | None) -> None:
    if quant is not None and quant not in QUANT_SCHEMES:
        raise UserError(f"quantization scheme {quant!r}; valid: {', '.join(QUANT_SCHEMES)} (or none)")


def resolve_matmul(mode: str, backend: str) -> str:
    if mode not in QUANT_MATMULS:
        raise UserError(f"quantized matmul {mode!r}; valid: {', '.join(QUANT_MATMULS)}")
    if mode == "auto":
        return "dynamic" if backend == "cpu" else "dequant"
    return mode


def _quantize_one(w, dims):
    wf = w.astype(F32)
    s = jnp.max(jnp.abs(wf), axis=dims, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)  # an all-zero channel: q = 0 whatever the scale
    return jnp.clip(jnp.round(wf / s), -127, 127).astype(jnp.int8), s


def quantize(params: dict, dims: dict[str, tuple[int, ...]], quant: str = "int8") -> dict:
    """Stacked parameters -> the same dict with each quantized matrix as int8 plus its `_scale`
    (float32), each keeping the weight's sharding. `dims`: each quantized matrix's input dims
    (`models.params.quant_dims`). Pops the float matrices as it goes."""
    check_scheme(quant)
    out = dict(params)
    for name, d in dims.items():
        w = out.pop(name)
        sharding = getattr(w, "sharding", None)
        fn = jax.jit(_quantize_one, static_argnums=1)
        if isinstance(sharding, NamedSharding):  # the scale keeps the output channels' sharding
            spec = tuple(sharding.spec) + (None,) * (w.ndim - len(sharding.spec))
            scale = NamedSharding(sharding.mesh, P(*(None if i in d else a for i, a in enumerate(spec))))
            fn = jax.jit(_quantize_one, static_argnums=1, out_shardings=(sharding, scale))
        out[name], out[scale_name(name)] = fn(w, d)
        del w
    return out


def dequantize(params: dict, dtype=F32) -> dict:
    """q * s for every quantized matrix (the float weights a quantized model computes with)."""
    out = {n: v for n, v in params.items() if not n.endswith(SCALE_SUFFIX)}
    for name in out:
        if scale_name(name) in params:
            out[name] = (params[name].astype(F32) * params[scale_name(name)]).astype(dtype)
    return out


def is_quantized(params: dict) -> bool:
    return any(n.endswith(SCALE_SUFFIX) for n in params)


# ---- inside the serving program -----------------------------------------------------------------

class Dequant(NamedTuple):
    """int8 values [.., in, out] and float32 scales broadcasting against the matmul's output."""
    q: jax.Array
    s: jax.Array


class Dynamic(NamedTuple):
    q: jax.Array
    s: jax.Array


PAIRS = {"dequant": Dequant, "dynamic": Dynamic}


def pair(q, s, mode: str):
    """One quantized matrix (or a list over local experts) as the matmul form `mode` takes."""
    if isinstance(q, list):
        return [PAIRS[mode](a, b) for a, b in zip(q, s)]
    return PAIRS[mode](q, s)


def reshape(w, in_shape, out_shape):
    """A weight reshaped for a 2-D matmul: values to in_shape + out_shape, scales to 1s + out_shape."""
    if isinstance(w, (Dequant, Dynamic)):
        return type(w)(w.q.reshape(in_shape + out_shape), w.s.reshape((1,) * len(in_shape) + out_shape))
    return w.reshape(in_shape + out_shape)


def quantize_rows(x):
    """x as int8 with a float32 scale per row: max |x| / 127 over the last dimension."""
    xf = x.astype(F32)
    s = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    return jnp.clip(jnp.round(xf / s), -127, 127).astype(jnp.int8), s


def matmul(eq: str, x, w):
    """einsum(eq, x, w) with float32 results for a float, `Dequant` or `Dynamic` weight. `eq`
    contracts x's last dimension, and its output is x's other dimensions (in order) followed by w's
    output channels, so both x's row scale [.., 1] and w's scale [.., 1, out] broadcast against it."""
    if isinstance(w, Dequant):
        return jnp.einsum(eq, x, w.q.astype(x.dtype), preferred_element_type=F32) * w.s
    if isinstance(w, Dynamic):
        xq, xs = quantize_rows(x)
        return jnp.einsum(eq, xq, w.q, preferred_element_type=jnp.int32).astype(F32) * xs * w.s
    return jnp.einsum(eq, x, w, preferred_element_type=F32)
