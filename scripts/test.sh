#!/usr/bin/env bash
# The test command: installs everything, makes sure PostgreSQL runs, then lint, types, tests.
# The Kafka-protocol broker (tansu) and, if no PostgreSQL is reachable, an embedded
# PostgreSQL are started by the test session itself (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# shellcheck disable=SC1091
. "${LOQUETIER_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_INTERPRET=1

# The machine's PostgreSQL, when this machine has one; tests fall back to an embedded one.
if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    fi
fi

echo "== ruff"
ruff check .
echo "== mypy (service side, strict)"
mypy loquetier/settings.py loquetier/messages.py loquetier/training_files.py loquetier/db loquetier/gateway workers producers \
    loquetier/cli.py loquetier/cli_errors.py loquetier/cli_stack.py loquetier/local_worker.py loquetier/services.py \
    loquetier/procs.py loquetier/chat.py
echo "== compose"
if ! command -v docker-compose >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null) || echo "docker-compose unavailable"
fi
if command -v docker-compose >/dev/null; then
    docker-compose -f compose.yaml config -q
fi
echo "== pytest"
# Everything the tests start (broker, embedded PostgreSQL, workers, gateways) carries this mark in its
# environment; whatever still runs when this script ends (a run interrupted by Ctrl-C or a timeout)
# is stopped, and nothing without the mark is touched.
export LOQUETIER_TEST_RUN="test-$$-$(date +%s%N)"
marked() {
    local p
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        if tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qx "LOQUETIER_TEST_RUN=$LOQUETIER_TEST_RUN"; then
            echo "${p#/proc/}"
        fi
    done
}
stop_leftovers() {
    local pids
    pids=$(marked)
    [ -z "$pids" ] && return 0
    echo "== stopping what the tests left running: $(echo "$pids" | tr '\n' ' ')" >&2
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    sleep 2
    pids=$(marked)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
}
trap stop_leftovers EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
pytest_run() {  # in the background, so that Ctrl-C or a timeout's TERM reaches the traps above at once
    python -m pytest -q -p no:cacheprovider --timeout=600 "$@" &
    wait $!
}
if [ "$#" -gt 0 ]; then  # the tests asked for, as asked
    pytest_run "$@"
    exit
fi
# Two groups at once. The service tests (broker, PostgreSQL, worker subprocesses, timing-sensitive)
# one after another at normal priority; they wait on sockets and timers more than they compute.
# Beside them the compute tests (kernels under the Triton interpreter, the engine, the model:
# CPU-bound, no services, no subprocesses) on two processes at the lowest priority, so they take
# only the cycles the service tests leave; their output follows the service tests'.
COMPUTE=(tests/kernels tests/engine tests/models tests/lora tests/architecture)
compute_log=$(mktemp)
nice -n 19 python -m pytest -q -p no:cacheprovider --timeout=900 --durations=10 -n 2 --dist loadfile "${COMPUTE[@]}" \
    >"$compute_log" 2>&1 &
compute=$!
rc=0
pytest_run --durations=15 "${COMPUTE[@]/#/--ignore=}" || rc=$?  # the slowest tests named: CI's time is bounded
compute_rc=0
wait "$compute" || compute_rc=$?
echo "== compute tests (${COMPUTE[*]})"
cat "$compute_log"
rm -f "$compute_log"
[ "$compute_rc" -eq 0 ] || rc=$compute_rc
exit "$rc"
