"""Checkpoints at real size: make, reshard, export and import a model through this machine, streaming.

    moejax bench checkpoints --config configs/seed-10b.yaml --dir /tmp/bench-ck \\
        [--max-memory-gb 4] [--disk-gb 4] [--json results/cpu-checkpoints-seed10b.json]

Steps, each a subprocess whose own report gives its seconds and peak RSS, each verified by the tool
(every tensor read back and compared by checksum) and here (the checksums in the metadata):
make_checkpoint.py (1x1x1x1) -> reshard.py 4x2x4x4 -> reshard.py 1x2x2x2 -> export_hf.py ->
import_hf.py, the import's checksums equal to the 1x2x2x2 checkpoint's. Each intermediate is deleted
as soon as the next step has verified it (at most two copies of the model on disk at once).
The disk's sequential rate is measured first in the same directory: a --disk-gb file written with
fsync, dropped from the page cache (posix_fadvise), read back; `copy_rate` = 1 / (1/read + 1/write),
the rate of a copy that reads each byte once and writes it once, which is what every step does
(plus its verification read). Throughput of a step = model bytes / its seconds.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import time

from moejax.cli.common import ArgumentParser



def disk_rate(directory: str, gb: float) -> dict:
    path = os.path.join(directory, "disk-rate.bin")
    block = os.urandom(64 << 20)
    n = max(1, int(gb * 1e9) // len(block))
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = n * len(block) / (time.perf_counter() - t)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    while os.read(fd, 64 << 20):
        pass
    read = n * len(block) / (time.perf_counter() - t)
    os.close(fd)
    os.remove(path)
    return {"bytes": n * len(block), "write_bytes_per_s": write, "read_bytes_per_s": read,
            "copy_rate_bytes_per_s": 1 / (1 / read + 1 / write)}


def step(name: str, command: str, *args) -> dict:
    """Run `moejax ckpt COMMAND ARGS --json` in its own process (its own peak memory)."""
    cmd = [sys.executable, "-m", "moejax", "ckpt", command, *map(str, args), "--json"]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{name} failed ({r.returncode}): {r.stderr[-3000:]}")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    rep["wall_seconds"] = wall
    print(f"    {wall:.1f} s, peak RSS {rep['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    return rep


def sums(ckpt: str) -> dict:
    from moejax.checkpoint.store import read_meta

    return read_meta(ckpt)[0]["checksums"]["tensors"]


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    ap = ArgumentParser(__doc__)
    ap.add_argument("--config", default="configs/seed-10b.yaml")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-memory-gb", type=float, help="passed to every tool (default: theirs)")
    ap.add_argument("--disk-gb", type=float, default=4.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from moejax.config.model import load_config
    from moejax.models import counts

    cfg = load_config(args.config)
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    bound = ["--max-memory-gb", args.max_memory_gb] if args.max_memory_gb else []
    out = {"config": cfg.name, "params": counts.param_count(cfg), "dtype": cfg.param_dtype, "host": platform.node(),
           "cpus": os.cpu_count(), "max_memory_gb": args.max_memory_gb, "disk": disk_rate(d, args.disk_gb), "steps": {}}
    rate = out["disk"]["copy_rate_bytes_per_s"]
    print(f"disk: write {out['disk']['write_bytes_per_s'] / 1e9:.2f} GB/s, read {out['disk']['read_bytes_per_s'] / 1e9:.2f}"
          f" GB/s, copy {rate / 1e9:.2f} GB/s", flush=True)
    a, b, c, h, i = (os.path.join(d, x) for x in ("a-1x1x1x1", "b-4x2x4x4", "c-1x2x2x2", "hf", "imported"))
    for p in (a, b, c, h, i):
        shutil.rmtree(p, ignore_errors=True)
    S = out["steps"]
    S["make"] = step("make", "make", "--config", args.config, "--out", a, *bound)
    model_bytes = S["make"]["bytes"]
    S["reshard 1x1x1x1 -> 4x2x4x4"] = step("reshard1", "reshard", a, b, "--mesh", "4x2x4x4", *bound)
    assert sums(a) == sums(b)
    shutil.rmtree(a)
    S["reshard 4x2x4x4 -> 1x2x2x2"] = step("reshard2", "reshard", b, c, "--mesh", "1x2x2x2", *bound)
    assert sums(b) == sums(c)
    shutil.rmtree(b)
    S["export_hf 1x2x2x2 -> hf"] = step("export", "export-hf", c, h, *bound)
    want = sums(c)
    out["disk_bytes_model"] = du(c)
    shutil.rmtree(c)
    S["import_hf hf -> moejax"] = step("import", "import-hf", h, i, *bound)
    assert sums(i) == want, "the round trip changed a tensor"
    shutil.rmtree(h)
    shutil.rmtree(i)
    for rep in S.values():
        rep["model_bytes"] = model_bytes
        rep["throughput_bytes_per_s"] = model_bytes / rep["seconds"]
        rep["throughput_vs_disk_copy_rate"] = rep["throughput_bytes_per_s"] / rate
        rep["peak_rss_vs_model"] = rep["peak_rss_bytes"] / model_bytes
    out["verified"] = True
    print(json.dumps({k: {m: round(v[m], 3) for m in ("seconds", "peak_rss_vs_model", "throughput_vs_disk_copy_rate")}
                      for k, v in S.items()}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
