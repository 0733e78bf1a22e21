#!/usr/bin/env bash
# The GPU path in one short run, for a machine with a CUDA GPU (about 10 minutes on one H100).
# Never needed: editkit runs on the CPU; this checks that it also runs, and how fast, on a GPU.
#
#   bash scripts/gpu_check.sh [OUT]      # OUT defaults to results/gpu_check
#
# Writes under OUT: the card's name (nvidia-smi.txt), the smoke grid run with `device: auto`
# in float32 and bfloat16, the contract suite's real-model tests and the half-precision tests
# (pytest.txt), engine items/s against lm-eval's HFLM (bench_eval/), and seconds per ROME and
# MEMIT edit (bench_edit_*/). Each step's exit status goes to status.txt; a failed step does not
# stop the others.
set -uo pipefail
OUT="${1:-results/gpu_check}"
PY="${PY:-.venv/bin/python}"
mkdir -p "$OUT"
: > "$OUT/status.txt"
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record the status
  local name="$1"; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? seconds=$((SECONDS - start))" | tee -a "$OUT/status.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
  >> "$OUT/nvidia-smi.txt" 2>&1
for dtype in float32 bfloat16; do
  "$PY" - "$OUT" "$dtype" <<'PYEOF'
import sys, yaml
out, dtype = sys.argv[1:]
study = yaml.safe_load(open("parameters/01_number_of_edits/smoke.yaml"))
study.update(device="auto", dtype=dtype, methods=["rome", "memit", "ft"], batch_size="auto",
             results_dir=f"{out}/smoke_{dtype}")
yaml.safe_dump(study, open(f"{out}/smoke_{dtype}.yaml", "w"))
PYEOF
  step "smoke_$dtype" "$PY" -m editkit run "$OUT/smoke_$dtype.yaml" --quiet
done
step pytest "$PY" -m pytest -q -p no:cacheprovider tests/test_editor_contract.py tests/test_precision.py \
  -k "smollm2 or half_precision or gpu" -rs
step bench_eval "$PY" scripts/bench_eval.py --device auto --task mmlu=200 --task gsm8k=20 --out "$OUT/bench_eval"
for dtype in float32 bfloat16; do
  step "bench_edit_$dtype" "$PY" scripts/bench_edit.py --device auto --dtype "$dtype" --methods rome memit --n 4 \
    --out "$OUT/bench_edit_$dtype"
done
cat "$OUT/status.txt"
