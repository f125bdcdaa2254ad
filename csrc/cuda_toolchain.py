"""Whether setup.py builds depthfast._C's CUDA kernels, with which toolkit and for which GPUs.

Decided before torch.utils.cpp_extension is imported, because that module fixes CUDA_HOME at
import time and guesses it badly: from the first `nvcc` on PATH, even when that is a wrapper script
(its parent prefix has no libcudart), and with no visible GPU and no TORCH_CUDA_ARCH_LIST it fails
with an IndexError. Here:

* CUDA_HOME (or CUDA_PATH) if set; otherwise every `nvcc` on PATH, followed through symlinks and
  through wrapper scripts (an absolute path to another nvcc in the script's text), then
  /usr/local/cuda and /usr/local/cuda-*. A toolkit counts only with bin/nvcc, include/cuda_runtime.h
  and libcudart (lib64/ or targets/*/lib/), and only if its nvcc's major CUDA version is torch's.
* TORCH_CUDA_ARCH_LIST if set (checked: numbers such as 8.0, 9.0+PTX, 9.0a or torch's names such
  as Ampere, each ≥ 7.0, every one known to this nvcc); else DEFAULT_ARCHS, less what this nvcc
  cannot compile, with +PTX on the newest so newer GPUs JIT-compile it. Never "the visible GPU":
  a build on a login node or in a docker build has none, and the result should run on every node.

Any problem is one line saying what is wrong and what to do; setup.py then builds the C++ (CPU)
extension only, or stops if DEPTHFAST_CUDA=1 asked for the kernels. DEPTHFAST_CUDA=0 skips them.
`python csrc/cuda_toolchain.py` prints the decision (install.sh shows it before building).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass, field

# Turing through Hopper as real code; Blackwell and later run the 9.0 PTX (JIT at first launch).
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
MIN_ARCH = 70  # fp16 WMMA (csrc/cka_cuda.cu); bf16 runs SIMT kernels below 80
# torch's own names (torch.utils.cpp_extension), combined names first.
NAMED_ARCHS = {
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX", "Rubin": "10.7+PTX",
}
# Where toolkits are looked for after PATH (tests replace it).
FALLBACK_HOMES = ("/usr/local/cuda", "/usr/local/cuda-*")
ARCH = re.compile(r"^(\d+)\.(\d)(a?)(\+PTX)?$")


class ToolchainError(Exception):
    """One line: what is wrong with the CUDA build set-up and what to do."""


@dataclass
class Plan:
    cuda: bool  # build the CUDA kernels
    line: str  # the one line to show
    cuda_home: str | None = None
    nvcc_version: str | None = None
    arch_list: str | None = None
    env: dict = field(default_factory=dict)  # what setup.py exports before importing cpp_extension


def nvcc_release(nvcc: str) -> str | None:
    """'13.0' from `nvcc --version`, or None if it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _is_toolkit(home: str) -> bool:
    libs = glob.glob(os.path.join(home, "lib64", "libcudart*")) + glob.glob(
        os.path.join(home, "targets", "*", "lib", "libcudart*"))
    return (os.path.isfile(os.path.join(home, "bin", "nvcc")) and bool(libs)
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")))


def _homes_from_nvcc(nvcc: str, depth: int = 0) -> list[str]:
    """Toolkit prefixes an nvcc on PATH stands for: its own (symlinks resolved) if that is a toolkit,
    else those of the nvcc paths a wrapper script names."""
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(home):
        return [home]
    if depth > 2:
        return []
    try:
        with open(real, "rb") as f:
            head = f.read(65536)
    except OSError:
        return []
    if head.startswith(b"\x7fELF") or b"\0" in head:
        return []
    homes = []
    for path in re.findall(r"(/[^\s'\"`;:$()]*/bin/nvcc)\b", head.decode("utf-8", "replace")):
        if os.path.realpath(path) != real and os.access(path, os.X_OK):
            homes += _homes_from_nvcc(path, depth + 1)
    return homes


def candidate_homes(env) -> list[str]:
    """Toolkit prefixes in order of preference (CUDA_HOME/CUDA_PATH alone when set)."""
    explicit = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if explicit:
        return [explicit]
    homes = []
    for d in env.get("PATH", "").split(os.pathsep):
        nvcc = os.path.join(d or ".", "nvcc")
        if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            homes += _homes_from_nvcc(nvcc)
    for pattern in FALLBACK_HOMES:
        homes += sorted(glob.glob(pattern), reverse=True)
    out = []
    for h in homes:
        if _is_toolkit(h) and os.path.realpath(h) not in {os.path.realpath(o) for o in out}:
            out.append(h)
    return out


def find_toolkit(env, torch_cuda: str) -> tuple[str, str]:
    """(CUDA home, nvcc release) whose major version is torch's; ToolchainError otherwise."""
    major = torch_cuda.split(".")[0]
    explicit = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if explicit and not _is_toolkit(explicit):
        var = "CUDA_HOME" if env.get("CUDA_HOME") else "CUDA_PATH"
        raise ToolchainError(f"{var}={explicit} is not a CUDA toolkit (needs bin/nvcc, include/cuda_runtime.h, "
                             f"lib64/libcudart*): point it at the CUDA {major}.x toolkit, or unset it")
    found = []
    for home in candidate_homes(env):
        release = nvcc_release(os.path.join(home, "bin", "nvcc"))
        if release is None:
            continue
        if release.split(".")[0] == major:
            return home, release
        found.append(f"{home} (nvcc {release})")
    if found:
        raise ToolchainError(f"torch is built with CUDA {torch_cuda} but the CUDA toolkit found is {', '.join(found)}: "
                             f"install a CUDA {major}.x toolkit and set CUDA_HOME to it, or install the torch "
                             f"build for that CUDA version")
    raise ToolchainError(f"torch is built with CUDA {torch_cuda} but no CUDA toolkit (nvcc) was found on PATH, in "
                         f"CUDA_HOME or /usr/local/cuda*: install the CUDA {major}.x toolkit and set CUDA_HOME to it")


def nvcc_archs(cuda_home: str) -> set[int] | None:
    """Virtual architectures this nvcc compiles (75, 80, …), or None if it cannot tell."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = {int(m) for m in re.findall(r"compute_(\d+)", out)}
    return archs or None


def _number(arch: str) -> int:
    m = ARCH.match(arch)
    return int(m.group(1)) * 10 + int(m.group(2))


def arch_list(env, supported: set[int] | None) -> str:
    """The TORCH_CUDA_ARCH_LIST to build for (see the module docstring); ToolchainError if the
    user's is unusable."""
    if "TORCH_CUDA_ARCH_LIST" not in env:
        archs = [a for a in DEFAULT_ARCHS.replace("+PTX", "").split(";") if supported is None or _number(a) in supported]
        if not archs:
            raise ToolchainError(f"this nvcc compiles none of the default architectures {DEFAULT_ARCHS}: set "
                                 f"TORCH_CUDA_ARCH_LIST to your GPUs' (e.g. TORCH_CUDA_ARCH_LIST=10.0)")
        return ";".join(archs[:-1] + [archs[-1] + "+PTX"])
    given = env["TORCH_CUDA_ARCH_LIST"]
    hint = f"set it like TORCH_CUDA_ARCH_LIST=\"8.0;9.0+PTX\", or unset it for the default {DEFAULT_ARCHS}"
    expanded = given.replace(" ", ";")
    for name, archs in NAMED_ARCHS.items():
        expanded = expanded.replace(name, archs)
    entries = [a for a in expanded.split(";") if a]
    if not entries:
        raise ToolchainError(f"TORCH_CUDA_ARCH_LIST is set but empty: {hint}")
    for a in entries:
        if not ARCH.match(a):
            raise ToolchainError(f"TORCH_CUDA_ARCH_LIST={given!r}: {a!r} is not an architecture: {hint}")
        if _number(a) < MIN_ARCH:
            raise ToolchainError(f"TORCH_CUDA_ARCH_LIST={given!r}: {a} is below 7.0, and depthfast's CUDA kernels need "
                                 f"tensor cores (sm_70 or newer): drop it (the PyTorch reference path still runs there)")
        if supported is not None and _number(a) not in supported:
            raise ToolchainError(f"TORCH_CUDA_ARCH_LIST={given!r}: this nvcc cannot compile {a} (it knows "
                                 f"{', '.join(f'{s // 10}.{s % 10}' for s in sorted(supported))}): {hint}")
    return ";".join(entries)


def plan(env=None, torch_cuda: str | None = None) -> Plan:
    """The build decision for torch built with CUDA torch_cuda (None: a CPU torch)."""
    env = dict(os.environ if env is None else env)
    want = env.get("DEPTHFAST_CUDA", "")
    if torch_cuda is None:
        return Plan(False, "depthfast: torch has no CUDA: building the C++ (CPU) extension")
    if want == "0":
        return Plan(False, "depthfast: DEPTHFAST_CUDA=0: building the C++ (CPU) extension only")
    try:
        home, release = find_toolkit(env, torch_cuda)
        archs = arch_list(env, nvcc_archs(home))
    except ToolchainError as exc:
        if want == "1":
            raise
        return Plan(False, f"depthfast: warning: {exc}; building the C++ (CPU) extension only "
                           f"(DEPTHFAST_CUDA=1 makes this an error)")
    return Plan(True, f"depthfast: building the CUDA kernels with {home} (nvcc {release}, torch CUDA {torch_cuda}) "
                      f"for TORCH_CUDA_ARCH_LIST={archs}",
                cuda_home=home, nvcc_version=release, arch_list=archs,
                env={"CUDA_HOME": home, "TORCH_CUDA_ARCH_LIST": archs})


if __name__ == "__main__":
    import sys
    import warnings

    warnings.filterwarnings("ignore")  # torch without numpy yet (install.sh calls this before the dependencies)
    try:
        import torch
    except ImportError:
        print("depthfast: torch is not importable: install torch first", file=sys.stderr)
        sys.exit(2)
    try:
        print(plan(torch_cuda=torch.version.cuda).line)
    except ToolchainError as exc:
        print(f"depthfast: error: {exc}", file=sys.stderr)
        sys.exit(2)
