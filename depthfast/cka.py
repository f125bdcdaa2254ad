"""Centered kernel alignment (CKA): plain-PyTorch references and the streaming accumulator.

Linear CKA between activations X (n, d1) and Y (n, d2) of the same n probe samples:

    CKA(X, Y) = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F · ‖Ycᵀ Yc‖_F),    Xc = X − 1 μₓᵀ,  Yc = Y − 1 μᵧᵀ.

Representational change of a layer is 1 − CKA(H(θ₀), H(θ_T)).

Other measures from the same centered statistics (float64 references below):
    debiased linear CKA (Kornblith et al. 2019): HSIC₁(K,L) / sqrt(HSIC₁(K,K)·HSIC₁(L,L)), K = XcXcᵀ;
    orthogonal Procrustes distance: d²_P = 2 − 2‖ŶᵀX̂‖_*, X̂ = Xc/‖Xc‖_F, Ŷ = Yc/‖Yc‖_F.

Everything here is ground truth for the compiled engine (``csrc/``): computed in float64, with
centering that stays exact when activations carry offsets of 1e3–1e5 ("massive activations").
``StreamingCKA`` runs on that engine when it is built (backend "auto") and on these references
otherwise; both give the same numbers to the tolerances stated in tests/test_cka.py.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Sequence

import torch

from depthfast.errors import DepthfastError

POOLINGS = ("token", "mean")
ESTIMATORS = ("exact", "unbiased")
MEASURES = ("linear", "debiased", "procrustes")
BACKENDS = ("auto", "reference", "extension")


def _as_float64_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d); got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)


def _centered_pair(x: torch.Tensor, y: torch.Tensor, min_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, d1), y (n, d2) in float64 with their column means removed (before any product)."""
    x = _as_float64_2d("x", x)
    y = _as_float64_2d("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples; got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < min_samples:
        raise ValueError(f"this measure needs at least {min_samples} samples; got {x.shape[0]}")
    return x - x.mean(dim=0, keepdim=True), y - y.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of x (n, d1) and y (n, d2), as a float64 scalar tensor.

    Columns are centered in float64 before any product, so offsets do not cancel. Works in
    feature space (d×d products) or sample space (n×n Grams), whichever is smaller; the two
    are the same quantity since ‖YcᵀXc‖²_F = tr(Xc Xcᵀ Yc Ycᵀ).
    """
    xc, yc = _centered_pair(x, y, min_samples=2)
    n, d1, d2 = xc.shape[0], xc.shape[1], yc.shape[1]
    if n < max(d1, d2):
        k, l = xc @ xc.T, yc @ yc.T
        cross, xx, yy = (k * l).sum(), torch.linalg.norm(k), torch.linalg.norm(l)
    else:
        cross = torch.linalg.norm(yc.T @ xc) ** 2
        xx, yy = torch.linalg.norm(xc.T @ xc), torch.linalg.norm(yc.T @ yc)
    return _cka_ratio(cross, xx, yy, what="linear_cka")


def _cka_ratio(cross: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, what: str) -> torch.Tensor:
    denom = xx * yy
    if not torch.isfinite(denom) or denom <= 0:
        raise DepthfastError(
            f"{what}: CKA is undefined because one representation has no variance across samples"
        )
    return cross / denom


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator of Song et al. (2012) for Gram matrices k, l (..., n, n), n > 3.

    With K̃, L̃ = K, L with zeroed diagonal:
        HSIC₁ = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − (2/(n−2)) 1ᵀK̃L̃1] / (n(n−3)).
    Computed in float64, batched over any leading dimensions (→ shape (...)). It can be slightly negative.
    """
    n = k.shape[-1]
    if k.dim() < 2 or k.shape[-2:] != (n, n) or l.shape != k.shape:
        raise ValueError(f"hsic1 needs two (..., n, n) Gram stacks of one shape; got {tuple(k.shape)} and {tuple(l.shape)}")
    if n <= 3:
        raise ValueError(f"hsic1 is undefined for n ≤ 3 samples; got n = {n}")
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.to(torch.float64).masked_fill(eye, 0.0)
    l = l.to(torch.float64).masked_fill(eye, 0.0)
    trace = (k * l.transpose(-1, -2)).sum(dim=(-1, -2))
    cross = (k.sum(dim=-2) * l.sum(dim=-1)).sum(dim=-1)  # 1ᵀ K̃ L̃ 1
    return _hsic1_from_moments(n, trace, k.sum(dim=(-1, -2)), l.sum(dim=(-1, -2)), cross)


def debiased_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Debiased linear CKA (Kornblith et al. 2019) of x (n, d1), y (n, d2), n > 3, float64 scalar.

        CKA_debiased = HSIC₁(K, L) / sqrt(HSIC₁(K, K) · HSIC₁(L, L)),  K = XcXcᵀ, L = YcYcᵀ,
    with HSIC₁ the unbiased estimator (``hsic1``) on the whole sample. Can be slightly negative.
    """
    xc, yc = _centered_pair(x, y, min_samples=4)
    k, l = xc @ xc.T, yc @ yc.T
    return _debiased_ratio(hsic1(k, l), hsic1(k, k), hsic1(l, l), what="debiased_cka")


def _debiased_ratio(kl, kk, ll, what: str) -> torch.Tensor:
    kl, kk, ll = (torch.as_tensor(v, dtype=torch.float64) for v in (kl, kk, ll))
    denom = kk * ll
    if not torch.isfinite(denom) or denom <= 0:
        raise DepthfastError(f"{what}: debiased CKA is undefined (HSIC₁(K,K)·HSIC₁(L,L) = {float(denom):.3g} ≤ 0)")
    return kl / denom.sqrt()


def procrustes_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared orthogonal Procrustes distance of x (n, d1), y (n, d2), float64 scalar in [0, 2].

        d²_P = min_Q ‖X̂ − ŶQ‖²_F = 2 − 2‖ŶᵀX̂‖_*,   X̂ = Xc/‖Xc‖_F, Ŷ = Yc/‖Yc‖_F
    (Q orthogonal; for d1 ≠ d2 the narrower side is zero-padded, which leaves ‖·‖_* unchanged).
    """
    xc, yc = _centered_pair(x, y, min_samples=2)
    nx, ny = torch.linalg.norm(xc), torch.linalg.norm(yc)
    if nx <= 0 or ny <= 0:
        raise DepthfastError("procrustes_distance: one representation has no variance across samples")
    nuc = torch.linalg.svdvals(yc.T @ xc).sum()
    return (2.0 - 2.0 * nuc / (nx * ny)).clamp_min(0.0)


def _hsic1_from_moments(n, off_kl, sum_k, sum_l, cross):
    """HSIC₁ from tr(K̃L̃) = off_kl, 1ᵀK̃1 = sum_k, 1ᵀL̃1 = sum_l, 1ᵀK̃L̃1 = cross (float64)."""
    return (off_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def pool_activations(acts: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Turn one layer's activations into samples (n, d).

    acts: (batch, seq, d), or already (n, d) samples. attention_mask: (batch, seq), 1 = real token.
    "token": every real token is a sample. "mean": the float64 mean over each sequence's real tokens
    (sequences without any are dropped). Padding never counts as a sample and is never read into a
    sum: it is selected away (where, not a product with the mask), so inf/NaN there cannot leak.
    """
    if acts.dim() == 2:
        return acts
    if acts.dim() != 3:
        raise ValueError(f"activations must be (batch, seq, d) or (n, d); got shape {tuple(acts.shape)}")
    if attention_mask is None:
        mask = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
    else:
        if attention_mask.shape != acts.shape[:2]:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match activations {tuple(acts.shape[:2])}"
            )
        mask = attention_mask.to(device=acts.device).bool()
    if pooling == "token":
        return acts[mask]
    counts = mask.sum(dim=1)
    keep = counts > 0
    # where, not acts·mask: NaN·0 = NaN would turn a padded NaN into a NaN mean
    real = torch.where(mask.unsqueeze(-1), acts, torch.zeros((), dtype=acts.dtype, device=acts.device))
    summed = real.sum(dim=1, dtype=torch.float64)
    return summed[keep] / counts[keep].unsqueeze(-1).to(torch.float64)


def _mirror_upper_blocks(s: torch.Tensor, block: int) -> torch.Tensor:
    """Fill the strictly-lower block triangle of s (d, d) from the upper one (the engine computes
    only blocks i ≤ j of a symmetric XᵀX; ``block`` 0 means s is already full)."""
    if block <= 0 or block >= s.shape[0]:
        return s
    s = s.clone()
    d = s.shape[0]
    for i0 in range(0, d, block):
        for j0 in range(i0 + block, d, block):
            s[j0:j0 + block, i0:i0 + block] = s[i0:i0 + block, j0:j0 + block].T
    return s


class _ExactLayerStats:
    """Feature-space statistics of one layer, shifted by a reference mean.

    With c the first batch's column means and x' = x − c, k_i = ‖x'_i‖², l_i = ‖y'_i‖²:
        Sxx = Σ x'x'ᵀ,  Syy = Σ y'y'ᵀ,  Syx = Σ y'x'ᵀ,  sx = Σ x',  sy = Σ y',  n,
        vx = [Σ k_i x'_i, Σ l_i x'_i],  vy = [Σ l_i y'_i, Σ k_i y'_i],  sc = [Σk, Σl, Σkl, Σk², Σl²].
    Then Xcᵀ Xc = Sxx − sx sxᵀ / n (likewise for Yc, YcᵀXc). Because c is already close to the
    true mean, the subtracted term is small and the difference does not cancel catastrophically.
    The O(n·d) vectors vx, vy, sc give the debiased (HSIC₁) measure, which needs row norms.

    The reference ``update`` keeps everything in float64. The compiled engine fills the same
    fields (Grams: fp32 products per update summed in ``_GRAM_ACCUM_DTYPE`` = float64, only the upper
    blocks of Sxx/Syy: ``upper_block``); ``finish`` always
    combines them in float64.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift_x = self.shift_y = None
        self.sxx = self.syy = self.syx = self.sx = self.sy = self.vx = self.vy = self.sc = None
        self.upper_block = 0
        self.frozen_n = None  # set by freeze_base(): Sxx is kept and no longer accumulated
        self.frozen_sx = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(torch.float64)
        y = y.to(torch.float64)
        if self.shift_x is None:
            self.shift_x = x.mean(dim=0)
        if self.shift_y is None:
            self.shift_y = y.mean(dim=0)
        if self.sx is None:
            d1, d2 = x.shape[1], y.shape[1]
            new = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
            if self.sxx is None:
                self.sxx = new(d1, d1)
            self.syy, self.syx = new(d2, d2), new(d2, d1)
            self.sx, self.sy, self.vx, self.vy, self.sc = new(d1), new(d2), new(2, d1), new(2, d2), new(5)
        elif x.shape[1] != self.sx.shape[0] or y.shape[1] != self.sy.shape[0]:
            raise ValueError("activation width changed between updates of the same layer")
        x = x - self.shift_x
        y = y - self.shift_y
        if self.frozen_n is None:
            self.sxx += x.T @ x
        self.syy += y.T @ y
        self.syx += y.T @ x
        self.sx += x.sum(dim=0)
        self.sy += y.sum(dim=0)
        k, l = (x * x).sum(dim=1), (y * y).sum(dim=1)
        self.vx += torch.stack([k, l]) @ x
        self.vy += torch.stack([l, k]) @ y
        self.sc += torch.stack([k.sum(), l.sum(), (k * l).sum(), (k * k).sum(), (l * l).sum()])
        self.n += x.shape[0]

    def freeze_base(self, layer: int) -> None:
        """Keep Sxx (the base model's only expensive statistic) and forget everything tuned."""
        if self.n < 2 and self.frozen_n is None:
            raise DepthfastError(f"layer {layer}: reset_tuned() needs a completed pass over the probe set first")
        if self.frozen_n is None:
            self.frozen_n, self.frozen_sx = self.n, self.sx.clone()
        self.shift_y = None
        for name in ("syy", "syx", "sx", "sy", "vx", "vy", "sc"):
            getattr(self, name).zero_()
        self.n = 0

    # --- float64 finishing --------------------------------------------------------------------
    def _check(self, layer: int, need: int) -> None:
        if self.n < need:
            raise DepthfastError(f"layer {layer}: this measure needs at least {need} probe samples; got {self.n}")
        if self.frozen_n is not None:
            same_n = self.n == self.frozen_n
            sx = self.sx.to(torch.float64)
            fsx = self.frozen_sx.to(torch.float64)
            scale = float(torch.linalg.norm(fsx)) + float(torch.diagonal(self.sxx).to(torch.float64).sum()) ** 0.5
            if not same_n or float(torch.linalg.norm(sx - fsx)) > 1e-4 * scale:
                raise DepthfastError(
                    f"layer {layer}: the base activations differ from those the kept base statistics were computed "
                    f"on ({self.n} samples now, {self.frozen_n} then); after reset_tuned() feed the same probe set"
                )

    def _f64(self):
        f = lambda t: t.to(torch.float64)  # noqa: E731
        return (f(_mirror_upper_blocks(self.sxx, self.upper_block)), f(_mirror_upper_blocks(self.syy, self.upper_block)),
                f(self.syx), f(self.sx), f(self.sy))

    def _centered(self):
        sxx, syy, syx, sx, sy = self._f64()
        n = float(self.n)
        return sxx - torch.outer(sx, sx) / n, syy - torch.outer(sy, sy) / n, syx - torch.outer(sy, sx) / n

    def cka(self, layer: int) -> torch.Tensor:
        self._check(layer, 2)
        cxx, cyy, cyx = self._centered()
        return _cka_ratio(
            torch.linalg.norm(cyx) ** 2, torch.linalg.norm(cxx), torch.linalg.norm(cyy), what=f"layer {layer}"
        )

    def debiased(self, layer: int) -> torch.Tensor:
        """HSIC₁ terms from shifted statistics (HSIC₁ ignores the shift; the terms do not):
            tr(K̃L̃) = ‖Syx‖²_F − Σk l,   1ᵀK̃1 = ‖sx‖² − Σk,
            1ᵀK̃L̃1 = Σ_i (x'_i·sx − k_i)(y'_i·sy − l_i) = syᵀSyx sx − sx·Σl x' − sy·Σk y' + Σk l."""
        self._check(layer, 4)
        sxx, syy, syx, sx, sy = self._f64()
        vx, vy, sc = self.vx.to(torch.float64), self.vy.to(torch.float64), self.sc.to(torch.float64)
        n = float(self.n)
        sum_k, sum_l, s_kl, s_kk, s_ll = sc.unbind()
        ksum, lsum = sx @ sx - sum_k, sy @ sy - sum_l
        kl = _hsic1_from_moments(n, (syx * syx).sum() - s_kl, ksum, lsum, sy @ syx @ sx - sx @ vx[1] - sy @ vy[1] + s_kl)
        kk = _hsic1_from_moments(n, (sxx * sxx).sum() - s_kk, ksum, ksum, sx @ sxx @ sx - 2 * sx @ vx[0] + s_kk)
        ll = _hsic1_from_moments(n, (syy * syy).sum() - s_ll, lsum, lsum, sy @ syy @ sy - 2 * sy @ vy[0] + s_ll)
        return _debiased_ratio(kl, kk, ll, what=f"layer {layer}")

    def procrustes(self, layer: int) -> torch.Tensor:
        self._check(layer, 2)
        cxx, cyy, cyx = self._centered()
        tx, ty = torch.trace(cxx), torch.trace(cyy)
        if tx <= 0 or ty <= 0:
            raise DepthfastError(f"layer {layer}: Procrustes distance is undefined (a representation has no variance)")
        return (2.0 - 2.0 * torch.linalg.svdvals(cyx).sum() / (tx * ty).sqrt()).clamp_min(0.0)


class _UnbiasedLayerStats:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021): sums of HSIC₁ over minibatches.

        CKA = Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)),
    K_b = X_b X_bᵀ, L_b = Y_b Y_bᵀ. HSIC₁ is invariant to adding a constant row vector, so each
    minibatch is centered first: free, and it removes the offset before the products.
    """

    def __init__(self) -> None:
        self.kl = self.kk = self.ll = 0.0
        self.batches = 0
        self.sizes: list[int] = []
        self.frozen_sizes = None  # set by freeze_base(): Σ HSIC₁(K,K) is kept

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(torch.float64)
        y = y.to(torch.float64)
        x = x - x.mean(dim=0, keepdim=True)
        y = y - y.mean(dim=0, keepdim=True)
        k, l = x @ x.T, y @ y.T
        self.kl += float(hsic1(k, l))
        if self.frozen_sizes is None:
            self.kk += float(hsic1(k, k))
        self.ll += float(hsic1(l, l))
        self.batches += 1
        self.sizes.append(x.shape[0])

    def add(self, kl: float, kk: float, ll: float, n: int) -> None:
        self.kl += kl
        if self.frozen_sizes is None:
            self.kk += kk
        self.ll += ll
        self.batches += 1
        self.sizes.append(n)

    def freeze_base(self, layer: int) -> None:
        if self.batches == 0 and self.frozen_sizes is None:
            raise DepthfastError(f"layer {layer}: reset_tuned() needs a completed pass over the probe set first")
        if self.frozen_sizes is None:
            self.frozen_sizes = list(self.sizes)
        self.kl = self.ll = 0.0
        self.batches = 0
        self.sizes = []

    def cka(self, layer: int) -> torch.Tensor:
        if self.batches == 0:
            raise DepthfastError(f"layer {layer}: no minibatch had more than 3 samples; unbiased CKA is undefined")
        if self.frozen_sizes is not None and self.sizes != self.frozen_sizes:
            raise DepthfastError(
                f"layer {layer}: after reset_tuned() feed the same minibatches as before "
                f"(sizes {self.sizes[:4]}… now, {self.frozen_sizes[:4]}… then)"
            )
        denom = self.kk * self.ll
        if denom <= 0:
            raise DepthfastError(
                f"layer {layer}: unbiased CKA is undefined (HSIC(K,K)·HSIC(L,L) = {denom:.3g} ≤ 0); "
                "use more probe samples per batch or the exact estimator"
            )
        return torch.tensor(self.kl / denom**0.5, dtype=torch.float64)


def _resolve_backend(backend: str):
    from depthfast import _ext

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    ext = _ext.extension()
    if backend == "extension" and ext is None:
        raise DepthfastError("backend='extension' but depthfast._C is not built; run `pip install -e .`")
    if backend == "reference" or ext is None:
        return None
    return ext


def _flatten_for_engine(acts: torch.Tensor, mask: torch.Tensor | None, pooling: str):
    """(samples (n, d), row mask (n,) float32 or None) as the engine takes them: token pooling keeps
    padded rows in place and zeroes them with the mask (no gather); mean pooling pools here."""
    if acts.dim() == 2:
        return acts, None
    if acts.dim() != 3:
        raise ValueError(f"activations must be (batch, seq, d) or (n, d); got shape {tuple(acts.shape)}")
    if pooling == "mean":
        return pool_activations(acts, mask, pooling), None
    if mask is not None and mask.shape != acts.shape[:2]:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match activations {tuple(acts.shape[:2])}")
    flat = acts.reshape(-1, acts.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    if mask is None:
        return flat, None
    return flat, mask.reshape(-1).to(device=acts.device, dtype=torch.float32)


_ENGINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GRAM_BLOCK_OVERRIDE: int | None = None  # tests force the symmetric block split on small widths
# Dtype of the engine's Gram statistics Sxx, Syy, Syx. Each update's products are fp32 (BLAS, or
# tensor cores with fp32 accumulation) and are added into these: float64 keeps the sum over a
# study-sized probe (≈ 256 updates of 4096 tokens) from adding √U·2⁻²⁴ of relative error per entry,
# which is already 1e-2 of 1 − CKA when 1 − CKA ≈ 1e-4 (benchmarks/bench_cka.py --accuracy).
# float32 is the old layout, kept so the tests and the benchmark can show the difference.
_GRAM_ACCUM_DTYPE = torch.float64

# Messages of RuntimeErrors that mean "the compiled kernels cannot run on this device" (a _C built
# for another architecture, a launch failure): the accumulator then falls back to the reference.
_DEVICE_FAILURES = ("no kernel image is available", "cudaErrorNoKernelImageForDevice", "CUDA error",
                    "CUDA kernel errors", "invalid device function", "cudaError")
_BROKEN_DEVICES: set[str] = set()  # devices on which the engine failed in this process
_FALLBACK_NOTICE = [False]  # printed once per process


def _is_device_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_FAILURES)


def _fallback_notice(device, exc: BaseException) -> None:
    if not _FALLBACK_NOTICE[0]:
        _FALLBACK_NOTICE[0] = True
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"depthfast: the compiled CKA engine failed on {device} ({first}); using the float64 reference "
              "path for CKA from now on (statistics so far are kept)", file=sys.stderr)


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Inside: fp32 matmuls on CUDA in IEEE fp32 (no TF32: its 10-bit mantissa would make the CKA Grams
    a 10-bit computation); the user's settings are restored on exit, also after an exception. Uses
    the fp32_precision API where torch has it (≥ 2.9; mixing it with allow_tf32 makes torch raise),
    else allow_tf32. The compiled engine also holds at::NoTF32Guard around its own products."""
    saved = []
    for mod in (torch.backends.cuda.matmul, torch.backends.cudnn):
        if hasattr(mod, "fp32_precision"):
            saved.append((mod, "fp32_precision", mod.fp32_precision))
            mod.fp32_precision = "ieee"
        else:  # pragma: no cover (torch < 2.9)
            saved.append((mod, "allow_tf32", mod.allow_tf32))
            mod.allow_tf32 = False
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


class StreamingCKA:
    """Per-layer CKA between a base and a tuned model, accumulated over probe batches.

    update(base_acts, tuned_acts, attention_mask=None): each a sequence of num_layers tensors
    (batch, seq, d_ℓ) — or (n, d_ℓ) samples — of the same inputs; attention_mask (batch, seq).
    compute(measure="linear") → float64 tensor (num_layers,):
        "linear": linear CKA;  "debiased": debiased linear CKA (HSIC₁ over the whole probe set);
        "procrustes": squared Procrustes distance d²_P ∈ [0, 2] (a distance, not a similarity).

    estimator "exact": feature-space statistics over the whole probe set; equals ``linear_cka``
    on the concatenated samples and does not depend on how the probe set is split into batches.
    estimator "unbiased": minibatch CKA with HSIC₁, one minibatch per ``update`` call; a minibatch
    with n ≤ 3 samples is skipped with a warning. Only measure "linear".

    backend "auto" uses the compiled engine depthfast._C when it is built (CPU: ATen/BLAS float32
    with shifted sums; CUDA: the kernels in csrc/*.cu) and this module's float64 reference
    otherwise; "reference" / "extension" force one. ``self.backend`` says which one runs. Under
    "auto", a device failure of the engine (a _C built for another GPU architecture: "no kernel image
    is available", or another CUDA launch error) switches this accumulator to the reference for good,
    with one notice on stderr per process: the statistics accumulated so far are converted to float64
    and the failed batch goes through the reference (launch failures leave the engine's state
    untouched, see csrc/cka.cpp), so the result equals an all-reference run. Under "extension" the
    failure is raised.
    Engine precision: each update's Grams in fp32 from operands shifted by the first batch's mean
    (16-bit inputs on CUDA stay 16-bit for the tensor cores, see tests/test_cka.py for the bounds;
    never TF32), added into float64 statistics (``_GRAM_ACCUM_DTYPE``); everything else float64.
    DEPTHFAST_CKA_SYRK=1 switches the CUDA exact Grams from cuBLAS upper blocks to the one-launch
    WMMA kernel (experimental, not yet run on a GPU).

    Reusing the base model's statistics along a training trajectory: after one full pass over the
    probe set, ``reset_tuned()`` forgets everything that depends on the tuned model and keeps the
    base model's XᵀX (exact) or Σ_b HSIC₁(K_b, K_b) (unbiased), which later passes no longer
    compute. Each later pass must feed the same probe batches (base activations included: the
    cross term needs them); ``compute`` checks sample counts and Σx and raises if they differ.
    """

    def __init__(self, num_layers: int, pooling: str = "token", estimator: str = "exact", backend: str = "auto") -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be ≥ 1; got {num_layers}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
        self.num_layers, self.pooling, self.estimator = num_layers, pooling, estimator
        self._ext = _resolve_backend(backend)
        self._forced = backend == "extension"
        self.backend = "reference" if self._ext is None else "extension"
        stats = _ExactLayerStats if estimator == "exact" else _UnbiasedLayerStats
        self._layers = [stats() for _ in range(num_layers)]
        self._groups = None  # engine: {(d1, d2, device): _EngineGroup}
        self.num_samples = 0

    def _check_counts(self, base_acts, tuned_acts) -> None:
        if len(base_acts) != self.num_layers or len(tuned_acts) != self.num_layers:
            raise ValueError(
                f"expected {self.num_layers} layers of activations; got {len(base_acts)} base and {len(tuned_acts)} tuned"
            )

    def update(
        self,
        base_acts: Sequence[torch.Tensor],
        tuned_acts: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        self._check_counts(base_acts, tuned_acts)
        with ieee_fp32_matmul():
            if self._ext is not None and not self._forced and str(base_acts[0].device) in _BROKEN_DEVICES:
                self._fall_back()
            if self._ext is not None and all(t.dtype in _ENGINE_DTYPES for t in (*base_acts, *tuned_acts)):
                self._update_engine(base_acts, tuned_acts, attention_mask)
            else:
                self._update_reference(base_acts, tuned_acts, attention_mask)

    def _update_reference(self, base_acts, tuned_acts, attention_mask, skip=()) -> None:
        """float64 reference update of every layer not in ``skip`` (layers the engine already did)."""
        n = None
        for layer, (xb, yb) in enumerate(zip(base_acts, tuned_acts)):
            if layer in skip:
                continue
            x = pool_activations(xb, attention_mask, self.pooling)
            y = pool_activations(yb, attention_mask, self.pooling)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"layer {layer}: base has {x.shape[0]} samples, tuned has {y.shape[0]}")
            n = x.shape[0]
            if self.estimator == "unbiased" and n <= 3:
                if layer == 0:
                    warnings.warn(f"unbiased CKA: skipped a minibatch of {n} ≤ 3 samples", stacklevel=3)
                continue
            if n > 0:
                self._layers[layer].update(x, y)
        self.num_samples += n or 0

    # --- compiled engine ------------------------------------------------------------------------
    def _update_engine(self, base_acts, tuned_acts, attention_mask) -> None:
        xs, ys, n, mask = [], [], None, None
        for layer, (xb, yb) in enumerate(zip(base_acts, tuned_acts)):
            if xb.device != yb.device:
                raise ValueError(f"layer {layer}: base activations on {xb.device}, tuned on {yb.device}")
            x, mx = _flatten_for_engine(xb.detach(), attention_mask, self.pooling)
            y, _ = _flatten_for_engine(yb.detach(), attention_mask, self.pooling)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"layer {layer}: base has {x.shape[0]} samples, tuned has {y.shape[0]}")
            if mask is None and mx is not None:
                mask = mx
            rows = x.shape[0] if mx is None else None
            if n is None:
                n = rows if rows is not None else int(round(float(mx.sum())))
            xs.append(x)
            ys.append(y)
        dtypes = {t.dtype for t in (*xs, *ys)}
        if len(dtypes) > 1:  # the engine takes one dtype per call (e.g. fp32 base, bf16 tuned → fp32)
            common = dtypes.pop()
            for dt in dtypes:
                common = torch.promote_types(common, dt)
            xs, ys = [t.to(common) for t in xs], [t.to(common) for t in ys]
        if self.estimator == "unbiased" and n <= 3:
            warnings.warn(f"unbiased CKA: skipped a minibatch of {n} ≤ 3 samples", stacklevel=3)
            self.num_samples += n
            return
        if n == 0:
            return
        if self._groups is None:
            self._groups = {}
            for layer, (x, y) in enumerate(zip(xs, ys)):
                key = (x.shape[1], y.shape[1], x.device)
                self._groups.setdefault(key, []).append(layer)
        done: list[int] = []
        for (d1, d2, device), layers in self._groups.items():
            gx = [xs[i] for i in layers]
            gy = [ys[i] for i in layers]
            if any(t.shape[1] != d1 for t in gx) or any(t.shape[1] != d2 for t in gy):
                raise ValueError("activation width changed between updates of the same layer")
            if any(t.device != device for t in (*gx, *gy)):
                raise ValueError("activations moved to another device between updates")
            try:
                if self.estimator == "exact":
                    self._engine_exact(layers, gx, gy, mask, n)
                else:
                    self._engine_unbiased(layers, gx, gy, mask, n)
            except RuntimeError as exc:
                if not _is_device_failure(exc):
                    raise
                if self._forced:
                    raise DepthfastError(f"the compiled CKA engine failed on {device} (backend='extension'; "
                                         f"'auto' would fall back to the reference): {exc}") from exc
                _BROKEN_DEVICES.add(str(device))
                _fallback_notice(device, exc)
                self._fall_back()
                # the groups done so far keep this batch; the failed one and the rest take the reference
                self._update_reference(base_acts, tuned_acts, attention_mask, skip=set(done))
                return
            done.extend(layers)
        self.num_samples += n

    def _fall_back(self) -> None:
        """Switch to the float64 reference for good, converting the engine's statistics in place:
        upper blocks mirrored, everything float64 and detached from the stacked engine buffers. Any
        shift is exact for the statistics, so the reference continues with the engine's."""
        for s in self._layers:
            if isinstance(s, _ExactLayerStats) and getattr(s, "_stacked", None) is not None:
                f64 = lambda t: None if t is None else t.to(torch.float64, copy=True)  # noqa: E731
                s.sxx = f64(_mirror_upper_blocks(s.sxx, s.upper_block))
                s.syy = f64(_mirror_upper_blocks(s.syy, s.upper_block))
                for name in ("syx", "sx", "sy", "vx", "vy", "sc", "shift_x", "shift_y"):
                    setattr(s, name, f64(getattr(s, name)))
                s.upper_block = 0
                s._stacked = None
        self._ext = None
        self._groups = None
        self.backend = "reference"

    def _engine_exact(self, layers, gx, gy, mask, n) -> None:
        stats = [self._layers[i] for i in layers]
        first = stats[0]
        g, d1, d2, dev = len(layers), gx[0].shape[1], gy[0].shape[1], gx[0].device
        if first.sx is None:  # allocate stacked state; per-layer stats are views into it
            f32 = dict(dtype=torch.float32, device=dev)
            f64 = dict(dtype=torch.float64, device=dev)
            gram = dict(dtype=_GRAM_ACCUM_DTYPE, device=dev)
            block = _GRAM_BLOCK_OVERRIDE or int(self._ext.gram_block(max(d1, d2), dev.type == "cuda"))
            st = dict(
                shift_x=torch.zeros(g, d1, **f32), shift_y=torch.zeros(g, d2, **f32),
                sxx=torch.zeros(g, d1, d1, **gram), syy=torch.zeros(g, d2, d2, **gram),
                syx=torch.zeros(g, d2, d1, **gram), sx=torch.zeros(g, d1, **f64), sy=torch.zeros(g, d2, **f64),
                vx=torch.zeros(g, 2, d1, **f64), vy=torch.zeros(g, 2, d2, **f64), sc=torch.zeros(g, 5, **f64),
            )
            for j, s in enumerate(stats):
                for name, t in st.items():
                    setattr(s, name, t[j])
                s.upper_block = block
                s._stacked = st
                s.shift_x = s.shift_y = None
        st = first._stacked
        for which, acts in (("shift_x", gx), ("shift_y", gy)):
            if getattr(first, which) is None:  # first batch (of this pass): shift by its mean
                st[which].copy_(torch.stack([_masked_mean(a, mask, n) for a in acts]))
                for j, s in enumerate(stats):
                    setattr(s, which, st[which][j])
        frozen = first.frozen_n is not None
        self._ext.exact_update(gx, gy, mask, st["shift_x"], st["shift_y"], st["sxx"], st["syy"], st["syx"],
                               st["sx"], st["sy"], st["vx"], st["vy"], st["sc"], frozen, first.upper_block)
        for s in stats:
            s.n += n

    def _engine_unbiased(self, layers, gx, gy, mask, n) -> None:
        acc = torch.zeros(len(layers), 3, dtype=torch.float64, device=gx[0].device)
        frozen = self._layers[layers[0]].frozen_sizes is not None
        self._ext.unbiased_update(gx, gy, mask, acc, n, frozen)
        for s, (kl, kk, ll) in zip((self._layers[i] for i in layers), acc.tolist()):
            s.add(kl, kk, ll, n)

    # --- results and reuse --------------------------------------------------------------------
    def compute(self, measure: str = "linear") -> torch.Tensor:
        with ieee_fp32_matmul():
            return self._compute(measure)

    def _compute(self, measure: str) -> torch.Tensor:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}; got {measure!r}")
        if self.estimator == "unbiased" and measure != "linear":
            raise ValueError(f"measure {measure!r} needs estimator='exact' (the unbiased estimator is minibatch CKA)")
        if self.estimator == "exact":
            for layer, s in enumerate(self._layers):
                if s.sx is None:
                    raise DepthfastError(f"layer {layer}: no probe samples were seen")
        name = {"linear": "cka", "debiased": "debiased", "procrustes": "procrustes"}[measure]
        return torch.stack(
            [getattr(s, name)(layer).to(torch.float64).cpu() for layer, s in enumerate(self._layers)]
        )

    def reset_tuned(self) -> None:
        """Forget the tuned model's statistics; keep the base model's (see the class docstring)."""
        for layer, s in enumerate(self._layers):
            s.freeze_base(layer)
        self.num_samples = 0


def _masked_mean(a: torch.Tensor, mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """Column mean over real rows in float64, rounded to the input's precision when that is 16-bit
    (then x − c is exact in that format for every channel whose values lie within 2× of c —
    the massive-activation channels — so the CUDA tensor-core operand keeps their spread)."""
    if mask is None:
        m = a.to(torch.float64).mean(dim=0)
    else:
        m = torch.where(mask.unsqueeze(1) != 0, a.to(torch.float64), 0.0).sum(dim=0) / n
    if a.dtype in (torch.float16, torch.bfloat16):
        m = m.to(a.dtype)
    return m.to(torch.float32)
