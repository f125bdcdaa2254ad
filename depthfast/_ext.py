"""The compiled extension depthfast._C, if it was built; otherwise None and a one-line notice.

Every caller has a plain-PyTorch reference to fall back on, so a missing extension costs speed,
never correctness.
"""

from __future__ import annotations

import sys

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, before _C is imported)

try:
    from depthfast import _C  # type: ignore[attr-defined]
except ImportError as exc:  # not built (e.g. a source checkout without `pip install`)
    _C = None
    print(f"depthfast: compiled extension not available ({exc}); using the PyTorch reference paths", file=sys.stderr)


def extension():
    """The module depthfast._C, or None."""
    return _C


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))
