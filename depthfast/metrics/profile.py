"""Numbers that summarize the shape of one depth profile (pure: plain lists in, floats or None out).

Over the blocks ℓ = 1 … L (the caller leaves the embedding row out), with depths d_ℓ = ℓ/L and
changes c_ℓ = 1 − CKA_ℓ:

    locality gradient   β = Σ(d − d̄)(c − c̄) / Σ(d − d̄)²            (locality_gradient)
    steepness           ln((c̄_top + ε) / (c̄_bottom + ε)),  ε = 0.01 · max_ℓ c⁺_ℓ   (steepness)
    width               fraction of blocks with c⁺_ℓ ≥ ½ max c⁺; depth centroid and spread (width)

``profile_metrics`` gathers them all, with the per-text bootstrap CI of β (depthfast.metrics.per_text).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from depthfast.artifacts import finite_or_none
from depthfast.metrics.per_text import bootstrap_slope_ci

# Relative floor of the steepness ratio: 1 % of the profile's largest change (see ``steepness``).
STEEPNESS_FLOOR = 0.01


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


def _check_profile(depths: Sequence[float], changes: Sequence[float]) -> tuple[list[float], list[float]]:
    depths, changes = [float(d) for d in depths], [float(c) for c in changes]
    if len(depths) != len(changes):
        raise ValueError(f"depths and changes differ in length: {len(depths)} vs {len(changes)}")
    return depths, changes


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
    out["steepness"] = finite_or_none(math.log((top + eps) / (bottom + eps)))
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
                    num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                    per_text_form: str = "hsic") -> dict:
    """Every profile-shape number of one run, JSON-safe (floats, ints or None; never NaN).

    depths, changes: the blocks ℓ = 1 … L (drop the embedding row ℓ = 0). per_text_hsic: optional
    float64 (texts, L, 3) for the same blocks: per_text_form "hsic" the triples (``per_text_hsic_batch``
    stacked over the probe set), "change" the change moments (``per_text_change_batch``; bootstrap_slope_ci).

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
        "mean_change": finite_or_none(mean),
        "max_change": finite_or_none(max(changes)) if m else None,
        "peak_depth": depths[max(range(m), key=lambda i: changes[i])] if m else None,
        "locality_gradient": finite_or_none(slope),
        "relative_locality_gradient": finite_or_none(slope / mean) if slope is not None and mean and mean > 0 else None,
    }
    out.update(steepness(depths, changes))
    out.update(width(depths, changes))
    ci = {"slope": None, "ci_low": None, "ci_high": None, "std": None, "confidence": confidence,
          "num_texts": None, "num_valid_resamples": None}
    if per_text_hsic is not None:
        ci = bootstrap_slope_ci(depths, per_text_hsic, num_resamples, confidence, seed, form=per_text_form)
    out.update(slope_per_text=ci["slope"], slope_per_text_ci_low=ci["ci_low"], slope_per_text_ci_high=ci["ci_high"],
               slope_ci_low=ci["ci_low"], slope_ci_high=ci["ci_high"],
               slope_ci_std=ci["std"], slope_ci_confidence=ci["confidence"], slope_ci_texts=ci["num_texts"],
               slope_ci_resamples=ci["num_valid_resamples"])
    return {k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in out.items()}
