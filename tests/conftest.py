"""Test-wide set-up: Triton kernels run in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
test modules import depthfast.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
