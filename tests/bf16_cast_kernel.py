"""The fused optimizer's bf16 store (kernels.optim._cast_to) alone in a kernel, for test_optim.

A module of its own: the Triton interpreter resolves a kernel's names through its module's globals,
and importing triton belongs to the test that needs it.
"""

import triton
import triton.language as tl

from depthfast.kernels.optim import _cast_to


@triton.jit
def cast_kernel(x_ptr, out_ptr, n, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + idx, mask=idx < n)
    tl.store(out_ptr + idx, _cast_to(x, out_ptr, BF16_BY_HAND), mask=idx < n)
