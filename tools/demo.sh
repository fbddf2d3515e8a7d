#!/usr/bin/env bash
# The main job: set up everything (tools/setup_env.sh), then train and evaluate an mmboat NAT
# UperNet on a synthetic ADE20K-style dataset generated on the fly (CPU, a few minutes).
# Extra arguments go to tools/demo/run_demo.py (e.g. `--work-dir work_dirs/demo`).
# Console: setup_env's step lines, then one compact line per demo phase / logged iteration and a
# summary; the tools' full logs go to the work dir.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START_S="$(date +%s)"
echo "[demo 00:00] setup   tools/setup_env.sh (venv, pinned stack, mmboat build; the one-time" \
    "mmcv build takes ~10 min)"
bash "$ROOT/tools/setup_env.sh"
VENV="${MMBOAT_VENV:-$ROOT/.venv}"
cd "$ROOT"
exec "$VENV/bin/python" tools/demo/run_demo.py --setup-seconds "$(($(date +%s) - START_S))" "$@"
