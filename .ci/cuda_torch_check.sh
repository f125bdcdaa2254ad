#!/usr/bin/env bash
# CI, second environment: a GPU image's CUDA torch on a machine without a GPU (a login node or a
# docker build). torch==2.14.1 (CUDA 13.0) goes in first, as in such an image; then depthfast is
# installed the GPU way of docs/install.md (DEPTHFAST_VENV=<env> bash install.sh) and must
#   * leave that torch in place (still 2.14.1, still a CUDA build: requirements.txt's CPU pins, e.g.
#     triton==3.9.0, once made pip swap it for the CPU wheel and exit 0),
#   * build depthfast._C with its CUDA kernels for the default arch list, sm_75 included (checked in
#     the .so's fat binary), OpenMP linked (the C++ path of a CUDA build used to run on one core),
#   * pass the tests chosen below.
set -uo pipefail
cd "$(dirname "$0")/.."
env="$PWD/${DEPTHFAST_CUDA_VENV:-build/venv-cuda}"  # build/ is git-ignored
# A copy of the tree: an editable install builds depthfast/_C*.so inside the source tree, and the CUDA
# build (linked to libc10_cuda) would replace the CPU environment's extension there.
src="$PWD/build/ci-cuda-src"
rm -rf "$src" && mkdir -p "$src"
tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' --exclude='*.egg-info' -cf - . \
  | tar -xf - -C "$src" || { echo "cuda-torch env: FAILED: copying the tree"; exit 1; }
cd "$src"
torch_req="${DEPTHFAST_CI_CUDA_TORCH:-torch==2.14.1}"
fail() { echo "cuda-torch env: FAILED: $*"; exit 1; }
t0=$SECONDS
rm -rf "$env"
python3 -m venv "$env" && "$env/bin/pip" install -q --disable-pip-version-check "$torch_req" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$env/bin/python" -c "import torch; assert torch.version.cuda" || fail "could not install a CUDA $torch_req"
echo "cuda-torch env: $torch_req in $((SECONDS - t0)) s"

t1=$SECONDS
# docs/install.md's command for a GPU machine whose environment already has torch (kept verbatim):
DEPTHFAST_VENV="$env" bash install.sh || fail "install.sh"
echo "cuda-torch env: install.sh (dependencies and the CUDA build) in $((SECONDS - t1)) s"

"$env/bin/python" - "$torch_req" <<'PY' || fail "checks"
import subprocess, sys
import torch
import depthfast._C as C
want = sys.argv[1].split("==")[1]
assert torch.__version__.split("+")[0] == want and torch.version.cuda, f"torch was replaced: {torch.__version__}"
assert C.with_cuda, "depthfast._C was built without its CUDA kernels"
code = subprocess.run([sys.executable, ".ci/fatbin_archs.py", C.__file__], capture_output=True, text=True).stdout.split()
for arch in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"):
    assert arch in code, f"{arch} missing from {C.__file__}: {code}"
libs = subprocess.run(["ldd", C.__file__], capture_output=True, text=True).stdout
assert "libgomp" in libs, "depthfast._C is not linked with OpenMP"
print(f"cuda-torch env: torch {torch.__version__}, _C.with_cuda {C.with_cuda}, GPU code {' '.join(code)}, OpenMP linked")
PY

# What runs here, and why (the full suite takes ≈ 8.5 min on this torch; the CPU environment runs all
# of it): test_cka.py, the CKA engine through a _C compiled with DEPTHFAST_WITH_CUDA (its CPU path
# then goes through the CUDA build's dispatch) and the nvcc-built kernels' host side; test_optim.py,
# the fused Triton optimizer under the interpreter with the older triton (3.8) that a CUDA torch
# brings; test_build.py, the CUDA toolchain decisions with this torch's cpp_extension.
t2=$SECONDS
"$env/bin/python" -m pytest -q -p no:cacheprovider tests/test_cka.py tests/test_optim.py tests/test_build.py
status=$?
echo "cuda-torch env: tests in $((SECONDS - t2)) s; all of it in $((SECONDS - t0)) s"
[ "$status" -eq 0 ] || fail "pytest exit status $status"
