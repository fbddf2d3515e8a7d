#!/usr/bin/env bash
# Set up everything (tools/setup_env.sh: venv, pinned stack, cached mmcv wheel, mmboat build)
# and run the whole test suite. Extra arguments go to pytest (e.g. `-m "not slow"`, `-k nat`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
VENV="${MMBOAT_VENV:-$ROOT/.venv}"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider --timeout 900 "$@" tests
