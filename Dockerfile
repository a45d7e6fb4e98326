# Loquetier worker image. CPU torch by default; a CUDA torch with a CUDA wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t loquetier:cuda .
# (compose's worker-gpu service does this). Versions follow scripts/constraints.txt, as CI's.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=triton
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Dependencies first (cached layer), then the source.
COPY pyproject.toml README.md ./
COPY scripts/constraints.txt ./scripts/constraints.txt
COPY loquetier ./loquetier
COPY kernels ./kernels
COPY workers ./workers
COPY producers ./producers
COPY migrations ./migrations
# A CUDA torch brings the triton it was built with: then that one stays, the rest is constrained.
RUN if python -c "import triton" 2>/dev/null; then grep -v '^triton' scripts/constraints.txt > /tmp/constraints.txt; \
    else cp scripts/constraints.txt /tmp/constraints.txt; fi \
    && pip install -c /tmp/constraints.txt ".[${EXTRAS}]" \
    && python -c "import torch, loquetier.kernels, loquetier.migrations; print('torch', torch.__version__)"

RUN useradd --create-home --uid 10001 loquetier \
    && mkdir -p /var/lib/loquetier/adapters \
    && chown -R loquetier /var/lib/loquetier
USER loquetier
EXPOSE 9400
CMD ["loquetier", "worker"]
