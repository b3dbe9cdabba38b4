#!/usr/bin/env bash
# Set up if needed, then serve a profile (default configs/cpu-tiny.yaml). Args go to the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m engine serve "$@"
