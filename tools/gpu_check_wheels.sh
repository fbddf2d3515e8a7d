#!/usr/bin/env bash
# Download the pure-Python wheels that tools/gpu_check.sh installs offline on a GPU machine for
# the layer tests and the layer/backbone benchmark rows: mmengine and what its import needs
# beyond the GPU image (torch, numpy, pyyaml, rich, zipp, opencv and matplotlib are there).
#
#   bash tools/gpu_check_wheels.sh [DIR]      # default: <repo>/.whl (git-ignored)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
mkdir -p "$DIR"
# Pure-Python wheels (py3-none-any) install on any Python 3.
for pkg in mmengine==0.10.7 addict==2.4.0 termcolor==2.4.0 yapf==0.40.1 platformdirs==4.2.2 \
        tomli==2.0.1 importlib_metadata==8.5.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "$pkg"
done
ls "$DIR"
