"""The CUDA kernels of csrc/cka_cuda.cu, run on the CPU by an emulator, against the float64 references.

No GPU has run these kernels yet. tests/cuda_emu builds depthfast._C with them compiled for a CPU
emulator of the CUDA features they use (threads as fibers, __syncthreads / warp-collective calls
checked for divergence, WMMA m16n16k16 with its alignment and ldm rules), and swaps it in for
depthfast._C: StreamingCKA then takes exactly the dispatch a CUDA build takes, with CPU tensors.
What this checks: indexing, tiling and tile-pair decoding, bounds and zero padding, masks, row
strides, layer chunking, barriers, shuffles and reductions. What it cannot check is listed in
tests/cuda_emu/cuda_emu.h (timing, memory-model races, tensor-core summation order).

Tolerances are those of the CUDA path in test_cka.py: tol_16bit for 16-bit inputs (operands
rounded to the input format after the shift), TOL_F32 for fp32 inputs.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

import cuda_emu  # first: puts the interpreter's bin directory (pip's ninja) on PATH
import test_cka as T
from depthfast import _ext, cka
from depthfast.cka import engine as cka_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.environ.get("DEPTHFAST_EMU_BUILD", os.path.join(REPO, "build", "cuda_emu"))

pytestmark = [pytest.mark.emulator, pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available(),
    reason="needs a C++ compiler and ninja to build the emulated extension",
)]


@pytest.fixture(scope="module")
def emulated_module():
    return cuda_emu.build(BUILD_DIR)


@pytest.fixture(scope="module")
def emulated_lib(emulated_module):
    """The module's plain C symbols (launch counter, self-checks), through ctypes."""
    lib = ctypes.CDLL(emulated_module.__file__)
    lib.cuda_emu_launches.restype = ctypes.c_int64
    lib.cuda_emu_launches.argtypes = [ctypes.c_char_p]
    return lib


@pytest.fixture
def emu(emulated_module, emulated_lib, monkeypatch):
    """depthfast._C replaced by the emulated CUDA build for one test; yields a launch counter."""
    monkeypatch.setattr(_ext, "_C", emulated_module)
    return lambda name: int(emulated_lib.cuda_emu_launches(name.encode()))


def _selfcheck(lib, case, a=None, b=None, out=None):
    err = ctypes.create_string_buffer(512)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr() if t is not None else 0)  # noqa: E731
    rc = lib.cuda_emu_selfcheck(case.encode(), ptr(a), ptr(b), ptr(out), err, len(err))
    return rc, err.value.decode()


# ---------------------------------------------------------------------------------------------
# the emulator itself: it reports the rules it claims to check, and computes what CUDA defines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,message", [
    ("syncthreads_in_divergent_branch", "__syncthreads reached by 64 of 128 threads"),
    ("shuffle_in_divergent_branch", "warp 0 diverged: 16 of 32 lanes"),
    ("misaligned_wmma_load", "load_matrix_sync: pointer not 256-bit aligned"),
])
def test_emulator_reports_broken_rules(emulated_lib, case, message):
    out = torch.zeros(64)
    rc, err = _selfcheck(emulated_lib, case, out=out)
    assert rc == 1 and message in err, err


def test_emulator_shuffles_and_wmma_compute_what_cuda_defines(emulated_lib):
    out = torch.zeros(1, dtype=torch.float64)
    assert _selfcheck(emulated_lib, "shuffle_block_sum", out=out) == (0, "")
    assert float(out) == 3 * sum(range(128))  # three blocks, each Σ threadIdx.x over 128 threads

    g = T.gen(1)
    a = torch.randn(16 * 24, generator=g).half()
    b = torch.randn(16 * 24, generator=g).half()
    out = torch.zeros(256)
    assert _selfcheck(emulated_lib, "wmma_product", a, b, out) == (0, "")
    a_mat = a.double().view(16, 24)[:, :16]  # row-major, ldm 24
    b_mat = b.double().view(16, 24)[:, :16].T  # column-major: element (k, j) at j·24 + k
    # 16 exact fp16 products summed in fp32: |error| ≤ 16·u32·Σ|a_ik b_kj|.
    want = a_mat @ b_mat + 1
    bound = 16 * T.U32 * (a_mat.abs() @ b_mat.abs() + 1)
    assert ((out.double().view(16, 16) - want).abs() <= bound).all()


# ---------------------------------------------------------------------------------------------
# the engine through the CUDA kernels vs the float64 references
# ---------------------------------------------------------------------------------------------


def _tolerance(dtype, n):
    return T.TOL_F32 if dtype == torch.float32 else T.tol_16bit(dtype, n)


def _compare(x, y, dtype, estimator, batch, layers=2):
    xs, ys = [x.to(dtype)] * layers, [y.to(dtype)] * layers
    ref = cka.StreamingCKA(layers, estimator=estimator, backend="reference")
    got = cka.StreamingCKA(layers, estimator=estimator, backend="extension")
    for a in range(0, x.shape[0], batch):
        for m in (ref, got):
            m.update([t[a:a + batch] for t in xs], [t[a:a + batch] for t in ys])
    measures = cka.MEASURES if estimator == "exact" else ("linear",)
    return {m: float((got.compute(m) - ref.compute(m)).abs().max()) for m in measures}


def integer_pair(n, d1, d2, seed, pad=0):
    """x (n + pad, d1), y (n + pad, d2), float64 holding small integers, every column summing to
    zero over the first n rows (pairs of rows ±v); the last `pad` rows are padding full of NaN.

    Centering then subtracts exactly 0, each operand is exact in bf16/fp16, every Gram entry and
    product sum is an integer far below 2^24, so fp32 tensor-core accumulation and the kernels'
    float64 reductions are exact: the engine must agree with float64 to its final roundoff."""
    g = T.gen(seed)
    a = torch.randint(-3, 4, (n // 2, d1), generator=g, dtype=torch.float64)
    b = a[:, torch.arange(d2) % d1] + torch.randint(-2, 3, (n // 2, d2), generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    x, y = torch.cat([a, -a])[perm], torch.cat([b, -b])[perm]
    nan = lambda d: torch.full((pad, d), float("nan"), dtype=torch.float64)  # noqa: E731
    return torch.cat([x, nan(d1)]), torch.cat([y, nan(d2)])


# Relative error of the float64 combination of exact integer moments (a few dozen roundings of 2^-53).
TOL_EXACT_INTEGERS = 1e-10


@pytest.mark.parametrize("space,n,d1,d2", [("sample", 150, 100, 90), ("feature", 300, 70, 131)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unbiased_moments_are_exact_on_integer_inputs(emu, space, n, d1, d2, dtype):
    """HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L) of one minibatch: sample space runs offdiag_kernel over
    3 × 3 row tiles (n = 150: a partial one), feature space syrk_kernel<reduce> over D = 201 (tiles
    straddling the X|Y border); 7 padded NaN rows are masked out."""
    x, y = integer_pair(n, d1, d2, seed=74, pad=7)
    mask = torch.cat([torch.ones(n), torch.zeros(7)])
    xc, yc = x[:n], y[:n]
    k, l = xc @ xc.T, yc @ yc.T
    want = torch.tensor([float(cka.hsic1(k, l)), float(cka.hsic1(k, k)), float(cka.hsic1(l, l))], dtype=torch.float64)
    kernel = "offdiag_kernel" if space == "sample" else "syrk_kernel"
    before = emu(kernel)
    acc = torch.zeros(2, 3, dtype=torch.float64)
    _ext.extension().unbiased_update([x.to(dtype)] * 2, [y.to(dtype)] * 2, mask, acc, n, False, space)
    assert emu(kernel) - before == 1
    rel = ((acc - want).abs() / want.abs()).max()
    assert rel < TOL_EXACT_INTEGERS, (acc, want)


@pytest.mark.parametrize("syrk,dtype,accum", [
    ("0", torch.bfloat16, torch.float64), ("1", torch.bfloat16, torch.float64),
    ("0", torch.float16, torch.float64), ("1", torch.float16, torch.float64),
    # float32 statistics: syrk_kernel adds each batch's products straight into the running sums
    ("1", torch.bfloat16, torch.float32)])
def test_exact_statistics_are_exact_on_integer_inputs(emu, syrk, dtype, accum, monkeypatch):
    """Exact estimator, cuBLAS-role bmm (SYRK 0) or syrk_kernel storing Sxx, Syy, Syx (SYRK 1), over
    two passes: the second after reset_tuned, which keeps XᵀX and skips its tiles (skip_xx). With
    float64 statistics each batch's fp32 products are staged and added; with float32 ones (accum) the
    kernel accumulates into the statistics themselves, over the two batches of each pass."""
    monkeypatch.setenv("DEPTHFAST_CKA_SYRK", syrk)
    monkeypatch.setattr(cka_engine, "_GRAM_ACCUM_DTYPE", accum)
    n, d1, d2 = 160, 70, 131
    # Two batches, each summing to zero: the shift (the first batch's mean) is exactly 0.
    x, y1 = (torch.cat(t) for t in zip(integer_pair(n // 2, d1, d2, 75), integer_pair(n // 2, d1, d2, 76)))
    y2 = torch.cat([integer_pair(n // 2, d1, d2, 77)[1], integer_pair(n // 2, d1, d2, 78)[1]])
    halves = [slice(0, n // 2), slice(n // 2, n)]
    got = cka.StreamingCKA(3, estimator="exact", backend="extension")
    before = emu("syrk_kernel")
    for y in (y1, y2):
        if y is y2:
            got.reset_tuned()
        for h in halves:
            got.update([x[h].to(dtype)] * 3, [y[h].to(dtype)] * 3)
        for measure, fn in (("linear", cka.linear_cka), ("debiased", cka.debiased_cka),
                            ("procrustes", cka.procrustes_distance)):
            want = float(fn(x, y))
            err = float((got.compute(measure) - want).abs().max())
            assert err < TOL_EXACT_INTEGERS * max(1.0, abs(want)), (measure, err)
    assert emu("syrk_kernel") - before == (4 if syrk == "1" else 0)


# (hostile input, batch): exact → prepare_kernel (+ cuBLAS-role bmm); unbiased → prepare_kernel and
# syrk_kernel<reduce> when d1 + d2 ≤ batch (feature space), offdiag_kernel otherwise (sample space).
CASES = {
    "massive_offsets": 256,  # feature space, widths multiples of the 64 tile
    "d_not_multiple_of_tile": 350,  # feature space, D = 201: a partial tile; n = 700 = 2 × 350
    "n_lt_d": 20,  # sample space, one partial 64-row tile
    "rank_deficient": 80,  # sample space, d1 + d2 = 88 > 80: two row tiles, a partial one
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_kernels_match_reference(emu, name, dtype):
    x, y = T.hostile(name, seed=70)
    batch = CASES[name]
    x, y = x[: 2 * batch], y[: 2 * batch]
    d1, d2 = x.shape[1], y.shape[1]
    before = {k: emu(k) for k in ("prepare_kernel", "syrk_kernel", "offdiag_kernel")}
    errors = {"exact": _compare(x, y, dtype, "exact", batch), "unbiased": _compare(x, y, dtype, "unbiased", batch)}
    ran = {k: emu(k) - v for k, v in before.items()}
    tol = _tolerance(dtype, batch)
    assert all(e < tol for est in errors.values() for e in est.values()), (errors, tol)
    assert ran["prepare_kernel"] == 2 * 2 * 2  # (x, y) × 2 batches × 2 estimators; 2 layers in one launch
    sixteen_bit = dtype != torch.float32
    feature = d1 + d2 <= batch
    # One width: the change form (D staged by prepare_kernel from y and x); its unbiased moments are
    # device bmm products (gram_moments_change / offdiag_sums_change_tiled in cka.cpp): the fused
    # reductions below serve the old form of different widths only, and must not run on D.
    fused = sixteen_bit and d1 != d2
    assert ran["syrk_kernel"] == (2 if fused and feature else 0), ran
    assert ran["offdiag_kernel"] == (2 if fused and not feature else 0), ran


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_syrk_exact_path_and_reused_base_statistics(emu, dtype, monkeypatch):
    """DEPTHFAST_CKA_SYRK=1: the one-launch symmetric Gram kernel stores Sxx, Syy, Syx; after
    reset_tuned it skips the tiles of the kept XᵀX (skip_xx) and must still give the same CKA."""
    monkeypatch.setenv("DEPTHFAST_CKA_SYRK", "1")
    x, y = T.hostile("d_not_multiple_of_tile", seed=71)  # D = 70 + 131: tiles straddle the X|Y border
    x, y = x[:400].to(dtype), y[:400].to(dtype)
    y2 = (0.5 * y.double() + 0.5 * torch.randn(y.shape, generator=T.gen(72), dtype=torch.float64)).to(dtype)
    before = emu("syrk_kernel")
    got = cka.StreamingCKA(3, estimator="exact", backend="extension")
    ref = cka.StreamingCKA(3, estimator="exact", backend="reference")
    for tuned in (y, y2):
        for m in (got, ref):
            if tuned is y2:
                m.reset_tuned()
            for a in range(0, 400, 200):
                m.update([x[a:a + 200]] * 3, [tuned[a:a + 200]] * 3)
        for measure in cka.MEASURES:
            err = float((got.compute(measure) - ref.compute(measure)).abs().max())
            assert err < T.tol_16bit(dtype, 200), (measure, err)
    assert emu("syrk_kernel") - before == 4


def test_prepare_many_layers_strided_rows_and_nan_padding(emu):
    """66 layers (two launches of at most 64), rows with a stride wider than d, padding holding NaN
    and inf: prepare_kernel reads each layer through its own row stride and never counts padding."""
    g = T.gen(73)
    layers, b, s, d1, d2 = 66, 3, 20, 40, 24
    wide = (torch.randn(layers, b, s, d1 + 9, generator=g) + 200.0 * (torch.arange(d1 + 9) < 2)).bfloat16()
    xs = [w[..., :d1] for w in wide]  # views: row stride d1 + 9
    ys = [(x[..., :d2].float() + 0.5 * torch.randn(b, s, d2, generator=g)).bfloat16() for x in xs]
    assert xs[0].stride(1) == d1 + 9
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 15:] = 0
    mask[2, 12:] = 0
    for x, y in zip(xs, ys):
        x[mask == 0] = float("nan")
        y[mask == 0] = float("inf")
    before = emu("prepare_kernel")
    for estimator in ("exact", "unbiased"):
        ref = cka.StreamingCKA(layers, estimator=estimator, backend="reference")
        got = cka.StreamingCKA(layers, estimator=estimator, backend="extension")
        for m in (ref, got):
            m.update([x[:2] for x in xs], [y[:2] for y in ys], mask[:2])
            m.update([x[2:] for x in xs], [y[2:] for y in ys], mask[2:])
        r, o = ref.compute(), got.compute()
        assert torch.isfinite(o).all()
        assert float((o - r).abs().max()) < T.tol_16bit(torch.bfloat16, 20), estimator
    assert emu("prepare_kernel") - before == 2 * 2 * 2 * 2  # estimators × updates × (x, y) × 2 launches


# ---------------------------------------------------------------------------------------------
# the same tests under AddressSanitizer: no kernel reads or writes outside its buffers
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("DEPTHFAST_EMU_ASAN") == "1", reason="this is the sanitized run itself")
@pytest.mark.slow
def test_kernels_stay_inside_their_buffers_under_asan():
    """Every global access of the kernels lands in a torch CPU allocation and every __shared__ array
    is a static: ASan aborts at the first byte outside them (≈ 90 s: its own build, then this file)."""
    cxx = os.environ.get("CXX", "c++")
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip(f"{cxx} has no AddressSanitizer runtime")
    script = os.path.join(REPO, "tests", "cuda_emu", "sanitize.sh")
    env = {k: v for k, v in os.environ.items() if k != "DEPTHFAST_EMU_BUILD"}  # its own build directory
    res = subprocess.run(["bash", script], env=dict(env, PYTHON=sys.executable), capture_output=True, text=True,
                         timeout=1200)
    report = res.stdout[-3000:] + res.stderr[-3000:]
    assert res.returncode == 0 and " passed" in res.stdout and "AddressSanitizer: " not in report, report


# ---------------------------------------------------------------------------------------------
# run-time safety and relative accuracy through the CUDA dispatch (issues 11, 12)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_2d_inputs_behave_as_on_the_cpu_build(emu, estimator, dtype):
    """Rows wider than d, a transposed buffer, every other column: the CUDA kernels read rows by their
    stride and need unit column stride, so cka.cpp copies the last two; before, the CUDA path refused
    them ("activations need unit column stride") while the CPU build took them."""
    x, y = T.pair(96, 20, 12, seed=92, offset=1e3)
    x, y = x.to(dtype), y.to(dtype)
    ref = cka.StreamingCKA(2, estimator=estimator, backend="reference")
    for h in (slice(0, 48), slice(48, 96)):
        ref.update([x[h]] * 2, [y[h]] * 2)
    want = ref.compute()
    before = emu("prepare_kernel")
    for name, (xv, yv) in zip(T.strided_layouts(x), zip(T.strided_layouts(x).values(), T.strided_layouts(y).values())):
        m = cka.StreamingCKA(2, estimator=estimator, backend="extension")
        for h in (slice(0, 48), slice(48, 96)):
            m.update([xv[h]] * 2, [yv[h]] * 2)
        err = float((m.compute() - want).abs().max())
        assert err < _tolerance(dtype, 48), (name, err)
    assert emu("prepare_kernel") - before == 4 * 2 * 2  # layouts × updates × (x, y): the kernels ran


@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
@pytest.mark.parametrize("pooling", ["token", "mean"])
def test_nan_and_inf_in_padding_through_the_kernels(emu, estimator, pooling):
    x, y, mask = T._padded_pair()
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        xf, yf = x.clone().bfloat16(), y.clone().bfloat16()
        xf[mask == 0] = fill
        yf[mask == 0] = -fill if fill == float("inf") else fill
        m = cka.StreamingCKA(2, pooling=pooling, estimator=estimator, backend="extension")
        for sl in (slice(0, 3), slice(3, 5)) if pooling == "token" else (slice(0, 5),):
            m.update([xf[sl], xf[sl]], [yf[sl], yf[sl]], mask[sl])
        results.append(m.compute())
    assert torch.isfinite(results[0]).all()
    for r in results[1:]:
        assert (r - results[0]).abs().max() < 1e-12, results  # same operands: the same bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nearly_identical_relative_error_through_the_kernels(emu, dtype):
    """1 − CKA ≈ 5e-5 … 2e-4: relative tolerances of test_cka.py (rel_tol_16bit for 16-bit operands,
    REL_TOL_F32 for fp32), exact and unbiased estimators; 16-bit: zero-mean channels (their shift is
    not Sterbenz-exact: the operand rounding's bias shows), fp32: offsets of 1e3."""
    for offset in (1e3,) if dtype == torch.float32 else (0.0,):
        x, y = T.nearly_identical(n=512, offset=offset)
        for estimator, (rel, c) in T.relative_change_errors(x, y, dtype, "extension").items():
            tol = T.REL_TOL_F32 if dtype == torch.float32 else T.rel_tol_16bit(dtype, c)
            assert rel < tol, (offset, estimator, rel, c, tol)


def test_device_failure_in_the_cuda_dispatch_falls_back(emu, monkeypatch, capsys):
    """The emulated CUDA build as the engine, failing like a _C built for another architecture in the
    second batch: the result equals the reference and the notice prints once."""
    monkeypatch.setattr(cka_engine, "_FALLBACK_NOTICE", [False])
    monkeypatch.setattr(cka_engine, "_BROKEN_DEVICES", set())
    batches = T._two_width_batches()
    ref = cka.StreamingCKA(3, backend="reference")
    for xs, ys, mask in batches:
        ref.update(xs, ys, mask)
    stand_in = T.FailingExtension(ok=2)  # wraps the emulated module (emu swapped it in)
    assert stand_in.real.with_cuda
    monkeypatch.setattr(_ext, "_C", stand_in)
    got = cka.StreamingCKA(3)
    for xs, ys, mask in batches:
        got.update(xs, ys, mask)
    assert got.backend == "reference"
    assert (got.compute() - ref.compute()).abs().max() < T.TOL_F32
    assert capsys.readouterr().err.count("depthfast: the compiled CKA engine failed") == 1
