"""Print the requirements of this project and one of its extras, one per line, from
pyproject.toml (the GPU image installs them before it copies the source, so a code change
does not rebuild the dependency layer).

    python scripts/requirements.py gpu > requirements-gpu.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extra: str) -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"][extra]]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
