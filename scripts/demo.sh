#!/usr/bin/env bash
# The main job: installs everything, prepares the real model, starts the embedded broker and
# PostgreSQL, a worker, and runs the guided scenario. Extra arguments go to `loquetier demo`
# (e.g. --serve to leave everything running, --steps N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# shellcheck disable=SC1091
. "${LOQUETIER_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec loquetier demo "$@"
