"""Make the PyPI (CUDA) torchvision wheel importable next to CPU-only torch.

torchvision's Python code registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms``; when its C extension cannot load (CUDA build, CPU torch) those
ops do not exist and ``import torchvision`` raises. We define the two op schemas, only
in that case, right before torchvision is first imported. Nothing else of torchvision's
C ops is used on our path (vLLM's Qwen3-VL code and transformers' image utilities use
its pure-Python parts).

``install()`` runs from a ``.pth`` file that ``scripts/setup.sh`` writes into the
environment, so it takes effect in every Python process: Ray workers and vLLM
engine-core subprocesses included. It costs one meta-path entry until torchvision is
imported; torch itself is not imported eagerly.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: Any = None  # keeps the torch.library.Library (and the op defs) alive


def _c_ops_load() -> bool:
    """True when torchvision's compiled extension loads in this torch."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to fix
    import glob
    import os

    for location in spec.submodule_search_locations:
        for so in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(so)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def define_missing_ops() -> bool:
    """Define torchvision's nms/qnms schemas if its C ops failed to load.

    Returns True when the schemas were defined by us.
    """
    global _library
    import torch

    if _library is not None or _c_ops_load():
        return False
    if hasattr(torch.ops.torchvision, "nms"):
        return False
    _library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for schema in _SCHEMAS:
        _library.define(schema)
    return True


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != "torchvision":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        try:
            define_missing_ops()
        except Exception as exc:  # never break interpreter start-up or imports
            print(f"torchvision_compat: could not define ops: {exc}", file=sys.stderr)
        return None  # let the normal finders import torchvision


def install() -> None:
    """Hook the first ``import torchvision`` in this process."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
