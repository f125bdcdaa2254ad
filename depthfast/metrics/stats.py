"""Statistics across runs: Pearson r with a bootstrap CI, seed-to-seed uncertainty of a run-level
number (Student t), and the equal-step vs none verdict: R = mean(equal-step)/mean(none) with Fieller's
interval, paired by seed, and the seeds a decisive verdict would need."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from depthfast.errors import DepthfastError
from depthfast.artifacts import finite_or_none


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


@functools.lru_cache(maxsize=4096)  # pure, and the verdict's seed search asks for the same few quantiles
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


# --- equal-step vs none: R = mean(equal-step) / mean(none), Fieller's interval, the verdict -----------

PERSISTENCE_THRESHOLD = 0.5
# The rule of ``verdict`` (printed in report.md and README).
PERSISTENCE_RULE = (
    "R = mean slope(equal-step) / mean slope(none) over seeds, with Fieller's 95 % interval for a ratio of "
    "means: paired by seed (the same seed gives both controls the same split, probe, head and batch order; "
    "exact t with df = pairs − 1), or, for unpaired groups, independent samples (Welch-like, df = min(seeds) − 1). "
    "The interval is bounded exactly when none's mean slope is significant at the same level; otherwise R is "
    "unbounded and the verdict is inconclusive (no slope to compare). collapses: R's upper bound < 0.5; "
    "persists: R's lower bound > 0.5 (so equal-step's slope is significant with none's sign); everything else "
    "inconclusive, saying what is missing and about how many seeds would decide (80 % power at the observed "
    "means and spread). A wide CI around R ≈ 1 is never collapses. Needs ≥ 2 seeds on each side (else n/a)."
)
SEEDS_NEEDED_POWER = 0.8


@dataclass
class Verdict:
    """The equal-step vs none verdict of ``verdict`` (``to_dict()`` is JSON-able: floats, None, str).

    verdict: "persists" | "collapses" | "inconclusive" | "n/a (1 seed)" | "n/a (no runs)";
    ratio: R = mean(equal-step) / mean(none); ci_low, ci_high: Fieller's bounds when the set is bounded;
    ci_kind: "bounded" | "exclusive" (two rays outside [ci_gap]) | "unbounded" (every R); ci_text the set
    in words; none_t: none's t statistic (|none_t| > t_critical ⇔ bounded); seeds_needed: seeds per control
    for a decisive verdict with probability ``power`` at the observed means and spread (None: not reachable
    within the search, e.g. R exactly at the threshold or none's mean 0).
    """

    verdict: str
    reason: str
    missing: str = ""
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    ci_kind: str | None = None
    ci_gap: tuple | None = None
    ci_text: str = "—"
    confidence: float = 0.95
    threshold: float = PERSISTENCE_THRESHOLD
    paired: bool = True
    n_none: int = 0
    n_equal_step: int = 0
    n_pairs: int = 0
    df: int | None = None
    none_mean: float | None = None
    equal_step_mean: float | None = None
    none_t: float | None = None
    t_critical: float | None = None
    seeds_needed: int | None = None
    power: float = SEEDS_NEEDED_POWER

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci_gap"] = list(self.ci_gap) if self.ci_gap is not None else None
        return out


def fieller_interval(num_mean, den_mean, var_num, cov, var_den, t):
    """Fieller's confidence set for ρ = μ_num / μ_den from the means and the (co)variances of the means
    (tensors or floats, broadcast; float64):

        {ρ : (m_num − ρ m_den)² ≤ t² (v_num − 2ρ c + ρ² v_den)}
        ⇔ A ρ² − 2 B ρ + C ≤ 0,  A = m_den² − t² v_den,  B = m_num m_den − t² c,  C = m_num² − t² v_num.
    Paired samples (d_i = num_i − ρ den_i i.i.d. normal, v = S/n of the pairs' covariance S, t the
    (1 + confidence)/2 quantile with n − 1 df) make it an exact confidence set. A > 0 (den's mean
    significant: |m_den| / sqrt(v_den) > t) ⇒ the bounded interval (B ∓ sqrt(B² − AC)) / A (B² ≥ AC
    since ρ̂ = m_num/m_den is inside); A < 0 ⇒ two rays outside those roots when B² > AC, else every ρ.
    Returns (low, high, kind): kind 0 bounded [low, high]; 1 exclusive (−∞, low'] ∪ [high', ∞) with
    low' < high' the roots; 2 unbounded (low, high NaN). A = 0 exactly counts as unbounded.
    """
    m1, m2, v1, c, v2, t = (torch.as_tensor(x, dtype=torch.float64) for x in (num_mean, den_mean, var_num, cov, var_den, t))
    t2 = t * t
    a, b, cc = m2 * m2 - t2 * v2, m1 * m2 - t2 * c, m1 * m1 - t2 * v1
    disc = b * b - a * cc
    bounded = a > 0
    root = disc.clamp_min(0).sqrt()  # rounding can make B² − AC a hair negative when it is 0
    safe_a = torch.where(a == 0, torch.ones_like(a), a)
    r1, r2 = (b - root) / safe_a, (b + root) / safe_a
    low, high = torch.minimum(r1, r2), torch.maximum(r1, r2)
    kind = torch.where(bounded, 0, torch.where((a < 0) & (disc > 0), 1, 2))
    nan = torch.full_like(low, float("nan"))
    return torch.where(kind == 2, nan, low), torch.where(kind == 2, nan, high), kind


def decide(low, high, kind, ratio, threshold: float = PERSISTENCE_THRESHOLD):
    """The verdict's rule on Fieller sets (tensors, broadcast): 1 persists (bounded, low > threshold,
    so R̂ > 0: equal-step's mean has none's sign), −1 collapses (bounded, high < threshold), 0 otherwise."""
    bounded = kind == 0
    persists = bounded & (low > threshold) & (ratio > 0)
    collapses = bounded & (high < threshold)
    return torch.where(persists, 1, torch.where(collapses, -1, 0))


def _clean(slopes) -> dict | list:
    """A mapping seed → slope, or a list of slopes, with None / non-finite values dropped (lists keep
    their positions as keys so that aligned lists pair by position)."""
    items = slopes.items() if isinstance(slopes, Mapping) else enumerate(slopes)
    return {k: float(v) for k, v in items if v is not None and math.isfinite(float(v))}


def _moments(none: list[float], eq: list[float], paired: bool):
    """Means and (co)variances per seed: (m_none, m_eq, s_nn, s_en, s_ee, n_none, n_eq); s_en = 0 unpaired."""
    t_n, t_e = torch.tensor(none, dtype=torch.float64), torch.tensor(eq, dtype=torch.float64)
    m_n, m_e = t_n.mean().item(), t_e.mean().item()
    s_nn = t_n.var(correction=1).item()
    s_ee = t_e.var(correction=1).item()
    s_en = ((t_n - m_n) * (t_e - m_e)).sum().item() / (len(none) - 1) if paired else 0.0
    return m_n, m_e, s_nn, s_en, s_ee


def _seeds_needed(m_n, m_e, s_nn, s_en, s_ee, threshold, confidence, power, max_seeds) -> int | None:
    """Smallest n (seeds per control, pairs when paired) with

        |m_n| √n / √s_nn ≥ q(n)   and   |m_e − θ m_n| √n / √w ≥ q(n),   w = s_ee − 2θ s_en + θ² s_nn,
        q(n) = t_{(1+confidence)/2, n−1} + t_{power, n−1}:
    none's mean significant (Fieller's set bounded) and θ outside it, each with probability ≈ power when
    the true means and spread are the observed ones (t approximation of the noncentral t). Both sides
    grow with n, q falls: monotone, so bisection over [2, max_seeds]. None when not reached by max_seeds.
    """
    w = max(s_ee - 2 * threshold * s_en + threshold ** 2 * s_nn, 0.0)

    def decides(n: int) -> bool:
        q = t_quantile((1.0 + confidence) / 2.0, n - 1) + (t_quantile(power, n - 1) if power != 0.5 else 0.0)
        gap = abs(m_e - threshold * m_n)
        return (abs(m_n) * math.sqrt(n) > q * math.sqrt(s_nn)) and (gap * math.sqrt(n) > q * math.sqrt(w))

    if not decides(max_seeds):
        return None
    lo, hi = 1, max_seeds  # decides(hi); lo never checked (a CI needs 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if decides(mid) else (mid, hi)
    return hi


def _fmt(x: float) -> str:
    return f"{x:+.2f}" if abs(x) < 100 else f"{x:+.2e}"


def _check_verdict_args(none_slopes, equal_step_slopes, paired: bool, threshold: float, confidence: float,
                        power: float) -> None:
    """verdict's arguments, refused in one line each: a level outside (0, 1), a non-positive threshold,
    paired lists of different lengths (not aligned by seed)."""
    if not 0 < confidence < 1 or not 0 < power < 1:
        raise DepthfastError(f"verdict needs 0 < confidence < 1 and 0 < power < 1; got {confidence}, {power}")
    if not math.isfinite(threshold) or threshold <= 0:
        raise DepthfastError(f"verdict needs a positive threshold for R; got {threshold}")
    if paired and not isinstance(none_slopes, Mapping) and not isinstance(equal_step_slopes, Mapping) \
            and len(none_slopes) != len(equal_step_slopes):
        raise DepthfastError(f"paired verdict needs slopes aligned by seed; got {len(none_slopes)} none and "
                             f"{len(equal_step_slopes)} equal-step values (pass mappings seed → slope instead)")


def _too_few_seeds(out: Verdict, none: dict, eq: dict) -> bool:
    """Mark ``out`` n/a when a side has no runs, or fewer than the 2 seeds a CI needs; True if so."""
    for side, name in ((none, "none"), (eq, "equal-step")):
        if not side:
            out.verdict, out.reason, out.missing = "n/a (no runs)", f"no {name} runs", f"{name} runs"
            out.paired = False
            return True
    for side, name in ((none, "none"), (eq, "equal-step")):
        if len(side) < 2:
            out.verdict, out.reason = "n/a (1 seed)", f"{name} has {len(side)} seed(s); a CI needs ≥ 2"
            out.missing, out.paired = f"≥ 2 seeds of {name}", False
            return True
    return False


def _set_interval(out: Verdict, low: float, high: float, kind: int) -> None:
    """R's Fieller interval into ``out``: bounded [low, high], exclusive (−∞, low] ∪ [high, +∞), or unbounded."""
    out.ci_kind = ("bounded", "exclusive", "unbounded")[kind]
    if kind == 0:
        out.ci_low, out.ci_high = finite_or_none(low), finite_or_none(high)
        out.ci_text = f"[{_fmt(low)}, {_fmt(high)}]"
    elif kind == 1:
        out.ci_gap = (finite_or_none(low), finite_or_none(high))
        out.ci_text = f"(−∞, {_fmt(low)}] ∪ [{_fmt(high)}, +∞)"
    else:
        out.ci_text = "(−∞, +∞)"


def verdict(none_slopes: Sequence[float | None] | Mapping, equal_step_slopes: Sequence[float | None] | Mapping,
            paired: bool = True, threshold: float = PERSISTENCE_THRESHOLD, confidence: float = 0.95,
            power: float = SEEDS_NEEDED_POWER, max_seeds: int = 10_000) -> Verdict:
    """Does the locality gradient persist under the equal-step control? The rule is ``PERSISTENCE_RULE``.

    none_slopes, equal_step_slopes: the headline slopes of the two seed groups, either mappings
    seed → slope or lists aligned by seed (position i of both is the same seed). None / non-finite
    entries are dropped. paired: pair by seed (the seeds present on both sides; lists of different
    lengths are an error); with < 2 common seeds, or paired=False, the two sides are independent samples.

        R = m_e / m_n;  per-seed (co)variances S (pairs' covariance when paired, s_en = 0 unpaired),
        v = S / n (paired) or v_xx = s_xx / n_x (unpaired);  t = t_{(1+confidence)/2, df},
        df = pairs − 1 (paired: exact) or min(n_none, n_eq) − 1 (unpaired: conservative Welch-like);
        CI = ``fieller_interval(m_e, m_n, v_ee, v_en, v_nn, t)``;  verdict = ``decide`` at threshold.
    seeds_needed: ``_seeds_needed`` at the observed means and spread with probability ``power``.
    Returns a ``Verdict``.
    """
    _check_verdict_args(none_slopes, equal_step_slopes, paired, threshold, confidence, power)
    none, eq = _clean(none_slopes), _clean(equal_step_slopes)
    out = Verdict("", "", confidence=float(confidence), threshold=float(threshold), paired=bool(paired),
                  n_none=len(none), n_equal_step=len(eq), power=float(power))
    if none:
        out.none_mean = sum(none.values()) / len(none)
    if eq:
        out.equal_step_mean = sum(eq.values()) / len(eq)
    if out.none_mean is not None and out.equal_step_mean is not None and out.none_mean != 0:
        out.ratio = finite_or_none(out.equal_step_mean / out.none_mean)
    if _too_few_seeds(out, none, eq):
        return out
    common = [k for k in none if k in eq]
    note = ""
    if paired and len(common) < 2:
        note, paired = f" (only {len(common)} seed(s) in both controls: analysed unpaired)", False
    out.paired = paired
    if paired:
        out.n_pairs = len(common)
        n_values, e_values = [none[k] for k in common], [eq[k] for k in common]
        m_n, m_e, s_nn, s_en, s_ee = _moments(n_values, e_values, True)
        k = len(common)
        v_nn, v_en, v_ee, df = s_nn / k, s_en / k, s_ee / k, k - 1
        if k < min(len(none), len(eq)):
            note = f" ({k} seed(s) in both controls; the others are left out of the pairing)"
        out.none_mean, out.equal_step_mean = m_n, m_e
        out.ratio = finite_or_none(m_e / m_n) if m_n != 0 else None
    else:
        n_values, e_values = list(none.values()), list(eq.values())
        m_n, m_e, s_nn, s_en, s_ee = _moments(n_values, e_values, False)
        v_nn, v_en, v_ee, df = s_nn / len(none), 0.0, s_ee / len(eq), min(len(none), len(eq)) - 1
    t = t_quantile((1.0 + confidence) / 2.0, df)
    out.df, out.t_critical = df, t
    out.none_t = finite_or_none(m_n / math.sqrt(v_nn)) if v_nn > 0 else None  # no spread: no t (JSON has no inf)
    low, high, kind = fieller_interval(m_e, m_n, v_ee, v_en, v_nn, t)
    low, high, kind = low.item(), high.item(), int(kind.item())
    _set_interval(out, low, high, kind)
    n_now = out.n_pairs if paired else min(len(none), len(eq))
    out.seeds_needed = _seeds_needed(m_n, m_e, s_nn, s_en, s_ee, threshold, confidence, power,
                                     max_seeds)
    needed = (f"~{out.seeds_needed} seeds per control would decide" if out.seeds_needed is not None
              else f"no seed count up to {max_seeds} would decide at the observed means")
    pct = f"{100 * confidence:g} %"
    code = int(decide(torch.tensor(low), torch.tensor(high), torch.tensor(kind),
                      torch.tensor(m_e / m_n if m_n != 0 else float("nan")), threshold).item())
    if code == 1:
        out.verdict = "persists"
        out.reason = f"R's {pct} CI {out.ci_text} lies above {threshold:g}" + note
    elif code == -1:
        out.verdict = "collapses"
        out.reason = f"R's {pct} CI {out.ci_text} lies below {threshold:g}" + note
    elif kind != 0:
        out.verdict = "inconclusive"
        t_text = "0" if out.none_t is None else f"{abs(out.none_t):.2f}"  # bounded whenever m_n ≠ 0 has no spread
        out.reason = (f"none's slope not significant (|t| = {t_text} ≤ {t:.2f}, df {df}): no slope to compare, "
                      f"R's CI {out.ci_text}; {needed}" + note)
        out.missing = f"a significant slope without the control; {needed} (now {n_now})"
    else:
        out.verdict = "inconclusive"
        out.reason = f"R's {pct} CI {out.ci_text} straddles {threshold:g}: {needed}" + note
        out.missing = f"a CI for R on one side of {threshold:g}; {needed} (now {n_now})"
    return out
