"""Profile metrics and objective distances against hand-computed values, slow references and edge cases."""

import math

import numpy as np
import pytest
import torch

from depthfast import metrics, objective_distance
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


def test_ratio_ci_delta_method_by_hand():
    num, den = metrics.seed_summary([0.8, 0.9, 1.0]), metrics.seed_summary([1.9, 2.0, 2.1])
    r = metrics.ratio_ci(num, den)
    se = 0.45 * math.sqrt((0.1 / math.sqrt(3) / 0.9) ** 2 + (0.1 / math.sqrt(3) / 2.0) ** 2)
    assert r["ratio"] == pytest.approx(0.45) and r["se"] == pytest.approx(se) and r["df"] == 2
    assert r["ci_high"] - r["ratio"] == pytest.approx(4.302653 * se, rel=1e-6)
    assert metrics.ratio_ci(metrics.seed_summary([1.0]), den)["ci_low"] is None  # 1 seed: no CI
    assert metrics.ratio_ci(num, metrics.seed_summary([0.0, 0.0]))["ratio"] is None


@pytest.mark.parametrize("none, equal, verdict", [
    ([1.0, 1.1, 0.9], [0.9, 0.95, 0.85], "persists"),
    ([1.0, 1.1, 0.9], [-0.1, 0.0, 0.12], "collapses"),          # equal-step CI includes 0
    ([1.0, 1.1, 0.9], [0.19, 0.2, 0.21], "collapses"),           # R CI high < 0.5
    ([1.0, 1.1, 0.9], [-0.19, -0.2, -0.21], "collapses"),        # reversed sign: R < 0
    ([1.0, 1.1, 0.9], [0.4, 0.6, 0.8], "inconclusive"),          # R's CI straddles 0.5
    ([-0.5, 0.0, 0.6], [0.5, 0.6, 0.7], "inconclusive"),         # none's CI includes 0
    ([-1.0, -1.1, -0.9], [-0.9, -0.95, -0.85], "persists"),     # negative slopes persist too
    ([1.0], [0.9, 0.95], "n/a (1 seed)"),
    ([], [0.9, 0.95], "n/a (no runs)"),
])
def test_persistence_verdict_branches(none, equal, verdict):
    n, e = metrics.seed_summary(none), metrics.seed_summary(equal)
    assert metrics.persistence_verdict(e, n, metrics.ratio_ci(e, n))[0] == verdict
