#!/usr/bin/env bash
# The main job: set up everything (tools/setup_env.sh), then train and evaluate an mmboat NAT
# UperNet on a synthetic ADE20K-style dataset generated on the fly (CPU, a few minutes).
# Extra arguments go to tools/demo/run_demo.py (e.g. `--work-dir work_dirs/demo`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
VENV="${MMBOAT_VENV:-$ROOT/.venv}"
cd "$ROOT"
exec "$VENV/bin/python" tools/demo/run_demo.py "$@"
