"""The `moejax` command: one dispatch table of subcommands.

    moejax infer | serve | train | eval | plan | plot-train
    moejax bench model | moe | kernels | train | serve | compare | serve-hf | grouped | checkpoints | xla-flags | mla
    moejax ckpt import-hf | export-hf | reshard | quantize | make

Each subcommand is a module with `main(argv) -> int`, imported only when it runs (so `moejax --help`
starts no JAX, and the product's import graph never reaches the benchmark packages). The files in
scripts/ are shims that call `run_script` with their subcommand.
"""

from __future__ import annotations

import importlib
import os
import sys

from moejax.cli.common import limit_malloc_arenas

# subcommand -> (module, one-line help, re-exec with few malloc arenas: XLA runs a thread per device)
# and the environment a command sets before it is imported (JAX reads it at import)
COMMANDS = {
    "infer": ("moejax.cli.infer", "generate on a (dp, pp, tp, ep) mesh: placement, prefill, decode, metrics", True),
    "serve": ("moejax.cli.serve", "the OpenAI-compatible server, one continuous-batching engine per dp replica", True),
    "train": ("moejax.cli.train", "train on a mesh with the serving program under jax.grad", True),
    "eval": ("moejax.cli.eval", "cross-entropy of a checkpoint on text (and float against int8)", True),
    "plan": ("moejax.cli.plan", "the layout planner: every (dp, pp, tp, ep) layout for a device count", False),
    "plot-train": ("moejax.cli.plot_train", "loss curves from a training log", False),
    "bench model": ("moejax.cli.bench.model", "prefill and decode of the model per mesh", True),
    "bench moe": ("moejax.cli.bench.moe", "the MoE layer alone per mesh", False),
    "bench kernels": ("moejax.cli.bench.kernels", "matmul and bandwidth rates that bound the model", False),
    "bench train": ("moejax.cli.bench.train", "training step time per mesh", True),
    "bench serve": ("moejax.cli.bench.serve", "a load generator against a running server", False),
    "bench compare": ("moejax.cli.bench.compare", "continuous against static batching, side by side", False),
    "bench serve-hf": ("moejax.cli.bench.serve_hf", "moejax's server against transformers' continuous batching", False),
    "bench grouped": ("moejax.cli.bench.grouped", "the grouped-matmul kernels of the ragged MoE path", False),
    "bench checkpoints": ("moejax.cli.bench.checkpoints", "make, reshard, export and import at real size", False),
    "bench xla-flags": ("moejax.cli.bench.xla_flags", "XLA:CPU's options side by side (bench model per XLA_FLAGS)", False),
    "bench mla": ("moejax.cli.bench.mla", "latent attention: cache bytes and absorbed against expanded decode", False),
    "ckpt import-hf": ("moejax.cli.ckpt_import_hf", "a Hugging Face checkpoint -> a moejax checkpoint", False),
    "ckpt export-hf": ("moejax.cli.ckpt_export_hf", "a moejax checkpoint -> Hugging Face safetensors", False),
    "ckpt reshard": ("moejax.cli.ckpt_reshard", "re-chunk a checkpoint for another mesh, layout or dtype", False),
    "ckpt quantize": ("moejax.cli.ckpt_quantize", "int8 attention and expert matrices", True),
    "ckpt make": ("moejax.cli.ckpt_make", "a random-weight checkpoint of any config", False),
}
ENV = {"plan": {"JAX_PLATFORMS": "cpu"}}  # shapes and arithmetic only: the planner uses no device
GROUPS = sorted({name.split()[0] for name in COMMANDS if " " in name})


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: moejax COMMAND [ARGS] (moejax COMMAND --help for its flags)", ""]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_, _) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str, list[str]]:
    """(subcommand, its arguments) from the command line after `moejax`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    head = argv[0]
    if head in GROUPS:
        sub = argv[1] if len(argv) > 1 else ""
        name = f"{head} {sub}"
        if name not in COMMANDS:
            choices = ", ".join(n.split()[1] for n in COMMANDS if n.startswith(head + " "))
            sys.stderr.write(f"error: moejax {head} {sub[:40]!r}: unknown; valid: {choices}\n")
            raise SystemExit(2)
        return name, argv[2:]
    if head not in COMMANDS:
        sys.stderr.write(f"error: unknown command {head[:40]!r}; valid: "
                         f"{', '.join(sorted({n.split()[0] for n in COMMANDS}))} (moejax --help)\n")
        raise SystemExit(2)
    return head, argv[1:]


def run(name: str, argv: list[str]) -> int:
    module, _, arenas = COMMANDS[name]
    if arenas:
        limit_malloc_arenas()  # re-runs this same command line once, before JAX starts
    for key, value in ENV.get(name, {}).items():
        os.environ.setdefault(key, value)
    code = importlib.import_module(module).main(argv)
    return int(code or 0)


def run_script(name: str) -> int:
    """What `python scripts/NAME.py ARGS` runs: `moejax NAME ARGS`."""
    return run(name, sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    name, rest = resolve(sys.argv[1:] if argv is None else argv)
    return run(name, rest)
