# lorahive server image. The default is a CPU image that serves the embedded demo model out of the box:
#   docker build -t lorahive . && docker run -p 8000:8000 lorahive
# A CUDA image: pick a CUDA base (python3 >= 3.11 is installed from its distribution when missing), e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t lorahive:cuda .
#   docker run --gpus all -p 8000:8000 lorahive:cuda
# torch==2.13.0 from PyPI is the CUDA build on Linux; for a smaller CPU-only image pass the CPU wheel
# index of your mirror as --build-arg TORCH_INDEX_URL=...
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# The distribution's own python3 for whatever BASE_IMAGE is given: no version pin can fit every base.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY kernels kernels
COPY adapters_store adapters_store
COPY loadtest loadtest
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" .

# Uploaded adapters persist in the store; mount a volume here (docker-compose.yml does).
# A numeric user (10001:10001) so that runtimes checking runAsNonRoot need no /etc/passwd lookup.
RUN groupadd --system --gid 10001 lorahive \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app lorahive \
    && mkdir -p /data/adapters && chown 10001:10001 /data/adapters
USER 10001:10001
ENV LORAHIVE_STORE=/data/adapters
VOLUME ["/data/adapters"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["lorahive", "serve", "--host", "0.0.0.0"]
