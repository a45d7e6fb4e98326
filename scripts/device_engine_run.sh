#!/usr/bin/env bash
# On the GPU machine: the engine-speed checks of one device call, inside 560 s: bench_offline (8B
# shape, no HF baselines) with the SMLM shrinks' K splits added by atomics (the default) and summed
# in a fixed order (LOQUETIER_SMLM_DETERMINISTIC), side by side in one call: its speed, and whether
# two runs of the same prompts then give the same tokens; then bench_decode's batch-64 graph step.
#
# Here, once:   bash scripts/device_wheels.sh          # .whl/ (wheels + SmolLM2 tokenizer), ~45 MiB
# Device call:  run(command="bash scripts/device_engine_run.sh", carry=[".whl"], timeout_s=600)
#
# Results land in $OUT: offline-atomic/ and offline-ordered/ (offline.*), decode/, logs.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-/tmp/loquetier-engine-out}
LIMIT=${LIMIT:-560}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels under .whl/: run scripts/device_wheels.sh first and carry .whl" >&2
    exit 2
fi
source scripts/device_setup.sh || exit 3
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/   gpu: /'

step() {  # step NAME SECONDS CMD...: run with at most SECONDS (and what the call has left)
    local name=$1 budget=$2; shift 2
    local left=$((LIMIT - (SECONDS - T0)))
    [ "$budget" -gt "$left" ] && budget=$left
    if [ "$budget" -le 10 ]; then echo "== $name: skipped, ${left}s left"; return 0; fi
    echo "== $name (${budget}s): $*"
    local t=$SECONDS
    timeout --signal=INT --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name rc=$? in $((SECONDS - t))s"
    tail -n 25 "$OUT/$name.log"
}
step offline-atomic 200 "$PY" -m benchmarks.bench_offline --model 8b --device cuda --no-baselines \
    --smlm-deterministic 0 --out "$OUT/offline-atomic"
step offline-ordered 200 "$PY" -m benchmarks.bench_offline --model 8b --device cuda --no-baselines \
    --smlm-deterministic 1 --out "$OUT/offline-ordered"
step decode 140 "$PY" -m benchmarks.bench_decode --model 8b --device cuda --out "$OUT/decode"
echo "== done after $((SECONDS - T0))s"
