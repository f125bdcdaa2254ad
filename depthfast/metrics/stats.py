"""Statistics across runs: Pearson r with a bootstrap CI, seed-to-seed uncertainty of a run-level
number (Student t), the ratio of two such means, and the equal-step vs none persistence verdict."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from depthfast.results import finite_or_none


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

    out["r"] = finite_or_none(corr(xy[:, 0], xy[:, 1]))
    if out["r"] is None or len(pairs) < 4:
        return out
    generator = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(len(pairs), (num_resamples, len(pairs)), generator=generator)
    rs = corr(xy[idx, 0], xy[idx, 1])
    rs = rs[torch.isfinite(rs)]
    if rs.numel() >= 2:
        alpha = (1.0 - confidence) / 2.0
        low, high = torch.quantile(rs, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
        out.update(ci_low=finite_or_none(low), ci_high=finite_or_none(high))
    return out


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
    out["mean"] = finite_or_none(mean)
    if n == 1:
        out["note"] = "n/a (1 seed)"
        return out
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * se
    out.update(sd=finite_or_none(sd), se=finite_or_none(se), ci_low=finite_or_none(mean - half), ci_high=finite_or_none(mean + half))
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
    out["ratio"] = finite_or_none(ratio)
    s1, s2 = numerator.get("se"), denominator.get("se")
    if s1 is None or s2 is None or m1 == 0:
        return out
    se = abs(ratio) * math.sqrt((s1 / m1) ** 2 + (s2 / m2) ** 2)
    df = min(numerator["n"], denominator["n"]) - 1
    half = t_quantile((1.0 + confidence) / 2.0, df) * se
    out.update(se=finite_or_none(se), ci_low=finite_or_none(ratio - half), ci_high=finite_or_none(ratio + half), df=df)
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
