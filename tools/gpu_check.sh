#!/usr/bin/env bash
# One command for a GPU machine: build mmboat's CUDA ops for the local GPU, check them, time them.
#
#   bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--quick]
#
# Assumes one NVIDIA GPU, nvcc and a CUDA build of torch >= 2.6 (python3, or $PYTHON); needs no
# network and none of mmcv, mmdet, mmseg, mmpretrain or mmengine. Steps, each timed, with its
# result in OUT_DIR/summary.txt:
#   1. preflight  (tools/gpu_check/preflight.py): refuses with exit 2 and names what is missing;
#   2. build      mmboat._ext in place for the local arch only (OUT_DIR/build.log);
#   3. tests      the CUDA op tests (CUDA vs CPU kernels and references for NA and FSLA in
#                 float32/float16/bfloat16, borders with k*d == L, float64 gradchecks, autocast)
#                 with pytest (OUT_DIR/tests.log, tests.xml: a mismatch names the test);
#   4. sanitizer  compute-sanitizer memcheck over small calls of every op, when the tool exists
#                 (OUT_DIR/sanitizer.log);
#   5. benchmark  tools/gpu_check/benchmark.py (OUT_DIR/benchmark.md, benchmark.json).
# Exit 0 only when every step that ran passed; otherwise 1 and the failed steps are named.
#
# --wheels DIR (or $MMBOAT_GPU_WHEELS, or <repo>/.whl when present): pure-Python wheels of
# mmengine and its needs (tools/gpu_check_wheels.sh downloads them), installed offline into a
# scratch folder; without them the layer and backbone benchmark rows and the layer tests are
# skipped with the reason. --quick: fewer batch sizes and iterations in the benchmark.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
usage() { echo "usage: bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--quick]"; }

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    usage >&2
    exit 64
fi
OUT="$1"
shift
WHEELS="${MMBOAT_GPU_WHEELS:-}"
if [ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ]; then WHEELS="$ROOT/.whl"; fi
QUICK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
        --quick) QUICK="--quick"; shift ;;
        *) usage >&2; exit 64 ;;
    esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=()

# step NAME STATUS DETAIL: one line of the summary (PASS, FAIL or SKIP).
step() {
    printf '%-10s %-4s %5ss  %s\n' "$1" "$2" "$SECONDS" "$3" | tee -a "$SUMMARY"
    if [ "$2" = FAIL ]; then FAILED+=("$1"); fi
}

finish() {
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "gpu_check: FAILED: ${FAILED[*]} (see $OUT)" | tee -a "$SUMMARY" >&2
        exit 1
    fi
    echo "gpu_check: all steps passed in ${SECONDS}s (results in $OUT)" | tee -a "$SUMMARY"
    exit 0
}

# 1. Preflight: a refusal names what is missing and stops here, with no traceback.
if ! "$PY" "$ROOT/tools/gpu_check/preflight.py" > "$OUT/preflight.txt" 2>&1; then
    cat "$OUT/preflight.txt" >> "$SUMMARY"
    rm -f "$OUT/preflight.txt"
    {
        echo "gpu_check: this machine cannot run the GPU check:"
        grep '^MISSING: ' "$SUMMARY" || tail -n 5 "$SUMMARY"
    } >&2
    exit 2
fi
cat "$OUT/preflight.txt" >> "$SUMMARY"
rm -f "$OUT/preflight.txt"
ARCH="$(sed -n 's/^ARCH=//p' "$SUMMARY")"
SANITIZER="$(sed -n 's/^SANITIZER=//p' "$SUMMARY")"
step preflight PASS "$(sed -n 's/^DEVICE=//p' "$SUMMARY"), sm_${ARCH/./}"

# 2. Build the extension in place for the local arch.
if (cd "$ROOT" && FORCE_CUDA=1 MMBOAT_WITH_OPS=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace) \
        > "$OUT/build.log" 2>&1; then
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    INFO="$(cd "$OUT" && "$PY" -c 'import torch, mmboat._ext; print(torch.ops.mmboat.ext_info())' 2>&1)"
    if [[ "$INFO" == *"cuda=1"* ]]; then
        step build PASS "$INFO"
    else
        step build FAIL "the built extension has no CUDA ops: $INFO"
        finish
    fi
else
    step build FAIL "setup.py build_ext failed: $(tail -n 3 "$OUT/build.log" | tr '\n' ' ')"
    finish
fi

# Optional: mmengine from local wheels (layer tests, layer and backbone benchmarks).
if [ -n "$WHEELS" ]; then
    SITE="$(mktemp -d)"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
            "$WHEELS"/*.whl > /dev/null 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$SITE"
        step wheels PASS "$(ls "$WHEELS" | tr '\n' ' ')"
    else
        step wheels FAIL "could not install the wheels in $WHEELS"
    fi
fi

# 3. The CUDA op tests.
if (cd "$ROOT" && timeout 900 "$PY" -m pytest -p no:cacheprovider -q -rfE \
        --junitxml="$OUT/tests.xml" tests/test_ops/test_neighborhood_attention_cuda.py \
        tests/test_ops/test_feature_space_attention_cuda.py tests/test_ops/test_ops_autocast.py) \
        > "$OUT/tests.log" 2>&1; then
    step tests PASS "$(tail -n 1 "$OUT/tests.log")"
else
    step tests FAIL "$(grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -n 20 | tr '\n' ' ') $(tail -n 1 "$OUT/tests.log")"
fi

# 4. compute-sanitizer memcheck over small calls of every op.
if [ -n "$SANITIZER" ]; then
    if (cd "$OUT" && timeout 600 "$SANITIZER" --tool memcheck --error-exitcode 1 \
            "$PY" "$ROOT/tools/gpu_check/sanitizer_cases.py") > "$OUT/sanitizer.log" 2>&1; then
        step sanitizer PASS "$(tail -n 1 "$OUT/sanitizer.log")"
    else
        step sanitizer FAIL "$(grep -m 3 -E 'ERROR|Invalid|error' "$OUT/sanitizer.log" | tr '\n' ' ')"
    fi
else
    step sanitizer SKIP "compute-sanitizer is not on PATH"
fi

# 5. Benchmark tables.
if (cd "$OUT" && timeout 900 "$PY" "$ROOT/tools/gpu_check/benchmark.py" --out "$OUT" $QUICK) \
        > "$OUT/benchmark.log" 2>&1; then
    rm -f "$OUT/benchmark.log"
    step benchmark PASS "$OUT/benchmark.md"
else
    step benchmark FAIL "$(tail -n 3 "$OUT/benchmark.log" | tr '\n' ' ')"
fi
finish
