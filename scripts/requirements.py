"""Print the requirements of this project and some of its extras, one per line, from
pyproject.toml (the images install them before they copy the source, so a code change does
not rebuild the dependency layer).

    python scripts/requirements.py gpu > requirements-gpu.txt
    python scripts/requirements.py cpu onnx
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(*extras: str) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    chosen = [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [*project["dependencies"], *chosen]


if __name__ == "__main__":
    print("\n".join(requirements(*sys.argv[1:])))
