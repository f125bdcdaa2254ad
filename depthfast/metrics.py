"""Numbers that summarize a depth profile, and training-free distances between objectives.

Every function is pure (plain lists / tensors in, floats or None out) so it can be checked by hand.
"Undefined" is always ``None``, never NaN, so the results can go straight into results.json.

Profile shape, over the blocks ℓ = 1 … L (the caller leaves the embedding row out, as the
locality gradient does), with depths d_ℓ = ℓ/L and changes c_ℓ = 1 − CKA_ℓ:

    locality gradient   β = Σ(d − d̄)(c − c̄) / Σ(d − d̄)²            (locality_gradient)
    bootstrap CI of β   over probe texts, from per-text HSIC₁ triples  (bootstrap_slope_ci)
    steepness           ln((c̄_top + ε) / (c̄_bottom + ε)),  ε = 0.01 · max_ℓ c⁺_ℓ   (steepness)
    width               fraction of blocks with c⁺_ℓ ≥ ½ max c⁺; depth centroid and spread (width)

Objective distance at θ₀ (before the first step):

    initial loss / chance level            L₀ / ln K   (K = number of labels, or vocabulary size)
    gradient-alignment distance            1 − cos(∇θ L_pretrain, ∇θ L_finetune) over shared θ
    kernel-target alignment (centered)     linear CKA(features, one-hot labels)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

# Relative floor of the steepness ratio: 1 % of the profile's largest change (see ``steepness``).
STEEPNESS_FLOOR = 0.01
# Keys that run.py stores under results["metrics"] for the objective distance (read by the report).
OBJECTIVE_DISTANCE_KEYS = ("initial_loss_normalized", "gradient_alignment_distance", "kernel_target_alignment")
# What results["metrics"]["slope_per_text"] is (stored as metrics["slope_per_text_estimator"]).
PER_TEXT_ESTIMATOR = "token HSIC₁ per text"


def slope_estimator_label(estimator: str, pooling: str) -> str:
    """The name of the headline slope's estimator, "<estimator>/<pooling>" (e.g. "exact/token")."""
    return f"{estimator}/{pooling}"


def locality_gradient(depths: list[float], changes: list[float]) -> float | None:
    """OLS slope of change on normalized depth; None with fewer than two points."""
    if len(depths) < 2:
        return None
    n = len(depths)
    mean_x, mean_y = sum(depths) / n, sum(changes) / n
    sxx = sum((x - mean_x) ** 2 for x in depths)
    if sxx == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(depths, changes)) / sxx


def _finite(value) -> float | None:
    """A Python float if finite, else None (JSON has no NaN, and NaN must never pass as a number)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check_profile(depths: Sequence[float], changes: Sequence[float]) -> tuple[list[float], list[float]]:
    depths, changes = [float(d) for d in depths], [float(c) for c in changes]
    if len(depths) != len(changes):
        raise ValueError(f"depths and changes differ in length: {len(depths)} vs {len(changes)}")
    return depths, changes


# --------------------------------------------------------------------------------------------
# Per-text HSIC₁ and the bootstrap of the locality gradient
# --------------------------------------------------------------------------------------------

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
    result["slope"] = _finite(_slopes(x, _change_from_sums(h.sum(dim=0))))
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
    result.update(ci_low=_finite(low), ci_high=_finite(high), std=_finite(slopes.std()))
    return result


# --------------------------------------------------------------------------------------------
# Profile shape
# --------------------------------------------------------------------------------------------

def _positive(changes: list[float]) -> list[float]:
    # 1 − CKA below 0 is estimator noise (unbiased HSIC₁ can undershoot): it counts as no change.
    return [max(c, 0.0) for c in changes]


def steepness(depths: Sequence[float], changes: Sequence[float], floor: float = STEEPNESS_FLOOR) -> dict:
    """How concentrated the change is toward the output, scale-free: a log-ratio of top to bottom.

    Blocks are ordered by depth; q = max(1, ⌊m/4⌋) blocks form each end (m blocks: q = 1 for m ≤ 7,
    i.e. last vs first block for 2–3 blocks). With c⁺ = max(c, 0) (negative change is noise),
        top = mean of c⁺ over the q deepest blocks,  bottom = mean over the q shallowest,
        ε   = floor · max_ℓ c⁺_ℓ                    (floor = 0.01 by default),
        steepness = ln((top + ε) / (bottom + ε)).
    ε is relative, so multiplying every change by s > 0 leaves steepness unchanged (stable however
    tiny the changes), and it bounds |steepness| ≤ ln(1 + 1/floor) ≈ 4.62. 0 means no depth trend;
    > 0 change concentrated near the output. Undefined (None): fewer than 2 blocks, or all c⁺ = 0.

    Returns {"steepness", "top_mean_change", "bottom_mean_change", "quarter_blocks"}.
    """
    depths, changes = _check_profile(depths, changes)
    m = len(changes)
    out = {"steepness": None, "top_mean_change": None, "bottom_mean_change": None, "quarter_blocks": None}
    if m < 2:
        return out
    order = sorted(range(m), key=lambda i: depths[i])
    pos = _positive([changes[i] for i in order])
    q = max(1, m // 4)
    top, bottom = sum(pos[-q:]) / q, sum(pos[:q]) / q
    out.update(top_mean_change=top, bottom_mean_change=bottom, quarter_blocks=q)
    peak = max(pos)
    if peak <= 0:
        return out
    eps = floor * peak
    out["steepness"] = _finite(math.log((top + eps) / (bottom + eps)))
    return out


def width(depths: Sequence[float], changes: Sequence[float]) -> dict:
    """How many blocks the change spreads over.

    With c⁺ = max(c, 0) over m blocks:
        width_blocks   = #{ℓ : c⁺_ℓ ≥ ½ max c⁺}      (blocks at or above half the maximum)
        width_fraction = width_blocks / m             (1 for a flat profile, 1/m for a single peak)
        depth_centroid = Σ d_ℓ c⁺_ℓ / Σ c⁺_ℓ          (where the change sits, in [0, 1])
        depth_spread   = sqrt(Σ c⁺_ℓ (d_ℓ − centroid)² / Σ c⁺_ℓ)   (0 when all change is in one block)
    One block: width 1 block, fraction 1, spread 0. All-zero change: every value None.
    """
    depths, changes = _check_profile(depths, changes)
    out = {"width_blocks": None, "width_fraction": None, "depth_centroid": None, "depth_spread": None}
    pos = _positive(changes)
    if not pos or max(pos) <= 0:
        return out
    half = 0.5 * max(pos)
    blocks = sum(1 for c in pos if c >= half)
    total = sum(pos)
    centroid = sum(d * c for d, c in zip(depths, pos)) / total
    spread = math.sqrt(max(0.0, sum(c * (d - centroid) ** 2 for d, c in zip(depths, pos)) / total))
    out.update(width_blocks=blocks, width_fraction=blocks / len(pos), depth_centroid=centroid, depth_spread=spread)
    return out


def profile_metrics(depths: Sequence[float], changes: Sequence[float], per_text_hsic: torch.Tensor | None = None,
                    num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Every profile-shape number of one run, JSON-safe (floats, ints or None; never NaN).

    depths, changes: the blocks ℓ = 1 … L (drop the embedding row ℓ = 0). per_text_hsic: optional
    float64 (texts, L, 3) for the same blocks (``per_text_hsic_batch`` stacked over the probe set).

    Keys:
        num_blocks, mean_change, max_change, peak_depth (depth of the largest change),
        locality_gradient (OLS slope β), relative_locality_gradient (β / mean change, scale-free),
        steepness, top_mean_change, bottom_mean_change, quarter_blocks (``steepness``),
        width_blocks, width_fraction, depth_centroid, depth_spread (``width``),
        and with per_text_hsic: slope_per_text (β of the per-text ratio-of-sums estimator: token-level
        HSIC₁ per probe text, whatever the run's --pooling/--estimator), its bootstrap CI over probe
        texts as slope_per_text_ci_low, slope_per_text_ci_high (the same numbers also as the older
        names slope_ci_low, slope_ci_high), slope_ci_std, slope_ci_confidence, slope_ci_texts,
        slope_ci_resamples (valid resamples) (``bootstrap_slope_ci``); these are None without it.
        The headline locality_gradient is the slope of ``changes``, i.e. of the run's own estimator;
        the caller records which (run.py: metrics["slope_estimator"] = "<estimator>/<pooling>").
    """
    depths, changes = _check_profile(depths, changes)
    m = len(changes)
    mean = sum(changes) / m if m else None
    slope = locality_gradient(depths, changes) if m else None
    out = {
        "num_blocks": m,
        "mean_change": _finite(mean),
        "max_change": _finite(max(changes)) if m else None,
        "peak_depth": depths[max(range(m), key=lambda i: changes[i])] if m else None,
        "locality_gradient": _finite(slope),
        "relative_locality_gradient": _finite(slope / mean) if slope is not None and mean and mean > 0 else None,
    }
    out.update(steepness(depths, changes))
    out.update(width(depths, changes))
    ci = {"slope": None, "ci_low": None, "ci_high": None, "std": None, "confidence": confidence,
          "num_texts": None, "num_valid_resamples": None}
    if per_text_hsic is not None:
        ci = bootstrap_slope_ci(depths, per_text_hsic, num_resamples, confidence, seed)
    out.update(slope_per_text=ci["slope"], slope_per_text_ci_low=ci["ci_low"], slope_per_text_ci_high=ci["ci_high"],
               slope_ci_low=ci["ci_low"], slope_ci_high=ci["ci_high"],
               slope_ci_std=ci["std"], slope_ci_confidence=ci["confidence"], slope_ci_texts=ci["num_texts"],
               slope_ci_resamples=ci["num_valid_resamples"])
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Objective distance at θ₀ (training-free)
# --------------------------------------------------------------------------------------------

def chance_normalized_loss(loss: float, num_classes: int) -> float | None:
    """Initial task loss over its chance level: L₀ / ln K.

    K = number of labels (cls) or vocabulary size (mlm, clm): ln K is the cross-entropy of the uniform
    prediction, so 1 ≈ "as good as guessing", < 1 the pretrained model already helps. None if K < 2
    or the loss is not finite.
    """
    if num_classes is None or num_classes < 2:
        return None
    return _finite(float(loss) / math.log(num_classes))


def gradient_alignment_distance(shared_params: Sequence[torch.nn.Parameter],
                                loss_pretrain_fn: Callable[[], torch.Tensor],
                                loss_finetune_fn: Callable[[], torch.Tensor]) -> float | None:
    """1 − cos(∇θ L_pretrain, ∇θ L_finetune) at the current θ, over ``shared_params`` (∈ [0, 2]).

    The callables take no arguments and return a scalar loss with a graph to ``shared_params`` (for
    instance causal-LM or masked-LM loss and the fine-tuning loss on the same batch). Gradients come
    from torch.autograd.grad (nothing is written to .grad, no optimizer state is touched); a parameter a
    loss does not reach has gradient 0. In float64, summed per parameter:
        cos = Σ_p ⟨g₁,p, g₂,p⟩ / (sqrt(Σ_p ‖g₁,p‖²) · sqrt(Σ_p ‖g₂,p‖²)).
    0: same direction; 1: orthogonal; 2: opposite. None if a gradient is zero or not finite.
    Call it with the model in eval mode so dropout does not make the two losses see different networks.
    """
    params = [p for p in shared_params if p.requires_grad]
    if not params:
        raise ValueError("gradient_alignment_distance needs at least one parameter that requires grad")

    def grads(fn):
        loss = fn()
        if loss.dim() != 0:
            raise ValueError(f"the loss callables must return a scalar; got shape {tuple(loss.shape)}")
        return torch.autograd.grad(loss, params, allow_unused=True)

    g1 = grads(loss_pretrain_fn)
    g2 = grads(loss_finetune_fn)
    dot = n1 = n2 = 0.0
    for a, b in zip(g1, g2):
        if a is None and b is None:
            continue
        if a is not None:
            a64 = a.detach().to(torch.float64)
            n1 += float((a64 * a64).sum())
        if b is not None:
            b64 = b.detach().to(torch.float64)
            n2 += float((b64 * b64).sum())
        if a is not None and b is not None:
            dot += float((a64 * b64).sum())
    if not (math.isfinite(dot) and math.isfinite(n1) and math.isfinite(n2)) or n1 <= 0 or n2 <= 0:
        return None
    cos = max(-1.0, min(1.0, dot / math.sqrt(n1 * n2)))
    return 1.0 - cos


def kernel_target_alignment(features: torch.Tensor, labels: torch.Tensor | Sequence[int], num_labels: int) -> float | None:
    """Centered kernel-target alignment of features (n, d) with class labels (n,) in [0, num_labels).

    With Y the one-hot labels (n, num_labels), K = Fc Fcᵀ and L = Yc Ycᵀ (columns centered):
        KTA = ⟨K, L⟩_F / (‖K‖_F ‖L‖_F) = ‖Ycᵀ Fc‖²_F / (‖Fcᵀ Fc‖_F ‖Ycᵀ Yc‖_F) = linear CKA(F, Y),
    in [0, 1]; higher = the pretrained features already separate the classes. Features are typically
    the last block's output mean-pooled per text. None if undefined (< 2 samples, one class only, or
    constant features).
    """
    from depthfast.cka import linear_cka
    from depthfast.errors import DepthfastError

    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be (n, d) with n = len(labels); got {tuple(features.shape)} and {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}); got range [{int(labels.min())}, {int(labels.max())}]")
    if labels.numel() < 2:
        return None
    onehot = torch.nn.functional.one_hot(labels, num_labels).to(torch.float64)
    try:
        return _finite(linear_cka(features.detach().to(torch.float64), onehot))
    except DepthfastError:
        return None


def pearson_ci(x: Sequence[float], y: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95,
               seed: int = 0) -> dict:
    """Pearson r of paired values, with a percentile bootstrap CI over the pairs (vectorized).

        r = Σ(x − x̄)(y − ȳ) / sqrt(Σ(x − x̄)² Σ(y − ȳ)²)
    Pairs with a None / non-finite member are dropped. r is None with < 3 pairs or zero variance; the
    CI is None with < 4 pairs. Resamples with zero variance are left out.
    Returns {"r", "ci_low", "ci_high", "n", "confidence"}.
    """
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    out = {"r": None, "ci_low": None, "ci_high": None, "n": len(pairs), "confidence": float(confidence)}
    if len(pairs) < 3:
        return out
    xy = torch.tensor(pairs, dtype=torch.float64)

    def corr(a, b):
        a = a - a.mean(dim=-1, keepdim=True)
        b = b - b.mean(dim=-1, keepdim=True)
        den = ((a * a).sum(-1) * (b * b).sum(-1)).sqrt()
        return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))

    out["r"] = _finite(corr(xy[:, 0], xy[:, 1]))
    if out["r"] is None or len(pairs) < 4:
        return out
    generator = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(len(pairs), (num_resamples, len(pairs)), generator=generator)
    rs = corr(xy[idx, 0], xy[idx, 1])
    rs = rs[torch.isfinite(rs)]
    if rs.numel() >= 2:
        alpha = (1.0 - confidence) / 2.0
        low, high = torch.quantile(rs, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
        out.update(ci_low=_finite(low), ci_high=_finite(high))
    return out


# --------------------------------------------------------------------------------------------
# Seed-to-seed uncertainty of a run-level number, and the equal-step vs none verdict
# --------------------------------------------------------------------------------------------

# The rule of ``persistence_verdict`` (also printed in report.md and README).
PERSISTENCE_RULE = (
    "R = mean slope(equal-step) / mean slope(none) over seeds, 95 % CI by the delta method with Student t "
    "(df = min(seeds) − 1). persists: the equal-step slope's 95 % CI over seeds excludes 0 with the sign of "
    "none's mean slope AND R's CI lower bound > 0.5; collapses: the equal-step CI includes 0 OR R's CI upper "
    "bound < 0.5; otherwise inconclusive. Needs ≥ 2 seeds on each side (else n/a) and none's CI excluding 0 "
    "(else inconclusive: no slope to compare)."
)
PERSISTENCE_THRESHOLD = 0.5


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student t CDF: P(T ≤ t) = 1 − ½ I_{df/(df+t²)}(df/2, ½) for t ≥ 0 (symmetric below 0)."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student t with df degrees of freedom (bisection on ``t_cdf``, |error| < 1e-10)."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0; got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def seed_summary(values: Sequence[float | None], confidence: float = 0.95) -> dict:
    """Mean, SD, SE and a Student-t CI of one number over the seeds of a group (e.g. the slopes of the
    runs that share model, objective, control and every other setting but the seed).

        mean = Σ v / n,   SD = sqrt(Σ (v − mean)² / (n − 1)),   SE = SD / sqrt(n),
        CI   = mean ± t_{(1+confidence)/2, n−1} · SE.
    None values are dropped. With n = 1 only the mean is defined (SD, SE, CI None; ``note`` says
    "n/a (1 seed)"); with n = 0 everything is None.
    Returns {"n", "mean", "sd", "se", "ci_low", "ci_high", "confidence", "note"}.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    out = {"n": n, "mean": None, "sd": None, "se": None, "ci_low": None, "ci_high": None,
           "confidence": float(confidence), "note": "no runs" if n == 0 else ""}
    if n == 0:
        return out
    mean = sum(vals) / n
    out["mean"] = _finite(mean)
    if n == 1:
        out["note"] = "n/a (1 seed)"
        return out
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * se
    out.update(sd=_finite(sd), se=_finite(se), ci_low=_finite(mean - half), ci_high=_finite(mean + half))
    return out


def ratio_ci(numerator: dict, denominator: dict, confidence: float = 0.95) -> dict:
    """R = mean_num / mean_den of two ``seed_summary`` results, with a delta-method Student-t CI.

        R = m₁ / m₂,   SE(R) = |R| · sqrt((SE₁/m₁)² + (SE₂/m₂)²),
        CI = R ± t_{(1+confidence)/2, df} · SE(R),   df = min(n₁, n₂) − 1 (conservative).
    The two groups are independent runs (different controls). R is None when m₂ is 0 or missing;
    the CI is None with < 2 seeds on either side or m₁ = 0 (SE₁/m₁ undefined; the delta method
    needs both means away from 0).
    Returns {"ratio", "se", "ci_low", "ci_high", "df", "confidence"}.
    """
    m1, m2 = numerator.get("mean"), denominator.get("mean")
    out = {"ratio": None, "se": None, "ci_low": None, "ci_high": None, "df": None, "confidence": float(confidence)}
    if m1 is None or not m2:
        return out
    ratio = m1 / m2
    out["ratio"] = _finite(ratio)
    s1, s2 = numerator.get("se"), denominator.get("se")
    if s1 is None or s2 is None or m1 == 0:
        return out
    se = abs(ratio) * math.sqrt((s1 / m1) ** 2 + (s2 / m2) ** 2)
    df = min(numerator["n"], denominator["n"]) - 1
    half = t_quantile((1.0 + confidence) / 2.0, df) * se
    out.update(se=_finite(se), ci_low=_finite(ratio - half), ci_high=_finite(ratio + half), df=df)
    return out


def persistence_verdict(equal_step: dict, none: dict, ratio: dict,
                        threshold: float = PERSISTENCE_THRESHOLD) -> tuple[str, str]:
    """Does the locality gradient persist under the equal-step control? (verdict, reason); the rule is
    ``PERSISTENCE_RULE``. equal_step, none: ``seed_summary`` of the slopes; ratio: ``ratio_ci``.

    Verdicts: "persists", "collapses", "inconclusive", or "n/a (1 seed)" / "n/a (no runs)".
    """
    for side, name in ((equal_step, "equal-step"), (none, "none")):
        if side.get("n", 0) == 0 or side.get("mean") is None:
            return "n/a (no runs)", f"no {name} runs"
        if side.get("ci_low") is None:
            return "n/a (1 seed)", f"{name} has {side['n']} seed(s); a CI needs ≥ 2"
    if none["ci_low"] <= 0 <= none["ci_high"]:
        return "inconclusive", "none's CI includes 0: no slope to compare"
    sign = 1.0 if none["mean"] > 0 else -1.0
    eq_excludes = equal_step["ci_low"] > 0 or equal_step["ci_high"] < 0
    same_sign = eq_excludes and (equal_step["mean"] > 0) == (sign > 0)
    r_low, r_high = ratio.get("ci_low"), ratio.get("ci_high")
    if same_sign and r_low is not None and r_low > threshold:
        return "persists", f"equal-step CI excludes 0 with none's sign; R CI low {r_low:.2f} > {threshold}"
    if not eq_excludes:
        return "collapses", "equal-step CI includes 0"
    if r_high is not None and r_high < threshold:
        return "collapses", f"R CI high {r_high:.2f} < {threshold}"
    return "inconclusive", "neither rule holds" + ("" if r_low is not None else " (R has no CI)")
