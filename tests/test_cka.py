"""CKA: float64 references against brute force, then the compiled engine against the references.

Tolerances (each derived where it is used):
  * reference vs brute force, both float64: 1e-10. Both are O(n·d) sums of products of centered
    values with unit roundoff 2^-53 ≈ 1.1e-16; even a condition factor of 1e4 leaves 1e-12.
  * engine on the CPU (float32 products, float64 sums and final combination) vs the float64
    reference on the *same* input values (16-bit inputs are upcast exactly, so bf16/fp16/fp32
    inputs share one bound): TOL_F32 below.
  * engine on CUDA with 16-bit inputs (tensor cores): the shifted operands are rounded to the input
    format once more: tol_16bit below (bf16, n = 256: 2.0e-3; fp16: 2.5e-4); fp32 on CUDA
    (TF32 off): TOL_F32.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from depthfast import _ext, cka
from depthfast.cka import engine as cka_engine
from depthfast.cka import stats as cka_stats
from depthfast.errors import DepthfastError

U32 = 2.0**-24
# fp32 Gram entries: blocked BLAS accumulation of the well-conditioned shifted operands gives a
# relative error ≲ √n·u (independent roundings), n ≤ 1024 per update here → ≲ 1.9e-6. CKA is a
# ratio of three quadratic forms of those entries: ≲ 4·√n·u ≈ 7.6e-6 < 1e-5, the target.
# Measured: ≤ 1e-8.
TOL_F32 = 1e-5
# CUDA 16-bit path: each shifted operand entry is rounded once more to the input format, unit
# roundoff u = 2^-8 (bf16) or 2^-11 (fp16) — exactly for channels within 2× of the shift
# (Sterbenz), so massive offsets do not enter. Worst case (all roundings aligned): each Gram
# entry moves ≤ 2u relative, each of the three norms ≤ 4u, |ΔCKA| ≤ 8u (bf16 3.1e-2). Rounding
# errors are independent, so in practice the change is a second-order bias (the rounding noise
# adds ≈ u²/3 of each variance to the diagonal: ≤ 2u²) plus a first-order fluctuation that
# averages over the n samples (≤ 8u/√n). Measured (CPU emulation, n = 1024, offsets 1e4):
# bf16 2.0e-5, fp16 8e-7.
def tol_16bit(dtype: torch.dtype, n: int) -> float:
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    return 2 * u * u + 8 * u / math.sqrt(n)

needs_ext = pytest.mark.skipif(_ext.extension() is None, reason="depthfast._C not built (pip install -e .)")
needs_cuda = pytest.mark.skipif(
    _ext.extension() is None or not torch.cuda.is_available(), reason="needs the extension and a CUDA device"
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pair(n: int, d1: int, d2: int, seed: int, noise: float = 0.5, offset: float = 0.0):
    """Correlated activations: y = x·W + noise, with optional massive offsets on a few channels."""
    g = gen(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    w = torch.randn(d1, d2, generator=g, dtype=torch.float64) / math.sqrt(d1)
    y = x @ w + noise * torch.randn(n, d2, generator=g, dtype=torch.float64)
    if offset:
        x[:, : max(1, d1 // 16)] += offset
        y[:, : max(1, d2 // 16)] -= offset
    return x, y


def brute_cka(x, y):
    """Biased HSIC with the centering matrix H = I − 11ᵀ/n, straight from the definition."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum())


def naive_hsic1(k, l):
    """HSIC₁ as a U-statistic over distinct index tuples (Song et al. 2012, Thm. 2 form):
    (1/(n)₂)Σ_{i≠j} K_ij L_ij + (1/(n)₄)Σ_{i,j,q,r distinct} K_ij L_qr − (2/(n)₃)Σ_{i,j,q distinct} K_ij L_iq."""
    n = k.shape[0]
    t2 = t3 = t4 = 0.0
    for i, j in itertools.permutations(range(n), 2):
        t2 += k[i, j] * l[i, j]
    for i, j, q in itertools.permutations(range(n), 3):
        t3 += k[i, j] * l[i, q]
    for i, j, q, r in itertools.permutations(range(n), 4):
        t4 += k[i, j] * l[q, r]
    ff = lambda m: math.prod(range(n - m + 1, n + 1))  # noqa: E731  falling factorial (n)_m
    return t2 / ff(2) + t4 / ff(4) - 2 * t3 / ff(3)


def random_orthogonal(d, seed):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------


def test_linear_cka_basics_and_invariances():
    x, y = pair(300, 24, 16, seed=1)
    assert abs(float(cka.linear_cka(x, x)) - 1.0) < 1e-12
    ref = float(cka.linear_cka(x, y))
    assert abs(ref - float(brute_cka(x, y))) < 1e-10
    q = random_orthogonal(16, 2)
    assert abs(float(cka.linear_cka(x, 3.7 * y @ q)) - ref) < 1e-10  # orthogonal + isotropic scaling
    assert abs(float(cka.linear_cka(x + 1e4, y)) - ref) < 1e-10  # translation (massive offsets)
    xs, ys = x[:10], y[:10]  # n < d takes the sample-space branch
    assert abs(float(cka.linear_cka(xs, ys)) - float(brute_cka(xs, ys))) < 1e-10


def test_hsic1_matches_u_statistic():
    g = gen(3)
    x, y = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    assert abs(float(cka.hsic1(k, l)) - naive_hsic1(k, l)) < 1e-10
    assert abs(float(cka.hsic1(k, k)) - naive_hsic1(k, k)) < 1e-10


def test_debiased_and_procrustes_references():
    x, y = pair(200, 12, 10, seed=4)
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l = xc @ xc.T, yc @ yc.T
    want = cka.hsic1(k, l) / torch.sqrt(cka.hsic1(k, k) * cka.hsic1(l, l))
    assert abs(float(cka.debiased_cka(x, y)) - float(want)) < 1e-10
    assert abs(float(cka.debiased_cka(x, x)) - 1.0) < 1e-12
    # Procrustes: the closed form equals the optimum over Q from the SVD of X̂ᵀŶ (d1 = d2 here).
    x2, y2 = pair(200, 10, 10, seed=5)
    xh = (x2 - x2.mean(0)) / torch.linalg.norm(x2 - x2.mean(0))
    yh = (y2 - y2.mean(0)) / torch.linalg.norm(y2 - y2.mean(0))
    u, _, vt = torch.linalg.svd(yh.T @ xh)
    best = torch.linalg.norm(xh - yh @ (u @ vt)) ** 2
    assert abs(float(cka.procrustes_distance(x2, y2)) - float(best)) < 1e-10
    assert float(cka.procrustes_distance(x2, 2.0 * x2 @ random_orthogonal(10, 6) + 5)) < 1e-10


def _stream(estimator, batches, backend="reference", measure="linear", layers=1, mask=None):
    m = cka.StreamingCKA(layers, estimator=estimator, backend=backend)
    for i, (x, y) in enumerate(batches):
        m.update([x] * layers, [y] * layers, None if mask is None else mask[i])
    return m.compute(measure)


@pytest.mark.parametrize("measure,fn", [("linear", cka.linear_cka), ("debiased", cka.debiased_cka),
                                        ("procrustes", cka.procrustes_distance)])
def test_exact_streaming_equals_concatenated_and_split_independent(measure, fn):
    x, y = pair(500, 20, 14, seed=7, offset=1e4)
    want = float(fn(x, y))
    for cuts in ([0, 500], [0, 13, 200, 500], [0, 250, 251, 500]):
        got = _stream("exact", [(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])], measure=measure)
        assert abs(float(got[0]) - want) < 1e-10, (cuts, float(got[0]), want)


def test_padding_never_counts():
    g = gen(8)
    acts_x, acts_y = torch.randn(3, 9, 6, generator=g), torch.randn(3, 9, 5, generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    want = float(cka.linear_cka(acts_x[mask.bool()], acts_y[mask.bool()]))
    acts_x[mask == 0] = 1e30  # garbage in padding
    acts_y[mask == 0] = float("nan")
    m = cka.StreamingCKA(1, backend="reference")
    m.update([acts_x], [acts_y], mask)
    assert abs(float(m.compute()[0]) - want) < 1e-10
    mean = cka.StreamingCKA(1, pooling="mean", backend="reference")
    mean.update([acts_x], [acts_y], mask)  # mean pooling: 3 samples, 1 per sequence; NaN padding ignored
    pooled = [torch.stack([a[i][mask[i].bool()].double().mean(0) for i in range(3)]) for a in (acts_x, acts_y)]
    assert abs(float(mean.compute()[0]) - float(cka.linear_cka(*pooled))) < 1e-10


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_unbiased_skips_tiny_batches_and_matches_hsic1(backend):
    if backend == "extension" and _ext.extension() is None:
        pytest.skip("depthfast._C not built")
    x, y = pair(40, 6, 5, seed=9)
    m = cka.StreamingCKA(1, estimator="unbiased", backend=backend)
    with pytest.warns(UserWarning, match="skipped a minibatch"):
        m.update([x[:3]], [y[:3]])
    m.update([x[3:20]], [y[3:20]])
    m.update([x[20:]], [y[20:]])
    got = float(m.compute()[0])
    assert math.isfinite(got)
    terms = []
    for a, b in ((3, 20), (20, 40)):
        xc, yc = x[a:b] - x[a:b].mean(0), y[a:b] - y[a:b].mean(0)
        k, l = xc @ xc.T, yc @ yc.T
        terms.append([float(cka.hsic1(k, l)), float(cka.hsic1(k, k)), float(cka.hsic1(l, l))])
    s = torch.tensor(terms, dtype=torch.float64).sum(0)
    assert abs(got - float(s[0] / torch.sqrt(s[1] * s[2]))) < (1e-10 if backend == "reference" else TOL_F32)
    only_tiny = cka.StreamingCKA(1, estimator="unbiased", backend=backend)
    with pytest.warns(UserWarning):
        only_tiny.update([x[:2]], [y[:2]])
    with pytest.raises(DepthfastError, match="no minibatch"):
        only_tiny.compute()


@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_reset_tuned_reuses_base_statistics(estimator, backend):
    if backend == "extension" and _ext.extension() is None:
        pytest.skip("depthfast._C not built")
    x, y1 = pair(240, 16, 16, seed=10, offset=1e3)
    _, y2 = pair(240, 16, 16, seed=11)
    cuts = [0, 80, 160, 240]
    m = cka.StreamingCKA(2, estimator=estimator, backend=backend)
    for a, b in zip(cuts, cuts[1:]):
        m.update([x[a:b]] * 2, [y1[a:b]] * 2)
    m.compute()
    m.reset_tuned()
    for a, b in zip(cuts, cuts[1:]):
        m.update([x[a:b]] * 2, [y2[a:b]] * 2)
    fresh = cka.StreamingCKA(2, estimator=estimator, backend=backend)
    for a, b in zip(cuts, cuts[1:]):
        fresh.update([x[a:b]] * 2, [y2[a:b]] * 2)
    tol = 1e-10 if backend == "reference" else TOL_F32
    assert (m.compute() - fresh.compute()).abs().max() < tol
    m.reset_tuned()  # a different probe set must be refused, not silently mixed
    x_other, _ = pair(240, 16, 16, seed=12)
    for a, b in zip(cuts[:-1], cuts[1:-1]):
        m.update([x_other[a:b]] * 2, [y2[a:b]] * 2)
    with pytest.raises(DepthfastError, match="same"):
        m.compute()


@needs_ext
def test_engine_mixed_dtypes_are_promoted():
    x, y = pair(200, 12, 10, seed=70)
    m = cka.StreamingCKA(1, backend="extension")
    m.update([x.float()], [y.to(torch.bfloat16)])
    want = cka.linear_cka(x.float(), y.to(torch.bfloat16))
    assert abs(float(m.compute()[0]) - float(want)) < TOL_F32


def test_bad_input_is_named():
    m = cka.StreamingCKA(2, backend="reference")
    with pytest.raises(ValueError, match="expected 2 layers"):
        m.update([torch.zeros(4, 3)], [torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="measure"):
        m.compute("cosine")
    with pytest.raises(ValueError, match="backend"):
        cka.StreamingCKA(1, backend="gpu")
    with pytest.raises(ValueError, match="needs estimator='exact'"):
        cka.StreamingCKA(1, estimator="unbiased").compute("procrustes")


# ---------------------------------------------------------------------------------------------
# compiled engine vs references, on hostile inputs
# ---------------------------------------------------------------------------------------------

HOSTILE = {
    # name: (n, d1, d2, offset, rank)
    "massive_offsets": (1024, 64, 64, 1e4, None),
    "rank_deficient": (512, 48, 40, 0.0, 5),
    "n_lt_d": (40, 96, 80, 10.0, None),
    "d_not_multiple_of_tile": (700, 70, 131, 1e3, None),
}


def hostile(name, seed):
    n, d1, d2, offset, rank = HOSTILE[name]
    x, y = pair(n, d1, d2, seed=seed, offset=offset)
    if rank is not None:
        g = gen(seed + 1)
        x = x[:, :rank] @ torch.randn(rank, d1, generator=g, dtype=torch.float64)
        y = 0.5 * x[:, :d2] + 0.1 * (y[:, :rank] @ torch.randn(rank, d2, generator=g, dtype=torch.float64))
    return x, y


def _debiased_amplification(x, y):
    """The feature-space debiased form subtracts Σk l from ‖Y'ᵀX'‖²: fp32 errors in the latter are
    amplified by ‖Y'ᵀX'‖² / |tr(K̃L̃)| (≈ 1 + d/n for independent features)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    big = float(torch.linalg.norm(yc.T @ xc) ** 2)
    off = big - float(((xc * xc).sum(1) * (yc * yc).sum(1)).sum())
    big_x = float(torch.linalg.norm(xc.T @ xc) ** 2)
    off_x = big_x - float(((xc * xc).sum(1) ** 2).sum())
    return max(big / abs(off), big_x / abs(off_x))


@needs_ext
@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_exact_matches_reference(name, dtype):
    x, y = hostile(name, seed=20)
    x, y = x.to(dtype), y.to(dtype)  # the reference sees the same (quantized) values
    batches = [(x[a:a + 300], y[a:a + 300]) for a in range(0, x.shape[0], 300)]
    for measure in cka.MEASURES:
        ref = _stream("exact", batches, "reference", measure)
        got = _stream("exact", batches, "extension", measure)
        tol = TOL_F32 * (_debiased_amplification(x.double(), y.double()) if measure == "debiased" else 1.0)
        assert (got - ref).abs().max() < tol, (measure, float(got[0]), float(ref[0]), tol)


@needs_ext
@pytest.mark.parametrize("layers,block", [(1, None), (48, None), (3, 32)])
def test_engine_many_layers_masks_and_block_split(layers, block, monkeypatch):
    monkeypatch.setattr(cka_engine, "_GRAM_BLOCK_OVERRIDE", block)  # 32 splits d=70 into 32+32+6 blocks
    g = gen(30)
    b, s, d1, d2 = 4, 16 if layers == 48 else 40, 70, 45
    xs = [torch.randn(b, s, d1, generator=g) + 300.0 * (torch.arange(d1) < 3) for _ in range(layers)]
    ys = [x[..., :d2] + 0.5 * torch.randn(b, s, d2, generator=g) for x in xs]
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s // 2:] = 0
    mask[3, 1:] = 0
    for t in (*xs, *ys):
        t[mask == 0] = float("nan")  # padding garbage must never count
    for estimator in ("exact", "unbiased"):
        ms = {be: cka.StreamingCKA(layers, estimator=estimator, backend=be) for be in ("reference", "extension")}
        for m in ms.values():
            m.update([x[:2] for x in xs], [y[:2] for y in ys], mask[:2])
            m.update([x[2:] for x in xs], [y[2:] for y in ys], mask[2:])
        ref, got = ms["reference"].compute(), ms["extension"].compute()
        assert torch.isfinite(got).all()
        assert (got - ref).abs().max() < TOL_F32, (estimator, (got - ref).abs().max())


@needs_ext
@pytest.mark.parametrize("space", ["feature", "sample"])
@pytest.mark.parametrize("n,d1,d2", [(96, 20, 12), (24, 40, 33)])
def test_engine_unbiased_both_spaces(space, n, d1, d2):
    x, y = pair(n, d1, d2, seed=40, offset=1e3)
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l = xc @ xc.T, yc @ yc.T
    want = torch.tensor([float(cka.hsic1(k, l)), float(cka.hsic1(k, k)), float(cka.hsic1(l, l))], dtype=torch.float64)
    acc = torch.zeros(1, 3, dtype=torch.float64)
    _ext.extension().unbiased_update([x.float()], [y.float()], None, acc, n, False, space)
    # HSIC₁ relative error: fp32 Gram entries (√n·u) amplified by the diagonal subtraction in the
    # feature form (‖Y'ᵀX'‖² / tr(K̃L̃)); the sample form reduces off-diagonal entries directly.
    amp = _debiased_amplification(x, y) if space == "feature" else 1.0
    assert ((acc[0] - want).abs() / want.abs()).max() < 4 * math.sqrt(n) * U32 * 8 * amp


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_16bit_operand_path_emulated_on_cpu(dtype):
    """The CUDA path's host logic for 16-bit inputs (operands rounded after the shift, split weights
    for the O(n·d) moments, fp32-accumulated products), run on the CPU: within tol_16bit."""
    ext = _ext.extension()
    x, y = hostile("massive_offsets", seed=60)
    xs, ys = [x.to(dtype)] * 2, [y.to(dtype)] * 2
    ext._set_emulate_tensor_cores(True)
    try:
        for estimator in ("exact", "unbiased"):
            ref = cka.StreamingCKA(2, estimator=estimator, backend="reference")
            got = cka.StreamingCKA(2, estimator=estimator, backend="extension")
            for a in range(0, x.shape[0], 256):
                for m in (ref, got):
                    m.update([t[a:a + 256] for t in xs], [t[a:a + 256] for t in ys])
            for measure in cka.MEASURES if estimator == "exact" else ("linear",):
                err = (got.compute(measure) - ref.compute(measure)).abs().max()
                assert err < tol_16bit(dtype, 256), (estimator, measure, float(err))
    finally:
        ext._set_emulate_tensor_cores(False)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
def test_engine_cuda_matches_reference(dtype, estimator):
    x, y = hostile("massive_offsets", seed=50)
    xs = [x.to(dtype)] * 4
    ys = [y.to(dtype)] * 4
    ref = cka.StreamingCKA(4, estimator=estimator, backend="reference")
    got = cka.StreamingCKA(4, estimator=estimator, backend="extension")
    # the user asks for TF32 (which would make fp32 a 10-bit format): the engine must not use it
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        for a in range(0, x.shape[0], 256):
            ref.update([t[a:a + 256] for t in xs], [t[a:a + 256] for t in ys])
            got.update([t[a:a + 256].cuda() for t in xs], [t[a:a + 256].cuda() for t in ys])
        tol = TOL_F32 if dtype == torch.float32 else tol_16bit(dtype, 256)
        for measure in cka.MEASURES if estimator == "exact" else ("linear",):
            assert (got.compute(measure) - ref.compute(measure)).abs().max() < tol, measure
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
def test_engine_cuda_production_probe_batches(dtype, estimator):
    """What real runs feed: probe batches of 32 texts × 128 tokens (RunConfig defaults, measure.py),
    (batch, seq, d) block outputs with a padding mask (NaN in the padding), d = 2048 (Pythia-1.4B: the
    symmetric block split gram_block takes), layers in one group; 1 − CKA ≈ 1e-4 (nearly identical) and
    relative tolerances of the section above, against float64 on the same values."""
    layers, b, s, d = 4, 32, 128, 2048
    g = gen(110)
    lengths = torch.randint(8, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    base = [torch.randn(b, s, d, generator=g) + 30.0 * (torch.arange(d) < 4) for _ in range(layers)]
    tuned = [x + 0.01 * torch.randn(x.shape, generator=g) for x in base]
    for t in (*base, *tuned):
        t[mask == 0] = float("nan")
    base, tuned = [t.to(dtype) for t in base], [t.to(dtype) for t in tuned]
    ref = cka.StreamingCKA(layers, estimator=estimator, backend="reference")
    got = cka.StreamingCKA(layers, estimator=estimator, backend="extension")
    for half in (slice(0, b // 2), slice(b // 2, b)):
        ref.update([t[half] for t in base], [t[half] for t in tuned], mask[half])
        got.update([t[half].cuda() for t in base], [t[half].cuda() for t in tuned], mask[half].cuda())
    c = 1.0 - ref.compute()
    rel = float(((1.0 - got.compute()) - c).abs().max() / c.min())
    tol = REL_TOL_F32 if dtype == torch.float32 else rel_tol_16bit(dtype, float(c.min()))
    assert rel < tol, (rel, tol, c)
    assert got.backend == "extension"  # no silent fall back on the GPU under test


# ---------------------------------------------------------------------------------------------
# the CUDA sources compile (nvcc only; the GPU build needs a CUDA torch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.skipif(os.environ.get("DEPTHFAST_NVCC_CHECK") != "1",
                    reason="opt-in (≈ 45–65 s on 2 cores): DEPTHFAST_NVCC_CHECK=1, or run bash csrc/check_nvcc.sh")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """≈ 45–65 s on 2 cores (nvcc -c of csrc/*.cu, -arch=sm_90, plus the host code's CUDA branch)."""
    script = os.path.join(os.path.dirname(__file__), "..", "csrc", "check_nvcc.sh")
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# run-time safety: device failures, TF32, strided inputs, NaN padding (issue 11)
# ---------------------------------------------------------------------------------------------

NO_KERNEL_IMAGE = "CUDA error: no kernel image is available for execution on the device"


class FailingExtension:
    """A stand-in for depthfast._C: the real engine for the first ``ok`` engine calls, then every
    call raises what a _C built for another GPU architecture raises (the launch fails before any
    state is touched, as csrc/cka.cpp orders it)."""

    def __init__(self, ok: int, message: str = NO_KERNEL_IMAGE):
        self.real, self.ok, self.message, self.calls = _ext.extension(), ok, message, 0
        self.with_cuda = True

    def gram_block(self, *a, **k):
        return self.real.gram_block(*a, **k)

    def _call(self, name, *args):
        self.calls += 1
        if self.calls > self.ok:
            raise RuntimeError(self.message)
        return getattr(self.real, name)(*args)

    def exact_update(self, *args):
        return self._call("exact_update", *args)

    def unbiased_update(self, *args):
        return self._call("unbiased_update", *args)


def _two_width_batches(seed=90, batches=3):
    """Three layers in two width groups (24, 24 | 16), three padded batches with NaN padding."""
    g = gen(seed)
    out = []
    for _ in range(batches):
        xs = [torch.randn(4, 12, d, generator=g) + 50.0 * (torch.arange(d) < 2) for d in (24, 24, 16)]
        ys = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1, 7:] = 0
        mask[3, 2:] = 0
        for t in (*xs, *ys):
            t[mask == 0] = float("nan")
        out.append((xs, ys, mask))
    return out


@needs_ext
@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
@pytest.mark.parametrize("ok", [0, 3])  # fails at the first call, or in the 2nd batch's 2nd width group
def test_device_failure_falls_back_to_reference_once(estimator, ok, monkeypatch, capsys):
    monkeypatch.setattr(cka_engine, "_FALLBACK_NOTICE", [False])
    monkeypatch.setattr(cka_engine, "_BROKEN_DEVICES", set())
    batches = _two_width_batches()
    ref = cka.StreamingCKA(3, estimator=estimator, backend="reference")
    for xs, ys, mask in batches:
        ref.update(xs, ys, mask)
    stand_in = FailingExtension(ok)
    monkeypatch.setattr(_ext, "_C", stand_in)
    got = cka.StreamingCKA(3, estimator=estimator)  # backend "auto"
    assert got.backend == "extension"
    for xs, ys, mask in batches:
        got.update(xs, ys, mask)
    assert got.backend == "reference" and stand_in.calls == ok + 1  # never called again after the failure
    assert got.num_samples == ref.num_samples
    measures = cka.MEASURES if estimator == "exact" else ("linear",)
    for measure in measures:  # engine part (groups done before the failure) within TOL_F32
        err = (got.compute(measure) - ref.compute(measure)).abs().max()
        assert err < TOL_F32, (measure, float(err))
    # a second accumulator on the same device goes straight to the reference: no second notice
    again = cka.StreamingCKA(3, estimator=estimator)
    for xs, ys, mask in batches:
        again.update(xs, ys, mask)
    assert again.backend == "reference" and stand_in.calls == ok + 1
    assert (again.compute() - ref.compute()).abs().max() < 1e-12
    err_text = capsys.readouterr().err
    assert err_text.count("depthfast: the compiled CKA engine failed") == 1, err_text
    assert "no kernel image" in err_text


@needs_ext
def test_device_failure_is_raised_when_the_engine_is_forced_and_other_errors_pass(monkeypatch):
    monkeypatch.setattr(cka_engine, "_FALLBACK_NOTICE", [False])
    monkeypatch.setattr(cka_engine, "_BROKEN_DEVICES", set())
    xs, ys, mask = _two_width_batches(batches=1)[0]
    monkeypatch.setattr(_ext, "_C", FailingExtension(0))
    with pytest.raises(DepthfastError, match="backend='extension'.*no kernel image"):
        cka.StreamingCKA(3, backend="extension").update(xs, ys, mask)
    monkeypatch.setattr(_ext, "_C", FailingExtension(0, message="cka: something else is wrong"))
    with pytest.raises(RuntimeError, match="something else"):  # not a device failure: never swallowed
        cka.StreamingCKA(3).update(xs, ys, mask)


def _fp32_precision():
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision


@pytest.fixture
def user_allows_tf32():
    """The user's process asks for TF32 (new API), restored after the test."""
    saved = _fp32_precision()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.fp32_precision = "tf32"
    yield ("tf32", "tf32")
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision = saved


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_tf32_is_off_inside_cka_and_the_user_setting_restored(backend, user_allows_tf32, monkeypatch):
    """A spy on every engine call and on every float64-reference update records the matmul precision
    in force: IEEE fp32 inside, the user's TF32 again outside, also after an exception."""
    if backend == "extension" and _ext.extension() is None:
        pytest.skip("depthfast._C not built")
    seen = []
    if backend == "extension":
        real = _ext.extension()

        class Spy:
            with_cuda = False
            gram_block = staticmethod(real.gram_block)

            @staticmethod
            def exact_update(*args):
                seen.append(_fp32_precision())
                return real.exact_update(*args)

            @staticmethod
            def unbiased_update(*args):
                seen.append(_fp32_precision())
                return real.unbiased_update(*args)

        monkeypatch.setattr(_ext, "_C", Spy)
    else:
        for cls in (cka_stats._ExactLayerStats, cka_stats._UnbiasedLayerStats):
            orig = cls.update

            def spy(self, x, y, _orig=orig):
                seen.append(_fp32_precision())
                return _orig(self, x, y)

            monkeypatch.setattr(cls, "update", spy)
    x, y = pair(64, 8, 6, seed=91)
    for estimator in ("exact", "unbiased"):
        m = cka.StreamingCKA(1, estimator=estimator, backend=backend)
        m.update([x], [y])
        assert _fp32_precision() == user_allows_tf32
        m.compute()
        assert _fp32_precision() == user_allows_tf32
        with pytest.raises(ValueError):  # an error inside the guarded region: still restored
            m.update([x], [y[:10]])
        assert _fp32_precision() == user_allows_tf32
    assert len(seen) == 2 and all(s == ("ieee", "ieee") for s in seen), seen
    # the per-text statistics' fp32 Grams too
    bmm_seen = []
    real_bmm = torch.bmm

    def bmm_spy(*a, **k):
        bmm_seen.append(_fp32_precision())
        return real_bmm(*a, **k)

    from depthfast import metrics

    monkeypatch.setattr(torch, "bmm", bmm_spy)
    metrics.per_text_hsic_batch([x.view(4, 16, 8)], [y.view(4, 16, 6)], torch.ones(4, 16), gram_dtype=torch.float32)
    monkeypatch.setattr(torch, "bmm", real_bmm)
    assert bmm_seen and all(s == ("ieee", "ieee") for s in bmm_seen)
    assert _fp32_precision() == user_allows_tf32


def strided_layouts(x: torch.Tensor):
    """The same (n, d) values in four memory layouts: contiguous, rows wider than d (a column slice
    of a wider tensor), a transposed buffer (column stride n), every other column of a 2d-wide one."""
    n, d = x.shape
    wide = torch.full((n, d + 5), float("nan"), dtype=x.dtype)
    wide[:, :d] = x
    trans = x.T.contiguous().T
    every_other = torch.full((n, 2 * d), float("nan"), dtype=x.dtype)
    every_other[:, ::2] = x
    layouts = {"contiguous": x, "row_stride": wide[:, :d], "transposed": trans, "column_stride_2": every_other[:, ::2]}
    assert layouts["row_stride"].stride() == (d + 5, 1) and layouts["transposed"].stride() == (1, n)
    return layouts


@pytest.mark.parametrize("backend", ["reference", "extension"])
@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
def test_strided_2d_inputs_are_accepted(backend, estimator):
    if backend == "extension" and _ext.extension() is None:
        pytest.skip("depthfast._C not built")
    x, y = pair(96, 20, 12, seed=92, offset=1e3)
    x, y = x.float(), y.float()
    want = None
    for name, (xv, yv) in zip(strided_layouts(x), zip(strided_layouts(x).values(), strided_layouts(y).values())):
        m = cka.StreamingCKA(2, estimator=estimator, backend=backend)
        m.update([xv[:48], xv[:48]], [yv[:48], yv[:48]])
        m.update([xv[48:], xv[48:]], [yv[48:], yv[48:]])
        got = m.compute()
        want = got if want is None else want
        assert torch.isfinite(got).all() and (got - want).abs().max() < 1e-12, name


def _padded_pair(seed=93, b=5, s=11, d1=14, d2=9):
    g = gen(seed)
    x = torch.randn(b, s, d1, generator=g) + 30.0 * (torch.arange(d1) < 2)
    y = x[..., :d2] + 0.4 * torch.randn(b, s, d2, generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 4:] = 0
    mask[4, 9:] = 0
    return x, y, mask


@pytest.mark.parametrize("backend", ["reference", "extension"])
@pytest.mark.parametrize("estimator", ["exact", "unbiased"])
@pytest.mark.parametrize("pooling", ["token", "mean"])
def test_nan_and_inf_in_padding_never_reach_a_statistic(backend, estimator, pooling):
    """inf/NaN in padded positions (a masked softmax's output, garbage) give the same CKA as clean
    zeros there: token pooling selects real rows, mean pooling averages with where (NaN·0 = NaN
    before, which turned into "no variance")."""
    if backend == "extension" and _ext.extension() is None:
        pytest.skip("depthfast._C not built")
    x, y, mask = _padded_pair()
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        xf, yf = x.clone(), y.clone()
        xf[mask == 0] = fill
        yf[mask == 0] = -fill if fill == float("inf") else fill
        m = cka.StreamingCKA(2, pooling=pooling, estimator=estimator, backend=backend)
        # token pooling: two minibatches; mean pooling: one of 5 samples (HSIC₁ needs > 3)
        for sl in (slice(0, 3), slice(3, 5)) if pooling == "token" else (slice(0, 5),):
            m.update([xf[sl], xf[sl]], [yf[sl], yf[sl]], mask[sl])
        results.append(m.compute())
    assert torch.isfinite(results[0]).all()
    tol = 1e-12 if backend == "reference" else TOL_F32
    for r in results[1:]:
        assert (r - results[0]).abs().max() < tol, (results, pooling)
    # and the mean samples are the means of the real tokens only
    pooled = cka.pool_activations(torch.where(mask.bool().unsqueeze(-1), x, float("nan")), mask, "mean")
    want = torch.stack([x[i][mask[i].bool()].double().mean(0) for i in range(x.shape[0])])
    assert torch.allclose(pooled, want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# numerics where they can fail: relative error on 1 − CKA ≈ 1e-4 (issue 12)
# ---------------------------------------------------------------------------------------------

# Nearly identical X, Y (Y = X + 0.01·σ·noise): 1 − CKA = c ≈ 5e-5 … 3e-4, so the tolerances are on
# |Δ(1 − CKA)| / c. Derivation (first order in the errors E of the centered Grams, C ≈ Cxx ≈ Cyy ≈ Cyx):
#     δCKA = [2⟨C, E_yx⟩ − ⟨C, E_xx⟩ − ⟨C, E_yy⟩] / ‖C‖²_F.
# Independent roundings of relative size ε per Gram entry give each inner product a standard deviation
# ε·(Σ C⁴)^½ ≈ ε‖C‖²/√d (d ≥ 32 comparable eigenvalues here), so at 3σ |δ(1 − CKA)| / c ≤ 3√6·ε / (√d·c):
#   * float64 reference: ε ≈ √t·2⁻⁵³ (t = 256 rows per update) → ≤ 1e-9: REL_TOL_F64 = 1e-8.
#   * engine, fp32 products of the (exactly upcast) inputs, float64 sums: ε ≤ √t·2⁻²⁴ for a naive
#     sequential dot product (blocked BLAS is far better): 7.35·16·6e-8 / (8·1e-4) = 8.8e-3 → REL_TOL_F32.
#     Measured (d = 64, 4 updates of 256): exact 1.4e-4, unbiased 4.6e-4 (fp32); 1.2e-4, 1.1e-4 (bf16). TF32 (ε ≈ 2⁻¹¹) would be ≈ 8000× that, fp32 sums over many updates see
#     test_float64_gram_sums_keep_relative_accuracy_over_a_study_sized_probe.
#   * 16-bit tensor-core operands (CUDA path, emulated): every shifted operand entry is rounded to the
#     input format once (unit roundoff u), which adds ≈ u²/3 of each entry's square to the variances
#     but not to the cross term: a bias of 1 − CKA ≤ 2u²/3, relative 2u²/(3c) (bf16: ≤ 0.1 at c = 1e-4,
#     fp16: 1.6e-3), on top of REL_TOL_F32. Measured (CPU emulation, d = 64, zero-mean channels, whose
#     shift is not Sterbenz-exact): bf16 1.2e-2 exact, 1.7e-2 unbiased; fp16 1.1e-3, 1.0e-3.
REL_TOL_F64 = 1e-8
REL_TOL_F32 = 1e-2


def rel_tol_16bit(dtype: torch.dtype, c: float) -> float:
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    return 2 * u * u / (3 * c) + REL_TOL_F32


def nearly_identical(n=1024, d=64, seed=95, offset=1e3, noise=0.01):
    """x (n, d) anisotropic with offsets on two channels, y = x + noise·σ_channel·N(0, 1): 1 − CKA ≈ noise²/2."""
    g = gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ (torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5)
    x[:, :2] += offset
    y = x + noise * torch.randn(n, d, generator=g, dtype=torch.float64) * x.std(0)
    return x, y


def relative_change_errors(x, y, dtype, backend, estimators=("exact", "unbiased"), batch=256):
    """{estimator: (|Δ(1 − CKA)| / (1 − CKA), 1 − CKA)} of ``backend`` vs float64 on the quantized inputs."""
    xq, yq = x.to(dtype), y.to(dtype)
    out = {}
    for estimator in estimators:
        ms = {b: cka.StreamingCKA(2, estimator=estimator, backend=b) for b in ("reference", backend)}
        for a in range(0, x.shape[0], batch):
            for m in ms.values():
                m.update([xq[a:a + batch]] * 2, [yq[a:a + batch]] * 2)
        c_ref = 1.0 - ms["reference"].compute().double()
        c_got = 1.0 - ms[backend].compute().double()
        if estimator == "exact":  # the reference itself against linear_cka on the concatenation (float64)
            c_cat = 1.0 - float(cka.linear_cka(xq, yq))
            assert abs(float(c_ref[0]) - c_cat) / c_cat < REL_TOL_F64
        out[estimator] = (float(((c_got - c_ref).abs() / c_ref).max()), float(c_ref.min()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_nearly_identical_representations_relative_error(dtype, backend):
    if backend == "extension" and _ext.extension() is None:
        pytest.skip("depthfast._C not built")
    x, y = nearly_identical()
    tol = REL_TOL_F64 if backend == "reference" else REL_TOL_F32
    for estimator, (rel, c) in relative_change_errors(x, y, dtype, backend).items():
        assert 2e-5 < c < 1e-3, c  # the regime the tolerance is derived for
        assert rel < tol, (estimator, rel, c, tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearly_identical_16bit_operands_emulated_on_cpu(dtype):
    """The CUDA path's 16-bit operand rounding (host logic, on the CPU): within rel_tol_16bit."""
    ext = _ext.extension()
    x, y = nearly_identical(offset=0.0)  # offsets are exact (Sterbenz); zero-mean channels are the hard case
    ext._set_emulate_tensor_cores(True)
    try:
        errors = relative_change_errors(x, y, dtype, "extension")
    finally:
        ext._set_emulate_tensor_cores(False)
    for estimator, (rel, c) in errors.items():
        assert rel < rel_tol_16bit(dtype, c), (estimator, rel, c)


def test_float64_gram_sums_keep_relative_accuracy_over_a_study_sized_probe(monkeypatch):
    """256 updates of 64 rows (4 layers, d = 32, 1 − CKA ≈ 1e-4). Adding U updates into an fp32 running
    sum rounds each add by ±½ ulp of the running value: entry error std ≈ 2⁻²⁴·|S|·√U / 3, and with
    the first-order δCKA above the relative error on 1 − CKA is ≈ √6/3·2⁻²⁴·√U / (√d·c) ≈ 1.4e-3 here
    (benchmarks/bench_cka.py --accuracy: 2.4e-3 after 256 updates of 4096 at d = 64, growing as √U).
    float64 sums leave only each update's own fp32 product error, which averages down over updates
    (bench, d = 64, 4096-row updates: 1.8e-5). accum_tol = 5e-4 sits between: the widened sums must
    pass it, and for the old fp32 layout the worst of 4 independent layers must fail it (else this test
    could not tell them apart). Measured here (MKL, 2 cores): fp32 sums 0.8–3.2e-3 per layer, float64
    sums 1.3e-6–1.1e-4."""
    if _ext.extension() is None:
        pytest.skip("depthfast._C not built")
    # The statistics of X and Y (the old form): the change-relative form's errors are relative to the
    # change, and with it even fp32 sums stay below accum_tol (test_change_relative_* below).
    from depthfast.cka import stats as cka_stats

    monkeypatch.setattr(cka_stats, "_CHANGE_FORM", False)
    accum_tol = 5e-4
    layers, d, t, updates = 4, 32, 64, 256
    g = gen(96)
    xs = [torch.randn(updates * t, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5) + 5.0
          for _ in range(layers)]
    ys = [x + 0.01 * torch.randn(x.shape, generator=g) * x.std(0) for x in xs]
    # float64 truth on the concatenation (the streamed reference equals it to 1e-10, tested above)
    c = torch.stack([1.0 - cka.linear_cka(x, y) for x, y in zip(xs, ys)])
    assert ((c > 3e-5) & (c < 3e-4)).all(), c
    rel = {}
    for name, dt in (("float32", torch.float32), ("float64", torch.float64)):
        monkeypatch.setattr(cka_engine, "_GRAM_ACCUM_DTYPE", dt)  # read when the state is allocated
        m = cka.StreamingCKA(layers, backend="extension")
        for a in range(0, updates * t, t):
            m.update([x[a:a + t] for x in xs], [y[a:a + t] for y in ys])
        assert m._layers[0].sxx.dtype == dt
        rel[name] = ((1.0 - m.compute()) - c).abs() / c
    assert rel["float64"].max() < accum_tol, rel
    assert rel["float32"].max() > accum_tol, rel  # the old layout loses it: the test can fail



# ---------------------------------------------------------------------------------------------
# per-text HSIC₁ (metrics.per_text_hsic_batch, the bootstrap's input) and the memory estimate
# ---------------------------------------------------------------------------------------------


def per_text_hsic_loop(base_acts, tuned_acts, mask):
    """The previous implementation, kept as the float64 reference: one text at a time, its real
    rows selected, centered, float64 n×n Grams, ``cka.hsic1``; texts with n ≤ 3 left out."""
    rows = []
    for i in range(mask.shape[0]):
        keep = mask[i].bool()
        if int(keep.sum()) <= 3:
            continue
        h = []
        for x, y in zip(base_acts, tuned_acts):
            xc, yc = x[i][keep].double(), y[i][keep].double()
            xc, yc = xc - xc.mean(0), yc - yc.mean(0)
            k, l = xc @ xc.T, yc @ yc.T
            h.append(cka.hsic1(torch.stack([k, k, l]), torch.stack([l, k, l])))
        rows.append(torch.stack(h))
    return torch.stack(rows) if rows else torch.zeros(0, len(base_acts), 3, dtype=torch.float64)


def _texts(seed, lengths, seq, widths, offset=1e3, noise=0.01):
    g = gen(seed)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    xs = [torch.randn(len(lengths), seq, d, generator=g) + offset * (torch.arange(d) < 2) for d in widths]
    ys = [x + noise * torch.randn(x.shape, generator=g) for x in xs]
    for t in (*xs, *ys):
        t[mask == 0] = float("nan")  # padding garbage must not reach any text's statistics
    return xs, ys, mask


def _per_text_change(h):
    """1 − CKA_S of the per-text bootstrap's ratio of sums over all texts, per layer."""
    return 1.0 - h[:, :, 0].sum(0) / (h[:, :, 1].sum(0) * h[:, :, 2].sum(0)).sqrt()


def test_per_text_hsic_batch_matches_the_per_text_float64_loop():
    """Texts of lengths 1 … seq, including n ≤ 3 (HSIC₁ undefined: left out, as before), NaN padding.
    CPU default (float64): to float64 roundoff. fp32 Grams (the GPU path, run here on the CPU): per
    triple, each Gram entry carries a relative error ≲ √d·2⁻²⁴ (≤ 1.9e-6 at d = 1024), the sums over
    n² entries stay within that: REL 2e-5 (measured ≤ 2.5e-6 up to d = 2048); on the bootstrap's
    1 − CKA_S (≈ 1e-4 here) the triples' errors partly cancel: ABS 1e-6 (measured ≤ 4.1e-7 at d = 1024)."""
    from depthfast import metrics

    lengths = [1, 2, 3, 4, 5, 17, 40, 40, 23, 3, 8]
    xs, ys, mask = _texts(98, lengths, 40, (24, 24, 64))
    want = per_text_hsic_loop(xs, ys, mask)
    assert want.shape == (len([n for n in lengths if n > 3]), 3, 3)
    got = metrics.per_text_hsic_batch(xs, ys, mask)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == want.shape
    assert ((got - want).abs() / want.abs()).max() < 1e-10
    f32 = metrics.per_text_hsic_batch(xs, ys, mask, gram_dtype=torch.float32)
    assert ((f32 - want).abs() / want.abs()).max() < 2e-5
    assert (_per_text_change(f32) - _per_text_change(want)).abs().max() < 1e-6
    # texts of ≤ 3 tokens only: no rows (and per_text_hsic of one such text: None), as before
    assert metrics.per_text_hsic_batch(xs, ys, (mask * 0 + 1) * (torch.arange(40) < 3)).shape == (0, 3, 3)
    assert metrics.per_text_hsic([x[1, :2] for x in xs], [y[1, :2] for y in ys]) is None
    one = metrics.per_text_hsic([x[5, :17] for x in xs], [y[5, :17] for y in ys])
    assert ((one - want[2]).abs() / want[2].abs()).max() < 1e-10  # texts 0-2 (n ≤ 3) were left out


def test_per_text_hsic_batch_fp32_at_wide_layers_and_chunks(monkeypatch):
    """d = 1024 (the √d term of the fp32 bound), offsets of 1e3, texts split into chunks of 3."""
    from depthfast.metrics import per_text as metrics

    monkeypatch.setattr(metrics, "PER_TEXT_GRAM_BYTES", 3 * 4 * 48 * 48 * 4)  # 3 texts per chunk
    xs, ys, mask = _texts(99, [48, 30, 7, 4, 48, 12, 2], 48, (1024,))
    want = per_text_hsic_loop(xs, ys, mask)
    f32 = metrics.per_text_hsic_batch(xs, ys, mask, gram_dtype=torch.float32)
    assert ((f32 - want).abs() / want.abs()).max() < 2e-5
    assert (_per_text_change(f32) - _per_text_change(want)).abs().max() < 1e-6
    f64 = metrics.per_text_hsic_batch(xs, ys, mask)
    assert ((f64 - want).abs() / want.abs()).max() < 1e-10


def test_memory_estimate_counts_the_cka_staging():
    """Pythia-1.4B shapes (24 blocks → 25 layers of d = 2048), probe batches of 32 × 128 tokens: the
    measurement line = float64 statistics + captured activations + the larger of one engine update's
    and one per-text batch's staging, each as csrc/cka.cpp and metrics.py allocate it."""
    from transformers import AutoModelForCausalLM

    from depthfast import memory
    from depthfast.config import RunConfig
    from depthfast.registry import lookup

    G, t, d = 25, 32 * 128, 2048
    stats = G * (3 * d * d * 8 + 6 * d * 8 + 2 * d * 4 + 5 * 8)
    assert memory.cka_statistics_bytes(G, d, "exact") == stats
    # X', Y' fp32 operands, row norms, the row mask, then the fp32 Y'ᵀX' product (bigger than the
    # split weights' G·t·(48 + 32) + 48·G·d)
    staging = 2 * G * t * d * 4 + 2 * G * t * 8 + t * 4 + G * d * d * 4
    assert memory.cka_update_bytes(G, t, d, "exact", 4) == staging
    assert staging > 2 * G * t * d * 4  # at least the two shifted operand copies of the group
    bf16 = 2 * G * t * d * 2 + 2 * G * t * 8 + t * 4 + G * d * d * 4
    assert memory.cka_update_bytes(G, t, d, "exact", 2) == bf16
    per_text = memory.per_text_hsic_bytes(32, 128, d)
    assert per_text == 32 * (2 * 128 * 128 * 4 + 128 * d * 8) < staging
    config = lookup("EleutherAI/pythia-1.4b").config()
    config.num_hidden_layers = 1  # the estimate's block count is passed in; hidden size is what counts
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = RunConfig(objective="clm", batch_size=8, max_length=128, probe_batch_size=32)
    est = memory.estimate_run_memory(model, cfg, 24)
    assert est.parts["measurement"] == stats + 2 * G * t * d * 4 + staging
    unbiased = memory.estimate_run_memory(model, RunConfig(objective="clm", batch_size=8, max_length=128,
                                                            probe_batch_size=32, estimator="unbiased"), 24)
    # no d × d state; the staging peak is the minibatch mean's copies or the fp32 block products
    assert unbiased.parts["measurement"] == (2 * G * t * d * 4 + 2 * G * t * 8 + t * 4
                                             + max(G * t * d * 4, 8 * G * d * d) + 2 * G * t * d * 4)


@needs_cuda
def test_memory_estimate_brackets_a_real_engine_update_on_gpu():
    """Production shape of a probe batch (32 texts × 128 tokens, 25 layers of 2048, bf16): the peak
    the CUDA allocator sees during one exact update, above the state, is within the estimate."""
    from depthfast import memory

    G, t, d = 25, 32 * 128, 2048
    x = [torch.randn(t, d, device="cuda", dtype=torch.bfloat16) for _ in range(G)]
    m = cka.StreamingCKA(G, backend="extension")
    m.update(x, x)  # allocates the state and the shift
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    m.update(x, x)
    torch.cuda.synchronize()
    staged = torch.cuda.max_memory_allocated() - base
    est = memory.cka_update_bytes(G, t, d, "exact", 2)
    assert 0.5 * est <= staged <= 1.1 * est, (staged, est)


# --- change-relative statistics (issue #18): 1 − CKA exact relative to the change --------------------
# Tolerances on the relative error of 1 − CKA against the float64 change-relative truth (depthfast.cka
# *_cka_change): compiled engine (fp32 products of X̃ and D̃, float64 finish) 1e-4; float64 reference 1e-7.
# Measured on a 2-core CPU: ≤ 8e-8 (engine), ≤ 2e-15 (reference) from 1e-1 to 1e-8 (docs/precision.md).
_CHANGE_TOL = {"auto": 1e-4, "reference": 1e-7}


def _change_pair(n, d, eps, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if offset:
        x[:, :3] += 1e4  # massive-activation channels, shared by base and tuned
    z = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    return x, (x.double() + eps * z.double()).float()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("offset", [False, True])
def test_change_relative_one_minus_cka_every_magnitude(backend, offset):
    from depthfast.cka import debiased_cka_change, linear_cka_change, minibatch_cka_change

    n, d, nb = 256, 40, 4
    for i, eps in enumerate([3e-1, 3e-2, 3e-3, 3e-4, 1e-4]):  # 1 − CKA ≈ 1e-1 … 1e-8
        x, y = _change_pair(n, d, eps, offset, seed=100 + i)
        xb, yb = list(x.split(n // nb)), list(y.split(n // nb))
        exact = cka.StreamingCKA(1, estimator="exact", backend=backend)
        unbiased = cka.StreamingCKA(1, estimator="unbiased", backend=backend)
        for a, b in zip(xb, yb):
            exact.update([a], [b])
            unbiased.update([a], [b])
        for got, truth in ((exact.compute_change("linear"), linear_cka_change(x, y)),
                           (exact.compute_change("debiased"), debiased_cka_change(x, y)),
                           (unbiased.compute_change(), minibatch_cka_change(xb, yb))):
            rel = abs(float(got[0]) - float(truth)) / float(truth)
            assert rel <= _CHANGE_TOL[backend], (eps, float(truth), rel)
        assert abs(float(exact.compute()[0]) - (1.0 - float(linear_cka_change(x, y)))) <= 1e-9



# 16-bit operands: products of D̃ in bf16/fp16 carry an error relative to the change, not to X, so 1 − CKA
# keeps ≤ 2e-2 relative error at every magnitude (issue #18; docs/precision.md measured ≤ 3.4e-4 bf16,
# ≤ 1.8e-5 fp16). The truth is of the rounded inputs the engine sees.
_CHANGE_TOL_16BIT = 2e-2


def _change_16bit_errors(dtype, device):
    from depthfast.cka import linear_cka_change, minibatch_cka_change

    n, d, nb, worst = 512, 64, 4, 0.0
    for i, eps in enumerate([3e-1, 3e-2, 3e-3, 3e-4, 1e-4]):
        x, y = _change_pair(n, d, eps, True, seed=200 + i)
        xq, yq = x.to(dtype), y.to(dtype)
        if torch.equal(xq, yq):  # the change is below the format's resolution: nothing to measure
            continue
        xb, yb = list(xq.split(n // nb)), list(yq.split(n // nb))
        truths = {"exact": float(linear_cka_change(xq, yq)), "unbiased": float(minibatch_cka_change(xb, yb))}
        for est, truth in truths.items():
            m = cka.StreamingCKA(1, estimator=est)
            for a, b in zip(xb, yb):
                m.update([a.to(device)], [b.to(device)])
            worst = max(worst, abs(float(m.compute_change()[0]) - truth) / truth)
    return worst


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_change_relative_16bit_operands_emulated(dtype):
    """The tensor-core path (16-bit operands, fp32 accumulation) emulated on the CPU build."""
    ext = _ext.extension()
    ext._set_emulate_tensor_cores(True)
    try:
        assert _change_16bit_errors(dtype, "cpu") <= _CHANGE_TOL_16BIT
    finally:
        ext._set_emulate_tensor_cores(False)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_change_relative_on_the_device(dtype):
    """The CUDA kernels (D staged by prepare_kernel) against the float64 change truth: fp32 within the
    engine's 1e-4, 16-bit within 2e-2."""
    if dtype == torch.float32:
        from depthfast.cka import linear_cka_change

        for i, eps in enumerate([3e-1, 3e-3, 3e-4, 1e-4]):
            x, y = _change_pair(1024, 96, eps, True, seed=300 + i)
            m = cka.StreamingCKA(1)
            for a, b in zip(x.cuda().split(256), y.cuda().split(256)):
                m.update([a], [b])
            truth = float(linear_cka_change(x, y))
            assert abs(float(m.compute_change()[0]) - truth) / truth <= _CHANGE_TOL["auto"], eps
    else:
        assert _change_16bit_errors(dtype, "cuda") <= _CHANGE_TOL_16BIT

def test_change_relative_different_widths_fall_back_to_old_statistics():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 12, generator=g), torch.randn(64, 7, generator=g)
    for backend in ("auto", "reference"):
        s = cka.StreamingCKA(1, backend=backend)
        s.update([x], [y])
        assert s._layers[0].change is False
        assert abs(float(s.compute_change()[0]) - (1.0 - float(cka.linear_cka(x, y)))) <= 1e-6


def test_change_relative_reset_tuned_keeps_base_and_matches_truth():
    from depthfast.cka import linear_cka_change

    x, y1 = _change_pair(96, 10, 1e-2, True, seed=7)
    _, y2 = _change_pair(96, 10, 1e-3, True, seed=8)
    for backend in ("auto", "reference"):
        s = cka.StreamingCKA(1, backend=backend)
        for a, b in zip(x.split(32), y1.split(32)):
            s.update([a], [b])
        s.reset_tuned()
        for a, b in zip(x.split(32), y2.split(32)):
            s.update([a], [b])
        truth = float(linear_cka_change(x, y2))
        assert abs(float(s.compute_change()[0]) - truth) / truth <= _CHANGE_TOL[backend]


def test_change_relative_masked_nan_padding_many_layers_odd_width():
    from depthfast.cka import linear_cka_change

    g = torch.Generator().manual_seed(9)
    base = torch.randn(3, 11, 13, generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    layers = 5
    bases = [base + i for i in range(layers)]
    tuned = [b + 10 ** (-1 - i) * torch.randn(b.shape, generator=g) for i, b in enumerate(bases)]
    for t in (*bases, *tuned):
        t[mask == 0] = float("nan")
    s = cka.StreamingCKA(layers)
    s.update(bases, tuned, mask)
    got = s.compute_change()
    for i in range(layers):
        truth = float(linear_cka_change(bases[i][mask.bool()], tuned[i][mask.bool()]))
        assert abs(float(got[i]) - truth) / truth <= 1e-4, (i, truth, float(got[i]))


def test_change_relative_cpu_kernels_match_float64():
    from depthfast import _C

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 37, 19, generator=g, dtype=torch.float64)
    d = 1e-3 * torch.randn(2, 37, 19, generator=g, dtype=torch.float64)
    eye = torch.eye(37, dtype=torch.bool)
    for j in range(2):
        k = x[j] @ x[j].T
        m = x[j] @ d[j].T + d[j] @ x[j].T + d[j] @ d[j].T
        k0, m0 = k.masked_fill(eye, 0), m.masked_fill(eye, 0)
        want = torch.stack([(k0 * m0).sum(), (k0 * k0).sum(), (m0 * m0).sum()])
        got = _C.offdiag_sums_change_tiled(x.float(), d.float(), 8)[j]
        assert torch.allclose(got, want, rtol=1e-5), (got, want)
        a, b, c = x[j].T @ x[j], d[j].T @ x[j], d[j].T @ d[j]
        gs = b + b.T + c
        want = torch.stack([(a * a).sum(), (a * b).sum(), (b * b).sum(), (a * c).sum(), (gs * gs).sum()])
        got = _C.gram_moments_change(x.float(), d.float(), 8)[j]
        assert torch.allclose(got, want, rtol=1e-5), (got, want)


def _tiles_like_the_engine(x, d, tile):
    """The fp32 tile products of offdiag_sums_change_tiled, formed by the same ATen calls (same views,
    same order): [(K_IJ, M_IJ, diagonal)] with M_II = P + Pᵀ already summed in fp32."""
    n = x.shape[1]
    starts = list(range(0, n, tile))
    e = [torch.add(x[:, i:i + tile], d[:, i:i + tile], alpha=0.5) for i in starts]
    for it, i0 in enumerate(starts):
        xi, di = x[:, i0:i0 + tile], d[:, i0:i0 + tile]
        for jt in range(it, len(starts)):
            j0 = starts[jt]
            k = torch.bmm(xi, x[:, j0:j0 + tile].transpose(1, 2))
            if it == jt:
                p = torch.bmm(e[it], di.transpose(1, 2))
                yield k, p + p.transpose(1, 2), True
            else:
                yield k, torch.bmm(e[it], d[:, j0:j0 + tile].transpose(1, 2)).baddbmm_(di, e[jt].transpose(1, 2)), False


def test_change_tile_reductions_are_float64_sums_of_the_fp32_tiles():
    """The CPU reduction of the sample-space moments (32-row strips, zero-padded 8-lane float64 rows,
    the diagonal zeroed) against float64 sums of the very fp32 tiles it reduces: rows and widths that
    are not multiples of 32 or 8, a single row of tiles, one layer and several. The products are the
    same ATen calls as the engine's, so only the reduction differs: 1e-12 relative (float64 rounding
    of up to ~1e5 terms; a dropped or doubled entry is ~1e-5)."""
    from depthfast import _C

    g = torch.Generator().manual_seed(12)
    for layers, n, w, tile in ((1, 5, 3, 256), (3, 70, 45, 45), (2, 97, 33, 64), (1, 300, 9, 256)):
        x = torch.randn(layers, n, w, generator=g)
        d = 1e-3 * torch.randn(layers, n, w, generator=g)
        want = torch.zeros(layers, 3, dtype=torch.float64)
        for k, m, diagonal in _tiles_like_the_engine(x, d, tile):
            k, m = k.double(), m.double()
            if diagonal:
                off = ~torch.eye(k.shape[1], dtype=torch.bool)
                k, m = k * off, m * off
            sums = torch.stack([(k * m).sum((1, 2)), (k * k).sum((1, 2)), (m * m).sum((1, 2))], 1)
            want += sums if diagonal else 2.0 * sums
        got = _C.offdiag_sums_change_tiled(x, d, tile)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (layers, n, w, tile, got, want)


def test_change_block_reductions_are_float64_sums_of_the_fp32_blocks():
    """The feature-space moments (a, p, q, r, s) of gram_moments_change against float64 sums of the
    very fp32 block products it reduces (same ATen calls), for widths that are not multiples of 32 or
    8 and blocks that split them unevenly: 1e-12 relative, so only the reduction is tested."""
    from depthfast import _C

    def dot(u, v):
        return (u.double() * v.double()).sum((1, 2))

    g = torch.Generator().manual_seed(13)
    for layers, n, w, block in ((1, 6, 5, 0), (2, 40, 77, 32), (3, 19, 70, 50), (1, 8, 33, 33)):
        x = torch.randn(layers, n, w, generator=g)
        d = 1e-3 * torch.randn(layers, n, w, generator=g)
        step = w if block <= 0 else block
        want = torch.zeros(layers, 5, dtype=torch.float64)
        for i0 in range(0, w, step):
            xi, di = x[:, :, i0:i0 + step], d[:, :, i0:i0 + step]
            for j0 in range(i0, w, step):
                xj, dj = x[:, :, j0:j0 + step], d[:, :, j0:j0 + step]
                a, b, c = (torch.bmm(u.transpose(1, 2), v) for u, v in ((xi, xj), (di, xj), (di, dj)))
                if i0 == j0:
                    gs = (b + b.transpose(1, 2)) + c
                    want += torch.stack([dot(a, a), dot(a, b), dot(b, b), dot(a, c), dot(gs, gs)], 1)
                else:
                    bt = torch.bmm(xi.transpose(1, 2), dj)
                    gs = (b + bt) + c
                    want += torch.stack([2 * dot(a, a), dot(a, b) + dot(a, bt), dot(b, b) + dot(bt, bt),
                                         2 * dot(a, c), 2 * dot(gs, gs)], 1)
        got = _C.gram_moments_change(x, d, block)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (layers, n, w, block, got, want)
