"""Build depthfast's CKA engine with its CUDA kernels compiled for the CPU emulator (cuda_emu.h).

The module it returns is depthfast._C as a CUDA build would be (``with_cuda`` true, every group
dispatched to csrc/cka_cuda.cu's kernels), except that the kernels run on CPU tensors: blocks one
after another, threads as fibers, barriers and warp-collective calls checked. The kernel source is
used as written; the only rewrite is mechanical and counted: the CUDA headers become cuda_emu.h
and each ``kernel<<<cfg>>>(args)`` becomes ``emu::launch("kernel", cfg, kernel, args)``.
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "..", "csrc")

# torch finds ninja on PATH only; the pip package (requirements.txt) installs it beside the
# interpreter, which is not on PATH when tests run as .venv/bin/python -m pytest.
_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

CUDA_INCLUDE = re.compile(r"(?m)^#include <(c10/cuda/\w+\.h|cuda_bf16\.h|cuda_fp16\.h|mma\.h)>\n")
LAUNCH = re.compile(r"(?m)^(?P<indent>[ \t]*)(?P<kernel>[A-Za-z_]\w*(?:<[^;{}()<>]*>)?)<<<(?P<cfg>[^;<>]*)>>>\(")
EXPECTED_LAUNCHES = 7  # prepare; offdiag bf16 WMMA/SIMT, fp16; syrk bf16 WMMA/SIMT, fp16


def emulated_source(cu_text: str) -> str:
    """cka_cuda.cu → C++ for the emulator; fails if the source no longer has the expected shape."""
    text, n_includes = CUDA_INCLUDE.subn("", cu_text)
    if n_includes == 0:
        raise AssertionError("cka_cuda.cu: no CUDA header include found to replace")
    text, n_launches = LAUNCH.subn(
        lambda m: (f"{m['indent']}::emu::launch(\"{m['kernel'].split('<')[0]}\", "
                   f"::emu::LaunchConfig{{{m['cfg']}}}, {m['kernel']}, "),
        text,
    )
    if n_launches != EXPECTED_LAUNCHES or "<<<" in text:
        raise AssertionError(f"cka_cuda.cu: rewrote {n_launches} kernel launches, expected {EXPECTED_LAUNCHES}; "
                             "update EXPECTED_LAUNCHES (or the pattern) with the source")
    return '#include "cuda_emu.h"  // emulated CUDA (tests/cuda_emu)\n' + text


def build(build_dir: str, verbose: bool = False):
    """Compile csrc/cka.cpp, the rewritten csrc/cka_cuda.cu and the emulator's self-checks into one
    module (≈ 60 s on 2 cores; ninja rebuilds only what changed)."""
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(CSRC, "cka_cuda.cu"), encoding="utf-8") as f:
        source = emulated_source(f.read())
    emu_cpp = os.path.join(build_dir, "cka_cuda_emulated.cpp")
    previous = None
    if os.path.exists(emu_cpp):
        with open(emu_cpp, encoding="utf-8") as f:
            previous = f.read()
    if previous != source:  # an unchanged file keeps ninja from recompiling it
        with open(emu_cpp, "w", encoding="utf-8") as f:
            f.write(source)
    # DEPTHFAST_EMU_ASAN=1: AddressSanitizer, so any read or write of a kernel outside its tensors
    # or its __shared__ arrays stops the test (run with LD_PRELOAD of libasan; see sanitize.sh).
    # -g1: line tables are all a report's stack needs; full -g made the build 15 s slower (106 → 91 s).
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g1"] if os.environ.get("DEPTHFAST_EMU_ASAN") == "1" else []
    return cpp_extension.load(
        name="depthfast_C_cuda_emulated",
        sources=[os.path.join(CSRC, "cka.cpp"), emu_cpp, os.path.join(HERE, "selfcheck.cpp")],
        extra_include_paths=[HERE, os.path.abspath(CSRC)],
        # -O1: the emulated kernels are short loops; compile time dominates.
        extra_cflags=["-O1", "-DDEPTHFAST_WITH_CUDA", "-DDEPTHFAST_CUDA_EMULATION", "-Wno-unknown-pragmas", *sanitize],
        extra_ldflags=sanitize,
        build_directory=build_dir,
        verbose=verbose,
    )
