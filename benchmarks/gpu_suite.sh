#!/usr/bin/env bash
# fastvit GPU suite: everything only a GPU can show (CUDA numerics, speed, memory), in one run.
#
# Usage:  benchmarks/gpu_suite.sh [OUT_DIR]
#   OUT_DIR defaults to $OUT, else benchmarks/results/<gpu-slug> (e.g. benchmarks/results/nvidia-h100-80gb-hbm3).
#   Environment: PYTHON (default: python), QUICK=1 for a short smoke run (few shapes), SKIP_BUILD=1, SKIP_TESTS=1.
#
# Needs: a CUDA GPU (H100/H200), torch with CUDA, Triton, timm, transformers, matplotlib, tqdm, pytest; no network.
# Every step logs to OUT_DIR/<step>.log; the suite continues past a failing step and exits non-zero at the end,
# with a summary (OUT_DIR/summary.txt), if any step failed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_suite.sh: nvidia-smi not found -- this script is for a machine with an NVIDIA GPU" >&2
fi
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)"
GPU_NAME="${GPU_NAME:-unknown-gpu}"
SLUG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')"

OUT_DIR="${1:-${OUT:-$REPO/benchmarks/results/$SLUG}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=()
PASSED=()

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT_DIR/suite.log" >&2; }

# step NAME CMD...: run CMD with stdout+stderr to OUT_DIR/NAME.log, record pass/fail, never abort the suite.
step() {
    local name="$1"
    shift
    local t0=$SECONDS rc=0
    log "step $name: $*"
    set +e
    "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    set -e
    local dt=$((SECONDS - t0))
    if [[ $rc -eq 0 ]]; then
        PASSED+=("$name")
        log "step $name: ok (${dt}s)"
        echo "ok     $name (${dt}s)" >> "$SUMMARY"
    else
        FAILED+=("$name")
        log "step $name: FAILED with exit code $rc (${dt}s) -- see $OUT_DIR/$name.log"
        tail -n 20 "$OUT_DIR/$name.log" | sed 's/^/    /' >&2 || true
        echo "FAILED $name (exit $rc, ${dt}s) -> $name.log" >> "$SUMMARY"
    fi
    return 0
}

log "fastvit GPU suite: repo $REPO, out $OUT_DIR, GPU '$GPU_NAME', python $(command -v "$PY")"

# ---------------------------------------------------------------------------------------------- environment
step nvidia_smi nvidia-smi
nvidia-smi -q > "$OUT_DIR/nvidia_smi_q.txt" 2>&1 || true
(git -C "$REPO" rev-parse HEAD && git -C "$REPO" status --short) > "$OUT_DIR/git.txt" 2>&1 || true
"$PY" -m pip list --format=freeze > "$OUT_DIR/pip_freeze.txt" 2>&1 || true

# ---------------------------------------------------------------------------------------------- build
shopt -s globstar nullglob
CSRC=("$REPO"/csrc/**/*.cu "$REPO"/csrc/**/*.cpp)
shopt -u globstar nullglob
# The CUTLASS / CuTe headers come from the nvidia-cutlass wheel; a machine without network gets it carried in
# (WHEELS=dir, default shared/wheels) and installed without dependencies.
if ! "$PY" -c "import cutlass_library" >/dev/null 2>&1; then
    shopt -s nullglob
    CUTLASS_WHEELS=("${WHEELS:-$REPO/shared/wheels}"/nvidia_cutlass-*.whl)
    shopt -u nullglob
    if [[ ${#CUTLASS_WHEELS[@]} -gt 0 ]]; then
        step install_cutlass "$PY" -m pip install --no-deps "${CUTLASS_WHEELS[-1]}"
    else
        log "nvidia-cutlass is not installed and no wheel was found under ${WHEELS:-$REPO/shared/wheels}"
    fi
fi
# Build for this GPU only unless told otherwise: half the compile time of the default "8.0;9.0a" (Hopper gets the
# arch-specific "a" target the kernels are compiled for).
if [[ -z "${FASTVIT_CUDA_ARCHS:-}" ]]; then
    CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)"
    case "$CC" in
        9.0) export FASTVIT_CUDA_ARCHS="9.0a" ;;
        [0-9].[0-9]|1[0-9].[0-9]) export FASTVIT_CUDA_ARCHS="$CC" ;;
    esac
fi
log "FASTVIT_CUDA_ARCHS=${FASTVIT_CUDA_ARCHS:-default}"
if [[ "${SKIP_BUILD:-0}" != "1" && ${#CSRC[@]} -gt 0 ]]; then
    step build_extension env FASTVIT_FORCE_CUDA_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps -e "$REPO" -v
else
    log "no CUDA sources under csrc/ (or SKIP_BUILD=1): not building fastvit._C"
fi

# The build above is the one build: no process of this suite retries it just in time (fastvit/_cuda.py would,
# on a GPU machine without fastvit._C, in every pytest worker and benchmark process).
export FASTVIT_CUDA_JIT=0

# Recorded after the build, so it says whether fastvit._C imports.
step fastvit_info bash -c "'$PY' -m fastvit.info --json > '$OUT_DIR/fastvit_info.json' && '$PY' -m fastvit.info"

# ---------------------------------------------------------------------------------------------- tests
if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
    # `pytest`, not `python -m pytest`: the latter would put the repo root (and its kernels/) on sys.path.
    PYTEST="$(dirname "$(command -v "$PY")")/pytest"
    [[ -x "$PYTEST" ]] || PYTEST=pytest
    step pytest "$PYTEST" -x -q "$REPO/tests" --junitxml="$OUT_DIR/pytest_junit.xml" -p no:cacheprovider
fi

# ---------------------------------------------------------------------------------------------- CUDA checks
if [[ ${#CSRC[@]} -gt 0 ]]; then
    # Registers / spills / smem of every instantiation, for the record (CI compiles one per template).
    step cuda_check "$PY" -m fastvit.cuda_check --all --archs "${FASTVIT_CUDA_ARCHS:-8.0;9.0a}" \
        --json "$OUT_DIR/cuda_check.json"
fi
if command -v compute-sanitizer >/dev/null 2>&1; then
    for backend in cuda triton; do
        for tool in memcheck racecheck; do
            step "sanitizer_${tool}_${backend}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
                "$PY" "$REPO/benchmarks/sanitize.py" --backend "$backend"
        done
    done
else
    log "compute-sanitizer not found: skipping the memcheck / racecheck steps"
fi

# ---------------------------------------------------------------------------------------------- benchmarks
BENCH=("$PY" -m fastvit.bench)
if [[ "${QUICK:-0}" == "1" ]]; then
    SEQ=(197 577); HD=(64); IMG_SIZES=(224 384); MAE_BATCH=32; B_BASE=32; B_LARGE=4
else
    SEQ=(50 65 145 197 257 577 785 1025 1370 4097); HD=(64 80); IMG_SIZES=(224 384 512 768 1024)
    MAE_BATCH=256; B_BASE=256; B_LARGE=32
fi
# Attention: H=12 and B = round(50432 / N), i.e. B·N ≈ 256·197 tokens (B·H = 3072 at N = 197, a ViT-B batch of
# 256), shrinking B as N grows so every point is a realistic full-GPU workload of the same token count.
step attention_bf16 "${BENCH[@]}" attention --dtype bf16 --mode all --heads 12 --batch auto --tokens 50432 \
    --seq-lens "${SEQ[@]}" --head-dims "${HD[@]}" \
    --json "$OUT_DIR/attention_bf16.json" --plot "$OUT_DIR/attention_bf16.png"
step model_vit_base "${BENCH[@]}" model vit_base_patch16_224 --batch "$B_BASE" --dtype bf16 --compile \
    --json "$OUT_DIR/model_vit_base_patch16_224.json" --plot "$OUT_DIR/model_vit_base_patch16_224.png"
step model_vit_large_512 "${BENCH[@]}" model vit_large_patch16_224 --img-size 512 --batch "$B_LARGE" --dtype bf16 \
    --compile --json "$OUT_DIR/model_vit_large_patch16_512.json" --plot "$OUT_DIR/model_vit_large_patch16_512.png"
step model_mae_base "${BENCH[@]}" model mae_vit_base_patch16 --batch "$MAE_BATCH" --dtype bf16 --compile \
    --json "$OUT_DIR/model_mae_vit_base_patch16.json" --plot "$OUT_DIR/model_mae_vit_base_patch16.png"
step scaling_vit_base "${BENCH[@]}" scaling vit_base_patch16_224 --dtype bf16 --batch 16 --mode fwd_bwd \
    --img-sizes "${IMG_SIZES[@]}" \
    --json "$OUT_DIR/scaling_vit_base_patch16_224.json" --plot "$OUT_DIR/scaling_vit_base_patch16_224.png"
step scaling_mae_base "${BENCH[@]}" scaling mae_vit_base_patch16 --dtype bf16 --batch 64 --mode fwd_bwd \
    --img-sizes "${IMG_SIZES[@]}" \
    --json "$OUT_DIR/scaling_mae_vit_base_patch16.json" --plot "$OUT_DIR/scaling_mae_vit_base_patch16.png"

# ---------------------------------------------------------------------------------------------- summary
{
    echo
    echo "GPU: $GPU_NAME    out: $OUT_DIR"
    echo "passed: ${#PASSED[@]}    failed: ${#FAILED[@]}${FAILED[*]:+ (${FAILED[*]})}"
} >> "$SUMMARY"
log "summary:"
cat "$SUMMARY" >&2
if [[ ${#FAILED[@]} -gt 0 ]]; then
    exit 1
fi
exit 0
