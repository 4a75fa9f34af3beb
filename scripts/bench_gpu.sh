#!/usr/bin/env bash
# One prepared run for a lent GPU (H100/H200, JAX already installed): correctness first, then the
# benchmark points of issues 7, 14 and 15 in order of importance (each point's JSON lands in $OUT as it
# ends, so a run cut short keeps what finished). Not yet run in full: about 12 minutes expected on an
# H200 (each seed-10b point compiles in ~50 s). Carry runs/shakespeare-long (the device tool's `carry`)
# for the trained-routing points.
#   bash scripts/bench_gpu.sh            # OUT defaults to /tmp/moejax-gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moejax-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # moejax from this checkout, not installed on that machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import jax, flax, orbax.checkpoint; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

# 1. correctness on the GPU against the float64 reference: each MoE kernel in float32, the exact-row
#    GPU kernels (cuDNN grouped GEMM via ragged_dot, Pallas Mosaic-GPU, tokamax) in bfloat16, int8
#    weights (weight-only form), bfloat16 with cuDNN's fused attention, cached decode
python -c "from jax._src.lib import cuda_versions as c; print('cuDNN', c.cudnn_get_version())" 2>&1 | tee -a "$OUT/gpu.txt"
timeout 200 python -m pytest -q -p no:cacheprovider -rs \
  "tests/test_moe.py::test_batched_kernel_equals_reference[1x1x1x1-seed]" \
  "tests/test_moe.py::test_ragged_kernel_equals_reference[1x1x1x1-seed]" \
  tests/test_moe.py::test_gpu_grouped_gemm_kernels_stay_within_bfloat16_rounding_of_the_reference \
  "tests/test_quant.py::test_dequant_form_equals_the_reference_on_the_dequantized_weights[1x1x1x1-seed-auto]" \
  "tests/test_model.py::test_bfloat16_run_stays_within_bfloat16_rounding_of_the_reference[1x1x1x1]" \
  "tests/test_generate.py::test_cached_greedy_decode_equals_full_recomputation[1x1x1x1-1]" 2>&1 \
  | tail -8 | tee -a "$OUT/gpu.txt"

# 2. the grouped GEMMs alone at seed-10b's expert shapes (8 x 1024 tokens of one layer), each checked
#    against a float32 matmul first, beside the padded batched form; Mosaic-GPU block sizes swept
echo "== grouped GEMMs"
timeout 150 python scripts/bench_grouped.py --config seed-10b --tokens 8192 --json "$OUT/grouped.json" \
  --impl xla --impl mgpu --impl tokamax --mgpu-blocks 128,128,64,4,1 --mgpu-blocks 128,256,64,4,1 \
  --mgpu-blocks 64,128,64,4,2 --mgpu-blocks 192,128,64,5,4 2>&1 | tail -9

# 3. benchmark points, most important first (each JSON lands as it ends)
point() {  # name, then bench.py arguments
  local name=$1; shift
  echo "== $name: $*"
  timeout 200 python scripts/bench.py --mesh 1x1x1x1 --dtype bfloat16 --repeats 5 --json "$OUT/$name.json" "$@" \
    2>&1 | grep -v '^timed repeat' | tail -5
}
P10=(--config seed-10b --batch 8 --prompt-len 1024 --decode-steps 8)
point 10b-prefill-8x1024-ragged "${P10[@]}" --moe-kernel ragged
point 10b-prefill-8x1024-ragged-mgpu "${P10[@]}" --moe-kernel ragged-mgpu
point 10b-decode-b64-int8 --config seed-10b --batch 64 --prompt-len 128 --decode-steps 32 --quant none --quant int8
# trained routing beside random routing: the trained Shakespeare model (carried in runs/; the GPU
# machine cannot train seed-10b in this budget), its own config with random weights
if [ -d runs/shakespeare-long/model ]; then
  point trained-shakespeare-long --ckpt runs/shakespeare-long/model --batch 8 --prompt-len 512 --decode-steps 32
  point random-shakespeare-long --config shakespeare-long --batch 8 --prompt-len 512 --decode-steps 32
fi
point 10b-prefill-8x1024 "${P10[@]}"
point 10b-ttft-10240-ragged --config seed-10b --batch 1 --prompt-len 10240 --decode-steps 0 --moe-kernel ragged
point 10b-ttft-10240 --config seed-10b --batch 1 --prompt-len 10240 --decode-steps 0
point seed-prefill-8x1024 --config seed --batch 8 --prompt-len 1024 --decode-steps 32

# 4. the kernel rates behind those figures: HBM read, weight streaming of 1-8 row matmuls, matmuls
echo "== kernels"
timeout 60 python scripts/bench_kernels.py --weight-mb 1024 --repeats 5 --json "$OUT/kernels.json" 2>&1 | grep -v '^timing'

# 5. the server (issue 14): seed-10b, random weights, 64 slots, at concurrency 64 (output tokens/s, p99 TTFT);
#    needs starlette, uvicorn, prometheus_client and httpx (pyproject pins them) beside the preinstalled JAX
echo "== serve seed-10b, concurrency 64"
timeout 240 python - "$OUT" <<'EOF2' 2>&1 | tail -3
import json, sys, asyncio
from moejax.bench.harness import ServerProcess
from moejax.bench.loadgen import make_workload, run_load, summarize
with ServerProcess("--config", "configs/seed-10b.yaml", "--dtype", "bfloat16", "--slots", "64", "--max-len", "640",
                   "--max-waiting", "256") as s:
    wl = make_workload(256, (16, 512), (8, 128), seed=0)
    asyncio.run(run_load(s.url, s.model, [(p, 4) for p, _ in wl[:64]], concurrency=64))  # warmup, untimed
    m = summarize(*asyncio.run(run_load(s.url, s.model, wl, concurrency=64)))
json.dump(m, open(sys.argv[1] + "/serve-10b-c64.json", "w"), indent=1)
print(f"seed-10b served at concurrency 64: {m['output_throughput']:.0f} output tok/s, TTFT p50 "
      f"{m['median_ttft_ms']:.0f} ms p99 {m['p99_ttft_ms']:.0f} ms, TPOT p50 {m['median_tpot_ms']:.1f} ms")
EOF2
