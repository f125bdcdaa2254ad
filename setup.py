"""Build depthfast and its extension depthfast._C.

C++ sources in csrc/ are always compiled (the CPU path). CUDA sources (csrc/*.cu) are added only
when the installed torch was built with CUDA and nvcc is found: a CUDA extension cannot be built
against a CPU-only torch. Triton kernels live in kernels/ and install as depthfast.kernels (the
top-level name ``kernels`` belongs to another PyPI package).
"""

import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources:
        return []
    # No -std flag: BuildExtension adds the standard the installed torch needs (C++17 up to ~2.9, C++20 later).
    cxx_flags = ["-O3"]
    if torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources:
        nvcc_flags = ["-O3", "-lineinfo"]  # no fast-math: CKA numerics are the product
        return [
            CUDAExtension(
                "depthfast._C",
                cpp_sources + cuda_sources,
                define_macros=[("DEPTHFAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
        ]
    return [CppExtension("depthfast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
                         extra_link_args=["-fopenmp"])]


setup(
    name="depthfast",
    version="0.1.0",
    description="Measure the depth profile of fine-tuning: per-layer representational change, with the equal-step control",
    packages=["depthfast", "depthfast.kernels"],
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
        "test": ["pytest>=7"],
    },
    ext_modules=extension_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["depthfast=depthfast.cli:main"]},
    zip_safe=False,
)
