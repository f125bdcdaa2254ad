"""The CUDA kernels on a device without bf16 tensor cores (Turing, sm_75), under the CPU emulator.

WMMA has no bf16 fragments below sm_80, so csrc/cka_cuda.cu has a SIMT variant of offdiag_kernel and
syrk_kernel that the host picks by the device's compute capability. The emulator (tests/cuda_emu)
reports a settable capability and counts warp-level WMMA products ("wmma::mma_sync"): on an
emulated sm_75 a bf16 group must run no WMMA product at all and still give the exact moments;
fp16 (WMMA from sm_70) keeps the tensor cores there, and bf16 gets them back from sm_80.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import test_cka_cuda_emulated as E
from depthfast import _ext, cka
from test_cka_cuda_emulated import emu, emulated_lib, emulated_module  # noqa: F401  (fixtures)

pytestmark = E.pytestmark


@pytest.fixture
def device_cc(emulated_lib):
    """Sets the emulated device's compute capability for one test (9.0 again afterwards)."""
    emulated_lib.cuda_emu_set_compute_capability.argtypes = [ctypes.c_int]
    yield emulated_lib.cuda_emu_set_compute_capability
    emulated_lib.cuda_emu_set_compute_capability(90)


def _moments(x, y, n, dtype, space):
    acc = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.cat([torch.ones(n), torch.zeros(x.shape[0] - n)])
    _ext.extension().unbiased_update([x.to(dtype)] * 2, [y.to(dtype)] * 2, mask, acc, n, False, space)
    return acc


@pytest.mark.parametrize("space,n,d1,d2,kernel", [("sample", 150, 100, 90, "offdiag_kernel"),
                                                   ("feature", 300, 70, 131, "syrk_kernel")])
@pytest.mark.parametrize("cc,dtype,wmma", [(75, torch.bfloat16, False), (75, torch.float16, True),
                                           (80, torch.bfloat16, True)])
def test_kernel_variant_follows_compute_capability(emu, device_cc, space, n, d1, d2, kernel, cc, dtype, wmma):
    """HSIC₁ moments of integer inputs (exact in fp32 accumulation, see E.integer_pair) through the
    kernel variant the capability selects: WMMA products only where the device has them for dtype."""
    device_cc(cc)
    x, y = E.integer_pair(n, d1, d2, seed=81, pad=5)
    xc, yc = x[:n], y[:n]
    k, l = xc @ xc.T, yc @ yc.T
    want = torch.tensor([float(cka.hsic1(k, l)), float(cka.hsic1(k, k)), float(cka.hsic1(l, l))], dtype=torch.float64)
    launches, products = emu(kernel), emu("wmma::mma_sync")
    acc = _moments(x, y, n, dtype, space)
    assert emu(kernel) - launches == 1
    assert (emu("wmma::mma_sync") > products) == wmma
    rel = ((acc - want).abs() / want.abs()).max()
    assert rel < E.TOL_EXACT_INTEGERS, (acc, want)


def test_simt_exact_statistics_match_reference(emu, device_cc, monkeypatch):
    """Exact estimator through syrk_kernel's storing SIMT variant (DEPTHFAST_CKA_SYRK=1) on sm_75,
    bf16, hostile widths (D = 201: tiles straddle the X|Y border): same CKA as the reference."""
    monkeypatch.setenv("DEPTHFAST_CKA_SYRK", "1")
    device_cc(75)
    x, y = E.T.hostile("d_not_multiple_of_tile", seed=82)
    x, y = x[:400].bfloat16(), y[:400].bfloat16()
    got = cka.StreamingCKA(2, estimator="exact", backend="extension")
    ref = cka.StreamingCKA(2, estimator="exact", backend="reference")
    launches, products = emu("syrk_kernel"), emu("wmma::mma_sync")
    for m in (got, ref):
        for a in range(0, 400, 200):
            m.update([x[a:a + 200]] * 2, [y[a:a + 200]] * 2)
    assert emu("syrk_kernel") - launches == 2 and emu("wmma::mma_sync") == products
    for measure in cka.MEASURES:
        err = float((got.compute(measure) - ref.compute(measure)).abs().max())
        assert err < E.T.tol_16bit(torch.bfloat16, 200), (measure, err)
