#!/usr/bin/env bash
# One command for a GPU machine: build mmboat's CUDA ops for the local GPU, check them, time them.
#
#   bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--quick] [--no-build] [--budget SECONDS]
#
# Assumes one NVIDIA GPU, nvcc and a CUDA build of torch >= 2.6 (python3, or $PYTHON), pytest;
# needs no network and none of mmcv, mmdet, mmseg, mmpretrain or mmengine. Steps, each timed,
# with its result (PASS / FAIL / SKIP and why) in OUT_DIR/summary.txt:
#   preflight  tools/gpu_check/preflight.py: a machine that cannot run the check is refused with
#              exit 2 and every missing piece named (no CUDA device, no nvcc, a CPU torch, ...);
#   wheels     optional: mmengine and ninja from local wheels (below);
#   build      mmboat._ext in place for the local arch only (OUT_DIR/build.log), then
#              tools/gpu_check/ext_check.py: built with CUDA, every op has a CUDA kernel;
#   tests      the CUDA op tests with pytest (OUT_DIR/tests.log, tests.xml): CUDA vs the CPU
#              kernels and the references for NA and FSLA in float32/float16/bfloat16, borders
#              with k*d == L, float64 gradchecks, autocast; a failure names the test;
#   sanitizer  compute-sanitizer memcheck over small calls of every op, when the tool exists
#              (OUT_DIR/sanitizer.log);
#   benchmark  tools/gpu_check/benchmark.py: markdown tables on stdout and in
#              OUT_DIR/benchmark.md, numbers in OUT_DIR/benchmark.json.
# Exit 0 when no step failed; 1 naming the failed steps; 2 when refused; 64 on bad arguments.
#
# --wheels DIR (default: $MMBOAT_GPU_WHEELS, else <repo>/.whl when it exists): wheels of mmengine
#   and the pure-Python packages it needs, and ninja (bash tools/gpu_check_wheels.sh downloads
#   them), installed offline into a scratch folder before the build: mmengine for the layer tests
#   and the layer and backbone benchmark rows (without it those are skipped with the reason, not
#   failed), ninja for a parallel build (without it the sources compile one by one).
# --quick: fewer batch sizes and calls in the benchmark. --no-build: reuse the in-place build.
# --budget SECONDS (default 470): every step's time limit is cut to what is left of it, so the
#   whole check ends within the budget; a step cut short fails.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
usage() {
    echo "usage: bash tools/gpu_check.sh OUT_DIR [--wheels DIR] [--quick] [--no-build]" \
         "[--budget SECONDS]"
}

if [ $# -ge 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then
    usage
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -uo/d' -e 's/^# \{0,1\}//'
    exit 0
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ] || [ -z "$1" ]; then
    usage >&2
    echo "gpu_check: OUT_DIR (the folder for the results) is missing" >&2
    exit 64
fi
OUT="$1"
shift
WHEELS="${MMBOAT_GPU_WHEELS:-}"
if [ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ]; then WHEELS="$ROOT/.whl"; fi
QUICK=()
BUILD=1
BUDGET=470
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels)
            if [ $# -lt 2 ] || [ -z "$2" ]; then usage >&2; echo "gpu_check: --wheels needs a folder" >&2; exit 64; fi
            WHEELS="$2"; shift 2 ;;
        --quick) QUICK=(--quick); shift ;;
        --no-build) BUILD=0; shift ;;
        --budget)
            if [ $# -lt 2 ] || ! [[ "$2" =~ ^[0-9]+$ ]]; then usage >&2; echo "gpu_check: --budget needs seconds" >&2; exit 64; fi
            BUDGET="$2"; shift 2 ;;
        *) usage >&2; echo "gpu_check: unknown argument: $1" >&2; exit 64 ;;
    esac
done

mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 64; }
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=()
STEP_START=$SECONDS
export PYTHONDONTWRITEBYTECODE=1

log() { printf '[gpu_check +%ss] %s\n' "$SECONDS" "$*"; }
begin() { STEP_START=$SECONDS; log "$1: $2"; }
# step NAME STATUS DETAIL: one line of the summary (PASS, FAIL or SKIP) with the step's time.
step() {
    printf '%-10s %-4s %5ss  %s\n' "$1" "$2" "$((SECONDS - STEP_START))" "$3" | tee -a "$SUMMARY"
    if [ "$2" = FAIL ]; then FAILED+=("$1"); fi
}
# limit WANTED: the step's time limit, cut to what is left of the budget (0: nothing left).
limit() {
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 15 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
finish() {
    printf '%-10s %-4s %5ss  %s\n' total "" "$SECONDS" "(budget ${BUDGET}s)" | tee -a "$SUMMARY"
    if [ ${#FAILED[@]} -gt 0 ]; then
        echo "gpu_check: FAILED: ${FAILED[*]} (details in $OUT)" | tee -a "$SUMMARY" >&2
        exit 1
    fi
    echo "gpu_check: all steps passed or were skipped with a reason (results in $OUT)" |
        tee -a "$SUMMARY"
    exit 0
}
fact() { sed -n "s/^$1=//p" "$OUT/preflight.txt" | head -n 1; }

{
    echo "mmboat GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname 2>/dev/null || echo host)"
    echo "repo $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git')," \
         "$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files)"
} | tee -a "$SUMMARY"

# Preflight: a refusal names what is missing and stops here, with no traceback.
begin preflight "can this machine run the check?"
if ! command -v "$PY" > /dev/null 2>&1; then
    {
        echo "gpu_check: this machine cannot run the GPU check:"
        echo "MISSING: $PY (Python 3) is not on PATH: install Python 3 or set PYTHON"
    } | tee -a "$SUMMARY" >&2
    exit 2
fi
"$PY" "$ROOT/tools/gpu_check/preflight.py" > "$OUT/preflight.txt" 2>&1
PRE_RC=$?
sed 's/^/  /' "$OUT/preflight.txt" >> "$SUMMARY"
if [ "$PRE_RC" -ne 0 ]; then
    {
        echo "gpu_check: this machine cannot run the GPU check:"
        grep '^MISSING: ' "$OUT/preflight.txt" || tail -n 5 "$OUT/preflight.txt"
    } >&2
    step preflight FAIL "refused: $(grep -c '^MISSING: ' "$OUT/preflight.txt") missing piece(s), see above" > /dev/null
    exit 2
fi
ARCH="$(fact ARCH)"
SANITIZER="$(fact SANITIZER)"
CUDA_HOME_FOUND="$(fact CUDA_HOME)"
if [ -n "$CUDA_HOME_FOUND" ]; then export CUDA_HOME="$CUDA_HOME_FOUND"; fi
step preflight PASS "$(fact DEVICE) (sm_${ARCH/./}), torch $(fact TORCH) (CUDA $(fact TORCH_CUDA)), Python $(fact PYTHON), nvcc $(fact NVCC_RELEASE)"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Optional: mmengine (and ninja) from local wheels: the layer tests, the layer and backbone
# benchmark rows, a parallel build.
begin wheels "mmengine for the layers and backbones"
SITE=""
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() { if [ -n "$SITE" ]; then rm -rf "$SITE"; fi; }
trap cleanup EXIT
if [ -z "$WHEELS" ]; then
    step wheels SKIP "no --wheels DIR (nor .whl/): the layer tests and the layer/backbone benchmark rows are skipped; fix: bash tools/gpu_check_wheels.sh (with network), then --wheels .whl"
elif ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    step wheels FAIL "no .whl files in $WHEELS"
else
    SITE="$(mktemp -d)"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
            "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1; then
        step wheels FAIL "pip could not install the wheels in $WHEELS: $(tail -n 2 "$OUT/wheels.log" | tr '\n' ' ')"
    else
        export PYTHONPATH="$PYTHONPATH:$SITE"
        export PATH="$PATH:$SITE/bin"
        WHLS=("$WHEELS"/*.whl)
        if MSG="$(cd "$OUT" && "$PY" -c 'import mmengine.model, mmengine.runner' 2>&1)"; then
            step wheels PASS "${#WHLS[@]} wheels from $WHEELS; mmengine imports"
        else
            step wheels FAIL "with the wheels of $WHEELS, import mmengine.runner fails: $(echo "$MSG" | tail -n 1)"
        fi
    fi
fi

# Build the extension in place for the local arch only.
if [ "$BUILD" = 1 ]; then
    begin build "setup.py build_ext --inplace for sm_${ARCH/./} (log: $OUT/build.log)"
    T="$(limit 330)"
    if [ "$T" = 0 ]; then
        step build FAIL "not run: the ${BUDGET}s budget is spent"
        finish
    fi
    command -v ninja > /dev/null || log "build: ninja is not on PATH, the sources compile one by one"
    (cd "$ROOT" && FORCE_CUDA=1 MMBOAT_WITH_OPS=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
        MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}" \
        timeout -k 10 "$T" "$PY" setup.py build_ext --inplace) > "$OUT/build.log" 2>&1
    RC=$?
    if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
        step build FAIL "timed out after ${T}s (log: $OUT/build.log)"
        finish
    elif [ "$RC" != 0 ]; then
        step build FAIL "setup.py build_ext failed (exit $RC): $(grep -m 3 -iE 'error|mmboat setup.py' "$OUT/build.log" | tr '\n' ' ' | cut -c 1-400)"
        finish
    fi
else
    begin build "--no-build: using the existing in-place build"
fi
if INFO="$(cd "$OUT" && "$PY" "$ROOT/tools/gpu_check/ext_check.py" --arch "$ARCH" 2>&1)"; then
    step build PASS "$INFO"
else
    step build FAIL "$(echo "$INFO" | tail -n 3 | tr '\n' ' ')"
    finish
fi

# The CUDA op tests.
begin tests "pytest on the CUDA op tests (log: $OUT/tests.log)"
T="$(limit 240)"
if [ "$T" = 0 ]; then
    step tests FAIL "not run: the ${BUDGET}s budget is spent"
else
    ARGS=(-p no:cacheprovider -q -rfEs --junitxml="$OUT/tests.xml")
    if [ "$(fact PYTEST_TIMEOUT)" = 1 ]; then ARGS+=(--timeout=120); fi
    rm -f "$OUT/tests.xml"
    (cd "$ROOT" && timeout -k 10 "$T" "$PY" -m pytest "${ARGS[@]}" \
        tests/test_ops/test_neighborhood_attention_cuda.py \
        tests/test_ops/test_feature_space_attention_cuda.py) > "$OUT/tests.log" 2>&1
    RC=$?
    REPORT="$("$PY" "$ROOT/tools/gpu_check/junit_summary.py" "$OUT/tests.xml")"
    REPORT_RC=$?
    if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
        step tests FAIL "timed out after ${T}s; last lines: $(tail -n 2 "$OUT/tests.log" | tr '\n' ' ')"
    elif [ "$RC" = 0 ] && [ "$REPORT_RC" = 0 ]; then
        step tests PASS "$(echo "$REPORT" | head -n 1)"
    else
        step tests FAIL "$(echo "$REPORT" | head -n 1) (pytest exit $RC)$(echo "$REPORT" | sed -n 's/^VERDICT: /: /p')"
        echo "$REPORT" | grep '^FAILED ' | sed 's/^/  /' | tee -a "$SUMMARY" >&2
        if [ "$RC" -ge 2 ]; then tail -n 5 "$OUT/tests.log" | sed 's/^/  /' | tee -a "$SUMMARY" >&2; fi
    fi
    echo "$REPORT" | grep '^SKIPPED ' | sed 's/^/  /' | tee -a "$SUMMARY"
fi

# compute-sanitizer memcheck over small calls of every op.
begin sanitizer "compute-sanitizer memcheck (log: $OUT/sanitizer.log)"
T="$(limit 120)"
if [ -z "$SANITIZER" ]; then
    step sanitizer SKIP "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): install the CUDA toolkit's compute-sanitizer to run it"
elif [ "$T" = 0 ]; then
    step sanitizer FAIL "not run: the ${BUDGET}s budget is spent"
else
    (cd "$OUT" && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$T" "$SANITIZER" \
        --tool memcheck --error-exitcode 1 --print-limit 20 \
        "$PY" "$ROOT/tools/gpu_check/sanitizer_cases.py") > "$OUT/sanitizer.log" 2>&1
    RC=$?
    ERRORS="$(grep -m 1 'ERROR SUMMARY' "$OUT/sanitizer.log" | sed 's/^=* *//')"
    if [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
        step sanitizer FAIL "timed out after ${T}s"
    elif [ "$RC" = 0 ]; then
        step sanitizer PASS "${ERRORS:-no errors}; $(grep -m 1 '^sanitizer cases' "$OUT/sanitizer.log")"
    else
        step sanitizer FAIL "exit $RC: ${ERRORS:-} $(grep -m 4 -E 'Invalid|out of bounds|misaligned|Error|error' "$OUT/sanitizer.log" | tr '\n' ' ' | cut -c 1-400)"
    fi
fi

# Benchmark tables.
begin benchmark "NAT-Tiny shapes, float16 and bfloat16 (log: $OUT/benchmark.log)"
T="$(limit 200)"
if [ "$T" = 0 ]; then
    step benchmark FAIL "not run: the ${BUDGET}s budget is spent"
else
    (cd "$OUT" && timeout -k 10 "$T" "$PY" "$ROOT/tools/gpu_check/benchmark.py" --out "$OUT" \
        --time-limit "$((T > 40 ? T - 30 : T / 2))" "${QUICK[@]}") > "$OUT/benchmark.log" 2>&1
    RC=$?
    if [ "$RC" = 0 ] && [ -s "$OUT/benchmark.md" ]; then
        cat "$OUT/benchmark.md"
        NOTE=""
        if grep -q 'stopped at the time limit' "$OUT/benchmark.md"; then NOTE=" (cut at the time limit, see its notes)"; fi
        ERRS="$(grep -c '^\* .*Error: ' "$OUT/benchmark.md")"
        if [ "$ERRS" != 0 ]; then NOTE="$NOTE ($ERRS timings raised, see its notes)"; fi
        step benchmark PASS "$OUT/benchmark.md$NOTE"
    elif [ "$RC" = 124 ] || [ "$RC" = 137 ]; then
        step benchmark FAIL "timed out after ${T}s"
    else
        step benchmark FAIL "exit $RC: $(tail -n 3 "$OUT/benchmark.log" | tr '\n' ' ' | cut -c 1-400)"
    fi
fi
finish
