#!/usr/bin/env bash
# On the GPU machine, inside 560 s: the scheduler's knobs on the service trace (bench_slo_knobs, 8B
# shape, engine alone), then the one-launch SMLM decode kernel against two launches (bench_smlm_fused)
# with what time is left.
#
# Here, once:   bash scripts/device_wheels.sh          # .whl/ (wheels + SmolLM2 tokenizer), ~45 MiB
# Device call:  run(command="bash scripts/device_knobs_run.sh", carry=[".whl"], timeout_s=600)
#               extra arguments go to bench_slo_knobs, e.g. --variant "cap 0.3:ttft_step_share=0.3"
#
# Results land in $OUT: knobs/ (slo_knobs.*), fused/ (smlm_fused.*), logs, and steps.tar.gz: every
# replayed step's composition, predicted and measured time (LOQUETIER_BENCH_STEP_DUMP, one JSON line a
# step, one file a replay), packed in one file because a call brings back only a few.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-/tmp/loquetier-knobs-out}
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
STEPS=$(mktemp -d)
LOQUETIER_BENCH_STEP_DUMP=$STEPS step knobs 400 "$PY" -m benchmarks.bench_slo_knobs --model 8b --device cuda \
    --out "$OUT/knobs" "$@"
tar -czf "$OUT/steps.tar.gz" -C "$STEPS" . && echo "== step dumps: $(ls "$STEPS" | wc -l) files in steps.tar.gz"
[ "${FUSED:-1}" = 1 ] && step fused 200 "$PY" -m benchmarks.bench_smlm_fused --out "$OUT/fused"
echo "== done after $((SECONDS - T0))s"
