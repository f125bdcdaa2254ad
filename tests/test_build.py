"""How setup.py decides on the CUDA build (csrc/cuda_toolchain.py), on fake toolkits: no GPU, no CUDA.

A fake toolkit is a directory with bin/nvcc (a shell script answering --version and
--list-gpu-arch like the real one), include/cuda_runtime.h and lib64/libcudart.so. The cases are
the ones that broke builds: an nvcc on PATH that is a wrapper script (torch's own guess then
takes the wrapper's prefix and linking fails), no nvcc, an nvcc of another CUDA major version than
torch's, and empty, unknown or too old TORCH_CUDA_ARCH_LIST entries. Also how the package is laid
out for import: setup.py's refusal of build isolation, and kernels/ never shadowing a ``kernels`` package.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "csrc"))
import cuda_toolchain as tc  # noqa: E402

ALL_ARCHS = "75 80 86 87 89 90 100 103 110 120 121"


def _exe(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def fake_toolkit(root, release="13.0", archs=ALL_ARCHS):
    _exe(os.path.join(root, "bin", "nvcc"), f"""#!/bin/sh
case "$1" in
  --version) echo "Cuda compilation tools, release {release}, V{release}.88";;
  --list-gpu-arch) for a in {archs}; do echo compute_$a; done;;
esac
""")
    for f in ("include/cuda_runtime.h", "lib64/libcudart.so"):
        os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
        open(os.path.join(root, f), "w").close()
    return str(root)


@pytest.fixture(autouse=True)
def no_system_toolkits(monkeypatch):
    monkeypatch.setattr(tc, "FALLBACK_HOMES", ())


def test_wrapper_script_on_path_leads_to_the_real_toolkit(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0")
    _exe(str(tmp_path / "wrap" / "bin" / "nvcc"), f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    p = tc.plan({"PATH": str(tmp_path / "wrap" / "bin")}, torch_cuda="13.0")
    assert p.cuda and p.cuda_home == home and p.env["CUDA_HOME"] == home, p.line
    assert p.arch_list == tc.DEFAULT_ARCHS == "7.5;8.0;8.6;8.9;9.0+PTX"


def test_symlinked_nvcc_and_explicit_cuda_home(tmp_path):
    home = fake_toolkit(tmp_path / "cuda")
    os.makedirs(tmp_path / "bin")
    os.symlink(os.path.join(home, "bin", "nvcc"), tmp_path / "bin" / "nvcc")
    assert tc.plan({"PATH": str(tmp_path / "bin")}, torch_cuda="13.0").cuda_home == home
    assert tc.plan({"PATH": "", "CUDA_HOME": home}, torch_cuda="13.0").cuda
    p = tc.plan({"PATH": "", "CUDA_HOME": str(tmp_path)}, torch_cuda="13.0")
    assert not p.cuda and f"CUDA_HOME={tmp_path} is not a CUDA toolkit" in p.line


def test_no_nvcc_builds_the_cpu_extension_or_stops_when_cuda_is_required(tmp_path):
    p = tc.plan({"PATH": str(tmp_path)}, torch_cuda="13.0")
    assert not p.cuda and p.env == {} and "\n" not in p.line
    assert "no CUDA toolkit (nvcc) was found" in p.line and "install the CUDA 13.x toolkit" in p.line
    with pytest.raises(tc.ToolchainError, match="no CUDA toolkit"):
        tc.plan({"PATH": str(tmp_path), "DEPTHFAST_CUDA": "1"}, torch_cuda="13.0")
    assert not tc.plan({"PATH": str(tmp_path), "DEPTHFAST_CUDA": "0"}, torch_cuda="13.0").cuda
    assert not tc.plan({"PATH": str(tmp_path)}, torch_cuda=None).cuda


def test_nvcc_of_another_cuda_major_version(tmp_path):
    old = fake_toolkit(tmp_path / "cuda-12.4", release="12.4")
    p = tc.plan({"PATH": os.path.join(old, "bin")}, torch_cuda="13.0")
    assert not p.cuda and "CUDA 13.0" in p.line and "nvcc 12.4" in p.line, p.line
    # a matching toolkit later in the search wins over the first, mismatched one
    new = fake_toolkit(tmp_path / "cuda-13.1", release="13.1")
    p = tc.plan({"PATH": os.pathsep.join([os.path.join(old, "bin"), os.path.join(new, "bin")])}, torch_cuda="13.0")
    assert p.cuda and p.cuda_home == new


@pytest.mark.parametrize("given,problem", [
    ("", "set but empty"),
    (";", "set but empty"),
    ("8.0;sm_90", "'sm_90' is not an architecture"),
    ("6.1;8.0", "6.1 is below 7.0"),
    ("8.0;10.0", "cannot compile 10.0"),
])
def test_bad_arch_list_is_one_line(tmp_path, given, problem):
    home = fake_toolkit(tmp_path / "cuda", archs="75 80 86 89 90")
    env = {"PATH": "", "CUDA_HOME": home, "TORCH_CUDA_ARCH_LIST": given}
    p = tc.plan(env, torch_cuda="13.0")
    assert not p.cuda and problem in p.line and "\n" not in p.line, p.line
    with pytest.raises(tc.ToolchainError):
        tc.plan(dict(env, DEPTHFAST_CUDA="1"), torch_cuda="13.0")


def test_arch_list_overrides_and_default_follows_nvcc(tmp_path):
    home = fake_toolkit(tmp_path / "cuda")
    env = {"PATH": "", "CUDA_HOME": home}
    assert tc.plan(dict(env, TORCH_CUDA_ARCH_LIST="Ampere 9.0a"), torch_cuda="13.0").arch_list == "8.0;8.6+PTX;9.0a"
    assert tc.plan(dict(env, TORCH_CUDA_ARCH_LIST="7.5"), torch_cuda="13.0").env["TORCH_CUDA_ARCH_LIST"] == "7.5"
    newer = fake_toolkit(tmp_path / "cuda-14", release="13.9", archs="80 86 89 90 100 120")  # no Turing
    assert tc.plan({"PATH": "", "CUDA_HOME": newer}, torch_cuda="13.0").arch_list == "8.0;8.6;8.9;9.0+PTX"


def test_setup_py_without_torch_says_no_build_isolation(tmp_path):
    """What pip's default build isolation gives setup.py: an interpreter where torch does not import."""
    _exe(str(tmp_path / "torch" / "__init__.py"), "raise ImportError('no torch in this environment')\n")
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=120)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("depthfast: error:") and "--no-build-isolation" in lines[-1], res.stderr


def test_the_kernels_folder_never_shadows_a_kernels_package(tmp_path):
    """Run from the repository root ('' first on sys.path, as under ``python -m pytest``), a regular
    package named ``kernels`` further down the path (Hugging Face's, which transformers ≥ 5.25 imports
    with every model module) must be the one ``import kernels`` gives, and ``depthfast.kernels`` must
    still be this repository's kernels/ folder. With no such package, transformers must see none: a
    kernels/__init__.py here once made it import this folder as Hugging Face's and fail (CI, stop 26)."""
    _exe(str(tmp_path / "kernels" / "__init__.py"), "__version__ = '0.19.1'\nCUDAProperties = object\n")
    code = ("import os, sys; os.environ['TRITON_INTERPRET'] = '1'\n"
            "import kernels, depthfast.kernels.optim as K\n"
            "assert kernels.__file__.startswith(sys.argv[1]), kernels.__file__\n"
            "assert K.__file__ == os.path.join(sys.argv[2], 'kernels', 'optim.py'), K.__file__\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path), REPO], cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    # This environment's own answer: Hugging Face's kernels where installed (a GPU image with a recent
    # transformers), none otherwise (the CPU pins), never this folder.
    try:
        expected = ["True", importlib.metadata.version("kernels")]
    except importlib.metadata.PackageNotFoundError:
        expected = ["False", "N/A"]
    code = ("import sys, os\n"
            "from transformers.utils import import_utils as u\n"
            "exists, version = u._is_package_available('kernels', return_version=True)\n"
            "where = getattr(sys.modules.get('kernels'), '__file__', None) or ''\n"
            "assert not where.startswith(os.path.join(sys.argv[1], 'kernels')), where\n"
            "print(exists, version)\n")
    res = subprocess.run([sys.executable, "-c", code, REPO], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.split() == expected, (res.stdout, res.stderr[-2000:])
