#!/usr/bin/env bash
# One GPU session's measurements, in one command (issue 11, point 6): calibrate this device, then bench
# a ~1B model's top plans and plain torch against their predictions, on one CUDA device.
#
#   OUT=DIR benchmarks/gpu_session.sh                      # on the GPU machine (writes DIR/*.json, *.log, *.png)
#   OUT=DIR MODEL=tiny.json SEQ=128 BATCH=4 QUICK=--quick STEPS=1 ROUNDS=1 benchmarks/gpu_session.sh   # dry run on CPU
#
# Each stage has its own time limit and writes its log under OUT even when it fails, so one
# stage's failure still leaves the others' figures.
set -u
OUT=${OUT:?set OUT to the folder for the results}
MODEL=${MODEL:-llama-3.2-1b}          # bench model (calibrate times its blocks too)
OTHER=${OTHER-cerebras-gpt-1.3b}      # a second model calibrate never saw (GPT-2 family); OTHER= skips it
SEQ=${SEQ:-2048}
BATCH=${BATCH:-8}
PRECISION=${PRECISION:-bf16}
QUICK=${QUICK:-}
STEPS=${STEPS:-5}
ROUNDS=${ROUNDS:-3}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

$PY - <<'PY' 2>&1 | tee "$OUT/versions.log"
import torch, transformers, platform
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", p.multi_processor_count)
PY

stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc in $((SECONDS - t0)) s"; tail -n 40 "$OUT/$name.log"
}

if [ -z "${CLUSTER:-}" ]; then  # CLUSTER=FILE: an earlier calibration of this device (skips this stage)
    stage calibrate 150 $PY -m autopar calibrate -n 1 --model "$MODEL" --seq-len "$SEQ" --global-batch "$BATCH" \
        --dtype bf16 $QUICK --out "$OUT/cluster.json"
    CLUSTER=$OUT/cluster.json
    [ -f "$CLUSTER" ] || CLUSTER=h200
fi
stage bench 280 $PY -m autopar bench --model "$MODEL" -n 1 --cluster "$CLUSTER" --seq-len "$SEQ" \
    --global-batch "$BATCH" --precision "$PRECISION" --top 2 --warmup 2 --steps "$STEPS" --rounds "$ROUNDS" \
    --json "$OUT/bench.json" --plot "$OUT/bench.png"
[ -z "$OTHER" ] || stage bench_other 150 $PY -m autopar bench --model "$OTHER" -n 1 --cluster "$CLUSTER" --seq-len "$SEQ" \
    --global-batch "$BATCH" --precision "$PRECISION" --top 1 --warmup 2 --steps "$STEPS" --rounds "$ROUNDS" \
    --json "$OUT/bench_other.json"
