# Loquetier worker image. CPU torch by default; for CUDA pass a CUDA wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=triton
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.8"

# Dependencies first (cached layer), then the source.
COPY pyproject.toml README.md ./
COPY loquetier ./loquetier
COPY kernels ./kernels
COPY workers ./workers
COPY producers ./producers
COPY migrations ./migrations
RUN pip install ".[${EXTRAS}]" && python -c "import loquetier.kernels, loquetier.migrations"

RUN useradd --create-home --uid 10001 loquetier \
    && mkdir -p /var/lib/loquetier/adapters \
    && chown -R loquetier /var/lib/loquetier
USER loquetier
EXPOSE 9400
CMD ["loquetier", "worker"]
