#!/usr/bin/env bash
# The checks one short GPU lease runs, most valuable first; each step has its own time limit
# so a slow one cannot starve the rest. Writes everything under $OUT (default ./gpu-out).
#   CORPUS=path/to/text.txt bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SEPTET_HOME=/tmp/septet-home
stamp() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/gpu.txt"; }

stamp machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
  nproc; } >> "$OUT/gpu.txt" 2>&1

stamp "tests/test_cuda.py"
timeout 150 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --tb=short \
    > "$OUT/test_cuda.txt" 2>&1
echo "rc=$?" >> "$OUT/test_cuda.txt"; tail -3 "$OUT/test_cuda.txt"

stamp "benchmarks/decode_gpu.py"
timeout 120 python3 benchmarks/decode_gpu.py --json --hf-compile > "$OUT/decode_gpu.json" 2> "$OUT/decode_gpu.err"
echo "rc=$?" >> "$OUT/decode_gpu.err"; tail -12 "$OUT/decode_gpu.err"

stamp "benchmarks/train_throughput.py (GPT-3 Small shapes)"
timeout 150 python3 benchmarks/train_throughput.py --device cuda --size small --batch 8 --seq 1024 \
    --steps 8 --json > "$OUT/train_throughput_gpu.json" 2> "$OUT/train_throughput_gpu.err"
echo "rc=$?" >> "$OUT/train_throughput_gpu.err"; tail -10 "$OUT/train_throughput_gpu.err"

if [ -n "${CORPUS:-}" ]; then
  stamp "septet train on cuda (bf16, compiled)"
  timeout 60 python3 -m septet.cli train --model llama-tiny --data "$CORPUS" --device cuda --dtype bf16 \
      --compile --steps 300 --batch-size 32 --eval-every 100 --ckpt-every 300 --out /tmp/gpu-run \
      --no-progress > "$OUT/train_cli.txt" 2>&1
  echo "rc=$?" >> "$OUT/train_cli.txt"; tail -4 "$OUT/train_cli.txt"
  cp /tmp/gpu-run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
fi
stamp done
