#!/usr/bin/env bash
# On the GPU machine: install the carried wheels and run the service benchmark on the 8B shape,
# inside 540 s (model build + worker start and graph capture + trace + engine-alone replays).
#
# Here, once:   bash scripts/device_wheels.sh          # .whl/ (wheels + SmolLM2 tokenizer), ~45 MiB
# Device call:  run(command="bash scripts/device_service_run.sh", carry=[".whl"], timeout_s=600)
#               extra arguments go to the benchmark, e.g. `bash scripts/device_service_run.sh --quick`
#
# Results (service.json, service.md, the worker's log, this script's log) land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
OUT=${OUT:-/tmp/loquetier-service-out}
LIMIT=${LIMIT:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels under .whl/: run scripts/device_wheels.sh first and carry .whl" >&2
    exit 2
fi
source scripts/device_setup.sh || exit 3
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/   gpu: /'

LEFT=$((LIMIT - (SECONDS - T0)))
echo "== bench_service, ${LEFT}s left: $PY -m benchmarks.bench_service --model 8b --device cuda --out $OUT $*"
timeout --signal=INT --kill-after=15 "$LEFT" "$PY" -m benchmarks.bench_service --model 8b --device cuda \
    --out "$OUT" --keep-logs --start-timeout 300 "$@" 2>"$OUT/service.log"
rc=$?
echo "== rc=$rc after $((SECONDS - T0))s"
tail -n 40 "$OUT/service.log"
exit $rc
