"""Export a moejax checkpoint as a Hugging Face checkpoint of its family (config.json + safetensors),
streaming.

    moejax ckpt export-hf CKPT OUT [--max-shard-gb 5] [--max-memory-gb G] [--force] [--json]

Reads one HF tensor's worth at a time (a layer's matrix, one expert's matrix) from CKPT and appends it
to the safetensors file being written, so memory stays at a few such tensors whatever the model's
size. Every tensor of CKPT is checked against the checksums saved with it as it is read, and the
written files are read back, tensor by tensor, and must give the same checksums. OUT is written to
a temporary directory and moved into place when verified; an existing OUT is replaced only with
--force. A kill or a failure leaves OUT absent or as it was.
"""

import json


from moejax.cli.common import ArgumentParser, guarded, peak_rss_bytes, progress


def run(args):
    from moejax.checkpoint.hf_export import export_hf

    rep = export_hf(args.ckpt, args.out, args.max_shard_gb, args.max_memory_gb, args.force,
                    progress("writing tensors") if args.progress else None)
    rep["peak_rss_bytes"] = peak_rss_bytes()
    print(f"exported {rep['params_total']:,} parameters to {args.out} ({len(rep['files'])} file(s)) in "
          f"{rep['seconds']:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB; every tensor verified")
    if args.json:
        print(json.dumps(rep))


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--max-memory-gb", type=float, help="memory bound (default: a quarter of the free memory)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--json", action="store_true")
    return guarded(run, ap.parse_args(argv))
