#!/usr/bin/env bash
# shellcheck disable=SC2329  # the stage_* functions (and what they call) are invoked indirectly, as "stage_$name"
# fastvit GPU suite: what only a GPU can show (CUDA numerics, speed, memory), staged to fit a lent machine.
#
# Usage:  benchmarks/gpu_suite.sh [--budget SECONDS] [--stages A,B,...] [--archive FILE.tar.gz] [OUT_DIR]
#
#   --budget SECONDS  wall-clock budget of the whole run (default 480). Stages run in order of value, each under
#                     its own timeout (never past the budget); a stage is not started when the budget left is below
#                     its minimum (it is recorded as skipped-budget). The first stage, env, always runs.
#   --stages A,B,...  run only these stages (env always runs; the others are recorded as skipped-user).
#   --archive FILE    after every stage, pack OUT_DIR into FILE (a .tar.gz), so a run cut short still brings its
#                     results back in one file (the lent GPU machine returns at most 8 files from $OUT).
#   OUT_DIR           default: $OUT, else benchmarks/results/<gpu-slug> (e.g. benchmarks/results/nvidia-h200).
#
# Environment: PYTHON (default: python, else python3); CPU=1 runs the stages that can run on a CPU (tiny shapes,
# the Triton backend in the interpreter) and records the others as skipped-cpu, so CI tests the plumbing;
# SKIP_BUILD=1 (use a fastvit._C built before); MINIMAL=1 (python -m fastvit.build --minimal: one instantiation per
# kernel template -- bf16, head-dim bucket 64 -- minutes less of nvcc, fewer shapes on the cuda backend);
# WHEELS=DIR (where the nvidia-cutlass wheel is, default wheels/ then shared/wheels/ of the checkout);
# SELFTEST_OPS=a,b (python -m fastvit.selftest --ops a,b; default every op -- tests/test_gpu_suite.py trims it).
#
# Stages (timeout / minimum budget left to start, seconds; CPU=1 values in brackets):
#   1 env        90 / 0    [60 / 0]   nvidia-smi, versions (python -m fastvit.info --json), pip freeze; installs a
#                                     carried nvidia-cutlass wheel and fastvit itself (editable) when missing
#   2 build     330 / 60   [cpu]      python -m fastvit.build for the local arch only, MAX_JOBS=$(nproc)
#   3 selftest  180 / 30   [90 / 30]  python -m fastvit.selftest --backend triton --backend cuda --json
#                                     [TRITON_INTERPRET=1, --backend triton]; skipped-missing without the module
#   4 headline  300 / 60   [60 / 15]  attention bf16 N 197/577/1025 x D 64/80, fwd and fwd_bwd, every SDPA backend;
#                                     vit_base_patch16_224 batch 128 train step + inference vs timm eager and
#                                     timm + torch.compile; fastvit-bench varlen (NaFlexVit, 64 images 128-512 px,
#                                     packed vs padded); roofline ceilings measured in each run
#                                     [tiny attention fwd_bwd, fastvit-bench overhead with few rounds, tiny varlen]
#   5 gpu_tests 240 / 60   [cpu]      pytest -m gpu -x -q tests
#   6 sanitizer 240 / 45   [cpu]      compute-sanitizer memcheck, racecheck on benchmarks/sanitize.py (every op,
#                                     forward + backward, small shapes), cuda and triton backends
#   7 sweeps    600 / 60   [60 / 15]  fastvit-bench scaling (ViT-B, MAE-B), the full attention sweep, MAE-B model
#                                     [tiny scaling sweep]
#
# Files in OUT_DIR: <step>.log for every step, the JSON / PNG each benchmark writes, environment.json,
# build_info.json, selftest.json, gpu_tests.xml; summary.json and summary.txt are rewritten after every stage (per
# stage: status pass / fail / skipped-budget / skipped-cpu / skipped-missing / skipped-user, seconds, reason, steps).
# Exit status: 0 when no stage failed (skipped stages are not failures), 1 when one did, 2 for bad arguments.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

usage() { sed -n '3,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die_usage() { echo "gpu_suite.sh: $*" >&2; echo "run 'benchmarks/gpu_suite.sh --help' for the options" >&2; exit 2; }

STAGES=(env build selftest headline gpu_tests sanitizer sweeps)
declare -A TIMEOUT=([env]=90 [build]=330 [selftest]=180 [headline]=300 [gpu_tests]=240 [sanitizer]=240 [sweeps]=600)
declare -A MINIMUM=([env]=0 [build]=60 [selftest]=30 [headline]=60 [gpu_tests]=60 [sanitizer]=45 [sweeps]=60)
# On the CPU: which stages run there, and their (smaller) timeouts / minimums.
declare -A ON_CPU=([env]=1 [build]=0 [selftest]=1 [headline]=1 [gpu_tests]=0 [sanitizer]=0 [sweeps]=1)
declare -A CPU_TIMEOUT=([env]=60 [selftest]=90 [headline]=60 [sweeps]=60)
declare -A CPU_MINIMUM=([env]=0 [selftest]=30 [headline]=15 [sweeps]=15)
declare -A WHY_NOT_CPU=(
    [build]="CPU=1: fastvit._C needs nvcc and a GPU to build for"
    [gpu_tests]="CPU=1: the gpu-marked tests need a CUDA device"
    [sanitizer]="CPU=1: compute-sanitizer checks CUDA kernels on a GPU"
)

BUDGET=480
SELECTED=""
ARCHIVE=""
OUT_ARG=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --budget) [[ $# -ge 2 ]] || die_usage "--budget needs a value"; BUDGET="$2"; shift 2 ;;
        --budget=*) BUDGET="${1#*=}"; shift ;;
        --stages) [[ $# -ge 2 ]] || die_usage "--stages needs a value"; SELECTED="$2"; shift 2 ;;
        --stages=*) SELECTED="${1#*=}"; shift ;;
        --archive) [[ $# -ge 2 ]] || die_usage "--archive needs a value"; ARCHIVE="$2"; shift 2 ;;
        --archive=*) ARCHIVE="${1#*=}"; shift ;;
        --) shift; [[ $# -gt 0 ]] && { OUT_ARG="$1"; shift; } ;;
        -*) die_usage "unknown option $1" ;;
        *) [[ -z "$OUT_ARG" ]] || die_usage "one OUT_DIR only (got '$OUT_ARG' and '$1')"; OUT_ARG="$1"; shift ;;
    esac
done
[[ $# -eq 0 ]] || die_usage "unexpected arguments: $*"
[[ "$BUDGET" =~ ^[0-9]+$ && "$BUDGET" -ge 1 ]] || die_usage "--budget: expected a positive whole number of seconds, got '$BUDGET'"
if [[ -n "$SELECTED" ]]; then
    IFS=',' read -r -a _sel <<< "$SELECTED"
    for s in "${_sel[@]}"; do
        [[ -n "${TIMEOUT[$s]+x}" ]] || die_usage "--stages: unknown stage '$s' (stages: ${STAGES[*]})"
    done
fi
command -v timeout > /dev/null 2>&1 || die_usage "the 'timeout' command (coreutils) is required"

CPU_MODE=0
[[ "${CPU:-0}" == "1" ]] && CPU_MODE=1

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif command -v python > /dev/null 2>&1; then
    PY=python
else
    PY=python3
fi
# Absolute, so steps that run from another directory (py_neutral) find the same interpreter.
PY_PATH="$(command -v "$PY" || echo "$PY")"
[[ "$PY_PATH" == */* && "$PY_PATH" != /* ]] && PY_PATH="$(cd "$(dirname "$PY_PATH")" && pwd)/$(basename "$PY_PATH")"
PY="$PY_PATH"
# `pytest`, not `python -m pytest`: the latter puts the repository root (and its kernels/) on sys.path.
PYTEST="$(dirname "$PY_PATH")/pytest"
[[ -x "$PYTEST" ]] || PYTEST=pytest

GPU_NAME=""
if [[ $CPU_MODE -eq 0 ]] && command -v nvidia-smi > /dev/null 2>&1; then
    GPU_NAME="$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -n1 || true)"
fi
GPU_NAME="${GPU_NAME:-$([[ $CPU_MODE -eq 1 ]] && echo cpu || echo unknown-gpu)}"
SLUG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"

OUT_DIR="${OUT_ARG:-${OUT:-$REPO/benchmarks/results/$SLUG}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [[ -n "$ARCHIVE" ]]; then
    mkdir -p "$(dirname "$ARCHIVE")" || exit 2
    ARCHIVE="$(cd "$(dirname "$ARCHIVE")" && pwd)/$(basename "$ARCHIVE")"
    [[ "$ARCHIVE" != "$OUT_DIR"/* ]] || die_usage "--archive must lie outside OUT_DIR ($OUT_DIR)"
fi
: > "$OUT_DIR/suite.log"
# Every command runs from OUT_DIR: `python -m` puts the working directory first on sys.path, and in the repository
# root that would expose kernels/ as a top-level package (and bypass the installed fastvit). Paths below are absolute.
cd "$OUT_DIR" || exit 2

log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT_DIR/suite.log" >&2; }

# ------------------------------------------------------------------------------------------------ bookkeeping
declare -A ST_STATUS ST_SECONDS ST_REASON ST_STEPS ST_TIMEOUT
for s in "${STAGES[@]}"; do
    ST_STATUS[$s]=pending; ST_SECONDS[$s]=0; ST_REASON[$s]=""; ST_STEPS[$s]=""; ST_TIMEOUT[$s]=0
done
CUR=""           # the stage running now
DEADLINE=0       # in $SECONDS: the current stage's timeout (never past the budget)
STEP_FAILS=0
STEP_PASSES=0

json_str() {
    local s="$1"
    s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\n'/ }"; s="${s//$'\r'/ }"; s="${s//$'\t'/ }"
    printf '"%s"' "$s"
}

# add_step NAME STATUS SECONDS REASON [FILE...]: one step of the current stage, for the summary.
add_step() {
    local name="$1" status="$2" secs="$3" reason="$4"
    shift 4
    local files="" f
    for f in "$@"; do
        [[ -e "$OUT_DIR/$f" ]] && files+="${files:+, }$(json_str "$f")"
    done
    local rec
    rec="{\"step\": $(json_str "$name"), \"status\": $(json_str "$status"), \"seconds\": $secs, "
    rec+="\"reason\": $(json_str "$reason"), \"log\": $(json_str "$name.log"), \"files\": [$files]}"
    ST_STEPS[$CUR]+="${ST_STEPS[$CUR]:+, }$rec"
    case "$status" in
        pass) STEP_PASSES=$((STEP_PASSES + 1)) ;;
        fail) STEP_FAILS=$((STEP_FAILS + 1)) ;;
    esac
    echo "    $(printf '%-15s %-28s %4ss' "$status" "$name" "$secs")${reason:+  $reason}" >> "$OUT_DIR/steps.txt"
}

write_summary() {
    local s first=1 n_fail=0
    {
        echo "{"
        echo "  \"schema\": \"fastvit-gpu-suite/1\","
        echo "  \"gpu\": $(json_str "$GPU_NAME"),"
        echo "  \"cpu_mode\": $([[ $CPU_MODE -eq 1 ]] && echo true || echo false),"
        echo "  \"budget_s\": $BUDGET,"
        echo "  \"elapsed_s\": $SECONDS,"
        echo "  \"out_dir\": $(json_str "$OUT_DIR"),"
        echo "  \"stages\": ["
        for s in "${STAGES[@]}"; do
            [[ $first -eq 1 ]] || echo ","
            first=0
            printf '    {"stage": %s, "status": %s, "seconds": %s, "timeout_s": %s, "minimum_s": %s, "limit_s": %s, "reason": %s, "steps": [%s]}' \
                "$(json_str "$s")" "$(json_str "${ST_STATUS[$s]}")" "${ST_SECONDS[$s]}" "$(stage_timeout "$s")" \
                "$(stage_minimum "$s")" "${ST_TIMEOUT[$s]}" "$(json_str "${ST_REASON[$s]}")" "${ST_STEPS[$s]}"
        done
        echo
        echo "  ]"
        echo "}"
    } > "$OUT_DIR/summary.json.tmp" && mv "$OUT_DIR/summary.json.tmp" "$OUT_DIR/summary.json"
    {
        echo "fastvit GPU suite -- GPU: $GPU_NAME  cpu_mode: $CPU_MODE  budget: ${BUDGET}s  elapsed: ${SECONDS}s"
        printf '%-10s %-15s %8s  %s\n' stage status seconds reason
        for s in "${STAGES[@]}"; do
            [[ "${ST_STATUS[$s]}" == fail ]] && n_fail=$((n_fail + 1))
            printf '%-10s %-15s %8s  %s\n' "$s" "${ST_STATUS[$s]}" "${ST_SECONDS[$s]}" "${ST_REASON[$s]}"
        done
        echo "failed stages: $n_fail"
        if [[ -s "$OUT_DIR/steps.txt" ]]; then
            echo
            echo "steps:"
            cat "$OUT_DIR/steps.txt"
        fi
    } > "$OUT_DIR/summary.txt"
}

pack() {
    [[ -n "$ARCHIVE" ]] || return 0
    tar -czf "$ARCHIVE.tmp" -C "$OUT_DIR" . 2> /dev/null && mv "$ARCHIVE.tmp" "$ARCHIVE"
}

stage_timeout() { if [[ $CPU_MODE -eq 1 ]]; then echo "${CPU_TIMEOUT[$1]:-${TIMEOUT[$1]}}"; else echo "${TIMEOUT[$1]}"; fi; }
stage_minimum() { if [[ $CPU_MODE -eq 1 ]]; then echo "${CPU_MINIMUM[$1]:-${MINIMUM[$1]}}"; else echo "${MINIMUM[$1]}"; fi; }

# run_step NAME CAP [--stdout FILE] [--files F1,F2] CMD...: run CMD under `timeout` (CAP seconds, never past the
# current stage's deadline), its output in OUT_DIR/NAME.log (stdout in FILE instead, with --stdout); record the
# step. Never aborts the suite. Returns CMD's exit status (124 on a timeout).
run_step() {
    local name="$1" cap="$2"
    shift 2
    local stdout="" files=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --stdout) stdout="$2"; shift 2 ;;
            --files) files="$2"; shift 2 ;;
            *) break ;;
        esac
    done
    local left=$((DEADLINE - SECONDS)) t="$cap"
    ((left < t)) && t=$left
    if ((t < 1)); then
        log "  step $name: not started, the stage's time is spent"
        add_step "$name" skipped-budget 0 "the stage's time was spent before this step"
        return 124
    fi
    local logf="$OUT_DIR/$name.log" t0=$SECONDS rc
    log "  step $name (timeout ${t}s): $*"
    if [[ -n "$stdout" ]]; then
        timeout -k 10 "$t" "$@" > "$OUT_DIR/$stdout" 2> "$logf"
    else
        timeout -k 10 "$t" "$@" > "$logf" 2>&1
    fi
    rc=$?
    local dt=$((SECONDS - t0)) status=pass reason=""
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status=fail; reason="timed out after ${t}s"
    elif [[ $rc -ne 0 ]]; then
        status=fail; reason="exit status $rc"
    fi
    local -a fl=()
    [[ -n "$stdout" ]] && fl+=("$stdout")
    [[ -n "$files" ]] && IFS=',' read -r -a _f <<< "$files" && fl+=("${_f[@]}")
    add_step "$name" "$status" "$dt" "$reason" "${fl[@]}"
    if [[ $status == pass ]]; then
        log "  step $name: pass (${dt}s)"
    else
        log "  step $name: FAILED, $reason (${dt}s) -- see $logf"
        tail -n 15 "$logf" 2> /dev/null | sed 's/^/      /' >&2
    fi
    return "$rc"
}

# skip_step NAME STATUS REASON: record a step that was not run.
skip_step() {
    log "  step $1: $2 ($3)"
    add_step "$1" "$2" 0 "$3"
}

is_selected() {
    [[ -z "$SELECTED" || "$1" == env ]] && return 0
    [[ ",$SELECTED," == *",$1,"* ]]
}

# run_stage NAME: decide whether the stage may start; run stage_NAME; record its status and time.
run_stage() {
    local s="$1" tmo mini left
    CUR="$s"
    tmo="$(stage_timeout "$s")"
    mini="$(stage_minimum "$s")"
    left=$((BUDGET - SECONDS))
    if ! is_selected "$s"; then
        ST_STATUS[$s]=skipped-user; ST_REASON[$s]="not in --stages $SELECTED"
    elif [[ $CPU_MODE -eq 1 && "${ON_CPU[$s]}" != 1 ]]; then
        ST_STATUS[$s]=skipped-cpu; ST_REASON[$s]="${WHY_NOT_CPU[$s]}"
    elif [[ "$s" != env && $left -lt $mini ]]; then
        ST_STATUS[$s]=skipped-budget
        ST_REASON[$s]="$((left > 0 ? left : 0))s of the ${BUDGET}s budget left, below this stage's minimum of ${mini}s"
    else
        # env always runs (every other result is read against it), under its own timeout.
        [[ "$s" != env && $left -lt $tmo ]] && tmo=$left
        ST_TIMEOUT[$s]=$tmo
        DEADLINE=$((SECONDS + tmo))
        STEP_FAILS=0; STEP_PASSES=0
        ST_STATUS[$s]=running
        write_summary
        log "stage $s: start (timeout ${tmo}s, ${left}s of the budget left)"
        local t0=$SECONDS
        STAGE_STATUS=""; STAGE_REASON=""
        "stage_$s"
        ST_SECONDS[$s]=$((SECONDS - t0))
        if [[ -n "$STAGE_STATUS" ]]; then
            ST_STATUS[$s]="$STAGE_STATUS"
        elif ((STEP_FAILS > 0)); then
            ST_STATUS[$s]=fail
        elif ((STEP_PASSES > 0)); then
            ST_STATUS[$s]=pass
        else
            ST_STATUS[$s]=skipped-budget
        fi
        [[ -n "$STAGE_REASON" ]] && ST_REASON[$s]="$STAGE_REASON"
        [[ -z "${ST_REASON[$s]}" && "${ST_STATUS[$s]}" == fail ]] && ST_REASON[$s]="$STEP_FAILS step(s) failed"
    fi
    log "stage $s: ${ST_STATUS[$s]} (${ST_SECONDS[$s]}s)${ST_REASON[$s]:+ -- ${ST_REASON[$s]}}"
    write_summary
    pack
}

on_signal() {
    trap - TERM INT
    log "interrupted (signal) during stage ${CUR:-none}"
    if [[ -n "$CUR" && "${ST_STATUS[$CUR]}" == running ]]; then
        ST_STATUS[$CUR]=fail; ST_REASON[$CUR]="interrupted by a signal"
    fi
    write_summary
    pack
    exit 143
}
trap on_signal TERM INT

# python -c CODE from a neutral directory (the repository root on sys.path would expose kernels/ as a package).
py_neutral() { (cd /tmp && timeout 60 "$PY" -c "$@"); }

cuda_backend_available() {
    local f="$OUT_DIR/build_info.json"
    [[ -s "$f" ]] || f="$OUT_DIR/environment.json"
    [[ -s "$f" ]] || return 1
    "$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["backends"]["cuda"]["available"] else 1)' \
        "$f" 2> /dev/null
}

# ------------------------------------------------------------------------------------------------ stages
stage_env() {
    if [[ $CPU_MODE -eq 0 ]]; then
        run_step nvidia_smi 20 nvidia-smi
        timeout 20 nvidia-smi -q > "$OUT_DIR/nvidia_smi_q.txt" 2>&1 || true
    fi
    { git -C "$REPO" rev-parse HEAD && git -C "$REPO" status --short; } > "$OUT_DIR/git.txt" 2>&1 || true
    timeout 30 "$PY" -m pip list --format=freeze > "$OUT_DIR/pip_freeze.txt" 2>&1 || true
    if [[ $CPU_MODE -eq 0 ]] && ! py_neutral "import cutlass_library" > /dev/null 2>&1; then
        # The CUTLASS / CuTe headers come from the nvidia-cutlass wheel, carried to a machine without network.
        # --no-deps: the build needs its headers only, and its requirements (cuda-python, pydot, treelib, ...) may
        # not be installed there.
        local wheel="" d w
        for d in "${WHEELS:-}" "$REPO/wheels" "$REPO/shared/wheels"; do
            [[ -n "$d" ]] || continue
            for w in "$d"/nvidia_cutlass-*.whl; do [[ -f "$w" ]] && wheel="$w"; done
            [[ -n "$wheel" ]] && break
        done
        if [[ -n "$wheel" ]]; then
            run_step install_cutlass 60 "$PY" -m pip install --no-index --no-deps "$wheel"
        else
            skip_step install_cutlass skipped-missing "nvidia-cutlass is not installed and no nvidia_cutlass-*.whl in WHEELS, wheels/ or shared/wheels/: the build will fail"
        fi
    fi
    if [[ $CPU_MODE -eq 0 ]] && ! py_neutral "import fastvit.kernels" > /dev/null 2>&1; then
        # A bare GPU machine: install this checkout (editable, no CUDA build here -- the build stage does that).
        # Not under CPU=1: CI has fastvit installed, and the suite must not change a developer's environment.
        run_step install_fastvit 120 env FASTVIT_SKIP_CUDA_BUILD=1 \
            "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$REPO"
    fi
    run_step fastvit_info 60 --stdout environment.json "$PY" -m fastvit.info --json
}

stage_build() {
    if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
        STAGE_STATUS=skipped-user; STAGE_REASON="SKIP_BUILD=1"
        return
    fi
    local -a flags=()
    [[ "${MINIMAL:-0}" == 1 ]] && flags+=(--minimal)
    if run_step build "${TIMEOUT[build]}" --files build_compiler.log env MAX_JOBS="$(nproc)" \
        "$PY" -m fastvit.build "${flags[@]}" --log "$OUT_DIR/build_compiler.log"; then
        # fastvit.build builds into torch's extension cache: later processes load it from there (a cached no-op
        # build, seconds) only with FASTVIT_CUDA_JIT=1, and must ask for the same (minimal or full) build.
        export FASTVIT_CUDA_JIT=1
        [[ "${MINIMAL:-0}" == 1 ]] && export FASTVIT_MINIMAL_BUILD=1
    else
        # No later process retries the build just in time (minutes each, in every pytest / benchmark process).
        export FASTVIT_CUDA_JIT=0
    fi
    # Recorded after the build: whether fastvit._C loads, and what each backend can serve now.
    run_step build_info 60 --stdout build_info.json "$PY" -m fastvit.info --json
}

stage_selftest() {
    local err
    if ! err="$(py_neutral "import fastvit.selftest" 2>&1)"; then
        STAGE_STATUS=skipped-missing
        STAGE_REASON="python -c 'import fastvit.selftest' failed: $(echo "$err" | tail -n 1)"
        return
    fi
    local -a ops=()
    [[ -n "${SELFTEST_OPS:-}" ]] && ops=(--ops "$SELFTEST_OPS")
    if [[ $CPU_MODE -eq 1 ]]; then
        run_step selftest "$(stage_timeout selftest)" --files selftest.json env TRITON_INTERPRET=1 \
            "$PY" -m fastvit.selftest --backend triton "${ops[@]}" --json "$OUT_DIR/selftest.json"
    else
        run_step selftest "${TIMEOUT[selftest]}" --files selftest.json \
            "$PY" -m fastvit.selftest --backend triton --backend cuda "${ops[@]}" --json "$OUT_DIR/selftest.json"
    fi
}

BENCH=("$PY" -m fastvit.bench)   # = fastvit-bench (python -m drops the repository root from sys.path)

bench_step() {  # bench_step NAME CAP ARGS...: fastvit-bench ARGS --json NAME.json (--plot NAME.png unless overhead)
    local name="$1" cap="$2"
    shift 2
    local -a plot=(--plot "$OUT_DIR/$name.png")
    [[ "$1" == overhead ]] && plot=()
    run_step "$name" "$cap" --files "$name.json,$name.png" "${BENCH[@]}" "$@" --no-progress \
        --json "$OUT_DIR/$name.json" "${plot[@]}"
}

stage_headline() {
    if [[ $CPU_MODE -eq 1 ]]; then
        bench_step attention_cpu 40 attention --device cpu --seq-lens 17 33 --head-dims 16 --heads 2 --batch 2 \
            --threads 1 --mode fwd_bwd
        bench_step overhead_cpu 40 overhead --reps 3 --number 20 --model-number 1 --threads 1
        run_step varlen_cpu 40 --files varlen_cpu.json "${BENCH[@]}" varlen --device cpu --images 4 --max-side 64 \
            --threads 1 --no-progress --json "$OUT_DIR/varlen_cpu.json"
        return
    fi
    # fastvit-bench attention takes one --mode (fwd | bwd | fwd_bwd | all): fwd first (cheapest, most read), then
    # fwd_bwd, each its own JSON, so the first survives a cut-short second. H = 12, B = round(256·197 / N).
    local mode
    for mode in fwd fwd_bwd; do
        bench_step "attention_$mode" 120 attention --dtype bf16 --mode "$mode" --heads 12 --batch auto \
            --seq-lens 197 577 1025 --head-dims 64 80
    done
    # Rotary attention (EVA-02 / DINOv3 style, cls left unrotated): fastvit rotates q and k inside the kernel, the
    # SDPA providers run timm's unfused rotation first.
    bench_step attention_rope_fwd_bwd 90 attention --dtype bf16 --mode fwd_bwd --heads 12 --batch auto \
        --seq-lens 197 577 1025 --head-dims 64 --rope
    # Train step (fwd + bwd + AdamW, bf16 autocast) and inference; --compile adds timm-compile (and fastvit-compile,
    # left to the sweeps stage: one torch.compile of a ViT-B less here).
    bench_step model_vit_base_patch16_224 180 model vit_base_patch16_224 --batch 128 --dtype bf16 --compile \
        --providers fastvit-triton,fastvit-cuda,fastvit-auto,timm-eager,timm-compile
    # Packed (cu_seqlens) against timm's padded NaFlexVit: 64 images, sides 128-512 px, bf16 autocast.
    run_step varlen 120 --files varlen.json "${BENCH[@]}" varlen --dtype bf16 --no-progress --json "$OUT_DIR/varlen.json"
}

stage_gpu_tests() {
    # From the repository root, as the tests are always run (pytest, not python -m pytest: see PYTEST above).
    # shellcheck disable=SC2016  # the single quotes are the point: bash -c expands $1 and $@ itself
    run_step gpu_tests "${TIMEOUT[gpu_tests]}" --files gpu_tests.xml bash -c 'cd "$1" && shift && exec "$@"' _ \
        "$REPO" "$PYTEST" -m gpu -x -q -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml" tests
}

stage_sanitizer() {
    if ! command -v compute-sanitizer > /dev/null 2>&1; then
        STAGE_STATUS=skipped-missing; STAGE_REASON="compute-sanitizer is not on the PATH"
        return
    fi
    local cuda_ok=1 tool backend
    cuda_backend_available || cuda_ok=0
    for tool in memcheck racecheck; do
        for backend in cuda triton; do
            if [[ $backend == cuda && $cuda_ok -eq 0 ]]; then
                skip_step "sanitizer_${tool}_$backend" skipped-missing "the cuda backend is unavailable (fastvit._C not built or not loading; see build_info.json)"
                continue
            fi
            run_step "sanitizer_${tool}_$backend" 90 compute-sanitizer --tool "$tool" --error-exitcode 1 \
                "$PY" "$REPO/benchmarks/sanitize.py" --backend "$backend"
        done
    done
}

stage_sweeps() {
    if [[ $CPU_MODE -eq 1 ]]; then
        bench_step scaling_cpu 40 scaling vit_tiny_patch16_224 --device cpu --img-sizes 32 48 --batch 1 --threads 1 \
            --mode fwd_bwd
        return
    fi
    bench_step scaling_vit_base_patch16_224 150 scaling vit_base_patch16_224 --dtype bf16 --batch 16 \
        --mode fwd_bwd --img-sizes 224 384 512 768 1024
    # Every N of docs/ARCHITECTURE.md's shape list, D = 64 and 80, B·N ≈ 256·197 tokens.
    bench_step attention_sweep 200 attention --dtype bf16 --mode fwd_bwd --heads 12 --batch auto
    bench_step scaling_mae_vit_base_patch16 150 scaling mae_vit_base_patch16 --dtype bf16 --batch 64 \
        --mode fwd_bwd --img-sizes 224 384 512 768 1024
    bench_step model_mae_vit_base_patch16 150 model mae_vit_base_patch16 --batch 256 --dtype bf16
}

# ------------------------------------------------------------------------------------------------ run
: > "$OUT_DIR/steps.txt"
if [[ $CPU_MODE -eq 1 ]]; then
    # The CPU benchmarks time the CPU implementations; the Triton interpreter (which pytest's conftest turns on
    # without a GPU) would spend seconds per call there. The selftest stage sets it for itself.
    unset TRITON_INTERPRET
    # Keep the selftest's cache out of the user's cache directory.
    export FASTVIT_CACHE_DIR="${FASTVIT_CACHE_DIR:-$OUT_DIR/fastvit_cache}"
elif ! command -v nvidia-smi > /dev/null 2>&1; then
    log "warning: nvidia-smi not found -- this suite is for a machine with an NVIDIA GPU (CPU=1 runs its CPU stages)"
fi
log "fastvit GPU suite: repo $REPO, out $OUT_DIR, GPU '$GPU_NAME', budget ${BUDGET}s, cpu_mode $CPU_MODE, python $PY_PATH"
write_summary
for s in "${STAGES[@]}"; do
    run_stage "$s"
done
CUR=""
log "summary ($OUT_DIR/summary.txt):"
cat "$OUT_DIR/summary.txt" >&2
for s in "${STAGES[@]}"; do
    [[ "${ST_STATUS[$s]}" == fail ]] && exit 1
done
exit 0
