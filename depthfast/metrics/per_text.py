"""Per-text HSIC₁ statistics of the probe set and the bootstrap of the locality gradient over texts.

For each probe text t and layer ℓ, the triple h_t,ℓ = (HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L)) of the
text's own tokens (K, L: token Grams of θ₀ and θ_T). Resampling texts and summing their triples gives
the ratio-of-sums CKA of each resample, hence a percentile CI of the slope (``bootstrap_slope_ci``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from depthfast.results import finite_or_none

# What results["metrics"]["slope_per_text"] is (stored as metrics["slope_per_text_estimator"]).
PER_TEXT_ESTIMATOR = "token HSIC₁ per text"
# Budget for one chunk of per-text Grams (texts × seq² entries, a few tensors of that size at once):
# long sequences take fewer texts per chunk instead of gigabytes of workspace.
_PER_TEXT_GRAM_BYTES = 256 * 2**20


@torch.no_grad()
def per_text_hsic(base_acts: Sequence[torch.Tensor], tuned_acts: Sequence[torch.Tensor],
                  gram_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """HSIC₁ triples of ONE probe text at every layer: float64 (layers, 3), or None if n ≤ 3 tokens.

    base_acts[ℓ], tuned_acts[ℓ]: (n, d_ℓ) activations of the text's n real tokens (no padding) in
    the pretrained (X) and fine-tuned (Y) model; h[ℓ] = (HSIC₁(K, L), HSIC₁(K, K), HSIC₁(L, L)) with
    K = Xc Xcᵀ, L = Yc Ycᵀ of the per-text centered rows. HSIC₁ is undefined for n ≤ 3 samples: such
    a text returns None. Computed as ``per_text_hsic_batch`` of one text (same precision rules).
    """
    if len(base_acts) != len(tuned_acts):
        raise ValueError(f"base and tuned have different numbers of layers: {len(base_acts)} vs {len(tuned_acts)}")
    for x, y in zip(base_acts, tuned_acts):
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"per-text activations must be (n, d) with the same n; got {tuple(x.shape)}, {tuple(y.shape)}")
    if not base_acts or base_acts[0].shape[0] <= 3:
        return None
    mask = torch.ones(1, base_acts[0].shape[0], dtype=torch.bool, device=base_acts[0].device)
    h = per_text_hsic_batch([x.unsqueeze(0) for x in base_acts], [y.unsqueeze(0) for y in tuned_acts], mask,
                            gram_dtype=gram_dtype)
    return h[0]


@torch.no_grad()
def per_text_hsic_batch(base_acts: Sequence[torch.Tensor], tuned_acts: Sequence[torch.Tensor],
                        attention_mask: torch.Tensor, gram_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``per_text_hsic`` for every text of a padded probe batch: float64 on the CPU, (texts kept, layers, 3).

    base_acts[ℓ], tuned_acts[ℓ]: (batch, seq, d_ℓ) as BlockCapture gives them; attention_mask (batch, seq),
    1 = real token. Texts with ≤ 3 real tokens are skipped (the result may have 0 rows).

    Batched over texts, no host synchronisation per text (one copy of the result per call): each
    text's real rows are centered on their own mean — HSIC₁ is invariant to adding a constant row
    vector, so any error in that mean is harmless, and centering first removes offsets (massive
    activations) before the products — padding is zeroed with ``where`` (inf/NaN there never enters),
    then per text, with n its real tokens and K̃, L̃ the Grams with zeroed diagonal (padded rows and
    columns are zero and drop out of every sum):
        HSIC₁ = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − (2/(n−2)) 1ᵀK̃L̃1] / (n(n−3)).

    Precision (``gram_dtype``, default by device): on the CPU float64 throughout (exact to float64
    roundoff, and cheap at probe sizes). On a GPU the (texts, seq, seq) Grams are fp32 products of
    the fp32 centered rows (TF32 off), every reduction float64. Each Gram entry then carries a relative
    error ≲ √d·2⁻²⁴ of |x_i||x_j|, independent across entries, so the sums over n² entries come out
    within ~1e-6 relative of float64: measured on random texts (n = 4 … 128, d = 24 … 2048, offsets
    of 1e3 on two channels, Y = X + 0.01·noise) ≤ 2.5e-6 relative per triple and ≤ 4.1e-7 absolute on
    the ratio-of-sums 1 − CKA_S (≈ 6e-5 there: 0.7 %; tests/test_cka.py). That is far below what the
    bootstrap resolves: its CI comes from the spread between texts, orders of magnitude wider; and no
    float64 n×n Gram is formed (consumer GPUs run float64 at 1/32–1/64 of the fp32 rate).
    """
    from depthfast.cka import ieee_fp32_matmul

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
    counts = mask.sum(dim=1)
    n = counts.to(torch.float64).clamp_min(4.0)  # texts with n ≤ 3 are computed on a dummy n and dropped
    out = torch.empty(b, len(base_acts), 3, dtype=torch.float64, device=dev)
    chunk = max(1, _PER_TEXT_GRAM_BYTES // max(1, 4 * seq * seq * torch.tensor([], dtype=dt).element_size()))
    with ieee_fp32_matmul():
        for layer, (x, y) in enumerate(zip(base_acts, tuned_acts)):
            for t in (x, y):
                if t.dim() != 3 or t.shape[:2] != mask.shape:
                    raise ValueError(f"per-text activations must be (batch, seq, d) matching the mask {tuple(mask.shape)}; "
                                     f"got {tuple(t.shape)}")
            for a in range(0, b, chunk):
                sl = slice(a, a + chunk)
                k = _per_text_gram(x[sl].detach(), mask[sl], counts[sl], dt)
                l = _per_text_gram(y[sl].detach(), mask[sl], counts[sl], dt)
                out[sl, layer] = _hsic1_triples(k, l, n[sl])
    return out[(counts > 3).to(dev)].cpu()


def _per_text_gram(x: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """K̃ (texts, seq, seq) in dt: Gram of the rows centered per text over its real tokens, padded rows
    and columns zero, diagonal zero."""
    m = mask.unsqueeze(-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    real = torch.where(m, x, zero)
    mean = real.sum(dim=1, dtype=torch.float64) / counts.clamp_min(1).unsqueeze(-1).to(torch.float64)
    xc = torch.where(m, real.to(dt) - mean.to(dt).unsqueeze(1), torch.zeros((), dtype=dt, device=x.device))
    k = torch.bmm(xc, xc.transpose(1, 2))
    k.diagonal(dim1=1, dim2=2).zero_()
    return k


def _hsic1_triples(k: torch.Tensor, l: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(texts, 3) float64: HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L) from zero-diagonal Grams, n (texts,) float64."""
    f64 = torch.float64
    sum_k, sum_l = k.sum(dim=(1, 2), dtype=f64), l.sum(dim=(1, 2), dtype=f64)
    row_k, row_l = k.sum(dim=2, dtype=f64), l.sum(dim=2, dtype=f64)

    def h(a, b, sa, sb, ra, rb):
        tr = (a * b).sum(dim=(1, 2), dtype=f64)
        return (tr + sa * sb / ((n - 1) * (n - 2)) - 2.0 * (ra * rb).sum(dim=1) / (n - 2)) / (n * (n - 3))

    return torch.stack([h(k, l, sum_k, sum_l, row_k, row_l), h(k, k, sum_k, sum_k, row_k, row_k),
                        h(l, l, sum_l, sum_l, row_l, row_l)], dim=1)


def _slopes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """OLS slope of each row of y (..., m) on x (m,): Σ(x − x̄)(y − ȳ) / Σ(x − x̄)² (NaN rows stay NaN)."""
    xc = x - x.mean()
    return (y * xc).sum(dim=-1) / (xc * xc).sum()


def _change_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """1 − Σh_kl / sqrt(Σh_kk · Σh_ll) for sums (..., layers, 3); NaN where the denominator is ≤ 0."""
    kl, kk, ll = sums.unbind(-1)
    denom = kk * ll
    cka = torch.where(denom > 0, kl / denom.clamp_min(1e-300).sqrt(), torch.full_like(kl, float("nan")))
    return 1.0 - cka


@torch.no_grad()
def bootstrap_slope_ci(depths: Sequence[float], per_text_hsic: torch.Tensor, num_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap CI of the locality gradient over probe texts.

    depths: (m,) normalized depths of the layers in ``per_text_hsic`` (pass the blocks only, as for the
    locality gradient). per_text_hsic: float64 (T texts, m layers, 3) of (HSIC₁(K,L), HSIC₁(K,K),
    HSIC₁(L,L)) per text (``per_text_hsic``). For a multiset S of texts, per layer
        CKA_S = Σ_{t∈S} h_kl / sqrt(Σ_{t∈S} h_kk · Σ_{t∈S} h_ll)   (a ratio of sums),
        β_S   = OLS slope of (1 − CKA_S) on depth.
    The point estimate uses S = all texts once. Each resample draws T texts with replacement; all
    resamples at once as a count matrix C (B, T), so the sums are one product C @ h. The CI is the
    ((1−confidence)/2, (1+confidence)/2) percentile interval (linear interpolation) of the β_S whose
    CKA is defined at every layer; resamples with Σh_kk·Σh_ll ≤ 0 at some layer are left out (counted).

    Returns {"slope", "ci_low", "ci_high", "std", "confidence", "num_texts", "num_resamples",
    "num_valid_resamples"}; slope None with < 2 layers, CI None with < 2 texts or < 2 valid resamples.
    """
    h = torch.as_tensor(per_text_hsic, dtype=torch.float64)
    x = torch.as_tensor([float(d) for d in depths], dtype=torch.float64)
    if h.dim() != 3 or h.shape[-1] != 3:
        raise ValueError(f"per_text_hsic must be (texts, layers, 3); got {tuple(h.shape)}")
    if h.shape[1] != x.shape[0]:
        raise ValueError(f"per_text_hsic has {h.shape[1]} layers but {x.shape[0]} depths were given")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
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

