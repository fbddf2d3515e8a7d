#!/usr/bin/env bash
# Slow, documented check (not part of CI): the CUDA extension builds, links and loads against a
# CUDA build of torch 2.13 on a machine with a CUDA toolkit (nvcc) and no GPU.
#
#   bash tools/check_cuda_build.sh [VENV]
#   MMBOAT_CUDA_VENV=/tmp/cudavenv/venv bash tools/check_cuda_build.sh   # reuse a venv
#
# Steps (each printed with its elapsed time; the first failure exits 1 and names the step):
#   1. venv     VENV (argument or $MMBOAT_CUDA_VENV) is reused as it is; without one a throwaway
#               venv is created under a mktemp folder with the CUDA wheel of torch 2.13.0 from
#               PyPI (about 3 GB with its nvidia-* wheels). pip is told to ignore this machine's
#               local wheel folder and pip config / constraint file, which pin the CPU build:
#                 env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null pip install \
#                   --index-url https://pypi.org/simple torch==2.13.0 numpy setuptools==80.9.0 \
#                   wheel ninja
#               The venv's torch must be a CUDA build (torch.version.cuda set).
#   2. sources  the tracked files of this checkout (working-tree contents, so uncommitted edits
#               are included) are copied to a scratch folder: the checkout's own build/ and
#               mmboat/_ext*.so stay as they are.
#   3. build    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
#                 python setup.py build_ext --inplace        (log: <scratch>/build.log)
#               CUDA_HOME: the environment's; else /usr/local/cuda when the nvcc on PATH is a
#               wrapper outside the toolkit (torch would take CUDA_HOME from it and miss
#               libcudart). About 5-10 minutes on 2 cores.
#   4. load     `import torch, mmboat._ext` with that torch: ext_info() says cuda=1 and names the
#               archs, every mmboat op has a CUDA kernel registered (the 13 known ops and any
#               other op with a CPU kernel), and the .so links libcudart / libc10_cuda.
#   5. cubin    cuobjdump --list-elf lists sm_80 and sm_90 code in the .so (cuobjdump from PATH,
#               $CUDA_HOME/bin, or the copy triton ships inside the venv).
#
# Environment: MMBOAT_CUDA_VENV (see 1), MMBOAT_CUDA_ARCHS (default "8.0;9.0"), MAX_JOBS,
# CUDA_HOME, MMBOAT_CUDA_CHECK_DIR (scratch folder; default: mktemp -d; it is kept, with the
# build log and the .so, and its path printed).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MMBOAT_CUDA_VENV:-}}"
ARCH_LIST="${MMBOAT_CUDA_ARCHS:-8.0;9.0}"
JOBS="${MAX_JOBS:-2}"
T0=$(date +%s)
STEP_T0=$T0
STEP=preflight

say() { printf '[check_cuda_build %5ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
begin() {
    STEP="$1"
    STEP_T0=$(date +%s)
    say "== $STEP: $2"
}
done_step() { say "   $STEP done in $(($(date +%s) - STEP_T0)) s${1:+: $1}"; }
fail() {
    say "FAILED at step '$STEP': $*"
    exit 1
}

# ------------------------------------------------------------------------------- preflight
begin preflight "tools"
command -v git > /dev/null || fail "git not found"
git -C "$ROOT" rev-parse --git-dir > /dev/null 2>&1 || fail "$ROOT is not a git checkout"
NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    NVCC="$CUDA_HOME/bin/nvcc"
    export PATH="$CUDA_HOME/bin:$PATH"
fi
[ -n "$NVCC" ] || fail "nvcc not found on PATH or in \$CUDA_HOME/bin (install the CUDA toolkit)"
if [ -z "${CUDA_HOME:-}" ]; then
    # torch derives CUDA_HOME from `which nvcc`; a wrapper script (e.g. /usr/local/bin/nvcc
    # exec-ing the toolkit's) points it at a folder without the runtime headers and libraries.
    guess="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
    if [ ! -f "$guess/include/cuda_runtime.h" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
        export CUDA_HOME=/usr/local/cuda
    fi
fi
say "nvcc: $NVCC ($("$NVCC" --version | tail -n 1)); CUDA_HOME=${CUDA_HOME:-<from nvcc>}"
done_step

# ------------------------------------------------------------------------------- 1. venv
if [ -z "$VENV" ]; then
    begin venv "creating a throwaway venv with the CUDA build of torch 2.13.0 (large download)"
    VENV="$(mktemp -d)/venv"
    python3 -m venv "$VENV" || fail "python3 -m venv $VENV"
    env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
        PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" install -q --index-url https://pypi.org/simple \
        torch==2.13.0 numpy setuptools==80.9.0 wheel ninja ||
        fail "pip install of the CUDA build of torch 2.13.0 into $VENV"
else
    begin venv "reusing $VENV"
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || fail "$PY not found (not a venv?)"
TORCH_DESC="$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)" ||
    fail "torch does not import in $VENV: $TORCH_DESC"
"$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' ||
    fail "$VENV holds a CPU build of torch ($TORCH_DESC); a CUDA build is needed"
case "$TORCH_DESC" in
    2.13.*) ;;
    *) say "   warning: torch $TORCH_DESC is not the 2.13 this check is about" ;;
esac
for mod in setuptools ninja; do
    "$PY" -c "import $mod" 2> /dev/null || fail "$mod is not installed in $VENV"
done
done_step "torch $TORCH_DESC, setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)')"

# ------------------------------------------------------------------------------- 2. sources
begin sources "copying the tracked files to a scratch folder"
SRC="${MMBOAT_CUDA_CHECK_DIR:-$(mktemp -d)}"
mkdir -p "$SRC" || fail "cannot create $SRC"
[ -z "$(ls -A "$SRC")" ] || fail "scratch folder $SRC is not empty"
(
    cd "$ROOT" &&
        git ls-files -z | while IFS= read -r -d '' f; do
            [ -e "$f" ] && printf '%s\0' "$f"   # skip tracked files deleted in the work tree
        done | xargs -0 cp --parents -t "$SRC"
) || fail "copying the sources to $SRC"
done_step "$SRC ($(git -C "$ROOT" ls-files | wc -l) files, HEAD $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- || echo ' + uncommitted edits'))"

# ------------------------------------------------------------------------------- 3. build
begin build "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=\"$ARCH_LIST\" MAX_JOBS=$JOBS python setup.py build_ext --inplace"
(cd "$SRC" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_LIST" MAX_JOBS="$JOBS" \
    "$PY" setup.py build_ext --inplace > "$SRC/build.log" 2>&1)
rc=$?
if [ $rc -ne 0 ]; then
    grep -n -E 'error|Error|FAILED' "$SRC/build.log" | head -n 20
    tail -n 20 "$SRC/build.log"
    fail "setup.py build_ext exited $rc (log: $SRC/build.log)"
fi
SO="$(ls "$SRC"/mmboat/_ext*.so 2> /dev/null | head -n 1)"
[ -n "$SO" ] || fail "no mmboat/_ext*.so after the build (log: $SRC/build.log)"
grep -q -- '-gencode=arch=compute_' "$SRC/build.log" ||
    fail "the build compiled no CUDA source (log: $SRC/build.log)"
done_step "$(basename "$SO"), $(du -h "$SO" | cut -f1); nvcc warnings: $(grep -c 'warning' "$SRC/build.log")"

# ------------------------------------------------------------------------------- 4. load
begin load "importing the extension with the venv's torch (no GPU needed)"
(cd "$SRC" && MMBOAT_EXPECT_ARCHS="$ARCH_LIST" "$PY" - << 'EOF') || fail "loading the extension or a missing CUDA kernel (see above)"
import os
import sys

import torch
import mmboat._ext as ext

info = torch.ops.mmboat.ext_info()
print('   ext_info:', info)
print('   .so:', ext.__file__)
fields = dict(kv.split('=', 1) for kv in info.split(';'))
if fields.get('cuda') != '1':
    sys.exit('   ext_info does not say cuda=1')
want = os.environ['MMBOAT_EXPECT_ARCHS'].replace(';', ' ').split()
if fields.get('archs', '').split() != want:
    sys.exit(f"   ext_info archs {fields.get('archs')!r} != TORCH_CUDA_ARCH_LIST {want}")

known = ['na1d_forward', 'na1d_backward', 'na2d_forward', 'na2d_backward', 'na3d_forward',
         'na3d_backward', 'na2d_qk', 'na2d_qk_backward', 'na2d_av', 'na2d_av_backward',
         'bhc_cluster', 'clustered_attention_forward', 'clustered_attention_backward']
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(n.split('::', 1)[1] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith('mmboat::'))
with_cpu = [op for op in ops if has(f'mmboat::{op}', 'CPU')]
missing = [op for op in sorted(set(known) | set(with_cpu)) if not has(f'mmboat::{op}', 'CUDA')]
for op in sorted(set(known) | set(with_cpu)):
    print(f"   {op:30s} CPU={int(has(f'mmboat::{op}', 'CPU'))} CUDA={int(has(f'mmboat::{op}', 'CUDA'))}")
if missing:
    sys.exit(f'   no CUDA kernel registered for {missing}')
print(f'   CUDA kernels registered for all {len(set(known) | set(with_cpu))} kernel ops '
      f'({len(ops)} mmboat ops in all)')
EOF
LIBS="$(ldd "$SO" | grep -o -E 'lib(cudart|c10_cuda|torch_cuda)[^ ]*' | sort -u | tr '\n' ' ')"
say "   links: $LIBS"
case "$LIBS" in
    *libcudart*libc10_cuda* | *libc10_cuda*libcudart*) ;;
    *) fail "the .so does not link libcudart and libc10_cuda (ldd: $LIBS)" ;;
esac
done_step

# ------------------------------------------------------------------------------- 5. cubin
begin cubin "GPU code in the .so (cuobjdump --list-elf)"
CUOBJDUMP="$(command -v cuobjdump || true)"
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" \
    "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2> /dev/null)"; do
    [ -z "$CUOBJDUMP" ] && [ -x "$c" ] && CUOBJDUMP="$c"
done
[ -n "$CUOBJDUMP" ] || fail "cuobjdump not found (PATH, \$CUDA_HOME/bin, triton in the venv)"
ELF="$("$CUOBJDUMP" --list-elf "$SO" 2>&1)" || fail "cuobjdump --list-elf failed: $ELF"
echo "$ELF" | sed 's/^/   /'
ARCHS="$(echo "$ELF" | grep -o -E 'sm_[0-9]+[a-z]?' | sort -u | tr '\n' ' ')"
for a in ${ARCH_LIST//;/ }; do
    sm="sm_${a//./}"
    sm="${sm%+PTX}"
    [[ " $ARCHS " == *" $sm "* ]] || fail "no $sm code in the .so (cuobjdump lists: $ARCHS)"
done
done_step "$ARCHS(cuobjdump: $CUOBJDUMP)"

say "OK: mmboat._ext built for \"$ARCH_LIST\" against torch $TORCH_DESC, loads, every op has a CUDA kernel; total $(($(date +%s) - T0)) s"
say "scratch folder (build.log, the .so): $SRC"
