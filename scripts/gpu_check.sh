#!/usr/bin/env bash
# One short GPU check, for a lent GPU machine (torch, accelerate preinstalled; no dvc needed):
#   1 GPU, fp32 and bf16, the default recipe on the full data: wall time and test accuracy.
# Needs data/raw (run the download stage first, or carry it). Writes logs and metrics under $OUT.
# Usage: OUT=/tmp/gpu bash scripts/gpu_check.sh
set -euo pipefail
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/machine.txt"

for mp in no bf16; do
  dir="$OUT/$mp"
  mkdir -p "$dir"
  start=$(date +%s.%N)
  accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision "$mp" --dynamo_backend no \
    pipeline/train.py --model-dir "$dir/models" --live-dir "$dir/live" --checkpoint-dir "$dir/checkpoints" \
    2>&1 | tee "$dir/train.log"
  end=$(date +%s.%N)
  python pipeline/evaluate.py --model-dir "$dir/models" --out "$dir/test.json" --eval-dir "$dir/eval" \
    2>&1 | tee "$dir/evaluate.log"
  python - "$dir" "$start" "$end" "$mp" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
d, start, end, mp = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
test = json.load(open(f"{d}/test.json"))
print(f"mixed_precision={mp}: train wall {end - start:.1f}s (launch included), test accuracy {test['accuracy']:.4f}")
PY
done
