#!/usr/bin/env bash
# The issue-13 GPU figures in one script, for an H100/H200 (not run yet: written in a CPU-only session).
#
#   bench/gpu_attention.sh [kernels|nanochat|all] [OUT_DIR]
#
# kernels:  `mgr run attention-backends --preset gpu`: bf16, T = 1k..16k, head dim 64 and 128, causal, 16 heads,
#           16k tokens per call, every implementation fwd and fwd+bwd (target: cuDNN/Mosaic causal fwd+bwd
#           >= 450 TFLOP/s PaLM convention at T >= 4k, K = 128; Mosaic has no causal backward in JAX, so its
#           fwd+bwd rows say so).
# nanochat: `python -m bench.nanochat_throughput` at depth 12, T = 1024, 20 steps, once per attention type
#           (target: >= 40% MFU in bf16; see "MFU analytic", nanochat's 6N + 12LHDT convention).
# Device time: kernels ~5 min, nanochat ~1-2 min per attention type: run them as two calls if time is short.
# Results are copied flat into OUT_DIR (default $OUT, else ./gpu_attention_out): summary.json / run.md / the plot
# per part, so they come back from a device machine (at most 8 files, shallow paths).
set -euo pipefail
part="${1:-all}"
out="${2:-${OUT:-./gpu_attention_out}}"
art="$(mktemp -d)"
py="${PYTHON:-python}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
"$py" -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
# the fused kernels' correctness first (seconds): a failing kernel shows here, not as a bench row only
"$py" -m pytest -q tests/test_attention_gpu.py 2>&1 | tail -n 30 | tee "$out/gpu_tests.txt" || true

if [[ "$part" == kernels || "$part" == all ]]; then
  "$py" -m mgr.cli run attention-backends --preset gpu --artifacts-dir "$art" --run-id gpu
  d="$art/benches/attention_backends/gpu"
  cp "$d/summary.json" "$out/kernels_summary.json"
  cp "$d/run.md" "$out/kernels_run.md"
  cp "$d/plots/tflops_vs_T.png" "$out/kernels_tflops_vs_T.png"
fi

if [[ "$part" == nanochat || "$part" == all ]]; then
  for att in xla jax cudnn chunked pallas-triton auto; do
    "$py" -m bench.nanochat_throughput --depths 12 --sequence-len 1024 --batch-size 16 --steps 20 \
      --attention-type "$att" --artifacts-dir "$art" --run-id "d12-$att" \
      || echo "attention $att: nanochat run failed (exit $?)" | tee -a "$out/nanochat.md"
  done
  # one markdown file with every attention type's table
  for f in "$art"/bench/nanochat_throughput/d12-*/run.md; do
    { echo; echo "<!-- $f -->"; cat "$f"; } >> "$out/nanochat.md"
  done
fi
ls -l "$out"
