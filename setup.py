"""Build depthfast and its extension depthfast._C against the torch already in the environment.

    pip install --no-build-isolation -e .

C++ sources in csrc/ are always compiled (the CPU path). CUDA sources (csrc/*.cu) are added when
torch was built with CUDA and csrc/cuda_toolchain.py finds a matching toolkit; it also fixes
CUDA_HOME and TORCH_CUDA_ARCH_LIST (default 7.5;8.0;8.6;8.9;9.0+PTX, no GPU needed) before
torch.utils.cpp_extension is imported. A CUDA extension cannot be built against a CPU-only torch.
Triton kernels live in kernels/ and install as depthfast.kernels (the top-level name ``kernels``
belongs to another PyPI package).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
except ImportError:
    sys.exit("depthfast: error: setup.py needs the environment's torch to build depthfast._C, and torch is not "
             "importable here: install torch first, then `pip install --no-build-isolation -e .` (pip's default "
             "build isolation hides the environment's torch)")

sys.path.insert(0, os.path.join(HERE, "csrc"))
import cuda_toolchain  # noqa: E402

try:
    PLAN = cuda_toolchain.plan(torch_cuda=torch.version.cuda)
except cuda_toolchain.ToolchainError as exc:  # DEPTHFAST_CUDA=1 and no usable toolkit
    sys.exit(f"depthfast: error: {exc}")
print(PLAN.line, file=sys.stderr)
os.environ.update(PLAN.env)
# torch calls `ninja` from PATH; pip's ninja sits beside the interpreter, not on PATH unless activated.
_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is fixed: read at import)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if PLAN.cuda:
    cpp_extension.CUDA_HOME = PLAN.cuda_home  # in case something imported it before


def extension_modules():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources:
        return []
    # No -std flag: BuildExtension adds the standard the installed torch needs (C++17 up to ~2.9, C++20 later).
    # OpenMP in both builds: the C++ CPU path of a CUDA build runs on all cores too.
    # -g0 (after Python's own CFLAGS, which carry -g): debug info for torch's headers is most of the
    # compile (measured on 2 cores: csrc/cka.cpp 80 s with it, 48 s without; object 21 MB vs 0.65 MB);
    # the symbols stay, so backtraces still name functions. DEPTHFAST_DEBUG_INFO=1 keeps -g.
    cxx_flags = ["-O3", "-fopenmp"] + ([] if os.environ.get("DEPTHFAST_DEBUG_INFO") == "1" else ["-g0"])
    if PLAN.cuda and cuda_sources:
        # No fast-math: CKA numerics are the product. Architectures: TORCH_CUDA_ARCH_LIST (PLAN.env).
        # --threads 0: nvcc compiles the architectures in parallel, one per core (one .cu file: measured on
        # 2 cores for the default six targets, 107 s one after another, 63 s with two threads).
        nvcc_flags = ["-O3", "-lineinfo", "-Xcompiler", "-fopenmp", "--threads", "0"]
        return [
            CUDAExtension(
                "depthfast._C",
                cpp_sources + cuda_sources,
                define_macros=[("DEPTHFAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [CppExtension("depthfast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                         extra_link_args=["-fopenmp"])]


setup(
    name="depthfast",
    version="0.1.0",
    description="Measure the depth profile of fine-tuning: per-layer representational change, with the equal-step control",
    # every subpackage of depthfast/ (report, sweep, cka, optim, …), plus kernels/ mapped below
    packages=find_packages(include=["depthfast", "depthfast.*"], exclude=["depthfast.kernels*"]) + ["depthfast.kernels"],
    package_dir={"depthfast": "depthfast", "depthfast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        # No lower bound above a typical GPU image (torch 2.11, triton 3.6, transformers 5.17, accelerate 1.15).
        "torch>=2.6",  # FSDP2 (torch.distributed.fsdp.fully_shard)
        "transformers>=4.56",  # from_pretrained(dtype=...)
        "accelerate>=1.0",
        "datasets>=2.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "peft": ["peft>=0.13"],  # LoRA runs and `depthfast compare` on an adapter directory
        "test": ["pytest>=7", "peft>=0.13"],
        # benchmarks/ compares against these CKA libraries where they are installed
        "bench": ["pytorch-cka>=1.1", "ckatorch>=1.0", "torch-cka>=0.21"],
    },
    ext_modules=extension_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["depthfast=depthfast.cli:console_main"]},
    zip_safe=False,
)
