"""Test-wide set-up: Triton kernels run in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
test modules import depthfast.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family → directory of a tiny saved checkpoint (save_pretrained, tests/tiny_models.py), made on
    first use in each test module. GPT-NeoX's tiny config has no dropout; BERT's has 0.1 (hidden and
    attention), so its runs draw random numbers every step."""
    import tiny_models

    root, made = tmp_path_factory.mktemp("checkpoints"), {}

    def get(family):
        if family not in made:
            made[family] = tiny_models.save(family, str(root / family))
        return made[family]

    return get
