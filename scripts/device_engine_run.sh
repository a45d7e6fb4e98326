#!/usr/bin/env bash
# On the GPU machine: the engine-speed checks of one device call, inside 560 s: the one-launch SMLM
# decode kernel against two launches (bench_smlm_fused), then bench_offline (8B shape, no HF
# baselines) with that kernel off and on, side by side in one call.
#
# Here, once:   bash scripts/device_wheels.sh          # .whl/ (wheels + SmolLM2 tokenizer), ~45 MiB
# Device call:  run(command="bash scripts/device_engine_run.sh", carry=[".whl"], timeout_s=600)
#
# Results land in $OUT: fused/ (smlm_fused.*), offline-fused0/ and offline-fused1/ (offline.*), logs.
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
step fused 150 "$PY" -m benchmarks.bench_smlm_fused --out "$OUT/fused"
step offline-fused0 200 "$PY" -m benchmarks.bench_offline --model 8b --device cuda --no-baselines \
    --smlm-fused-decode 0 --out "$OUT/offline-fused0"
step offline-fused1 200 "$PY" -m benchmarks.bench_offline --model 8b --device cuda --no-baselines \
    --smlm-fused-decode 1 --out "$OUT/offline-fused1"
echo "== done after $((SECONDS - T0))s"
