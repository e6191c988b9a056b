#!/usr/bin/env bash
# compute-sanitizer over every kernel of the CUDA library, on a GPU machine:
#
#   bash csrc/tools/sanitize.sh                      # memcheck, racecheck, synccheck
#   bash csrc/tools/sanitize.sh memcheck initcheck   # the tools named
#
# Each tool runs csrc/tools/exercise_kernels.py, which launches every kernel variant (each
# group_norm_silu path incl. the channels_last tiles, every attention head-dim tile (8 .. 512) in
# fp32/fp16/bf16, each ddpm_step path and noise source, and device step indices outside the
# table) on small inputs; only fastddpm's kernels are instrumented. Exits non-zero on the
# first tool that reports an error.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -eq 0 ]; then set -- memcheck racecheck synccheck; fi
for tool in "$@"; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 1 --kernel-name kns=fastddpm \
    python csrc/tools/exercise_kernels.py
done
