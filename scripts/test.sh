#!/usr/bin/env bash
# Set up if needed, then lint and run the whole test suite (unit + live-server integration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check engine bench export fixtures tests scripts
.venv/bin/ruff format --check --quiet engine bench export fixtures tests scripts
exec .venv/bin/python -m pytest "$@"
