#!/usr/bin/env bash
# The one-call GPU evidence run: on a fresh GPU machine (an H200 with torch 2.11 cu130, triton 3.6,
# nvcc 13, compute-sanitizer, no diffusers, no network), from the repository root:
#
#   bash benchmarks/gpu_check.sh                # the device tool: {"command": ..., "timeout_s": 600}
#   bash benchmarks/gpu_check.sh --dry          # on a CPU: every stage's logic, GPU-only work skipped
#
# Stages, each clamped to a global deadline (BUDGET_S, default 480 s; --dry 90 s) and guarded, so
# one failure leaves the rest:
#   machine   nvidia-smi, versions, the commit (GIT_COMMIT=<sha> where the tree has no .git)
#   build     the CUDA library for sm_90 only, without pip (setup.py build_py)
#   tests     every GPU test, compiled (TRITON_INTERPRET=0): the op test files, then `-m gpu`
#   bench     benchmarks/gpu_quick.py: fastddpm.check at DDPM shapes with GB/s, TFLOP/s and fractions
#             of the ceilings; U-Net per backend x precision at batch 1 and 256; the graph runner's
#             ms per step; a profiler split of one forward
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck over csrc/tools/exercise_kernels.py
#             (csrc/tools/sanitize.sh, one tool at a time, in the time left)
# Output: at most 8 files in $OUT (default ./gpu-check-out): summary.txt (read this first),
# machine.txt, build.log, tests.log, bench.json, bench.log, sanitize.log. Exit status 1 if a stage
# failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; fi
O=${OUT:-gpu-check-out}
mkdir -p "$O"
: > "$O/summary.txt"
export PYTHONUNBUFFERED=1 FASTDDPM_CUDA_ARCH_LIST=9.0
PY=${PYTHON:-python3}  # the GPU machine's python3 holds torch
# Triton compiled, never interpreted, on the GPU; a dry run leaves the choice to tests/conftest.py
# (the interpreter, as CI runs the tests) and times only the torch backend (bench below).
[ "$DRY" = 1 ] || export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no pip, no network: the tree itself
if [ "$DRY" = 1 ]; then BUDGET=${BUDGET_S:-90}; else BUDGET=${BUDGET_S:-480}; fi
END=$(( $(date +%s) + BUDGET ))
FAILED=0  # stages that failed or timed out: the exit status
exec 3>&1  # the console: stage lines go there and to summary.txt, whatever a stage redirects

left() {  # seconds a stage may run: at most $1, at most what is left of the budget
  local l=$(( END - $(date +%s) ))
  [ "$l" -gt "$1" ] && l=$1
  echo "$l"
}
log() { echo "[$(date +%T) +$(( BUDGET - END + $(date +%s) ))s] $*" | tee -a "$O/summary.txt" >&3; }
stage() {  # stage NAME MAX_S COMMAND...: run it under a timeout, log how it ended
  local name=$1 limit start rc
  limit=$(left "$2")
  shift 2
  if [ "$limit" -lt 10 ]; then log "$name: skipped (past the deadline)"; return; fi
  start=$(date +%s)
  timeout -k 10 "$limit" "$@"
  rc=$?
  local how="ok"
  [ "$rc" -ne 0 ] && how="FAILED (exit $rc)" && FAILED=$(( FAILED + 1 ))
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="TIMED OUT after ${limit}s"
  log "$name: $how in $(( $(date +%s) - start ))s"
}
skip() { log "$1: skipped ($2)"; }
has() { "$PY" -c "import $1" 2>/dev/null; }

# --- machine: what the numbers were measured on --------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  git status --porcelain 2>/dev/null | head -20 | sed 's/^/  changed: /'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv 2>&1 || echo "nvidia-smi: not found"
  "$PY" -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
  (nvcc --version 2>&1 || echo "nvcc: not found") | tail -2
  command -v compute-sanitizer || echo "compute-sanitizer: not found"
  echo "cpus: $(nproc)"
  for m in xdist pytest_timeout diffusers; do has "$m" && echo "python module $m: yes" || echo "python module $m: no"; done
} > "$O/machine.txt" 2>&1
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1)
log "machine: $GPU, commit $(sed -n 's/^commit: //p' "$O/machine.txt") (machine.txt); dry=$DRY, budget ${BUDGET}s"

# --- build: the CUDA library, sm_90 only, in place ---------------------------------------------
if [ "$DRY" = 1 ]; then
  skip build "dry: nvcc for sm_90 is a GPU machine's job"
else
  [ -e fastddpm/kernels ] || ln -s ../kernels fastddpm/kernels  # what setup.py's package_dir does (the dry run leaves the checkout alone)
  FASTDDPM_BUILD_CUDA=1 stage build 150 "$PY" setup.py -q build_py > "$O/build.log" 2>&1
fi
"$PY" -c 'from fastddpm import ops; print(ops.backend_status())' 2>&1 | tail -1 | sed 's/^/backends: /' \
  | tee -a "$O/summary.txt" >&3

# --- tests: compiled, not interpreted -----------------------------------------------------------
OP_TESTS=(tests/ops tests/test_cuda_ops.py tests/test_triton_attention.py tests/test_triton_group_norm_silu.py
          tests/test_triton_ddpm_step.py tests/test_triton_backend.py)
PYTEST=("$PY" -m pytest -p no:cacheprovider -rfE --tb=short -q)
if [ "$DRY" = 1 ]; then
  PYTEST+=(--collect-only)  # dry: the same two selections, collected: every module imports
else
  has xdist && PYTEST+=(-n 8)  # Triton compiles in parallel; without pytest-xdist, one process
fi
has pytest_timeout && PYTEST+=(--timeout 150)
IGNORE=()
for f in "${OP_TESTS[@]}"; do IGNORE+=(--ignore "$f"); done
stage "tests (op files)" 180 "${PYTEST[@]}" "${OP_TESTS[@]}" > "$O/tests.log" 2>&1
stage "tests (-m gpu)" 90 "${PYTEST[@]}" -m gpu tests "${IGNORE[@]}" >> "$O/tests.log" 2>&1
[ "$DRY" = 1 ] && log "tests: dry: collected only, not run"
grep -E "^(FAILED|ERROR) |(passed|failed|error|collected).* in [0-9.]+s" "$O/tests.log" \
  | tee -a "$O/summary.txt" >&3

# --- bench: fastddpm.check's code at DDPM shapes, U-Net, graphs, profiler split -----------------
if [ "$DRY" = 1 ]; then DRY_FLAG=--dry; BENCH_S=60; else DRY_FLAG=; BENCH_S=150; fi
# shellcheck disable=SC2086  # DRY_FLAG is one word or none
TRITON_INTERPRET=0 stage bench "$BENCH_S" "$PY" -m benchmarks.gpu_quick $DRY_FLAG --budget-s "$(( $(left "$BENCH_S") - 15 ))" \
  --out "$O/bench.json" --summary "$O/summary.txt" > "$O/bench.log" 2>&1

# --- sanitize: every CUDA-library kernel variant under compute-sanitizer (what time is left) -----
if [ "$DRY" = 1 ]; then
  skip sanitize "dry: compute-sanitizer needs a GPU"
elif ! command -v compute-sanitizer > /dev/null; then
  skip sanitize "compute-sanitizer not found"
else
  if [ "$(command -v python)" != "$(command -v "$PY")" ]; then  # sanitize.sh runs `python`: make it $PY
    mkdir -p /tmp/py-shim && ln -sfn "$(command -v "$PY")" /tmp/py-shim/python && export PATH="/tmp/py-shim:$PATH"
  fi
  for tool in memcheck racecheck synccheck; do
    FASTDDPM_VERIFY=0 stage "sanitize $tool" 60 bash csrc/tools/sanitize.sh "$tool" >> "$O/sanitize.log" 2>&1
  done
  grep -h "ERROR SUMMARY" "$O/sanitize.log" | tee -a "$O/summary.txt" >&3
fi

log "done: $(ls "$O" | wc -l) files in $O; $FAILED stage(s) failed"
echo "==== $O/summary.txt"
cat "$O/summary.txt"
[ "$FAILED" -eq 0 ]
