"""1 − CKA from the moments of K and the change M = L − K, batched and NaN-safe, in float64.

For any symmetric bilinear HSIC h (biased, or the unbiased HSIC₁ of Song et al. 2012) with
L = K + M and κ = h(K, K), μ = h(K, M), ν = h(M, M):

    h(K, L) = κ + μ,   h(L, L) = κ + 2μ + ν,   CKA = (κ + μ) / sqrt(κ (κ + 2μ + ν)),
    1 − CKA² = (κν − μ²) / (κ (κ + 2μ + ν)),   1 − CKA = (1 − CKA²) / (1 + CKA).

The O(1) terms cancel algebraically, so a small change keeps an error relative to itself instead of
to 1. M is formed from the activations X and the change D = Y − X (never as L − K):
M = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ = [X̃ D̃]·[D̃ Ỹ]ᵀ with Ỹ = X̃ + D̃.

Batched twin of depthfast.cka.reference.one_minus_cka_from_change (which raises on undefined input):
here an undefined entry is NaN, so resamples and matrices can be finished in one call.
"""

from __future__ import annotations

import torch


def one_minus_cka_from_moments(kk: torch.Tensor, km: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
    """1 − CKA (float64, shape of the broadcast inputs) from κ = kk, μ = km, ν = mm.

    NaN where h(K,K)·h(L,L) = κ(κ + 2μ + ν) is ≤ 0 or not finite (CKA undefined). Where CKA ≤ ½ the
    change is large and 1 − CKA is formed directly; elsewhere from (κν − μ²) / (κ(κ+2μ+ν)) / (1 + CKA).
    """
    kk, km, mm = (torch.as_tensor(v, dtype=torch.float64) for v in (kk, km, mm))
    denom = kk * (kk + 2.0 * km + mm)
    ok = torch.isfinite(denom) & (denom > 0)
    safe = torch.where(ok, denom, torch.ones_like(denom))
    cka = (kk + km) / safe.sqrt()
    # 1 + cka can be 0 only where cka ≤ ½ picks the direct branch
    small = (kk * mm - km * km) / safe / (1.0 + cka).clamp_min(0.5)
    out = torch.where(cka <= 0.5, 1.0 - cka, small)
    return torch.where(ok, out, torch.full_like(out, float("nan")))


def moments_from_hsic_triples(triples: torch.Tensor) -> torch.Tensor:
    """(..., 3) (h(K,L), h(K,K), h(L,L)) → (..., 3) (κ, μ, ν) = (h_kk, h_kl − h_kk, h_ll − 2h_kl + h_kk).

    For statistics that only exist as triples (layers of different widths): the subtraction loses
    what float64 roundoff of the triples holds (≈ 1e-16 of h_kk, absolute), no more."""
    kl, kk, ll = torch.as_tensor(triples, dtype=torch.float64).unbind(-1)
    return torch.stack([kk, kl - kk, ll - 2.0 * kl + kk], dim=-1)


def hsic_triples_from_moments(moments: torch.Tensor) -> torch.Tensor:
    """(..., 3) (κ, μ, ν) → (..., 3) (h(K,L), h(K,K), h(L,L)) = (κ + μ, κ, κ + 2μ + ν)."""
    kk, km, mm = torch.as_tensor(moments, dtype=torch.float64).unbind(-1)
    return torch.stack([kk + km, kk, kk + 2.0 * km + mm], dim=-1)
