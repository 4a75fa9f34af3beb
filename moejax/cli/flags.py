"""Run flags, defined once: the shared flag groups every command adds, and the one constructor of
the run spec from parsed flags (`run_spec`), which resolves every default in one place: the
capacity factor per policy, the float16 -> bfloat16 fallback on CPU, the microbatches, the platform.
"""

from __future__ import annotations

import argparse

from moejax.config.model import DTYPES, KERNELS, POLICIES, QUANT_MATMULS, QUANT_SCHEMES, ModelConfig
from moejax.parallel.mesh import MeshShape
from moejax.parallel.rules import Layout

DEFAULT_CONFIG = "configs/seed.yaml"
DEFAULT_LAYOUT = "seed"


def add_model(ap: argparse.ArgumentParser, *, config_default: str | None = None, ckpt: bool = True,
              ckpt_required: bool = False, default_help: str | None = None) -> None:
    """Where the weights come from: --config (random weights) and/or --ckpt."""
    g = ap.add_argument_group("model")
    g.add_argument("--config", default=config_default,
                   help=f"model config (file or name in configs/; default "
                        + (default_help or f"{config_default or DEFAULT_CONFIG}"
                           + (", or the checkpoint's with --ckpt" if ckpt else "")) + ")")
    if ckpt:
        g.add_argument("--ckpt", required=ckpt_required, help="moejax checkpoint directory (its latest complete step)")


def add_tokenizer(ap: argparse.ArgumentParser, *, chat: bool = False) -> None:
    """--tokenizer DIR (and --chat-template FILE for the server): how text becomes ids."""
    g = ap.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", metavar="DIR", help="a Hugging Face tokenizer directory (tokenizer.json, "
                   "tokenizer_config.json, generation_config.json); default: the checkpoint's own (import_hf "
                   "copies it in), else bytes (token id = UTF-8 byte)")
    if chat:
        g.add_argument("--chat-template", metavar="FILE", help="a jinja chat template replacing the tokenizer's")


def tokenizer(args: argparse.Namespace, cfg: ModelConfig, ckpt: str | None = None):
    """The run's tokenizer: --tokenizer, else the checkpoint's (--ckpt, or `ckpt`), else bytes; --chat-template read and
    checked here (a one-line error for a missing file or a template that does not parse)."""
    from moejax.errors import UserError, os_reason
    from moejax.tokenizers import load_tokenizer, tokenizer_dir
    from moejax.tokenizers.chat import check_template

    template = None
    path = getattr(args, "chat_template", None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise UserError(f"--chat-template: cannot read {os_reason(e, path)}") from None
        except UnicodeDecodeError:
            raise UserError(f"--chat-template {path!r} is not UTF-8 text") from None
        check_template(template, f"--chat-template {path!r}")
    ckpt = ckpt or getattr(args, "ckpt", None)
    return load_tokenizer(getattr(args, "tokenizer", None) or tokenizer_dir(ckpt), cfg, template)


def add_mesh(ap: argparse.ArgumentParser, *, default: str | None = "1x1x1x1", repeat: bool = False,
             layout_default: str | None = DEFAULT_LAYOUT) -> None:
    """--mesh DPxPPxTPxEP (repeatable to compare meshes) and --layout (the sharding rules)."""
    g = ap.add_argument_group("mesh")
    if repeat:
        g.add_argument("--mesh", action="append", help=f"DPxPPxTPxEP; repeat to compare (default {default})")
    else:
        g.add_argument("--mesh", default=default, help="DPxPPxTPxEP, e.g. 4x2x4x4")
    g.add_argument("--layout", default=layout_default, help="sharding rules (file or name in meshes/)")


def add_dtype(ap: argparse.ArgumentParser, *, default: str | None = None, help: str | None = None) -> None:
    ap.add_argument("--dtype", choices=DTYPES, default=default,
                    help=help or "parameter and compute dtype (default: the config's; float16 computes in "
                                 "bfloat16 on CPU unless given)")


def add_moe(ap: argparse.ArgumentParser) -> None:
    """The MoE policy and kernel, and the pipeline's microbatches. Every default is None here and
    resolved by `run_spec`, so that no command can drift from another."""
    g = ap.add_argument_group("MoE and pipeline")
    g.add_argument("--capacity-policy", choices=POLICIES, help="dropless (default), drop or reroute")
    g.add_argument("--capacity-factor", type=float,
                   help="expert capacity per source device = ceil(cf * tokens * k / experts); default per policy: "
                        "dropless 2.0 (a round size), drop and reroute 1.25")
    g.add_argument("--moe-kernel", choices=KERNELS,
                   help="expert exchange and compute: capacity buffers + all_to_all with a branch per expert "
                        "(buffers) or one batched matmul (batched), or ragged all-to-all + grouped matmul "
                        "(ragged_dot); auto (default): each candidate this platform runs is timed on one MoE "
                        "layer of this run's shapes and the fastest is used (kept in ~/.cache/moejax/kernels.json)")
    g.add_argument("--microbatches", type=int,
                   help="pipeline microbatches M (default 2 x pp, bounded by the batch; 1 when pp = 1 or on CPU)")


def add_quant(ap: argparse.ArgumentParser, *, repeat: bool = False) -> None:
    g = ap.add_argument_group("int8")
    if repeat:
        g.add_argument("--quant", action="append", choices=("none",) + QUANT_SCHEMES,
                       help="weights to compare (repeat: e.g. --quant none --quant int8 for an A/B in one run)")
    else:
        g.add_argument("--quant", choices=QUANT_SCHEMES,
                       help="int8 weights (per-output-channel scales) for the attention and expert matrices; a "
                            "checkpoint made by `moejax ckpt quantize` is served as stored")
    g.add_argument("--quant-matmul", default="auto", choices=QUANT_MATMULS,
                   help="int8 matmul form: dequant (weight-only; GPU default) or dynamic (int8 activations "
                        "per row; CPU default): see moejax/ops/quant.py")


def add_multiprocess(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("multi-process")
    g.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-process runs")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def add_json(ap: argparse.ArgumentParser, *, to_file: bool = False, help: str | None = None) -> None:
    if to_file:
        ap.add_argument("--json", metavar="FILE", help=help or "also write the results to FILE as JSON")
    else:
        ap.add_argument("--json", action="store_true", help=help or "also print one JSON object as the last stdout line")


def compute_dtype(requested: str | None, cfg: ModelConfig, platform: str) -> tuple[str, str | None]:
    """(dtype, a note to print or None). XLA:CPU upcasts float16 dots to float32 copies of the
    weights, so a float16 config computes in bfloat16 on CPU unless float16 is asked for."""
    if requested:
        return requested, None
    if platform == "cpu" and cfg.param_dtype == "float16":
        return "bfloat16", "computing in bfloat16: XLA:CPU has no native float16 matmul (pass --dtype float16 to insist)"
    return cfg.param_dtype, None


def run_spec(args: argparse.Namespace, cfg: ModelConfig, layout: Layout, shape: MeshShape, *, batch: int,
             platform: str, dtype: str | None = None, quant: str | None = None, training: bool = False):
    """The RunSpec of a command's parsed flags: the one place their defaults are resolved.

    `batch` is the batch the run computes (prompts, slots, training rows), for the microbatch
    default; `dtype` overrides the flag (e.g. an A/B run's second side); `quant` is the resolved
    scheme (a quantized checkpoint's own, or --quant)."""
    from moejax.models.runspec import RunSpec
    from moejax.parallel.pipeline import default_microbatches

    if dtype is None:
        dtype, _ = compute_dtype(getattr(args, "dtype", None), cfg, platform)
    micro = getattr(args, "microbatches", None)
    if micro is None:
        micro = default_microbatches(shape.pp, batch, layout.shards("batch", shape), platform)
    return RunSpec(cfg, layout, shape, dtype, policy=getattr(args, "capacity_policy", None) or "dropless",
                   capacity_factor=getattr(args, "capacity_factor", None), microbatches=micro,
                   moe_kernel=getattr(args, "moe_kernel", None) or "auto", training=training,
                   remat=bool(getattr(args, "remat", False)), quant=quant,
                   quant_matmul=getattr(args, "quant_matmul", None) or "auto", platform=platform)


def measured_kernel(rs, mesh, tokens: tuple[int, ...], say=print):
    """`--moe-kernel auto`: the kernel measured fastest on this run's shapes (ops/moe/choose.py);
    one line says what was chosen and why. Returns (rs with the kernel set, the choice for reports)."""
    from moejax.ops.moe.choose import choose_kernel

    rs, choice = choose_kernel(rs, mesh, tokens, progress=say)
    if "ms" in choice:
        cand = ", ".join(f"{k} {'/'.join(f'{t:.2f}' for t in v)} ms" for k, v in choice["ms"].items())
        said = "measured earlier" if choice.get("cached") else "measured"
        say(f"MoE kernel {choice['kernel']} ({said} on one layer at {'/'.join(map(str, choice['tokens']))} "
            f"tokens: {cand})")
    return rs, choice
