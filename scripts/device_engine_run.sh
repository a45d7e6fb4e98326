#!/usr/bin/env bash
# On the GPU machine: the engine-speed checks of one device call, inside 560 s. STEPS picks them, in
# order (default "tune offline decode offline-window16"):
#   gpu-tests         the CUDA tests of the LoRA overlap and the captured graphs (tokens equal to
#                     plain steps, the same bits on the side stream)
#   attn-tests        the paged attention kernel's tests on the GPU
#   gemm              bench_gemm: the 8B step's base GEMMs in CUDA graphs, cuBLAS against cuBLASLt
#   gemm-lora         bench_gemm_lora: the decode linears with the LoRA terms in a Triton GEMM's loop
#   kernels           bench_kernels: each SMLM case against its floor (eager, in a graph), the targets
#   kernels-tuned     bench_kernels again with LOQUETIER_SMLM_TUNING=$KERNELS_TUNING
#   tune-attn         tune_attention: one 8B decode step's paged attention in a CUDA graph per launch
#                     variant; the fastest over the batches (by 3 % or more) is exported as
#                     LOQUETIER_ATTN_TUNING for the later steps and timed against the defaults by
#                     bench_offline (ATTN_AB)
#   tune              tune_smlm: one 8B step's LoRA launches in a CUDA graph (atomic, ordered, split,
#                     launch parameters); the split variant fastest over the decode batches (by 3 % or
#                     more) is exported as LOQUETIER_SMLM_TUNING for the later steps and timed against
#                     the defaults by bench_offline (TUNING_AB)
#   tune64            tune_smlm with slot storage of rank 64 (the engine's default max_lora_rank); its
#                     pick is exported and timed as tune's is
#   offline           bench_offline (8B shape, no HF baselines; its windowed case runs twice, so it
#                     shows whether two runs of the same prompts give the same tokens); OVERLAPS (a
#                     comma list of LoRA overlap modes, default none) times the adapter cases again
#                     with graphs captured in each mode; CHAIN_AB=N times the cases N rounds with
#                     chained decode windows off, then on; BLAS_AB=LIB (cublaslt) times every case with
#                     that BLAS library against the engine's, two rounds; CARRY_AB=N times every case N
#                     rounds with each layer's MLP output carried into the next norm, then added per layer;
#                     ASYNC_AB=N times every case N rounds with asynchronous steps off, then on;
#                     HALVES=N times the adapter cases N rounds with the decode-sized LoRA forwards
#                     launching both halves, the shrinks alone, the expands alone, neither (timing only)
#   offline-ab2       bench_offline again, its adapter cases timed with TUNING_AB2 against the defaults
#   decode            bench_decode's batch-64 graph step, the fused graph with the MLP output carried and
#                     added (two rounds, also pipelined) (OVERLAPS: the fused graph in each mode too)
#   dense             bench_lora_dense: a decode step's linear layers in CUDA graphs, the LoRA terms by
#                     the SMLM path against dense cuBLAS GEMMs over every slot (pool ranks 16 and 64)
#   serving           bench_serving on the serving trace, ours with and without adapters (no HF baselines)
#   serving-ab        the same, the 32-adapter trace replayed again with asynchronous steps off, then on
#   profile           profile_step: where an eager step's time goes (host phases, GPU busy, kernels)
#                     (PROFILE_ARGS adds arguments to both profile steps, e.g. --syncs)
#   profile-graphs    profile_step --graphs: the same for graph steps run one at a time, then back to
#                     back with asynchronous steps on and off
#   profile-graphs-ab profile_step --graphs with LOQUETIER_ATTN_TUNING=$ATTN_AB (profile-ab/)
#   offline-window16  bench_offline with decode windows of 16 steps instead of 4
#   unified           bench_unified at 20 requests/s (no PEFT baseline): SLO and training share
#   unified-ab        bench_unified twice, asynchronous steps on, then off (no tpot_lookahead replay;
#                     UNIFIED_ARGS adds arguments, e.g. --set kv_memory_gb=16 on an 80 GB card)
#   finetune          bench_finetune: concurrent packed jobs against PEFT one after another
#   finetune-ab       bench_finetune, ours only, with LOQUETIER_SMLM_TUNING=$FINETUNE_AB (e.g.
#                     backward_passes=4: the SMLM backward's four launches instead of its two passes)
#
# Here, once:   bash scripts/device_wheels.sh          # .whl/ (wheels + SmolLM2 tokenizer), ~45 MiB
# Device call:  run(command="bash scripts/device_engine_run.sh", carry=[".whl"], timeout_s=600)
#
# Results land in $OUT: gemm/, tune/ and tune64/ (tune_smlm.*), tune-attn/ (tune_attention.*), kernels/
# and kernels-tuned/ (kernels.json), gemm-lora/ (gemm_lora.*), profile/ (profile_step*), offline/, offline-ab2/ and offline-window16/ (offline.*), decode/, dense/ (lora_dense.*), unified/,
# finetune/, finetune-ab/, and each step's log. A call brings back at most 8 files: pack $OUT into one
# archive at the end of the command when more steps run.
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
use_pick() {  # use_pick STEP ENV_VAR AB_VAR WHAT: a tuner's pick (the variant that beat the defaults by
    # 3 % or more), if any, exported as ENV_VAR for the later steps and set as AB_VAR, which
    # bench_offline times against the defaults
    # (PICKS=0: reported only, so that the A/B set by hand stays)
    local pick
    pick=$(tr -d '[:space:]' 2>/dev/null <"$OUT/$1/pick.env")
    if [ -n "$pick" ] && [ "${PICKS:-1}" != 0 ]; then export "$2=$pick"; printf -v "$3" '%s' "$pick"; fi
    echo "== $4 picked: ${pick:-defaults}"
}
STEPS=${STEPS:-tune offline decode offline-window16}
OVERLAPS=${OVERLAPS:-}
TUNING_AB=${TUNING_AB:-}
ATTN_AB=${ATTN_AB:-}
for name in $STEPS; do
    case $name in
        gpu-tests) step gpu-tests 150 "$PY" -m pytest --noconftest -q -x -p no:cacheprovider tests/kernels/test_smlm_fused.py \
            tests/engine/test_graphs.py tests/engine/test_async_step.py tests/kernels/test_fused.py tests/kernels/test_gemm_lora.py \
            -k "${GPU_TESTS_K:-cuda or side_stream or split_shrink or rope or unrolled or backward_passes or gemv or fused_inference_rows or linear_lora}" ;;
        attn-tests) step attn-tests 120 "$PY" -m pytest --noconftest -q -x -p no:cacheprovider \
            tests/kernels/test_paged_attention.py ;;
        tune64) step tune64 150 "$PY" -m benchmarks.tune_smlm --pool-rank 64 --out "$OUT/tune64" \
            --pick-env "$OUT/tune64/pick.env"
            use_pick tune64 LOQUETIER_SMLM_TUNING TUNING_AB "SMLM tuning (rank-64 storage)" ;;
        kernels-tuned) step kernels-tuned 200 env LOQUETIER_SMLM_TUNING="${KERNELS_TUNING:-}" "$PY" benchmarks/bench_kernels.py \
            --out "$OUT/kernels-tuned" ;;
        kernels) step kernels 200 "$PY" benchmarks/bench_kernels.py --out "$OUT/kernels" ;;
        tune-attn) step tune-attn 200 "$PY" -m benchmarks.tune_attention --out "$OUT/tune-attn" \
            --pick-env "$OUT/tune-attn/pick.env"
            use_pick tune-attn LOQUETIER_ATTN_TUNING ATTN_AB "attention tuning" ;;
        unified) step unified 300 "$PY" -m benchmarks.bench_unified --model 8b --device cuda --no-baselines \
            --set unified_rate=20 --out "$OUT/unified" ;;
        unified-ab) for mode in on off; do  # UNIFIED_ARGS: e.g. --set kv_memory_gb=16 on an 80 GB card
                step unified-$mode 270 "$PY" -m benchmarks.bench_unified --model 8b --device cuda --no-baselines \
                    --set unified_rate=20 --lookahead 16 ${UNIFIED_ARGS:-} \
                    --engine-arg async_steps=$([ $mode = on ] && echo true || echo false) --out "$OUT/unified-$mode"
            done ;;
        finetune) step finetune 200 "$PY" -m benchmarks.bench_finetune --model 8b --device cuda --out "$OUT/finetune" ;;
        finetune-ab) step finetune-ab 150 env LOQUETIER_SMLM_TUNING="$FINETUNE_AB" "$PY" -m benchmarks.bench_finetune \
            --model 8b --device cuda --no-baselines --out "$OUT/finetune-ab" ;;
        gemm) step gemm 90 "$PY" -m benchmarks.bench_gemm --out "$OUT/gemm" ;;
        gemm-lora) step gemm-lora 300 "$PY" -m benchmarks.bench_gemm_lora --out "$OUT/gemm-lora" ;;
        gemm-lora64) step gemm-lora64 200 "$PY" -m benchmarks.bench_gemm_lora --pool-rank 64 --rows 32 \
            --out "$OUT/gemm-lora64" ;;
        tune) step tune 150 "$PY" -m benchmarks.tune_smlm --out "$OUT/tune" --pick-env "$OUT/tune/pick.env"
            use_pick tune LOQUETIER_SMLM_TUNING TUNING_AB "SMLM tuning" ;;
        offline) step offline "${OFFLINE_S:-260}" "$PY" -m benchmarks.bench_offline --model 8b --device cuda --no-baselines \
            ${OVERLAPS:+--lora-overlap "$OVERLAPS"} ${CHAIN_AB:+--chain-ab "$CHAIN_AB"} \
            ${TUNING_AB:+--tuning-ab "$TUNING_AB"} ${ATTN_AB:+--attn-ab "$ATTN_AB"} ${BLAS_AB:+--blas-ab "$BLAS_AB"} \
            ${CARRY_AB:+--carry-ab "$CARRY_AB"} ${ASYNC_AB:+--async-ab "$ASYNC_AB"} ${HALVES:+--lora-halves "$HALVES"} --out "$OUT/offline" ;;
        offline-ab2) step offline-ab2 "${OFFLINE_S:-260}" "$PY" -m benchmarks.bench_offline --model 8b --device cuda \
            --no-baselines --tuning-ab "$TUNING_AB2" --out "$OUT/offline-ab2" ;;
        decode) step decode 150 "$PY" -m benchmarks.bench_decode --model 8b --device cuda \
            --lora-overlap "$OVERLAPS" --out "$OUT/decode" ;;
        dense) step dense 300 "$PY" -m benchmarks.bench_lora_dense --out "$OUT/dense" ;;
        serving) step serving 200 "$PY" -m benchmarks.bench_serving --model 8b --device cuda --no-baselines \
            --no-mixed-ranks --out "$OUT/serving" ;;
        serving-ab) step serving-ab 330 "$PY" -m benchmarks.bench_serving --model 8b --device cuda --no-baselines \
            --no-mixed-ranks --async-ab --out "$OUT/serving-ab" ;;
        profile) step profile 200 "$PY" -m benchmarks.profile_step --model 8b --device cuda ${PROFILE_ARGS:-} \
            --out "$OUT/profile" ;;
        profile-graphs) step profile-graphs 200 "$PY" -m benchmarks.profile_step --model 8b --device cuda --graphs \
            ${PROFILE_ARGS:-} --out "$OUT/profile" ;;
        profile-graphs-ab) step profile-graphs-ab 200 env LOQUETIER_ATTN_TUNING="$ATTN_AB" "$PY" -m benchmarks.profile_step \
            --model 8b --device cuda --graphs --out "$OUT/profile-ab" ;;
        offline-window16) step offline-window16 170 "$PY" -m benchmarks.bench_offline --model 8b --device cuda \
            --no-baselines --engine-arg decode_window=16 --out "$OUT/offline-window16" ;;
        *) echo "unknown step $name" >&2; exit 2 ;;
    esac
done
echo "== done after $((SECONDS - T0))s"
