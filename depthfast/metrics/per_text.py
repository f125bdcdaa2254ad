"""Per-text HSIC₁ statistics of the probe set and the bootstrap of the locality gradient over texts.

For each probe text t and layer ℓ, the change moments m_t,ℓ = (κ, μ, ν) = (HSIC₁(K,K), HSIC₁(K,M),
HSIC₁(M,M)) of the text's own tokens (K, L = K + M: token Grams of θ₀ and θ_T; M built from the change
D = Y − X, never as L − K; depthfast.cka_change). HSIC₁ is bilinear, so the usual triple
(HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L)) = (κ + μ, κ, κ + 2μ + ν). Resampling texts and summing their
moments gives the ratio-of-sums CKA of each resample, its 1 − CKA finished change-relative, hence a
percentile CI of the slope (``bootstrap_slope_ci``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from depthfast.artifacts import finite_or_none
from depthfast.cka import ieee_fp32_matmul
from depthfast.cka_change import hsic_triples_from_moments, moments_from_hsic_triples, one_minus_cka_from_moments
# PER_TEXT_GRAM_BYTES: budget for one chunk of per-text Grams and operands (texts × (seq² + seq·d) entries,
# a few tensors of that size at once): long sequences take fewer texts per chunk instead of gigabytes.
from depthfast.constants import PER_TEXT_GRAM_BYTES

# What results["metrics"]["slope_per_text"] is (stored as metrics["slope_per_text_estimator"]).
PER_TEXT_ESTIMATOR = "token HSIC₁ per text"
FORMS = ("hsic", "change")  # what a per-text tensor's last axis holds: triples, or the change moments


@torch.no_grad()
def per_text_hsic(base_acts: Sequence[torch.Tensor], tuned_acts: Sequence[torch.Tensor],
                  gram_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """HSIC₁ triples of ONE probe text at every layer: float64 (layers, 3), or None if n ≤ 3 tokens.

    base_acts[ℓ], tuned_acts[ℓ]: (n, d_ℓ) activations of the text's n real tokens (no padding) in
    the pretrained (X) and fine-tuned (Y) model; h[ℓ] = (HSIC₁(K, L), HSIC₁(K, K), HSIC₁(L, L)) with
    K = Xc Xcᵀ, L = Yc Ycᵀ of the per-text centered rows. HSIC₁ is undefined for n ≤ 3 samples: such
    a text returns None. ``hsic_triples_from_moments`` of ``per_text_change`` (same precision rules).
    """
    moments = per_text_change(base_acts, tuned_acts, gram_dtype)
    return None if moments is None else hsic_triples_from_moments(moments)


@torch.no_grad()
def per_text_change(base_acts: Sequence[torch.Tensor], tuned_acts: Sequence[torch.Tensor],
                    gram_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Change moments (κ, μ, ν) of ONE probe text at every layer: float64 (layers, 3), or None if n ≤ 3
    tokens; inputs as ``per_text_hsic``. Computed as ``per_text_change_batch`` of one text."""
    if len(base_acts) != len(tuned_acts):
        raise ValueError(f"base and tuned have different numbers of layers: {len(base_acts)} vs {len(tuned_acts)}")
    for x, y in zip(base_acts, tuned_acts):
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"per-text activations must be (n, d) with the same n; got {tuple(x.shape)}, {tuple(y.shape)}")
    if not base_acts or base_acts[0].shape[0] <= 3:
        return None
    mask = torch.ones(1, base_acts[0].shape[0], dtype=torch.bool, device=base_acts[0].device)
    h = per_text_change_batch([x.unsqueeze(0) for x in base_acts], [y.unsqueeze(0) for y in tuned_acts], mask,
                              gram_dtype=gram_dtype)
    return h[0]


@torch.no_grad()
def per_text_hsic_batch(base_acts: Sequence[torch.Tensor], tuned_acts: Sequence[torch.Tensor],
                        attention_mask: torch.Tensor, gram_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``per_text_hsic`` for every text of a padded probe batch: float64 on the CPU, (texts kept, layers, 3)
    of (HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L)) = ``hsic_triples_from_moments(per_text_change_batch(…))``."""
    return hsic_triples_from_moments(per_text_change_batch(base_acts, tuned_acts, attention_mask, gram_dtype))


@torch.no_grad()
def per_text_change_batch(base_acts: Sequence[torch.Tensor], tuned_acts: Sequence[torch.Tensor],
                          attention_mask: torch.Tensor, gram_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Change moments of every text of a padded probe batch: float64 on the CPU, (texts kept, layers, 3)
    of (κ, μ, ν) = (HSIC₁(K,K), HSIC₁(K,M), HSIC₁(M,M)) of each text's real tokens.

    base_acts[ℓ], tuned_acts[ℓ]: (batch, seq, d_ℓ) as BlockCapture gives them; attention_mask (batch, seq),
    1 = real token. Texts with ≤ 3 real tokens are skipped (the result may have 0 rows).

    Batched over texts, no host synchronisation per text (one copy of the result per call): padding
    is selected away with ``where`` (inf/NaN there never enters); each text's real rows X and change
    D = Y − X (formed in float64) are centered on their own mean in float64, before any rounding to
    the product dtype (HSIC₁ is invariant to a constant row shift; centering first removes offsets,
    massive activations, before the products). Then per text, with n its real tokens,
        K = X̃X̃ᵀ,   M = [X̃ D̃]·[D̃ Ỹ]ᵀ = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ  (Ỹ = X̃ + D̃),
    and with Ã, B̃ those with zeroed diagonal (padded rows and columns are zero and drop out of every sum):
        HSIC₁(A, B) = [tr(ÃB̃) + (1ᵀÃ1)(1ᵀB̃1)/((n−1)(n−2)) − (2/(n−2)) 1ᵀÃB̃1] / (n(n−3)).
    A layer whose base and tuned widths differ has no D: its moments come from the triples of K and
    L = ỸỸᵀ (``moments_from_hsic_triples``, the old statistics).

    Precision (``gram_dtype``, default by device): on the CPU float64 throughout (exact to float64
    roundoff, and cheap at probe sizes). On a GPU the (texts, seq, seq) Grams are fp32 products of
    the float64-centered rows rounded to fp32 (TF32 off), every reduction float64. Each entry of K
    carries a relative error ≲ √d·2⁻²⁴ of |x_i||x_j|, each entry of M one of the change's own size,
    so κ, μ, ν come out within ~1e-6 of themselves and the per-text 1 − CKA keeps that relative
    error at every magnitude (tests/test_per_text.py states the measured bounds). The bootstrap's CI
    comes from the spread between texts, orders of magnitude wider; and no float64 n×n Gram is formed
    (consumer GPUs run float64 at 1/32–1/64 of the fp32 rate).
    """
    if len(base_acts) != len(tuned_acts):
        raise ValueError(f"base and tuned have different numbers of layers: {len(base_acts)} vs {len(tuned_acts)}")
    if not base_acts:
        return torch.zeros(0, 0, 3, dtype=torch.float64)
    dev = base_acts[0].device
    mask = attention_mask.to(device=dev).bool()
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq); got shape {tuple(mask.shape)}")
    b, seq = mask.shape
    dt = gram_dtype or (torch.float64 if dev.type == "cpu" else torch.float32)
    size = torch.tensor([], dtype=dt).element_size()
    counts = mask.sum(dim=1)
    n = counts.to(torch.float64).clamp_min(4.0)  # texts with n ≤ 3 are computed on a dummy n and dropped
    out = torch.empty(b, len(base_acts), 3, dtype=torch.float64, device=dev)
    with ieee_fp32_matmul():
        for layer, (x, y) in enumerate(zip(base_acts, tuned_acts)):
            for t in (x, y):
                if t.dim() != 3 or t.shape[:2] != mask.shape:
                    raise ValueError(f"per-text activations must be (batch, seq, d) matching the mask {tuple(mask.shape)}; "
                                     f"got {tuple(t.shape)}")
            width = max(x.shape[-1], y.shape[-1])
            # per text: three Grams at once and the float64 rows (X̃, D̃) with their two width-2d operands
            chunk = max(1, PER_TEXT_GRAM_BYTES // max(1, 3 * seq * seq * size + seq * width * (16 + 4 * size)))
            for a in range(0, b, chunk):
                sl = slice(a, a + chunk)
                if x.shape[-1] == y.shape[-1]:
                    out[sl, layer] = _change_moments(x[sl].detach(), y[sl].detach(), mask[sl], counts[sl], n[sl], dt)
                else:
                    k = _gram(_centered(x[sl].detach(), mask[sl], counts[sl]), dt)
                    l = _gram(_centered(y[sl].detach(), mask[sl], counts[sl]), dt)
                    triples = torch.stack([_hsic1(k, l, n[sl]), _hsic1(k, k, n[sl]), _hsic1(l, l, n[sl])], dim=1)
                    out[sl, layer] = moments_from_hsic_triples(triples)
    return out[(counts > 3).to(dev)].cpu()


def _centered(x: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """float64 (texts, seq, d): the rows centered per text over its real tokens, padded rows zero."""
    m = mask.unsqueeze(-1)
    real = torch.where(m, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    mean = real.sum(dim=1) / counts.clamp_min(1).unsqueeze(-1).to(torch.float64)
    return torch.where(m, real - mean.unsqueeze(1), torch.zeros((), dtype=torch.float64, device=x.device))


def _gram(xc: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """K̃ (texts, seq, seq) in dt of float64-centered rows xc, rounded to dt only now; diagonal zero."""
    c = xc.to(dt)
    k = torch.bmm(c, c.transpose(1, 2))
    k.diagonal(dim1=1, dim2=2).zero_()
    return k


def _change_moments(x, y, mask, counts, n, dt) -> torch.Tensor:
    """(texts, 3) float64 (κ, μ, ν) of one layer from X, Y (texts, seq, d) of one width (the docstring above)."""
    xc = _centered(x, mask, counts)
    # D = Y − X in float64 (padded rows: NaN − NaN, selected away by _centered's where)
    dc = _centered(y.to(torch.float64) - x.to(torch.float64), mask, counts)
    k = _gram(xc, dt)
    left = torch.cat([xc, dc], dim=2).to(dt)
    right = torch.cat([dc, xc + dc], dim=2).to(dt)
    del xc, dc
    change = torch.bmm(left, right.transpose(1, 2))
    del left, right
    change.diagonal(dim1=1, dim2=2).zero_()
    return torch.stack([_hsic1(k, k, n), _hsic1(k, change, n), _hsic1(change, change, n)], dim=1)


def _hsic1(a: torch.Tensor, b: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(texts,) float64 HSIC₁(A, B) of zero-diagonal Grams (texts, seq, seq), n (texts,) float64. B may be
    asymmetric at product roundoff (M): tr(ÃB̃) is read as Σ A_ij B_ij, 1ᵀÃB̃1 as (Ã1)·(B̃1)."""
    f64 = torch.float64
    tr = (a * b).sum(dim=(1, 2), dtype=f64)
    row_a, row_b = a.sum(dim=2, dtype=f64), b.sum(dim=2, dtype=f64)
    sa, sb = row_a.sum(dim=1), row_b.sum(dim=1)
    return (tr + sa * sb / ((n - 1) * (n - 2)) - 2.0 * (row_a * row_b).sum(dim=1) / (n - 2)) / (n * (n - 3))


def _slopes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """OLS slope of each row of y (..., m) on x (m,): Σ(x − x̄)(y − ȳ) / Σ(x − x̄)² (NaN rows stay NaN)."""
    xc = x - x.mean()
    return (y * xc).sum(dim=-1) / (xc * xc).sum()


def _change_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """1 − CKA_S (..., layers) from summed moments (..., layers, 3) of (κ, μ, ν), change-relative;
    NaN where Σh_kk · Σh_ll = κ(κ + 2μ + ν) is ≤ 0."""
    kk, km, mm = sums.unbind(-1)
    return one_minus_cka_from_moments(kk, km, mm)


@torch.no_grad()
def bootstrap_slope_ci(depths: Sequence[float], per_text_hsic: torch.Tensor, num_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0, form: str = "hsic") -> dict:
    """Percentile bootstrap CI of the locality gradient over probe texts.

    depths: (m,) normalized depths of the layers in ``per_text_hsic`` (pass the blocks only, as for the
    locality gradient). per_text_hsic: float64 (T texts, m layers, 3), by ``form``: "hsic" the triples
    (HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L)) per text (``per_text_hsic_batch``), turned into moments by
    ``moments_from_hsic_triples``; "change" the moments (κ, μ, ν) (``per_text_change_batch``), which keep
    small changes exact. For a multiset S of texts, per layer
        CKA_S = Σ_{t∈S} h_kl / sqrt(Σ_{t∈S} h_kk · Σ_{t∈S} h_ll)   (a ratio of sums),
        1 − CKA_S from the summed moments (depthfast.cka_change.one_minus_cka_from_moments),
        β_S   = OLS slope of (1 − CKA_S) on depth.
    The point estimate uses S = all texts once. Each resample draws T texts with replacement; all
    resamples at once as a count matrix C (B, T), so the sums are one product C @ h. The CI is the
    ((1−confidence)/2, (1+confidence)/2) percentile interval (linear interpolation) of the β_S whose
    CKA is defined at every layer; resamples with Σh_kk·Σh_ll ≤ 0 at some layer are left out (counted).

    Returns {"slope", "ci_low", "ci_high", "std", "confidence", "num_texts", "num_resamples",
    "num_valid_resamples"}; slope None with < 2 layers, CI None with < 2 texts or < 2 valid resamples.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    h = torch.as_tensor(per_text_hsic, dtype=torch.float64)
    x = torch.as_tensor([float(d) for d in depths], dtype=torch.float64)
    if h.dim() != 3 or h.shape[-1] != 3:
        raise ValueError(f"per_text_hsic must be (texts, layers, 3); got {tuple(h.shape)}")
    if h.shape[1] != x.shape[0]:
        raise ValueError(f"per_text_hsic has {h.shape[1]} layers but {x.shape[0]} depths were given")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if form == "hsic":
        h = moments_from_hsic_triples(h)
    t, m = h.shape[0], h.shape[1]
    result = {"slope": None, "ci_low": None, "ci_high": None, "std": None, "confidence": float(confidence),
              "num_texts": int(t), "num_resamples": int(num_resamples), "num_valid_resamples": 0}
    if t == 0 or m < 2 or float(((x - x.mean()) ** 2).sum()) == 0:
        return result
    result["slope"] = finite_or_none(_slopes(x, _change_from_sums(h.sum(dim=0))))
    if t < 2 or num_resamples < 2:
        return result
    generator = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(t, (num_resamples, t), generator=generator)
    counts = torch.zeros(num_resamples, t, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(num_resamples, t, dtype=torch.float64))
    sums = (counts @ h.reshape(t, m * 3)).reshape(num_resamples, m, 3)
    slopes = _slopes(x, _change_from_sums(sums))
    slopes = slopes[torch.isfinite(slopes)]
    result["num_valid_resamples"] = int(slopes.numel())
    if slopes.numel() < 2:
        return result
    alpha = (1.0 - confidence) / 2.0
    low, high = torch.quantile(slopes, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    result.update(ci_low=finite_or_none(low), ci_high=finite_or_none(high), std=finite_or_none(slopes.std()))
    return result
