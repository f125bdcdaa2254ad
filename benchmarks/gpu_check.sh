#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a session that has one: build depthfast._C with its
# CUDA kernels in place for this GPU's architecture only (its compute capability: one arch builds in
# about a fifth of the time of the five CI builds), check the change-relative statistics on the device
# against the float64 truth (bench_cka --accuracy), run the GPU tests, then the benchmarks, and end with
# ONE table: every target of the project with its measured ratio (benchmarks/targets.py). Results go to
# $OUT (or ./gpu_results); the table also to $OUT/targets.txt.
#   bash benchmarks/gpu_check.sh                 # the whole check within BUDGET_S seconds (default 540)
#   BUDGET_S=300 bash benchmarks/gpu_check.sh    # less: later steps get what is left, or are skipped
# Each step runs under `timeout` with at most its own cap and what is left of the budget, so the script
# ends inside a 10-minute call and every finished step's output is already under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
# The fused optimizer's tests and benchmarks measure the block and chunk production launches.
unset DEPTHFAST_OPTIM_BLOCK DEPTHFAST_OPTIM_CHUNK
export DEPTHFAST_TARGETS="$out/targets.jsonl"  # every benchmark appends its ratios here
rm -f "$DEPTHFAST_TARGETS"
# This GPU's architecture only, e.g. 9.0 on an H100/H200 (setup.py adds the arch-specific 'a' variant
# where the kernels need it); a user's TORCH_CUDA_ARCH_LIST wins.
cc=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cc}"
budget=${BUDGET_S:-510}
t0=$SECONDS

# run_step NAME CAP LOG CMD...: runs CMD with min(CAP, budget left − 5 s) seconds, output to $out/LOG.
run_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( budget - (SECONDS - t0) - 5 ))
  (( left < cap )) && cap=$left
  echo; echo "== $name ($(date +%T), ${cap}s of $(( budget - (SECONDS - t0) ))s left)"
  if (( cap < 20 )); then echo "skipped: budget spent" | tee "$out/$log"; return; fi
  timeout "$cap" "$@" 2>&1 | tee "$out/$log"
  local rc=${PIPESTATUS[0]}
  (( rc == 124 )) && echo "(stopped after ${cap}s)" | tee -a "$out/$log"
  return 0
}

echo "== device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$python -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" \
  | tee -a "$out/device.txt"

build="rm -rf build depthfast/_C*.so
MAX_JOBS=\${MAX_JOBS:-8} $python setup.py build_ext --inplace > $out/build.log 2>&1 \\
  || { tail -40 $out/build.log; echo 'build failed: the CKA engine runs on the reference only'; }
$python -c \"import depthfast._ext as e; print('extension:', e.extension(), 'cuda kernels:', e.has_cuda_kernels())\""
run_step "build the extension (C++ and CUDA) in place, arch ${TORCH_CUDA_ARCH_LIST:-?}" 150 build.txt bash -c "$build"
run_step "change-relative 1 − CKA on the device vs float64 (fp32, bf16, fp16)" 60 accuracy.txt \
  $python benchmarks/bench_cka.py --accuracy --device cuda
# The targets' benchmarks first, so the table is full; the tests get what is left (≥ 70 s).
run_step "bench_optim (#3)" 90 bench_optim.txt $python benchmarks/bench_optim.py
run_step "bench_cka (#4)" 110 bench_cka.txt $python benchmarks/bench_cka.py --device cuda
run_step "bench_run (#5)" 80 bench_run.txt $python benchmarks/bench_run.py
run_step "GPU tests" 150 tests.log $python -m pytest -q -p no:cacheprovider -rs \
  tests/test_cka.py tests/test_optim.py tests/test_optim_fsdp.py tests/test_memory.py
echo; echo "== targets (worst case per target; n/m: not measured in this budget)"
$python benchmarks/targets.py "$DEPTHFAST_TARGETS" | tee "$out/targets.txt"
echo; echo "== done after $(( SECONDS - t0 ))s"
