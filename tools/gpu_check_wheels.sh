#!/usr/bin/env bash
# Download (with network) the wheels that tools/gpu_check.sh installs offline on a GPU machine:
# mmengine and the pure-Python packages its import (and so `import mmboat.models`) needs beyond a
# bare CUDA-torch image, for the layer tests and the layer/backbone benchmark rows (all
# py3-none-any: any Python >= 3.8; the GPU image has 3.12), and ninja (a py3-none-manylinux2014
# x86_64 wheel with the binary), so that the extension's sources compile in parallel.
#
#   bash tools/gpu_check_wheels.sh [DIR]      # default: <repo>/.whl (git-ignored)
#   bash tools/gpu_check.sh OUT_DIR           # picks up <repo>/.whl (or --wheels DIR)
#
# Not bundled, expected on the GPU image: torch, numpy, pyyaml, rich and opencv (cv2: mmengine's
# hooks import it; opencv-python-headless is enough). matplotlib is not needed for the imports.
# Requires-Dist checked with `unzip -p X.whl '*/METADATA' | grep ^Requires-Dist`: mmengine ->
# addict, termcolor, yapf (+ matplotlib, numpy, pyyaml, rich, opencv); yapf -> importlib-metadata,
# platformdirs, tomli; importlib-metadata -> zipp.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
PYTHON_VERSION="${MMBOAT_GPU_PYTHON_VERSION:-3.12}"
WHEELS=(mmengine==0.10.7 addict==2.4.0 termcolor==2.4.0 yapf==0.40.1 platformdirs==4.2.2
        tomli==2.0.1 importlib_metadata==8.5.0 zipp==3.20.2 ninja==1.13.2)
mkdir -p "$DIR"
for pkg in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp --platform manylinux2014_x86_64 --platform any -d "$DIR" "$pkg"
done
echo "wheels for Python $PYTHON_VERSION in $DIR:"
ls "$DIR"
