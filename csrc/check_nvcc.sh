#!/usr/bin/env bash
# Compile-check the CUDA sources with nvcc against the installed torch's headers (no GPU, no CUDA
# torch needed): catches syntax/template/WMMA errors on a CPU-only machine. Usage:
#   bash csrc/check_nvcc.sh [OUT_DIR]        (exit status 0 = every .cu compiled to an object)
#   DEPTHFAST_NVCC_ARCH="-arch=sm_90" bash csrc/check_nvcc.sh     (other architectures)
# By default for sm_75 (no bf16 WMMA: the SIMT variants), sm_80 and sm_90 in one nvcc call each.
# ≈ 45–65 s on 2 cores for one architecture, so tests/test_cka.py runs it only with
# DEPTHFAST_NVCC_CHECK=1 (opt-in).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$(mktemp -d)}"
py="${PYTHON:-python}"
incs=$("$py" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))
PY
)
abi=$("$py" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
std=$("$py" -c "import torch; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print('c++20' if v >= (2, 10) else 'c++17')")
# A CPU-only torch wheel ships c10/cuda headers without the CMake-generated one; a one-line shim
# (what CMake writes for shared-library builds) stands in for it here only.
tinc=$("$py" -c "from torch.utils.cpp_extension import include_paths; print(include_paths()[0])")
if [ ! -f "$tinc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$out/shim/c10/cuda/impl"
  echo "#define C10_CUDA_BUILD_SHARED_LIBS" > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
  incs="$incs -I$out/shim"
fi
arch="${DEPTHFAST_NVCC_ARCH:--gencode=arch=compute_75,code=sm_75 -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90}"
for cu in "$here"/*.cu; do
  echo "nvcc -c $(basename "$cu") ($arch, -std=$std)"
  nvcc -c "$cu" -o "$out/$(basename "$cu" .cu).o" $arch -std=$std -O3 -Xcompiler -fPIC \
    -DDEPTHFAST_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=$abi \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr $incs
done
# The host side under DEPTHFAST_WITH_CUDA (the branch a CPU build never compiles): syntax and types.
for cpp in "$here"/*.cpp; do
  echo "c++ -fsyntax-only -DDEPTHFAST_WITH_CUDA $(basename "$cpp")"
  c++ -fsyntax-only -std=$std -DDEPTHFAST_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=$abi $incs "$cpp"
done
echo "ok: objects in $out"
