#!/usr/bin/env bash
# Set up everything mmboat needs on a fresh machine, idempotently.
#
#   bash tools/setup_env.sh            # venv + pinned OpenMMLab stack + mmboat (with ops)
#
# What it does, in order (each step printed with the elapsed time, a timing summary at the end):
#   1. a virtual environment at $MMBOAT_VENV (default: <repo>/.venv);
#   2. the build-time pins (torch==2.13.0, setuptools<82, ninja, wheel, numpy);
#   3. mmcv 2.1.0 *with its ops*: it has no wheel for this torch, so it is built from the
#      sdist once (~10 min on 2 cores) and the wheel is cached under $MMBOAT_CACHE
#      (default: ~/.cache/mmboat/wheels/<torch>-<python>/), outside the clone, for later runs;
#   4. mmboat itself, editable, with its C++ (and CUDA when available) extension, plus the
#      pinned runtime/test dependencies declared in pyproject.toml; skipped when the installed
#      one was built from the same sources, setup.py, pyproject.toml, python, torch and build
#      switches (a fingerprint kept in $MMBOAT_VENV/.mmboat-build-stamp; MMBOAT_REBUILD=1
#      rebuilds anyway);
#   5. the torchvision start-up hook and a short check of the environment.
# Each pip/build command writes its full output to a log file under $MMBOAT_SETUP_LOGS
# (default: $MMBOAT_CACHE/logs/setup_env/), prints that path, says every
# $MMBOAT_HEARTBEAT_S seconds (default 30) that it is still running, and shows the log's tail
# when it fails.
#
# Environment knobs: MMBOAT_VENV, MMBOAT_CACHE, MMBOAT_SETUP_LOGS, MMBOAT_HEARTBEAT_S,
# MMBOAT_REBUILD, PYTHON (interpreter for the venv), MMBOAT_WITH_OPS=0 (pure-Python mmboat),
# MAX_JOBS (compile parallelism, default 2).
#
# Sourcing this file (`. tools/setup_env.sh`) defines its helpers (step, run_logged, ...)
# without running the set-up.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMBOAT_VENV:-$ROOT/.venv}"
CACHE="${MMBOAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmboat}"
LOG_DIR="${MMBOAT_SETUP_LOGS:-$CACHE/logs/setup_env}"
HEARTBEAT_S="${MMBOAT_HEARTBEAT_S:-30}"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-2}"

TORCH_PIN="torch==2.13.0"
MMCV_VERSION="2.1.0"
NUM_STEPS=5

START_S="$(date +%s)"
STEP_NAME=""
STEP_START_S=""
STEP_NOTE=""
SUMMARY=()  # one "name|seconds|note" per finished step
HEARTBEAT_PID=""
TMP=""

# 75 -> 1m15s
fmt_s() { printf '%dm%02ds' "$(($1 / 60))" "$(($1 % 60))"; }
elapsed() { fmt_s "$(($(date +%s) - START_S))"; }
log() { printf '[setup_env %s] %s\n' "$(elapsed)" "$*" >&2; }

# step NAME MESSAGE: close the running step (its time goes to the summary) and start NAME;
# STEP_NOTE (e.g. "cached wheel") goes next to the step's time in the summary.
step() {
    end_step
    STEP_NAME="$1"
    STEP_START_S="$(date +%s)"
    STEP_NOTE=""
    log "$((${#SUMMARY[@]} + 1))/$NUM_STEPS $2"
}
end_step() {
    if [ -n "$STEP_NAME" ]; then
        SUMMARY+=("$STEP_NAME|$(($(date +%s) - STEP_START_S))|$STEP_NOTE")
        STEP_NAME=""
    fi
}
summary() {
    end_step
    log "done in $(elapsed); time per step (logs in $LOG_DIR):"
    local entry name secs note
    for entry in "${SUMMARY[@]}"; do
        IFS='|' read -r name secs note <<<"$entry"
        printf '    %-28s %8s  %s\n' "$name" "$(fmt_s "$secs")" "$note" >&2
    done
}

stop_heartbeat() {
    if [ -n "$HEARTBEAT_PID" ]; then
        kill "$HEARTBEAT_PID" 2>/dev/null || true
        wait "$HEARTBEAT_PID" 2>/dev/null || true
        HEARTBEAT_PID=""
    fi
}
cleanup() {
    stop_heartbeat
    if [ -n "$TMP" ]; then rm -rf "$TMP"; fi
}

# run_logged NAME LABEL CMD...: run CMD with its output in $LOG_DIR/NAME.log, a heartbeat line
# every $HEARTBEAT_S seconds while it runs, and the log's tail when it fails (its exit code is
# returned; under `set -e` the script stops there).
run_logged() {
    local name="$1" label="$2"
    shift 2
    mkdir -p "$LOG_DIR"
    local logf="$LOG_DIR/$name.log" t0 rc=0 parent=$$
    t0="$(date +%s)"
    printf '$%s\n' "$(printf ' %q' "$@")" >"$logf"
    log "  $label (log: $logf)"
    (
        # Stops with the command (killed by stop_heartbeat) or when the script is gone.
        while sleep "$HEARTBEAT_S" >/dev/null 2>&1 && kill -0 "$parent" 2>/dev/null; do
            log "  ... still $label: $(fmt_s "$(($(date +%s) - t0))") so far," \
                "$(wc -l <"$logf") log lines (log: $logf)"
        done
    ) &
    HEARTBEAT_PID=$!
    "$@" >>"$logf" 2>&1 </dev/null || rc=$?
    stop_heartbeat
    if [ "$rc" -ne 0 ]; then
        log "ERROR: $label failed (exit code $rc) after $(fmt_s "$(($(date +%s) - t0))"); last" \
            "lines of $logf:"
        # (minus this machine's notes about local index folders that do not hold a package)
        grep -v "^WARNING: Location '.*' is ignored" "$logf" | tail -n 40 | sed 's/^/    | /' >&2
        return "$rc"
    fi
    return 0
}

mmcv_wheel_ok() {
    # A wheel built with build isolation (or without MMCV_WITH_OPS) silently lacks mmcv/_ext.
    python - "$1" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(0 if any(n.startswith('mmcv/_ext') and n.endswith('.so') for n in names) else 1)
EOF
}

mmboat_fingerprint() {
    # What the editable install and its extension are built from (see setup.py's switches).
    {
        printf '%s\n' "$ROOT" "${MMBOAT_WITH_OPS:-1}" "${FORCE_CUDA:-0}" \
            "${TORCH_CUDA_ARCH_LIST:-}" "${MMBOAT_USE_NINJA:-1}" "${CUDA_HOME:-}"
        python -c 'import sys, torch
print(sys.version, torch.__version__, torch.version.cuda, torch.cuda.is_available())'
        (cd "$ROOT" && find csrc setup.py pyproject.toml -type f -print0 | LC_ALL=C sort -z |
            xargs -0 sha256sum)
    } | sha256sum | cut -d' ' -f1
}

mmboat_installed() {
    # mmboat imports from this clone (not from the current directory: -I), with its extension
    # unless MMBOAT_WITH_OPS=0.
    python -I - "$ROOT" "${MMBOAT_WITH_OPS:-1}" <<'EOF'
import os, sys
root, with_ops = os.path.realpath(sys.argv[1]), sys.argv[2] != '0'
try:
    import mmboat
    if with_ops:
        import torch  # noqa: F401  (mmboat._ext links against its libraries)
        import mmboat._ext  # noqa: F401
except Exception:
    sys.exit(1)
sys.exit(0 if os.path.realpath(mmboat.__file__).startswith(root + os.sep) else 1)
EOF
}

build_mmcv() {
    # Build the mmcv wheel with its ops into $TMP/wheel (the caller checks and caches it).
    TMP="$(mktemp -d)"
    run_logged mmcv-download "downloading the mmcv $MMCV_VERSION sources" \
        python -m pip download --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$TMP/src"
    # mmcv's setup.py needs these at build time (it imports them without declaring them).
    run_logged mmcv-build-deps "installing mmcv's build-time imports" \
        python -m pip install "addict" "pyyaml" "yapf==0.40.1" "opencv-python==4.10.0.84" \
        "mmengine==0.10.7"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 CFLAGS="-DNDEBUG -fwrapv -O3 -g0" \
        CXXFLAGS="-DNDEBUG -O3 -g0" run_logged mmcv-build \
        "building mmcv $MMCV_VERSION with ops (one time, ~10 min on 2 cores)" \
        python -m pip wheel --no-build-isolation --no-deps -w "$TMP/wheel" \
        "$TMP"/src/mmcv-*.tar.gz
}

main() {
    trap cleanup EXIT
    export PIP_DISABLE_PIP_VERSION_CHECK=1

    step "virtual environment" "virtual environment $VENV"
    if [ ! -x "$VENV/bin/python" ]; then
        run_logged venv "creating it" "$PY" -m venv "$VENV"
        STEP_NOTE="created"
    else
        STEP_NOTE="reused"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"

    step "build-time pins" "build-time pins ($TORCH_PIN, setuptools, ninja, wheel, numpy)"
    run_logged pins "installing or checking them" python -m pip install "$TORCH_PIN" \
        "setuptools==80.9.0" "wheel" "ninja" "numpy==1.26.4" "packaging"

    local pytag torch_ver wheels mmcv_wheel built
    pytag="$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    torch_ver="$(python -c 'import torch; print(torch.__version__.replace("+", "_"))')"
    wheels="$CACHE/wheels/torch-${torch_ver}-${pytag}"
    mkdir -p "$wheels"

    step "mmcv $MMCV_VERSION with ops" "mmcv $MMCV_VERSION with ops (wheel cache: $wheels)"
    mmcv_wheel="$(ls "$wheels"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [ -n "$mmcv_wheel" ] && ! mmcv_wheel_ok "$mmcv_wheel"; then
        log "  cached $mmcv_wheel has no compiled ops; rebuilding"
        rm -f "$mmcv_wheel"
        mmcv_wheel=""
    fi
    if [ -z "$mmcv_wheel" ]; then
        build_mmcv
        built="$(ls "$TMP"/wheel/mmcv-*.whl)"
        if ! mmcv_wheel_ok "$built"; then
            log "ERROR: the mmcv wheel was built without mmcv/_ext (ops). Refusing to cache it."
            exit 1
        fi
        cp "$built" "$wheels/"
        mmcv_wheel="$wheels/$(basename "$built")"
        log "  cached $mmcv_wheel"
        STEP_NOTE="built and cached"
    else
        log "  reusing the cached $(basename "$mmcv_wheel")"
        STEP_NOTE="cached wheel"
    fi

    step "mmboat (editable, with ops)" "mmboat (editable, its C++/CUDA extension, pinned deps)"
    local stamp="$VENV/.mmboat-build-stamp" fingerprint
    fingerprint="$(mmboat_fingerprint)"
    if [ "${MMBOAT_REBUILD:-0}" != 1 ] &&
        [ "$(cat "$stamp" 2>/dev/null || true)" = "$fingerprint" ] && mmboat_installed; then
        log "  installed and unchanged since its last build (MMBOAT_REBUILD=1 rebuilds)"
        STEP_NOTE="unchanged, not rebuilt"
    else
        rm -f "$stamp"
        run_logged mmboat "installing mmboat and building its extension" \
            python -m pip install --no-build-isolation --find-links "$wheels" -e "${ROOT}[tests]"
        echo "$fingerprint" >"$stamp"
        STEP_NOTE="built"
    fi

    step "start-up hook and check" "torchvision start-up hook and environment check"
    # The start-up hook that applies the torchvision fix before any `import torchvision`
    # (mmboat/_startup.py), so downstream entry points work with no extra call.
    run_logged startup-hook "installing the start-up hook" python -m mmboat._startup
    python -m mmboat.utils.collect_env --short
    summary
    log "activate with '. $VENV/bin/activate'"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
