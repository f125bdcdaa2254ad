"""float64 ground truth of every CKA measure, and turning one layer's activations into samples.

    linear CKA      ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F · ‖YcᵀYc‖_F),   Xc = X − 1 μₓᵀ, Yc = Y − 1 μᵧᵀ
    debiased CKA    HSIC₁(K,L) / sqrt(HSIC₁(K,K)·HSIC₁(L,L)),  K = XcXcᵀ, L = YcYcᵀ (Kornblith et al. 2019)
    Procrustes      d²_P = 2 − 2‖ŶᵀX̂‖_*,  X̂ = Xc/‖Xc‖_F, Ŷ = Yc/‖Yc‖_F

for X (n, d1), Y (n, d2) of the same n samples. For one width (d1 = d2) the change-relative truths
``linear_cka_change``, ``debiased_cka_change`` and ``minibatch_cka_change`` give 1 − CKA from X and the
change D = Y − X (formed in float64), exact relative to the change at every magnitude. Computed in float64, with centering before any
product, so it stays exact when activations carry offsets of 1e3–1e5 ("massive activations"). The
streaming statistics (depthfast.cka.stats) and the compiled engine are tested against these.
"""

from __future__ import annotations

import torch

from depthfast.constants import POOLINGS  # noqa: F401  (also depthfast.cka.reference.POOLINGS, as before)
from depthfast.errors import DepthfastError



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


def one_minus_cka_from_change(kk, km, mm) -> torch.Tensor:
    """1 − CKA of K and L = K + M from the three bilinear moments of K and the change M, float64.

    For any symmetric bilinear HSIC h (biased: linear CKA; unbiased HSIC₁: debiased and minibatch CKA)
    with κ = h(K, K), μ = h(K, M), ν = h(M, M):
        CKA = (κ + μ) / sqrt(κ (κ + 2μ + ν)),   1 − CKA² = (κν − μ²) / (κ (κ + 2μ + ν)),
        1 − CKA = (1 − CKA²) / (1 + CKA).
    The O(1) terms cancel algebraically, so only terms of the size of the change remain: the result
    carries an error relative to the change, not to 1 (no subtraction of two numbers near 1). For large
    changes (CKA ≤ ½) 1 − CKA is formed directly, where that subtraction is harmless.
    """
    kk, km, mm = (torch.as_tensor(v, dtype=torch.float64) for v in (kk, km, mm))
    denom = kk * (kk + 2.0 * km + mm)
    if not torch.isfinite(denom) or denom <= 0 or kk <= 0:
        raise DepthfastError(f"CKA is undefined: h(K,K)·h(L,L) = {float(denom):.3g} ≤ 0 (no variance across samples)")
    cka = (kk + km) / denom.sqrt()
    if cka <= 0.5:
        return 1.0 - cka
    return ((kk * mm - km * km) / denom) / (1.0 + cka)


def linear_change_moments(a_mat: torch.Tensor, b_mat: torch.Tensor, c_mat: torch.Tensor):
    """(κ, μ, ν) of linear CKA from the centered feature-space products of X and the change D = Y − X:
    A = X̃ᵀX̃ (d, d), B = D̃ᵀX̃ (d, d), C = D̃ᵀD̃ (d, d), all float64. With a = ‖A‖², p = ⟨A,B⟩, q = ‖B‖²,
    r = ⟨A,C⟩, s = ‖B + Bᵀ + C‖² (since ỸᵀX̃ = A + B and ỸᵀỸ = A + B + Bᵀ + C):
        κ = ‖X̃ᵀX̃‖² = a,   μ = ‖ỸᵀX̃‖² − ‖X̃ᵀX̃‖² = 2p + q,   ν = ‖M‖² = 2r + s − 2q  (M = ỸỸᵀ − X̃X̃ᵀ).
    Feed them to ``one_minus_cka_from_change``; its numerator κν − μ² = 2ar + sa − 2qa − 4p² − q² − 4pq.
    """
    a = (a_mat * a_mat).sum()
    p = (a_mat * b_mat).sum()
    q = (b_mat * b_mat).sum()
    r = (a_mat * c_mat).sum()
    g = b_mat + b_mat.transpose(-1, -2) + c_mat
    s = (g * g).sum()
    return a, 2.0 * p + q, 2.0 * r + s - 2.0 * q


def _centered_change(x: torch.Tensor, y: torch.Tensor, min_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X̃ (n, d) and the centered change D̃ = (Y − X) − mean, both float64: D is formed in float64 from
    the inputs, then centered (D̃ = Ỹ − X̃ exactly in real arithmetic)."""
    x = _as_float64_2d("x", x)
    y = _as_float64_2d("y", y)
    if x.shape != y.shape:
        raise ValueError(f"the change-relative measures need x and y of one shape (n, d); got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < min_samples:
        raise ValueError(f"this measure needs at least {min_samples} samples; got {x.shape[0]}")
    d = y - x
    return x - x.mean(dim=0, keepdim=True), d - d.mean(dim=0, keepdim=True)


def _change_grams(xc: torch.Tensor, dc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K = X̃X̃ᵀ and the change of the Gram M = ỸỸᵀ − X̃X̃ᵀ = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ, (n, n) float64 each."""
    cross = xc @ dc.T
    return xc @ xc.T, cross + cross.T + dc @ dc.T


def linear_cka_change(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − linear CKA of x, y (n, d) of one width, float64 scalar, exact relative to the change itself.

    With X̃, D̃ the centered X and D = Y − X (formed in float64): κ = ‖X̃ᵀX̃‖², μ, ν from
    A = X̃ᵀX̃, B = D̃ᵀX̃, C = D̃ᵀD̃ (``linear_change_moments``; sample space K, M when n < d), finished by
    ``one_minus_cka_from_change``: no two numbers near 1 are subtracted, so 1 − CKA = 1e-8 keeps
    float64's relative precision. Equals 1 − ``linear_cka(x, y)`` up to that function's cancellation.
    """
    xc, dc = _centered_change(x, y, min_samples=2)
    n, d = xc.shape
    if n < d:
        k, m = _change_grams(xc, dc)
        return one_minus_cka_from_change((k * k).sum(), (k * m).sum(), (m * m).sum())
    return one_minus_cka_from_change(*linear_change_moments(xc.T @ xc, dc.T @ xc, dc.T @ dc))


def _hsic1_change_moments(xc: torch.Tensor, dc: torch.Tensor):
    """(HSIC₁(K,K), HSIC₁(K,M), HSIC₁(M,M)) float64 of one sample: HSIC₁ is bilinear, L = K + M."""
    k, m = _change_grams(xc, dc)
    return hsic1(k, k), hsic1(k, m), hsic1(m, m)


def debiased_cka_change(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − debiased CKA of x, y (n, d) of one width, n > 3, float64 scalar, exact relative to the change.

        1 − CKA_debiased from κ = HSIC₁(K,K), μ = HSIC₁(K,M), ν = HSIC₁(M,M),  K = X̃X̃ᵀ,
        M = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ (D = Y − X), through ``one_minus_cka_from_change``.
    """
    xc, dc = _centered_change(x, y, min_samples=4)
    return one_minus_cka_from_change(*_hsic1_change_moments(xc, dc))


def minibatch_cka_change(x_batches, y_batches) -> torch.Tensor:
    """1 − minibatch CKA (Nguyen, Raghu & Kornblith 2021) of minibatches x_b, y_b (n_b, d), n_b > 3,
    float64 scalar, exact relative to the change.

        κ = Σ_b HSIC₁(K_b,K_b), μ = Σ_b HSIC₁(K_b,M_b), ν = Σ_b HSIC₁(M_b,M_b),
    each minibatch centered on its own mean (HSIC₁ ignores it), M_b the change of its Gram (D = Y − X);
    finished by ``one_minus_cka_from_change``. What StreamingCKA(estimator="unbiased") computes with
    one update per minibatch.
    """
    x_batches, y_batches = list(x_batches), list(y_batches)
    if not x_batches or len(x_batches) != len(y_batches):
        raise ValueError(f"need the same non-zero number of x and y minibatches; got {len(x_batches)} and {len(y_batches)}")
    total = torch.zeros(3, dtype=torch.float64)
    for xb, yb in zip(x_batches, y_batches):
        total += torch.stack(_hsic1_change_moments(*_centered_change(xb, yb, min_samples=4)))
    return one_minus_cka_from_change(*total.unbind())


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
