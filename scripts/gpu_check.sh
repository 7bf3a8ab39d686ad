#!/usr/bin/env bash
# The GPU check, for any GPU host with torch and accelerate installed (dvc is not needed):
#   1. bench/benchmark.py on the GPU: throughput of the seed tutorial loop and every speed option, the
#      data path's share of a step, then the seed loop's 10 epochs and every recipe (default, fast,
#      two-minute, beyond) over seeds 0 1 2 with their time to 90% / 91% / 94% / 95% test accuracy;
#   2. the train stage under `accelerate launch` on 1 GPU with train.mixed_precision=bf16 (params decide the
#      precision; a launcher flag that contradicts them is refused), then the evaluate stage: wall time and
#      test accuracy;
#   3. one GPU per run: two 1-epoch runs of the train stage side by side, each launched as the stage launches it
#      (python -m pipeline.launch, one process), as `dvc queue start -j 2` runs them: each says which GPU it took
#      (on one GPU, the second waits for the first) and records it in its model.json.
# Needs data/raw. Writes everything under $OUT; each part has its own time limit, together under twelve minutes.
# Usage: OUT=/tmp/gpu bash scripts/gpu_check.sh
# Dry run of the plumbing on any machine: BENCH_ARGS=--quick PARAMS=tiny.yaml OUT=/tmp/g bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.version.cuda)"
  python -c "import dvclive" 2>/dev/null && echo "dvclive present" || echo "dvclive absent (train prints metrics only)"
} 2>&1 | tee "$OUT/machine.txt"

# 1a. throughput of every variant (one round: a GPU host running nothing else) and the data path's share of a step
timeout "${THROUGHPUT_LIMIT:-150}" python -m bench.benchmark --parts throughput datapath --repeats 1 ${BENCH_ARGS:-} \
  --out "$OUT/gpu-throughput.json" > "$OUT/throughput.md" 2> "$OUT/throughput.log"
echo "throughput exit $?" | tee -a "$OUT/summary.txt"
cat "$OUT/throughput.md"
# 1b. time to accuracy: the seed loop's 10 epochs, then each recipe over seeds 0 1 2. Every finished job is
# also a JSON line in accuracy.log, so a timeout still leaves what ran.
timeout "${ACCURACY_LIMIT:-340}" python -m bench.benchmark --parts accuracy --seeds 0 1 2 --targets 0.90 0.91 0.94 0.95 \
  ${BENCH_ARGS:-} --out "$OUT/gpu-accuracy.json" > "$OUT/accuracy.md" 2> "$OUT/accuracy.log"
echo "accuracy exit $?" | tee -a "$OUT/summary.txt"
cat "$OUT/accuracy.md"

dir="$OUT/launch-bf16"
mkdir -p "$dir"
# the params and both stage command lines come from the project (pipeline.params, train.command, evaluate.command)
python -c 'import sys; from pipeline.params import load_params, save_params, with_changes
save_params(with_changes(load_params(sys.argv[1]), {"train": {"mixed_precision": "bf16"}}), sys.argv[2])' \
  "${PARAMS:-params.yaml}" "$dir/params.yaml"
read -ra train_cmd < <(python -c 'import shlex, sys; from pathlib import Path; from pipeline.train import Paths, command
d = Path(sys.argv[1]); launcher = "accelerate launch --quiet --num_processes 1 --num_machines 1 --dynamo_backend no"
print(shlex.join(command(d / "params.yaml", Paths.under(d, Path("data/raw")), launcher.split())))' "$dir")
read -ra eval_cmd < <(python -c 'import shlex, sys; from pathlib import Path; from pipeline.evaluate import command
d = Path(sys.argv[1]); print(shlex.join(command(d / "params.yaml", Path("data/raw"), d / "models", d / "test.json", d / "eval")))' "$dir")
start=$(date +%s.%N)
timeout "${LAUNCH_LIMIT:-75}" "${train_cmd[@]}" > "$dir/train.log" 2>&1
echo "launch exit $?" | tee -a "$OUT/summary.txt"
end=$(date +%s.%N)
"${eval_cmd[@]}" > "$dir/evaluate.log" 2>&1
python - "$dir" "$start" "$end" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
d, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
test = json.load(open(f"{d}/test.json"))
print(f"accelerate launch, 1 GPU, train.mixed_precision=bf16, default recipe: train wall {float(end) - float(start):.1f}s "
      f"(launch included), test accuracy {test['test']['accuracy']:.4f}")
PY
tail -5 "$dir/train.log"

# 3. one GPU per run: two runs side by side; their locks in $OUT, so that other runs on this machine do not count.
# The time limit of each includes its wait for a GPU.
dir="$OUT/gpu-per-run"
runs=(a b)
pids=()
for run in "${runs[@]}"; do
  mkdir -p "$dir/$run"
  python -c 'import sys; from pipeline.params import load_params, save_params, with_changes
p = load_params(sys.argv[1])
save_params(with_changes(p, {"data": {"subset": p.data.subset or 10000}, "train": {"epochs": 1}}), sys.argv[2])' \
    "${PARAMS:-params.yaml}" "$dir/$run/params.yaml"
  read -ra run_cmd < <(python -c 'import shlex, sys; from pathlib import Path; from pipeline.train import Paths, command
d, launch = Path(sys.argv[1]), "python -m pipeline.launch --num_processes 1 --num_machines 1 --dynamo_backend no"
print(shlex.join(command(d / "params.yaml", Paths.under(d, Path("data/raw")), launch.split())))' "$dir/$run")
  PIPELINE_GPU_LOCK_DIR="$dir/locks" timeout "${PER_RUN_LIMIT:-90}" "${run_cmd[@]}" > "$dir/$run/train.log" 2>&1 &
  pids+=($!)
done
for i in 0 1; do
  wait "${pids[$i]}"
  echo "$?" > "$dir/${runs[$i]}/exit"
done
python - "$dir" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, pathlib, re, sys
d = pathlib.Path(sys.argv[1])
took, pool, waited, failed = {}, [], [], []
for run in "ab":
    log, status = (d / run / "train.log").read_text(), (d / run / "exit").read_text().strip()
    line = re.search(r"^GPUs? (\S+) \(of (\S+)\) for this run$", log, re.M)
    waits = re.search(r"^waiting for .*$", log, re.M)
    model = d / run / "models" / "model.json"
    recorded = json.loads(model.read_text())["provenance"].get("gpus") if model.exists() else None
    print(f"gpu per run: run {run} exit {status}: {line[0] if line else 'took no GPU'}"
          f"{'; it waited first: ' + waits[0] if waits else ''}; its model.json records gpus {recorded}")
    failed += [run] if status != "0" else []
    waited += [run] if waits else []
    if line:
        took[run], pool = line[1], line[2].split(",")
if failed or len(took) < 2:
    print("gpu per run: FAIL: a run failed or took no GPU (no GPU seen?); its train.log says why")
elif len(pool) > 1:
    print(f"gpu per run: {'ok' if took['a'] != took['b'] else 'FAIL'}: the runs took GPU {took['a']} and {took['b']}")
else:
    print(f"gpu per run: {'ok' if waited else 'FAIL'}: one GPU, and {'run ' + waited[0] if waited else 'no run'} waited")
PY
