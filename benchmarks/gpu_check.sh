#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a session that has one (about 6–8 minutes on an H100):
# build depthfast._C with its CUDA kernels in place, run the GPU tests (CKA engine, fused optimizer,
# FSDP2), then every benchmark. Results go to $OUT (or ./gpu_results).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
step() { echo; echo "== $1 ($(date +%T))"; }

step "device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$python -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" \
  | tee -a "$out/device.txt"

step "build the extension (C++ and CUDA) in place"
rm -rf build depthfast/_C*.so
if ! $python setup.py build_ext --inplace > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; echo "build failed: the CKA engine tests below run on the reference only"
fi
$python -c "import depthfast._ext as e; print('extension:', e.extension(), 'cuda kernels:', e.has_cuda_kernels())"

step "GPU tests"
$python -m pytest -q -p no:cacheprovider tests/test_cka.py tests/test_optim.py tests/test_optim_fsdp.py tests/test_memory.py \
  2>&1 | tee "$out/tests.log" | tail -20

step "bench_cka"
timeout 240 $python benchmarks/bench_cka.py --device cuda 2>&1 | tee "$out/bench_cka.txt"
step "bench_optim"
timeout 240 $python benchmarks/bench_optim.py 2>&1 | tee "$out/bench_optim.txt"
step "bench_run"
timeout 240 $python benchmarks/bench_run.py 2>&1 | tee "$out/bench_run.txt"
step "done"
