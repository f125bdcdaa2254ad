"""Profile metrics and objective distances against hand-computed values, slow references and edge cases."""

import json
import math

import numpy as np
import pytest
import torch

from depthfast import metrics, objective_distance
from depthfast.errors import DepthfastError
from depthfast.cka import debiased_cka, hsic1, linear_cka
from depthfast.metrics import locality_gradient

D4 = [0.25, 0.5, 0.75, 1.0]


# --- steepness ------------------------------------------------------------------------------------

def test_steepness_by_hand():
    s = metrics.steepness(D4, [0.1, 0.2, 0.3, 0.5])  # q = 1: last vs first block, ε = 0.01·0.5
    assert s["quarter_blocks"] == 1 and s["top_mean_change"] == 0.5 and s["bottom_mean_change"] == 0.1
    assert s["steepness"] == pytest.approx(math.log(0.505 / 0.105))
    depths8 = [i / 8 for i in range(1, 9)]
    changes8 = [1, 2, 3, 4, 5, 6, 7, 9]
    s8 = metrics.steepness(depths8, changes8)  # q = 2: mean(7, 9) vs mean(1, 2), ε = 0.09
    assert s8["quarter_blocks"] == 2
    assert s8["steepness"] == pytest.approx(math.log((8 + 0.09) / (1.5 + 0.09)))


def test_steepness_is_scale_free_and_ordered_by_depth():
    changes = [0.1, 0.2, 0.3, 0.5]
    ref = metrics.steepness(D4, changes)["steepness"]
    assert metrics.steepness(D4, [c * 1e-9 for c in changes])["steepness"] == pytest.approx(ref, rel=1e-9)
    shuffled = metrics.steepness([1.0, 0.25, 0.75, 0.5], [0.5, 0.1, 0.3, 0.2])["steepness"]
    assert shuffled == pytest.approx(ref)


def test_steepness_edge_cases():
    assert metrics.steepness(D4, [0.2] * 4)["steepness"] == 0.0  # flat
    assert metrics.steepness([1.0], [0.3])["steepness"] is None  # one block: no depth contrast
    assert metrics.steepness(D4, [0.0] * 4)["steepness"] is None  # all zero: nothing to locate
    assert metrics.steepness(D4, [0.5, 0.3, 0.2, 0.1])["steepness"] < 0  # concentrated at the input
    bottom_only = metrics.steepness(D4, [1.0, 0, 0, 0])["steepness"]
    assert bottom_only == pytest.approx(-math.log(1 + 1 / metrics.STEEPNESS_FLOOR))  # the bound
    assert metrics.steepness([0.5, 1.0], [-0.01, 0.2])["steepness"] == pytest.approx(math.log(0.202 / 0.002))
    assert metrics.steepness([1 / 3, 2 / 3, 1.0], [0.1, 5.0, 0.4])["quarter_blocks"] == 1


# --- width ----------------------------------------------------------------------------------------

def test_width_by_hand():
    w = metrics.width(D4, [0.0, 0.2, 1.0, 0.6])
    assert w["width_blocks"] == 2 and w["width_fraction"] == 0.5
    centroid = (0.5 * 0.2 + 0.75 * 1.0 + 1.0 * 0.6) / 1.8
    assert w["depth_centroid"] == pytest.approx(centroid)
    spread = math.sqrt((0.2 * (0.5 - centroid) ** 2 + 1.0 * (0.75 - centroid) ** 2 + 0.6 * (1 - centroid) ** 2) / 1.8)
    assert w["depth_spread"] == pytest.approx(spread)


def test_width_edge_cases():
    flat = metrics.width(D4, [0.3] * 4)
    assert flat["width_fraction"] == 1.0 and flat["depth_centroid"] == pytest.approx(0.625)
    assert flat["depth_spread"] == pytest.approx(float(np.std(D4)))
    one = metrics.width([1.0], [0.4])
    assert one == {"width_blocks": 1, "width_fraction": 1.0, "depth_centroid": 1.0, "depth_spread": 0.0}
    assert set(metrics.width(D4, [0.0] * 4).values()) == {None}
    peak = metrics.width(D4, [0.0, 0.0, 0.0, 0.7])
    assert peak["width_fraction"] == 0.25 and peak["depth_spread"] == 0.0
    assert metrics.width(D4, [-0.1, 0.0, 0.0, 0.7])["width_blocks"] == 1  # negative = noise = 0


# --- profile_metrics ----------------------------------------------------------------------------

def test_profile_metrics_keys_and_values():
    changes = [0.1, 0.2, 0.3, 0.5]
    m = metrics.profile_metrics(D4, changes)
    assert m["locality_gradient"] == pytest.approx(locality_gradient(D4, changes))
    assert m["relative_locality_gradient"] == pytest.approx(m["locality_gradient"] / 0.275)
    assert m["peak_depth"] == 1.0 and m["max_change"] == 0.5 and m["num_blocks"] == 4
    assert m["slope_ci_low"] is None and m["slope_per_text"] is None
    neg = metrics.profile_metrics(D4, changes[::-1])
    assert neg["locality_gradient"] == pytest.approx(-m["locality_gradient"])
    zero = metrics.profile_metrics(D4, [0.0] * 4)
    assert zero["locality_gradient"] == 0.0 and zero["relative_locality_gradient"] is None
    one = metrics.profile_metrics([1.0], [0.2])
    assert one["locality_gradient"] is None and one["steepness"] is None and one["width_fraction"] == 1.0
    for result in (m, neg, zero, one):
        assert all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for v in result.values())


# --- per-text HSIC and the bootstrap -----------------------------------------------------------

def test_per_text_hsic_matches_reference():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(9, 5, generator=g) + 100.0, torch.randn(9, 5, generator=g)]
    tuned = [b + 0.3 * torch.randn(9, 5, generator=g) for b in base]
    h = metrics.per_text_hsic(base, tuned)
    assert h.shape == (2, 3) and h.dtype == torch.float64
    for layer, (x, y) in enumerate(zip(base, tuned)):
        x64, y64 = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
        k, l = x64 @ x64.T, y64 @ y64.T
        ref = torch.stack([hsic1(k, l), hsic1(k, k), hsic1(l, l)])
        torch.testing.assert_close(h[layer], ref, rtol=1e-10, atol=1e-10)
        # one text alone: the ratio is debiased CKA of that text
        assert float(h[layer, 0] / (h[layer, 1] * h[layer, 2]).sqrt()) == pytest.approx(float(debiased_cka(x, y)))
    assert metrics.per_text_hsic([torch.randn(3, 5)], [torch.randn(3, 5)]) is None  # n ≤ 3


def test_per_text_hsic_batch_skips_short_texts():
    g = torch.Generator().manual_seed(1)
    acts_b = [torch.randn(3, 6, 4, generator=g) for _ in range(2)]
    acts_t = [a + 0.1 * torch.randn(a.shape, generator=g) for a in acts_b]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    h = metrics.per_text_hsic_batch(acts_b, acts_t, mask)
    assert h.shape == (2, 2, 3)
    ref = metrics.per_text_hsic([a[0, :5] for a in acts_b], [a[0, :5] for a in acts_t])
    torch.testing.assert_close(h[0], ref)


def _synthetic_hsic(texts, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    kk = 1.0 + torch.rand(texts, layers, generator=g, dtype=torch.float64)
    ll = 1.0 + torch.rand(texts, layers, generator=g, dtype=torch.float64)
    drop = torch.linspace(0.02, 0.3, layers, dtype=torch.float64)  # change grows with depth
    kl = (kk * ll).sqrt() * (1 - drop) * (1 + 0.1 * torch.randn(texts, layers, generator=g, dtype=torch.float64))
    return torch.stack([kl, kk, ll], dim=-1)


def test_bootstrap_matches_slow_loop():
    depths = [0.25, 0.5, 0.75, 1.0]
    h = _synthetic_hsic(7, 4)
    b, seed = 300, 5
    fast = metrics.bootstrap_slope_ci(depths, h, num_resamples=b, confidence=0.9, seed=seed)

    def slope_of(rows):
        changes = []
        for layer in range(4):
            kl = sum(float(h[t, layer, 0]) for t in rows)
            kk = sum(float(h[t, layer, 1]) for t in rows)
            ll = sum(float(h[t, layer, 2]) for t in rows)
            changes.append(1 - kl / math.sqrt(kk * ll))
        return locality_gradient(depths, changes)

    idx = torch.randint(7, (b, 7), generator=torch.Generator().manual_seed(seed))  # same draws
    slow = np.array([slope_of(row.tolist()) for row in idx])
    assert fast["slope"] == pytest.approx(slope_of(range(7)), rel=1e-12)
    assert fast["ci_low"] == pytest.approx(np.percentile(slow, 5), rel=1e-9)
    assert fast["ci_high"] == pytest.approx(np.percentile(slow, 95), rel=1e-9)
    assert fast["std"] == pytest.approx(np.std(slow, ddof=1), rel=1e-9)
    assert fast["num_texts"] == 7 and fast["num_valid_resamples"] == b
    assert fast["ci_low"] < fast["slope"] < fast["ci_high"] and fast["slope"] > 0


def test_bootstrap_edge_cases():
    h = _synthetic_hsic(5, 3)
    one_text = metrics.bootstrap_slope_ci([0.3, 0.6, 1.0], h[:1])
    assert one_text["slope"] is not None and one_text["ci_low"] is None
    assert metrics.bootstrap_slope_ci([1.0], h[:, :1])["slope"] is None
    empty = metrics.bootstrap_slope_ci([0.5, 1.0], torch.zeros(0, 2, 3, dtype=torch.float64))
    assert empty["slope"] is None and empty["num_texts"] == 0
    with pytest.raises(ValueError):
        metrics.bootstrap_slope_ci([0.5, 1.0], h)  # 3 layers, 2 depths
    bad = h.clone()
    bad[0, 0, 1] = -1e9  # this text alone makes Σh_kk < 0 whenever drawn often enough
    r = metrics.bootstrap_slope_ci([0.3, 0.6, 1.0], bad, num_resamples=200)
    assert r["num_valid_resamples"] < 200 and r["slope"] is None
    m = metrics.profile_metrics([0.3, 0.6, 1.0], [0.1, 0.2, 0.3], per_text_hsic=h, num_resamples=100)
    assert m["slope_ci_texts"] == 5 and m["slope_ci_low"] <= m["slope_per_text"] <= m["slope_ci_high"]
    # the per-text CI under keys named for its estimator (the older names stay for old readers)
    assert (m["slope_per_text_ci_low"], m["slope_per_text_ci_high"]) == (m["slope_ci_low"], m["slope_ci_high"])


def test_run_metrics_names_each_slope_estimator():
    from types import SimpleNamespace

    from depthfast.config import RunConfig
    from depthfast.run import run_metrics

    g = torch.Generator().manual_seed(0)
    h = torch.rand(6, 4, 3, dtype=torch.float64, generator=g) + 1.0
    measured = SimpleNamespace(per_text_hsic=h, loss_base=1.0, base_features=None, labels=None)
    task, model = SimpleNamespace(num_labels=2), SimpleNamespace(config=SimpleNamespace(vocab_size=10))
    depths, changes = [0.0, 1 / 3, 2 / 3, 1.0], [0.0, 0.1, 0.2, 0.4]
    cfg = RunConfig(estimator="unbiased", pooling="mean")
    m = run_metrics(cfg, task, model, measured, depths, changes, None)
    assert m["slope_estimator"] == "unbiased/mean" and m["slope_per_text_estimator"] == metrics.PER_TEXT_ESTIMATOR
    assert m["locality_gradient"] == pytest.approx(locality_gradient(depths[1:], changes[1:]))
    measured.per_text_hsic = None
    m = run_metrics(RunConfig(), task, model, measured, depths, changes, None)
    assert m["slope_estimator"] == "exact/token" and m["slope_per_text_estimator"] is None


# --- objective distance -----------------------------------------------------------------------

def test_chance_normalized_loss():
    assert objective_distance.chance_normalized_loss(math.log(8), 8) == pytest.approx(1.0)
    assert objective_distance.chance_normalized_loss(2.0, 30522) == pytest.approx(2.0 / math.log(30522))
    assert objective_distance.chance_normalized_loss(1.0, 1) is None
    assert objective_distance.chance_normalized_loss(float("nan"), 4) is None


def test_gradient_alignment_on_tiny_model():
    import tiny_models

    model, _ = tiny_models.build("gpt2")
    model.eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    params = [p for n, p in model.named_parameters() if n.startswith("transformer.")]
    clm = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    assert objective_distance.gradient_alignment_distance(params, clm, clm) == pytest.approx(0.0, abs=1e-9)
    assert objective_distance.gradient_alignment_distance(params, clm, lambda: -clm()) == pytest.approx(2.0, abs=1e-9)
    other = lambda: model(input_ids=ids.flip(-1), labels=ids.flip(-1)).loss  # noqa: E731
    d = objective_distance.gradient_alignment_distance(params, clm, other)
    assert 0.0 < d < 2.0
    assert all(p.grad is None for p in params)  # nothing accumulated into .grad


def test_gradient_alignment_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    unused = torch.nn.Parameter(torch.tensor([3.0]))
    assert objective_distance.gradient_alignment_distance([w, unused], lambda: w[0] * 3, lambda: w[1]) == pytest.approx(1.0)
    d = objective_distance.gradient_alignment_distance([w], lambda: w[0] + w[1], lambda: 2 * w[0])  # cos = 1/√2
    assert d == pytest.approx(1 - 1 / math.sqrt(2))
    assert objective_distance.gradient_alignment_distance([w], lambda: (w * 0).sum(), lambda: w[0]) is None


def test_kernel_target_alignment():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 1, 2])
    features = torch.randn(10, 6, generator=g) + labels[:, None].float()
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    kta = objective_distance.kernel_target_alignment(features, labels, num_labels=4)
    assert kta == pytest.approx(float(linear_cka(features, onehot)), rel=1e-12)
    # by definition: ⟨HKH, HLH⟩ / (‖HKH‖‖HLH‖)
    h = torch.eye(10, dtype=torch.float64) - 1 / 10
    k, l = h @ features.double() @ features.double().T @ h, h @ onehot @ onehot.T @ h
    assert kta == pytest.approx(float((k * l).sum() / (k.norm() * l.norm())), rel=1e-10)
    assert objective_distance.kernel_target_alignment(onehot[:, :3].float() * 5, labels, 3) == pytest.approx(1.0)
    assert objective_distance.kernel_target_alignment(features, torch.zeros(10, dtype=torch.long), 3) is None
    with pytest.raises(ValueError):
        objective_distance.kernel_target_alignment(features, labels, num_labels=2)


def test_pearson_ci():
    x = [0.1, 0.4, 0.35, 0.8, 0.9, 0.5]
    y = [1.0, 2.1, 1.7, 3.9, 4.4, 2.0]
    r = metrics.pearson_ci(x + [None], y + [5.0], num_resamples=500)
    assert r["n"] == 6 and r["r"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    assert r["ci_low"] <= r["r"] <= r["ci_high"] <= 1.0
    assert metrics.pearson_ci([1, 2], [3, 4])["r"] is None
    assert metrics.pearson_ci([1, 1, 1, 1], [1, 2, 3, 4])["r"] is None


# --- seed-to-seed uncertainty and the persistence rule --------------------------------------------

def test_t_quantile_matches_tables():
    # Student t table values (two-sided 95 % and one-sided 95 %)
    for df, q in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert metrics.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert metrics.t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    assert metrics.t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    assert metrics.t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)  # → normal
    assert metrics.t_cdf(0.0, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.t_quantile(1.0, 3)


def test_seed_summary_by_hand():
    s = metrics.seed_summary([1.0, 2.0, 4.0, None])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3) and s["sd"] == pytest.approx(sd)
    assert s["se"] == pytest.approx(sd / math.sqrt(3))
    assert s["ci_low"] == pytest.approx(7 / 3 - 4.302653 * sd / math.sqrt(3), rel=1e-6)
    one = metrics.seed_summary([0.5])
    assert one["mean"] == 0.5 and one["sd"] is None and one["ci_low"] is None and one["note"] == "n/a (1 seed)"
    assert metrics.seed_summary([])["mean"] is None


def _paired_moments(none, eq):
    """Means and per-seed (co)variances of paired slopes along the last dim (float64)."""
    none, eq = torch.as_tensor(none, dtype=torch.float64), torch.as_tensor(eq, dtype=torch.float64)
    m_n, m_e = none.mean(-1), eq.mean(-1)
    k = none.shape[-1]
    cov = ((none - m_n[..., None]) * (eq - m_e[..., None])).sum(-1) / (k - 1)
    return m_n, m_e, none.var(-1, correction=1), cov, eq.var(-1, correction=1)


def test_fieller_interval_against_brute_force_and_known_value():
    """Fieller's set = the R whose paired t test of d_i = e_i − R n_i does not reject (grid search over R),
    on fresh random pairs; with den known exactly (v_den = 0) it is (m_num ± t·sqrt(v_num)) / m_den."""
    gen = torch.Generator().manual_seed(7)
    for k in (2, 3, 5, 8):
        for _ in range(3):
            none = 0.5 + 0.15 * torch.randn(k, generator=gen, dtype=torch.float64)
            eq = 0.4 * none + 0.1 * torch.randn(k, generator=gen, dtype=torch.float64)
            m_n, m_e, s_nn, s_en, s_ee = _paired_moments(none, eq)
            t = metrics.t_quantile(0.975, k - 1)
            low, high, kind = metrics.fieller_interval(m_e, m_n, s_ee / k, s_en / k, s_nn / k, t)
            grid = torch.linspace(-6, 6, 120_001, dtype=torch.float64)  # step 1e-4
            d = eq[None, :] - grid[:, None] * none[None, :]
            stat = d.mean(-1).abs() / (d.std(-1, correction=1) / math.sqrt(k))
            accepted = grid[stat <= t]
            if int(kind) == 0:
                assert -6 < low.item() and high.item() < 6  # inside the grid
                assert accepted.min().item() == pytest.approx(low.item(), abs=2e-4)
                assert accepted.max().item() == pytest.approx(high.item(), abs=2e-4)
                assert accepted.numel() == pytest.approx((high - low).item() / 1e-4, abs=3)  # one interval
            elif int(kind) == 1:  # two rays: nothing accepted strictly inside the gap, both grid ends accepted
                inside = accepted[(accepted > low.item() + 2e-4) & (accepted < high.item() - 2e-4)]
                outside = (grid < low.item() - 2e-4) | (grid > high.item() + 2e-4)
                assert inside.numel() == 0 and (stat[outside] <= t).all()
            else:
                assert accepted.numel() == grid.numel()
    low, high, kind = metrics.fieller_interval(0.3, 0.6, 0.01, 0.0, 0.0, 2.0)
    assert int(kind) == 0 and (low.item(), high.item()) == pytest.approx(((0.3 - 0.2) / 0.6, (0.3 + 0.2) / 0.6))
    assert int(metrics.fieller_interval(0.3, 0.1, 0.01, 0.0, 0.01, 2.0)[2]) == 1  # none not significant, eq is
    assert int(metrics.fieller_interval(0.01, 0.01, 0.01, 0.0, 0.01, 2.0)[2]) == 2  # neither: every R


@pytest.mark.parametrize("none, equal, expected", [
    ([1.0, 1.1, 0.9], [0.9, 0.95, 0.85], "persists"),
    ([1.0, 1.1, 0.9], [-0.1, 0.0, 0.12], "collapses"),         # R ≈ 0 with a tight CI: upper bound < 0.5
    ([1.0, 1.1, 0.9], [0.19, 0.2, 0.21], "collapses"),          # R CI high < 0.5
    ([1.0, 1.1, 0.9], [-0.19, -0.2, -0.21], "collapses"),       # reversed sign: R < 0
    ([1.0, 1.1, 0.9], [0.4, 0.6, 0.8], "inconclusive"),         # R's CI straddles 0.5
    ([-0.5, 0.0, 0.6], [0.5, 0.6, 0.7], "inconclusive"),        # none's mean not significant: R unbounded
    ([-1.0, -1.1, -0.9], [-0.9, -0.95, -0.85], "persists"),    # negative slopes persist too
    ([0.100, 0.101], [0.05, 0.15], "inconclusive"),             # issue 18: R = 0.995, wide CI: not "collapses"
    ([1.0], [0.9, 0.95], "n/a (1 seed)"),
    ([], [0.9, 0.95], "n/a (no runs)"),
])
def test_verdict_cases(none, equal, expected):
    v = metrics.verdict(none, equal, paired=len(none) == len(equal))
    assert v.verdict == expected, v.reason
    json.dumps(v.to_dict(), allow_nan=False)  # JSON-able, no NaN / inf
    if expected == "inconclusive":
        assert v.missing and ("straddles 0.5" in v.reason or "not significant" in v.reason)
    if v.ci_kind == "bounded" and expected in ("persists", "collapses"):
        assert (v.ci_low > 0.5) == (expected == "persists") and (v.ci_high < 0.5) == (expected == "collapses")


def test_verdict_issue_case_and_pairing():
    v = metrics.verdict([0.100, 0.101], [0.05, 0.15])
    assert v.ratio == pytest.approx(0.1 / 0.1005) and v.paired and v.n_pairs == 2 and v.df == 1
    assert v.ci_low < 0.5 < 1.0 < v.ci_high and "straddles 0.5" in v.reason and v.seeds_needed > 2
    # pairing matters: a shared seed effect cancels in d = e − R·n; unpaired, the same values are wider
    none, eq = [0.40, 0.55, 0.70, 0.48], [0.33, 0.47, 0.58, 0.41]
    paired, unpaired = metrics.verdict(none, eq), metrics.verdict(none, eq, paired=False)
    assert paired.verdict == "persists" and not unpaired.paired and unpaired.df == 3
    assert unpaired.ci_high - unpaired.ci_low > 3 * (paired.ci_high - paired.ci_low)
    # mappings pair by seed whatever the order; seeds present on one side only are left out
    by_seed = metrics.verdict({3: 0.48, 0: 0.40, 1: 0.55, 2: 0.70, 9: 5.0}, {2: 0.58, 1: 0.47, 0: 0.33, 3: 0.41})
    assert by_seed.n_pairs == 4 and (by_seed.ci_low, by_seed.ci_high) == pytest.approx((paired.ci_low, paired.ci_high))
    assert metrics.verdict({0: 0.4, 1: 0.5}, {1: 0.4, 2: 0.5}).paired is False  # < 2 common seeds: unpaired
    with pytest.raises(DepthfastError):
        metrics.verdict([0.1, 0.2, 0.3], [0.1, 0.2])  # paired lists must be aligned by seed
    with pytest.raises(DepthfastError):
        metrics.verdict([0.1, 0.2], [0.1, 0.2], confidence=1.0)


def test_seeds_needed_is_where_fieller_first_decides():
    """With power 0.5, seeds_needed is the smallest n at which the observed means and per-seed (co)variances
    give a bounded Fieller CI excluding the threshold (checked against ``fieller_interval`` at n and n − 1)."""
    for none, eq in (([0.10, 0.11, 0.12], [0.04, 0.06, 0.08]), ([0.100, 0.101], [0.05, 0.15]),
                     ([0.5, 0.6, 0.4, 0.55], [0.30, 0.36, 0.22, 0.35]), ([-0.5, 0.1, 0.6], [0.5, 0.6, 0.7])):
        v = metrics.verdict(none, eq, power=0.5)
        m_n, m_e, s_nn, s_en, s_ee = _paired_moments(none, eq)

        def decisive(n):
            low, high, kind = metrics.fieller_interval(m_e, m_n, s_ee / n, s_en / n, s_nn / n,
                                                       metrics.t_quantile(0.975, n - 1))
            return int(kind) == 0 and not low.item() <= 0.5 <= high.item()

        n = v.seeds_needed
        assert n is not None and decisive(n) and (n == 2 or not decisive(n - 1)), (none, eq, n)
        assert metrics.verdict(none, eq).seeds_needed >= n  # 80 % power needs at least as many
    assert metrics.verdict([0.2, 0.3], [0.1, 0.15]).seeds_needed is None  # R = 0.5 exactly: no n decides


def _simulated_pairs(gen, sims, seeds, ratio, none_mean, sd_fraction, shared):
    """Paired slopes: a seed effect shared by both controls plus independent noise, SD = sd_fraction·none_mean."""
    sd = sd_fraction * none_mean
    seed_effect = math.sqrt(shared) * sd * torch.randn(sims, seeds, generator=gen, dtype=torch.float64)
    noise = lambda: math.sqrt(1 - shared) * sd * torch.randn(sims, seeds, generator=gen, dtype=torch.float64)  # noqa: E731
    return none_mean + seed_effect + noise(), ratio * none_mean + seed_effect + noise()


CALIBRATION_SPREADS = [(0.3, 0.1, 0.5), (0.5, 0.2, 0.8), (0.7, 0.3, 0.5)]  # none's mean, seed SD / mean, shared


def test_verdict_calibration_by_simulation():
    """Known R, 2–8 seeds, realistic spreads, 4000 simulated studies per cell, paired: false "collapses"
    at R ≥ 0.8 and false "persists" at R ≤ 0.2 each ≤ 5 %, Fieller coverage in [93 %, 97 %] at 95 %.
    The vectorised path (``fieller_interval`` + ``decide``) is checked against ``verdict`` on a subset."""
    gen = torch.Generator().manual_seed(18)
    sims = 4000
    worst = {"false collapses": 0.0, "false persists": 0.0, "coverage low": 1.0, "coverage high": 0.0}
    decided = {}
    for seeds in range(2, 9):
        t = metrics.t_quantile(0.975, seeds - 1)
        for none_mean, sd_fraction, shared in CALIBRATION_SPREADS:
            for ratio in (0.0, 0.2, 0.5, 0.8, 1.0, 1.2):
                none, eq = _simulated_pairs(gen, sims, seeds, ratio, none_mean, sd_fraction, shared)
                m_n, m_e, s_nn, s_en, s_ee = _paired_moments(none, eq)
                low, high, kind = metrics.fieller_interval(m_e, m_n, s_ee / seeds, s_en / seeds, s_nn / seeds, t)
                code = metrics.decide(low, high, kind, m_e / m_n, 0.5)
                covered = (kind == 2) | ((kind == 0) & (low <= ratio) & (ratio <= high)) \
                    | ((kind == 1) & ((ratio <= low) | (ratio >= high)))
                coverage = covered.double().mean().item()
                assert 0.93 <= coverage <= 0.97, (seeds, none_mean, sd_fraction, ratio, coverage)
                worst["coverage low"] = min(worst["coverage low"], coverage)
                worst["coverage high"] = max(worst["coverage high"], coverage)
                if ratio >= 0.8:
                    rate = (code == -1).double().mean().item()
                    assert rate <= 0.05, (seeds, none_mean, sd_fraction, ratio, rate)
                    worst["false collapses"] = max(worst["false collapses"], rate)
                if ratio <= 0.2:
                    rate = (code == 1).double().mean().item()
                    assert rate <= 0.05, (seeds, none_mean, sd_fraction, ratio, rate)
                    worst["false persists"] = max(worst["false persists"], rate)
                decided[seeds, none_mean, ratio] = (code != 0).double().mean().item()
                if seeds in (2, 5) and none_mean == 0.5 and ratio in (0.2, 1.0):
                    for i in range(150):
                        v = metrics.verdict(none[i].tolist(), eq[i].tolist())
                        assert v.verdict == {1: "persists", -1: "collapses", 0: "inconclusive"}[int(code[i])]
    # the rule is not just always inconclusive: with 8 seeds and a 10 % spread it decides R = 0 and R = 1
    assert decided[8, 0.3, 1.0] > 0.9 and decided[8, 0.3, 0.0] > 0.9 and decided[2, 0.7, 1.0] < 0.5
    print("calibration:", worst, {k: round(v, 3) for k, v in decided.items() if k[0] in (2, 4, 8)})


def test_verdict_calibration_unpaired():
    """Independent samples with unequal spreads (Welch-like, df = min(seeds) − 1, conservative): coverage
    ≥ 93 %, false collapses at R = 0.8 and false persists at R = 0.2 ≤ 5 %."""
    gen = torch.Generator().manual_seed(19)
    sims = 4000
    for n_none, n_eq in ((2, 3), (4, 4), (3, 8)):
        t = metrics.t_quantile(0.975, min(n_none, n_eq) - 1)
        for ratio in (0.2, 0.8):
            none = 0.5 + 0.1 * torch.randn(sims, n_none, generator=gen, dtype=torch.float64)
            eq = ratio * 0.5 + 0.05 * torch.randn(sims, n_eq, generator=gen, dtype=torch.float64)
            low, high, kind = metrics.fieller_interval(eq.mean(-1), none.mean(-1), eq.var(-1) / n_eq, 0.0,
                                                       none.var(-1) / n_none, t)
            code = metrics.decide(low, high, kind, eq.mean(-1) / none.mean(-1), 0.5)
            covered = (kind == 2) | ((kind == 0) & (low <= ratio) & (ratio <= high)) \
                | ((kind == 1) & ((ratio <= low) | (ratio >= high)))
            assert covered.double().mean().item() >= 0.93
            assert (code == (-1 if ratio == 0.8 else 1)).double().mean().item() <= 0.05
            v = metrics.verdict(none[0].tolist(), eq[0].tolist(), paired=False)
            assert v.verdict == {1: "persists", -1: "collapses", 0: "inconclusive"}[int(code[0])]
