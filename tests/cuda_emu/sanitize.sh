#!/usr/bin/env bash
# The emulated CUDA tests under AddressSanitizer: every global-memory access of the kernels lands in
# a torch CPU allocation and every __shared__ array is a static, so ASan stops at the first byte a
# kernel reads or writes outside them. About 2 min on 2 cores (its own build directory).
#   bash tests/cuda_emu/sanitize.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-.venv/bin/python}"
export DEPTHFAST_EMU_ASAN=1 DEPTHFAST_EMU_BUILD="${DEPTHFAST_EMU_BUILD:-build/cuda_emu_asan}"
# Python and torch are not instrumented: no leak report (their allocations are not ours), and the
# fiber stack switches are announced to ASan by nothing, so stack-use-after-return checks stay off
# (ASan warns once that it does not fully support swapcontext; no report has come from that).
export ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0:${ASAN_OPTIONS:-}"
# libstdc++ preloaded too: python does not link it, and ASan's __cxa_throw interceptor needs it at start.
cxx="${CXX:-c++}"
LD_PRELOAD="$($cxx -print-file-name=libasan.so) $($cxx -print-file-name=libstdc++.so.6)" \
  "$python" -m pytest -q -p no:cacheprovider --capture=sys tests/test_cka_cuda_emulated.py "$@"  # fd 2 free for ASan
