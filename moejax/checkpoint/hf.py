"""Hugging Face checkpoints: config.json through the family registry, streaming import and sharded
export. The tensor names and layouts are the family's (models/hf_map.py)."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from moejax.checkpoint import hf_formats
from moejax.config.model import ModelConfig, config_from_dict
from moejax.errors import UserError
from moejax.models import registry
from moejax.models.hf_map import config_to_hf, expert_reads, fused_units, hf_tensors, hf_writes, join, to_hf
from moejax.models.params import param_dtypes, param_shapes

__all__ = ["config_from_hf", "config_to_hf", "hf_tensors", "to_hf", "read_hf", "write_hf", "write_hf_streaming",
           "HFReader"]


def config_from_hf(hf_dir: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint directory; any malformed field is one line."""
    c, path = _config_json(hf_dir)
    family = registry.get(c.get("model_type"), f"{path}: model_type")
    hf_formats.fp8_block(c, path)  # a quantisation moejax does not read: one line, before any tensor
    fields = family.config_from_hf(c, path)
    return config_from_dict(fields, os.path.basename(os.path.abspath(hf_dir)))


def _config_json(hf_dir: str) -> tuple[dict, str]:
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
    except OSError as e:
        from moejax.errors import os_reason

        raise UserError(f"{hf_dir!r} is not a Hugging Face checkpoint: no readable config.json "
                        f"({os_reason(e, path)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: not valid JSON") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{path}: not readable JSON ({str(e)[:80]})") from None
    if not isinstance(c, dict):
        raise UserError(f"{path}: expected a JSON object of config fields, not a {type(c).__name__}")
    return c, path


def _weight_files(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> safetensors file, from the index or the single file."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{index}: not a safetensors index (needs 'weight_map')") from None
        return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    single = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise UserError(f"{hf_dir!r}: no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    try:
        with safe_open(single, framework="flax") as f:
            return {k: single for k in f.keys()}
    except _read_errors() as e:
        raise UserError(f"{single}: not a readable safetensors file ({_reason(e, single)})") from None


def read_hf(hf_dir: str, progress=None) -> tuple[ModelConfig, dict]:
    """Config and stacked host parameters, read tensor by tensor (peak ~ one copy of the model)."""
    cfg = config_from_hf(hf_dir)
    dtypes = param_dtypes(cfg, cfg.param_dtype)
    params = {n: np.empty(s, _np_dtype(dtypes[n])) for n, s in param_shapes(cfg).items()}
    reader = HFReader(hf_dir, cfg)
    try:
        for i, (name, idx) in enumerate(reader.units):
            params[name][idx] = reader.unit(name, idx)
            if progress:
                progress(i + 1, len(reader.units))
    finally:
        reader.close()
    return cfg, params


def write_hf(out_dir: str, cfg: ModelConfig, params: dict, max_shard_bytes: int = 5 * 2**30, progress=None):
    """config.json plus safetensors: one file, or shards and an index past `max_shard_bytes`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg), f, indent=2)
    return write_hf_streaming(out_dir, cfg, lambda name, idx: to_hf(cfg, name, np.asarray(params[name][idx])),
                              max_shard_bytes, progress)


def write_hf_streaming(out_dir: str, cfg: ModelConfig, fill, max_shard_bytes: int = 5 * 2**30, progress=None):
    """The safetensors files (and index) of `write_hf`, tensor by tensor: `fill(name, index)` gives the
    moejax slice `name[index]` already in HF form (`to_hf`) when its turn comes; an HF tensor made of
    several slices (GPT-OSS's gate_up_proj) is their `join`."""
    from moejax.checkpoint.blocks import write_safetensors

    entries = hf_writes(cfg)  # (HF name, [(moejax name, index), ...])
    shapes = param_shapes(cfg)
    dtypes = param_dtypes(cfg, cfg.param_dtype)  # float32 where the family keeps it so
    groups, cur, size = [], [], 0
    for hf_name, parts in entries:
        n = sum(int(np.prod(shapes[name][len(idx):])) * np.dtype(_np_dtype(dtypes[name])).itemsize
                for name, idx in parts)
        if cur and size + n > max_shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((hf_name, parts))
        size += n
    groups.append(cur)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map, done, total = {}, 0, 0
    for fname, group in zip(names, groups):
        by_name = dict(group)
        hf_shapes = [(hf_name, join([to_hf(cfg, name, np.empty(shapes[name][len(idx):], np.uint8))
                                     for name, idx in parts]).shape, dtypes[parts[0][0]]) for hf_name, parts in group]
        total += write_safetensors(os.path.join(out_dir, fname), hf_shapes,
                                   lambda h: join([fill(*p) for p in by_name[h]]), metadata={"format": "pt"})
        weight_map.update({h: fname for h in by_name})
        done += len(group)
        if progress:
            progress(done, len(entries))
    if len(groups) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def units(cfg: ModelConfig) -> dict:
    """{(moejax name, index): (HF name, HF -> moejax transform)} for every HF tensor."""
    return {(name, idx): (hf_name, fn) for hf_name, name, idx, fn in hf_tensors(cfg)}


class HFReader:
    """HF tensors by moejax (name, index), from the safetensors files of `hf_dir`, one at a time;
    FP8 and MXFP4 tensors dequantised (checkpoint/hf_formats.py), each one counted in `converted`."""

    def __init__(self, hf_dir: str, cfg: ModelConfig):
        self.hf_dir, self.cfg = hf_dir, cfg
        self.files = _weight_files(hf_dir)
        self.units = units(cfg)
        self.fused = fused_units(cfg)
        self.parts = {}  # {(name, (layer, expert)): (expert, chunk 0, of 1)}: a tensor of every expert, read by expert
        for (name, idx), (hf_name, e, fn) in expert_reads(cfg).items():
            self.units.pop((name, idx[:1]), None)  # the layer's unit becomes its experts' units
            self.units[(name, idx)], self.parts[(name, idx)] = (hf_name, fn), (e, 0, 1)
        self.shapes = param_shapes(cfg)
        self.fp8_block = hf_formats.fp8_block(*_config_json(hf_dir))
        self.converted = {hf_formats.FP8: set(), hf_formats.MXFP4: set()}  # HF names dequantised
        self.handles, self.headers = {}, {}
        self.lock = __import__("threading").Lock()

    def past_layers(self) -> dict[int, int]:
        """{layer: tensors} of the checkpoint's layers at or past num_hidden_layers, which nothing reads:
        DeepSeek-V3's and GLM-4.5's multi-token-prediction layers (transformers does not load them either)."""
        out: dict[int, int] = {}
        for name in self.files:
            m = re.match(r"model\.layers\.(\d+)\.", name)
            if m and int(m.group(1)) >= self.cfg.num_layers:
                out[int(m.group(1))] = out.get(int(m.group(1)), 0) + 1
        return out

    def _header(self, path: str) -> dict:
        """The safetensors header of `path` (the tensors are then read with plain reads: a memory map
        would count every page touched in this process's RSS)."""
        with self.lock:
            return self._open(path)

    def _open(self, path: str) -> tuple:
        import struct

        if path not in self.handles:
            f = open(path, "rb")
            self.handles[path] = f
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: not a readable safetensors file ({e}: truncated, damaged or not "
                                f"safetensors)") from None
            size = os.fstat(f.fileno()).st_size
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise UserError(f"{path}: not a readable safetensors file ({size} bytes, its header needs "
                                f"{8 + n + end}: truncated)")
            self.headers[path] = (8 + n, header)
        return self.headers[path]

    def unit(self, name: str, idx: tuple) -> np.ndarray:
        hf_name, fn = self.units[(name, idx)]
        part = self.parts.get((name, idx))  # (expert, chunk, chunks) of a tensor of every expert
        if not self._stored(hf_name) and (name, idx) in self.fused:
            fused, *part = self.fused[(name, idx)]
            if self._stored(fused):
                hf_name = fused
        if not self._stored(hf_name):
            raise UserError(f"{self.hf_dir!r}: tensor {hf_name!r} is missing")
        t, path = self._tensor(hf_name, part)
        want = self.shapes[name][len(idx):]
        got = fn(t)
        if got.shape != want:
            raise UserError(f"{path}: tensor {hf_name!r} has shape {tuple(t.shape)}, which does not fit "
                            f"the config (moejax {name} slice {want})")
        return np.ascontiguousarray(got)

    def _stored(self, hf_name: str) -> bool:
        """In the checkpoint as itself, or as MXFP4 `<x>_blocks` and `<x>_scales`."""
        return hf_name in self.files or (hf_name + "_blocks" in self.files and hf_name + "_scales" in self.files)

    def _tensor(self, hf_name: str, part) -> tuple[np.ndarray, str]:
        """(HF tensor `hf_name`, or one expert's chunk of it (`part`), dequantised; its file). A
        quantised expert is dequantised whole (one expert's bytes are read) and then cut."""
        e, chunk, chunks = part or (None, 0, 1)
        E = self.cfg.num_experts
        if hf_name not in self.files:  # MXFP4: <x>_blocks [E, R, G, 16] and <x>_scales [E, R, G] are <x> [E, 32G, R]
            path, blocks = self._entry(hf_name + "_blocks", ("U8",))
            scales = self._entry(hf_name + "_scales", ("U8",))[1]
            if not hf_formats.mxfp4_shapes_fit(blocks["shape"], scales["shape"]):
                raise UserError(f"{path}: MXFP4 tensor {hf_name!r}: blocks {blocks['shape']} and scales "
                                f"{scales['shape']}; expected [..., R, G, 16] and [..., R, G]")
            t = hf_formats.dequantize_mxfp4(self._read(hf_name + "_blocks", e), self._read(hf_name + "_scales", e))
            self.converted[hf_formats.MXFP4].add(hf_name)
        else:
            path, h = self._entry(hf_name, ("F32", "F16", "BF16", "F8_E4M3"))
            shape = h["shape"]
            if h["dtype"] == "F8_E4M3":
                scale = hf_name + "_scale_inv"
                if scale not in self.files or len(shape) < 2:
                    raise UserError(f"{path}: tensor {hf_name!r} is F8_E4M3 {shape}; moejax reads FP8 matrices with "
                                    f"block scales in a {scale!r} beside them (quant_method 'fp8')")
                spath, s = self._entry(scale, ("F32", "BF16", "F16", "F8_E8M0"))
                need = hf_formats.fp8_scale_shape(shape, self.fp8_block)
                if s["shape"] != need:
                    raise UserError(f"{spath}: tensor {scale!r} has shape {s['shape']}; {hf_name!r} {shape} in blocks "
                                    f"of {list(self.fp8_block)} needs {need}")
                t = hf_formats.dequantize_fp8(self._read(hf_name, e), self._read(scale, e), self.fp8_block)
                self.converted[hf_formats.FP8].add(hf_name)
            elif part is None:
                return self._read(hf_name), path
            elif chunks == 1:  # one expert of [E, ...]
                return self._read(hf_name, e), path
            else:  # one expert's chunk of [E, R, ...]: a contiguous run of its bytes
                if len(shape) != 3 or shape[0] != E or shape[1] % chunks:
                    raise UserError(f"{path}: fused expert tensor {hf_name!r} has shape {shape}; expected "
                                    f"[{E}, {chunks} x rows, cols]")
                rows = shape[1] // chunks
                return self._read(hf_name, e, (chunk * rows, (chunk + 1) * rows)), path
        if part is not None and chunks > 1:
            if t.ndim != 2 or t.shape[0] % chunks:
                raise UserError(f"{path}: fused expert tensor {hf_name!r} has expert shape {list(t.shape)}; "
                                f"expected [{chunks} x rows, cols]")
            rows = t.shape[0] // chunks
            t = t[chunk * rows:(chunk + 1) * rows]
        return t, path

    def _entry(self, hf_name: str, dtypes: tuple) -> tuple[str, dict]:
        """(file, safetensors header entry) of `hf_name`, its dtype one of `dtypes` and its size checked."""
        path = self.files[hf_name]
        try:
            header = self._header(path)[1]
        except OSError as e:
            raise UserError(f"{path}: tensor {hf_name!r} unreadable ({_reason(e, path)})") from None
        if hf_name not in header:
            raise UserError(f"{path}: tensor {hf_name!r} is missing")
        h = header[hf_name]
        if h["dtype"] not in dtypes:
            raise UserError(f"{path}: tensor {hf_name!r} has dtype {h['dtype']}; moejax reads "
                            f"{', '.join(dtypes)} there")
        b0, b1 = h["data_offsets"]
        if b1 - b0 != int(np.prod(h["shape"])) * hf_formats.np_dtype(h["dtype"]).itemsize:
            raise UserError(f"{path}: tensor {hf_name!r}: {b1 - b0} bytes for shape {h['shape']}: damaged")
        return path, h

    def _read(self, hf_name: str, e: int | None = None, rows: tuple | None = None) -> np.ndarray:
        """Tensor `hf_name` ([E, ...] with `e`: its [e], rows [r0, r1) of that with `rows`), read with one
        pread of a contiguous run of bytes; `_entry` has checked it."""
        path = self.files[hf_name]
        base, header = self.headers[path]
        h = header[hf_name]
        dtype, shape, b0 = hf_formats.np_dtype(h["dtype"]), list(h["shape"]), h["data_offsets"][0]
        if e is not None:
            if len(shape) < 2 or shape[0] != self.cfg.num_experts:
                raise UserError(f"{path}: fused expert tensor {hf_name!r} has shape {shape}; expected "
                                f"[{self.cfg.num_experts}, ...]")
            r0, r1 = rows or (0, shape[1])
            b0 += (e * shape[1] + r0) * int(np.prod(shape[2:])) * dtype.itemsize
            shape = [r1 - r0] + shape[2:]
        t = np.empty(shape, dtype)
        try:
            got = os.preadv(self.handles[path].fileno(), [memoryview(t.reshape(-1).view(np.uint8))], base + b0)
        except OSError as err:
            raise UserError(f"{path}: tensor {hf_name!r} unreadable ({_reason(err, path)})") from None
        if got != t.nbytes:  # (pread: safe from several threads)
            raise UserError(f"{path}: tensor {hf_name!r} unreadable (end of file: truncated)")
        return t

    def block(self, name: str, index: tuple) -> np.ndarray:
        """moejax `name[index]` for a block of whole HF tensors (ints, then one slice, over their axes)."""
        n = len(next(i for (m, i) in self.units if m == name))
        shape = self.shapes[name]
        ranges = [[i] if isinstance(i, (int, np.integer)) else range(*i.indices(shape[j])) for j, i in enumerate(index[:n])]
        ranges += [range(shape[j]) for j in range(len(index), n)]
        from concurrent.futures import ThreadPoolExecutor

        idxs = [tuple(int(r[k]) for r, k in zip(ranges, ix)) for ix in np.ndindex(*[len(r) for r in ranges])]
        with ThreadPoolExecutor(2) as pool:  # reads and transposes release the GIL: two cores work
            parts = list(pool.map(lambda i: self.unit(name, i), idxs))
        if n == 0:
            return parts[0][index] if index else parts[0]
        lead = [len(r) for j, r in enumerate(ranges) if j >= len(index) or not isinstance(index[j], (int, np.integer))]
        return np.stack(parts).reshape(tuple(lead) + shape[n:])

    def close(self):
        for h in self.handles.values():
            h.close()
        self.handles, self.headers = {}, {}


def _read_errors() -> tuple:
    """What a missing, unreadable, truncated or malformed safetensors file raises (anything else
    is a bug and propagates)."""
    from safetensors import SafetensorError

    return (OSError, SafetensorError)


def _reason(e: Exception, path: str) -> str:
    if isinstance(e, OSError):
        from moejax.errors import os_reason

        return os_reason(e, path)
    return f"{e}: truncated, damaged or not safetensors"


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def _np_dtype(dtype: str):
    return _bf16() if dtype == "bfloat16" else np.dtype(dtype)
