#!/usr/bin/env bash
# Set up everything mmboat needs on a fresh machine, idempotently.
#
#   bash tools/setup_env.sh            # venv + pinned OpenMMLab stack + mmboat (with ops)
#
# What it does, in order:
#   1. a virtual environment at $MMBOAT_VENV (default: <repo>/.venv);
#   2. the build-time pins (torch==2.13.0, setuptools<82, ninja, wheel, numpy);
#   3. mmcv 2.1.0 *with its ops*: it has no wheel for this torch, so it is built from the
#      sdist once (~10 min on 2 cores) and the wheel is cached under $MMBOAT_CACHE
#      (default: ~/.cache/mmboat/wheels/<torch>-<python>/), outside the clone, for later runs;
#   4. mmboat itself, editable, with its C++ (and CUDA when available) extension, plus the
#      pinned runtime/test dependencies declared in pyproject.toml.
#
# Environment knobs: MMBOAT_VENV, MMBOAT_CACHE, PYTHON (interpreter for the venv),
# MMBOAT_WITH_OPS=0 (pure-Python mmboat), MAX_JOBS (compile parallelism, default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMBOAT_VENV:-$ROOT/.venv}"
CACHE="${MMBOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmboat}"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-2}"

TORCH_PIN="torch==2.13.0"
MMCV_VERSION="2.1.0"

log() { printf '[setup_env] %s\n' "$*" >&2; }
# pip, minus this machine's notes about local index folders that do not hold a package.
pip_q() {
    python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment at $VENV"
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log "build-time pins"
pip_q install -q "$TORCH_PIN" "setuptools==80.9.0" "wheel" "ninja" "numpy==1.26.4" \
    "packaging"

PYTAG="$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
TORCH_VER="$(python -c 'import torch; print(torch.__version__.replace("+", "_"))')"
WHEELS="$CACHE/wheels/torch-${TORCH_VER}-${PYTAG}"
mkdir -p "$WHEELS"

mmcv_wheel_ok() {
    # A wheel built with build isolation (or without MMCV_WITH_OPS) silently lacks mmcv/_ext.
    python - "$1" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(0 if any(n.startswith('mmcv/_ext') and n.endswith('.so') for n in names) else 1)
EOF
}

MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [ -n "$MMCV_WHEEL" ] && ! mmcv_wheel_ok "$MMCV_WHEEL"; then
    log "cached $MMCV_WHEEL has no compiled ops; rebuilding"
    rm -f "$MMCV_WHEEL"
    MMCV_WHEEL=""
fi
if [ -z "$MMCV_WHEEL" ]; then
    log "building mmcv $MMCV_VERSION with ops from source (one time, ~10 min; cached in $WHEELS)"
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    pip_q download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$TMP/src"
    # mmcv's setup.py needs these at build time (it imports them without declaring them).
    pip_q install -q "addict" "pyyaml" "yapf==0.40.1" "opencv-python==4.10.0.84" \
        "mmengine==0.10.7"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 CFLAGS="-DNDEBUG -fwrapv -O3 -g0" CXXFLAGS="-DNDEBUG -O3 -g0" \
        pip_q wheel -q --no-build-isolation --no-deps -w "$TMP/wheel" "$TMP"/src/mmcv-*.tar.gz
    BUILT="$(ls "$TMP"/wheel/mmcv-*.whl)"
    if ! mmcv_wheel_ok "$BUILT"; then
        log "ERROR: the mmcv wheel was built without mmcv/_ext (ops). Refusing to cache it."
        exit 1
    fi
    cp "$BUILT" "$WHEELS/"
    MMCV_WHEEL="$WHEELS/$(basename "$BUILT")"
    log "cached $MMCV_WHEEL"
else
    log "reusing cached $MMCV_WHEEL"
fi

log "installing mmboat (editable) and its pinned dependencies"
pip_q install -q --no-build-isolation --find-links "$WHEELS" -e "$ROOT[tests]"

# The start-up hook that applies the torchvision fix before any `import torchvision`
# (mmboat/_startup.py), so downstream entry points work with no extra call.
python -m mmboat._startup
python -m mmboat.utils.collect_env --short
log "done: activate with '. $VENV/bin/activate'"
