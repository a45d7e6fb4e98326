#!/usr/bin/env bash
# The GPU benchmarks in one go on one GPU (~15 minutes for the 8B shape):
#
#   bash benchmarks/run_all.sh [OUT_DIR] [extra args for every script, e.g. --quick or --model small]
#   RUNS="decode serving" bash benchmarks/run_all.sh $OUT     # a subset (default: all four)
#   RUNS=quick bash benchmarks/run_all.sh $OUT                # GPU tests + unified, one call
#   RUNS="decode serving-short" bash benchmarks/run_all.sh $OUT  # decode step + serving, another call
#   RUNS=service bash benchmarks/run_all.sh $OUT              # the whole service (wheels: scripts/device_service_run.sh)
#
# One device call is limited to 10 minutes: run "decode serving" in one call and "unified finetune"
# in the next on the same warm machine (the model and adapters under the cache are reused).
#
# OUT_DIR defaults to $OUT (the device machine's result folder), else docs/benchmarks. Each script
# runs under its own time limit, so one failure or hang does not stop the others; logs go next to the
# results (OUT_DIR/<name>.log). The random 8B model (16 GB safetensors) and the adapters are written
# once under $LOQUETIER_BENCH_CACHE (default /tmp/loquetier-bench) and reused by the later scripts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-docs/benchmarks}}
shift || true
EXTRA=("$@")
MODEL_ARGS=(--model 8b --device cuda)
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# loquetier.kernels lives in kernels/ (mapped by the package install); make it importable.
if ! "$PY" -c "import loquetier.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
LINKED=0
if ! "$PY" -c "import loquetier.kernels" 2>/dev/null; then
    ln -s ../kernels loquetier/kernels && LINKED=1
fi
cleanup() { if [ "$LINKED" = 1 ]; then rm -f loquetier/kernels; fi; }
trap cleanup EXIT

run() {  # name, time limit (s), module, extra flags for this run
    local name=$1 limit=$2 module=$3
    shift 3
    echo "== $name (limit ${limit}s): $PY -m $module ${MODEL_ARGS[*]} --out $OUT_DIR ${EXTRA[*]} $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" \
        "$PY" -m "$module" "${MODEL_ARGS[@]}" --out "$OUT_DIR" "${EXTRA[@]}" "$@" >"$OUT_DIR/$name.out" 2>"$OUT_DIR/$name.log"
    local rc=$?
    echo "   $name: rc=$rc in $((SECONDS - t0))s"
    cat "$OUT_DIR/$name.out"
    if [ "$rc" != 0 ]; then tail -n 30 "$OUT_DIR/$name.log"; fi
    nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | sed 's/^/   gpu memory after: /'
}

gpu_tests() {  # the tests that only mean something on a GPU (no broker or database: no conftest)
    # one process per file, side by side: most of their time is single-threaded Triton compiles
    echo "== gpu-tests (limit ${GPU_TESTS_LIMIT:-240}s)"
    # test_smlm compiles the most variants: three processes, split by test name
    local t0=$SECONDS pids=() f part
    for part in engine/test_graphs kernels/test_fused kernels/test_smlm:parts "kernels/test_smlm:popularity or rank_mix" \
            "kernels/test_smlm:not parts and not popularity and not rank_mix" kernels/test_paged_attention \
            kernels/test_launch models/test_model_parts; do
        f=${part%%:*}
        local k=() log=${f##*/}
        if [ "$part" != "$f" ]; then k=(-k "${part#*:}"); log="${log}_$(echo "${part#*:}" | tr -c 'a-z' '_')"; fi
        timeout "${GPU_TESTS_LIMIT:-240}" "$PY" -m pytest --noconftest -q -p no:cacheprovider "tests/$f.py" "${k[@]}" \
            >"$OUT_DIR/gpu_$log.log" 2>&1 &
        pids+=($!)
    done
    for f in "${pids[@]}"; do wait "$f"; done
    echo "   gpu-tests: done in $((SECONDS - t0))s"
    for f in "$OUT_DIR"/gpu_test_*.log; do echo "   $(basename "$f"): $(tail -n 1 "$f")"; done
    cat "$OUT_DIR"/gpu_test_*.log >"$OUT_DIR/gpu_tests.log" && rm -f "$OUT_DIR"/gpu_test_*.log
    grep -E "^(FAILED|ERROR)" "$OUT_DIR/gpu_tests.log" | head -n 20
}

# Presets that fit one 10-minute device call each (the model is built once per machine):
#   RUNS="quick"  = the GPU-only tests + unified without its PEFT baseline (its replays run up to ~290 s)
#   RUNS="decode serving-short" = the decode step vs its floor + serving without the mixed-rank replay
RUNS=${RUNS:-decode serving unified finetune}
[ "$RUNS" = quick ] && RUNS="gpu-tests unified-short"
for r in $RUNS; do
    case $r in
        decode) run decode 200 benchmarks.bench_decode ;;
        serving) run serving 330 benchmarks.bench_serving ;;
        serving-short) run serving 240 benchmarks.bench_serving --no-mixed-ranks ;;
        unified) run unified 270 benchmarks.bench_unified ;;
        unified-short) run unified 300 benchmarks.bench_unified --no-baselines ;;
        finetune) run finetune 180 benchmarks.bench_finetune ;;
        profile) run profile 240 benchmarks.profile_step --cprofile ;;
        tune) run tune 150 benchmarks.tune_smlm ;;
        gpu-tests) gpu_tests ;;
        # the whole service (broker, PostgreSQL, a worker process): needs the service's wheels on the
        # device (scripts/device_wheels.sh here, carry .whl; scripts/device_service_run.sh installs them)
        service) run service 540 benchmarks.bench_service --keep-logs ;;
        *) echo "unknown run $r (decode, serving, serving-short, unified, unified-short, finetune, profile, tune, gpu-tests, service)"; exit 2 ;;
    esac
done
echo "== results in $OUT_DIR:"
ls -la "$OUT_DIR"
if [ -n "${OUT:-}" ] && [ "$OUT_DIR" = "$OUT" ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
    # a device call returns at most 8 files: pack them into one
    (cd "$OUT" && tar czf /tmp/loquetier-results.tgz . && find . -mindepth 1 -delete && mv /tmp/loquetier-results.tgz results.tgz)
    echo "== packed into $OUT/results.tgz"
fi
