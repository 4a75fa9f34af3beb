"""Import a Hugging Face checkpoint of a family moejax implements (config.json + safetensors) as a
moejax checkpoint, streaming.

    moejax ckpt import-hf HF_DIR OUT [--dtype bfloat16] [--max-memory-gb G] [--force] [--json]

Reads one HF tensor at a time and writes the stacked moejax tensors a block (a layer, a block of one
layer's experts) at a time, as reshard.py writes (see moejax/checkpoint/blocks.py): memory stays at a few
blocks whatever the model's size; --max-memory-gb bounds it (default: a quarter of the free memory).
Refuses, naming the field, what moejax does not implement (sliding window, tied embeddings, biases,
RoPE scaling, a quantization_config other than block-scaled FP8 or MXFP4, ...); FP8 and MXFP4
tensors are dequantised as transformers does, and a line says how many. The new step is written to
a temporary directory, read back from disk tensor by tensor and checked against the checksums of
what was written, and only then moved into place (OUT, or the next step of an existing OUT with
--force): a failure or a kill leaves OUT absent or as it was.
"""

import json


from moejax.cli.common import ArgumentParser, guarded, peak_rss_bytes, progress
from moejax.config.model import DTYPES


def run(args):
    from moejax.checkpoint.hf_formats import FP8, MXFP4
    from moejax.checkpoint.hf_import import import_hf

    rep = import_hf(args.hf_dir, args.out, args.dtype, args.max_memory_gb, args.force,
                    progress("writing tensors") if args.progress else None)
    rep["peak_rss_bytes"] = peak_rss_bytes()
    print(f"imported {rep['params_total']:,} parameters ({rep['dtype']}) into {args.out} step {rep['step']} in "
          f"{rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; every tensor verified")
    what = {FP8: "FP8 e4m3 block-scaled", MXFP4: "MXFP4"}
    done = [f"{n} {what[fmt]} tensor{'s' * (n != 1)}" for fmt, n in rep["converted"].items() if n]
    if done:
        print(f"dequantised {' and '.join(done)} to {rep['dtype']}, as transformers does")
    if rep["ignored_layers"]:
        layers = ", ".join(f"model.layers.{k}" for k in rep["ignored_layers"])
        print(f"ignored {sum(rep['ignored_layers'].values())} tensors of {layers} (past num_hidden_layers: the "
              f"multi-token-prediction layer, which transformers does not load either)")
    if args.json:
        print(json.dumps(rep))


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's")
    ap.add_argument("--max-memory-gb", type=float, help="memory bound (default: a quarter of the free memory)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    return guarded(run, ap.parse_args(argv))
