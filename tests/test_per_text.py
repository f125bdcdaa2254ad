"""Per-text HSIC₁ change moments (metrics.per_text: per_text_change_batch, the bootstrap's input) against a
float64 per-text loop of the change form, at small changes and offsets of 1e4, and the bootstrap finished
change-relative.

Tolerances, relative on the per-text 1 − CKA (and on the bootstrap's 1 − CKA_S), 1 − CKA ≈ 1e-2 … 1e-8:
  float64 (the CPU default): 1e-9 — the same float64 values, summed in another order (measured ≤ 5e-14;
  the old triples gave 4e-6 at 1 − CKA ≈ 1e-9 by subtracting from 1);
  fp32 Grams (the GPU default, run here on the CPU): X̃ and D̃ centered in float64, then rounded; K carries
  ≈ √d·2⁻²⁴ of |x|², M the same of the change's own size: 1e-4 (measured ≤ 2.8e-6 per text at d ≤ 64,
  ≤ 5.4e-8 on the ratio of sums; the old fp32 triples: 2.9e-2 per text at 1 − CKA ≈ 1e-5, 170 % at 1e-8).
Per HSIC₁ triple at offsets of 1e4 with fp32 Grams: 2e-5 relative (the docstring's claim; measured 7.4e-7;
2.1e-4 when the raw rows were rounded to fp32 before centering, so this test fails on that code).
"""

import pytest
import torch

from depthfast.cka import hsic1
from depthfast.cka.reference import one_minus_cka_from_change
from depthfast.metrics import per_text as metrics

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def texts(seed, lengths, seq, widths, eps, offset=1e4, dtype=torch.float64):
    """Y = X + εZ (Z noise) on every channel but the first three, which carry ``offset`` and do not move;
    NaN in the padding (it must never reach a text's statistics)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    xs, ys = [], []
    for d in widths:
        x = torch.randn(len(lengths), seq, d, generator=g, dtype=torch.float64)
        y = x + eps * torch.randn(x.shape, generator=g, dtype=torch.float64) * (torch.arange(d) >= 3)
        x[..., :3] += offset
        y[..., :3] = x[..., :3]
        x, y = x.to(dtype), y.to(dtype)
        x[mask == 0] = y[mask == 0] = float("nan")
        xs.append(x)
        ys.append(y)
    return xs, ys, mask


def change_loop(xs, ys, mask):
    """float64 (texts with n > 3, layers, 3) of (HSIC₁(K,K), HSIC₁(K,M), HSIC₁(M,M)), one text at a time:
    its real rows, D = Y − X, both centered, K = X̃X̃ᵀ, M = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ, cka.hsic1."""
    rows = []
    for i in range(mask.shape[0]):
        keep = mask[i].bool()
        if int(keep.sum()) <= 3:
            continue
        h = []
        for x, y in zip(xs, ys):
            xi = x[i][keep].double()
            di = y[i][keep].double() - xi
            xi, di = xi - xi.mean(0), di - di.mean(0)
            k, m = xi @ xi.T, xi @ di.T + di @ xi.T + di @ di.T
            h.append(torch.stack([hsic1(k, k), hsic1(k, m), hsic1(m, m)]))
        rows.append(torch.stack(h))
    return torch.stack(rows)


def triples_loop(xs, ys, mask):
    """The old float64 reference: (HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L)) of the centered rows, per text."""
    rows = []
    for i in range(mask.shape[0]):
        keep = mask[i].bool()
        if int(keep.sum()) <= 3:
            continue
        h = []
        for x, y in zip(xs, ys):
            xc, yc = x[i][keep].double(), y[i][keep].double()
            xc, yc = xc - xc.mean(0), yc - yc.mean(0)
            k, l = xc @ xc.T, yc @ yc.T
            h.append(hsic1(torch.stack([k, k, l]), torch.stack([l, k, l])))
        rows.append(torch.stack(h))
    return torch.stack(rows)


def per_text_change(moments):
    """1 − CKA of each (text, layer), float64 truth from its moments."""
    return torch.stack([torch.stack([one_minus_cka_from_change(*m) for m in row]) for row in moments])


def relative(got, want):
    return float(((got - want).abs() / want.abs()).max())


LENGTHS = [1, 2, 3, 4, 5, 17, 40, 40, 23, 3, 8]


@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("input_dtype", [torch.float64, torch.float32])
def test_change_moments_match_the_float64_change_loop_at_every_magnitude(gram_dtype, input_dtype):
    seen = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):  # per-text 1 − CKA ≈ 1e-2 … 1e-8
        xs, ys, mask = texts(7, LENGTHS, 40, (24, 64), eps, dtype=input_dtype)
        want = change_loop(xs, ys, mask)
        got = metrics.per_text_change_batch(xs, ys, mask, gram_dtype=gram_dtype)
        assert got.dtype == torch.float64 and got.shape == want.shape == (7, 2, 3)
        truth = per_text_change(want)
        seen += [float(truth.min()), float(truth.max())]
        assert relative(per_text_change(got), truth) < TOL[gram_dtype], eps
        # the bootstrap's ratio of sums over all texts, finished change-relative
        all_texts = metrics._change_from_sums(got.sum(0))
        assert relative(all_texts, torch.stack([one_minus_cka_from_change(*m) for m in want.sum(0)])) < TOL[gram_dtype]
    assert min(seen) < 1e-7 and max(seen) > 1e-3


def test_fp32_grams_centre_before_rounding():
    """float64 activations with offsets of 1e4: fp32 Grams of rows centered in float64 keep each HSIC₁
    triple within 2e-5 of float64 (rounding the raw rows to fp32 first lost 1e4·2⁻²⁴ ≈ 6e-4 per entry)."""
    xs, ys, mask = texts(8, [48, 30, 7, 4, 48, 12], 48, (32, 96), 0.3)
    want = triples_loop(xs, ys, mask)
    f32 = metrics.per_text_hsic_batch(xs, ys, mask, gram_dtype=torch.float32)
    assert relative(f32, want) < 2e-5
    f64 = metrics.per_text_hsic_batch(xs, ys, mask)
    assert relative(f64, want) < 1e-10


def test_layer_of_two_widths_keeps_the_triples():
    """No D = Y − X when the widths differ: the moments are those of the triples (the old statistics)."""
    xs, ys, mask = texts(9, [6, 9, 2, 12], 12, (8, 8), 0.2, offset=0.0)
    ys[1] = torch.cat([ys[1], ys[1][..., :3] * 0.5], dim=-1)
    got = metrics.per_text_change_batch(xs, ys, mask)
    triples = triples_loop(xs, ys, mask)
    kl, kk, ll = triples.unbind(-1)
    assert torch.allclose(got[:, 1], torch.stack([kk, kl - kk, ll - 2 * kl + kk], -1)[:, 1], rtol=1e-10, atol=1e-12)
    assert relative(got[:, 0], change_loop(xs[:1], ys[:1], mask)[:, 0]) < 1e-10
    assert torch.allclose(metrics.per_text_hsic_batch(xs, ys, mask), triples, rtol=1e-10, atol=0)


def test_bootstrap_of_moments_equals_the_bootstrap_of_triples():
    """One resampling, two inputs: the moments and their triples give the same slope and CI at a large
    change; at 1 − CKA ≈ 1e-7 the moments keep the slope that float64 triples of fp32 Grams lose."""
    depths = [1 / 3, 2 / 3, 1.0]
    xs, ys, mask = texts(10, [12, 20, 9, 30, 16, 25, 7], 30, (16, 16, 16), 0.1)
    for i, y in enumerate(ys):  # the change grows with depth
        ys[i] = xs[i] + (i + 1) * (y - xs[i])
    moments = metrics.per_text_change_batch(xs, ys, mask)
    a = metrics.bootstrap_slope_ci(depths, moments, num_resamples=300, seed=3, form="change")
    b = metrics.bootstrap_slope_ci(depths, metrics.per_text_hsic_batch(xs, ys, mask), num_resamples=300, seed=3)
    for key in ("slope", "ci_low", "ci_high", "std"):
        assert a[key] == pytest.approx(b[key], rel=1e-9)
    assert a["num_valid_resamples"] == b["num_valid_resamples"] == 300 and a["slope"] > 0
    small = [xs[i] + 1e-3 * (y - xs[i]) for i, y in enumerate(ys)]  # 1 − CKA ≈ 1e-7 … 1e-6
    truth = metrics.bootstrap_slope_ci(depths, change_loop(xs, small, mask), num_resamples=300, seed=3, form="change")
    f32 = metrics.per_text_change_batch(xs, small, mask, gram_dtype=torch.float32)
    got = metrics.bootstrap_slope_ci(depths, f32, num_resamples=300, seed=3, form="change")
    for key in ("slope", "ci_low", "ci_high"):
        assert got[key] == pytest.approx(truth[key], rel=TOL[torch.float32])
    with pytest.raises(ValueError, match="form must be one of"):
        metrics.bootstrap_slope_ci(depths, moments, form="triples")


def test_probe_pass_records_the_change_moments_and_the_run_bootstraps_them():
    """measure_probe keeps each text's change moments (per_text_change) and the triples derived from them
    (per_text_hsic); run_metrics bootstraps the moments (form "change"): the same slope as the moments'
    own bootstrap, and within 1e-9 of the triples' at this large change."""
    from types import SimpleNamespace

    import tiny_models
    from depthfast.batches import probe_batches
    from depthfast.cka_change import hsic_triples_from_moments
    from depthfast.config import RunConfig
    from depthfast.layers import BlockCapture, discover_layers
    from depthfast.probe import measure_probe
    from depthfast.run import run_metrics
    from test_probe import PROBE_TEXTS, _perturbed_twin

    model, tokenizer = tiny_models.build("bert")
    model.eval()
    twin = _perturbed_twin(model, scale=0.01).eval()
    batches = probe_batches("clm", tokenizer, PROBE_TEXTS, None, 3, 32, 0.15, seed=0)
    result = measure_probe(model, twin, discover_layers(model), discover_layers(twin), batches,
                           torch.device("cpu"), "token", "exact", progress=False)
    want = []
    for batch in batches:
        with torch.no_grad(), BlockCapture(discover_layers(model)) as cb, BlockCapture(discover_layers(twin)) as ct:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        want.append(change_loop(cb.activations, ct.activations, batch["attention_mask"]))
    want = torch.cat(want)
    assert result.per_text_change.shape == want.shape and relative(per_text_change(result.per_text_change),
                                                                   per_text_change(want)) < 1e-9
    assert torch.equal(result.per_text_hsic, hsic_triples_from_moments(result.per_text_change))
    depths = [i / (want.shape[1] - 1) for i in range(want.shape[1])]
    task, net = SimpleNamespace(num_labels=2), SimpleNamespace(config=SimpleNamespace(vocab_size=10))
    measured = SimpleNamespace(per_text_hsic=result.per_text_hsic, per_text_change=result.per_text_change,
                               loss_base=1.0, base_features=None, labels=None)
    m = run_metrics(RunConfig(), task, net, measured, depths, [0.0] * len(depths), None)
    own = metrics.bootstrap_slope_ci(depths[1:], result.per_text_change[:, 1:], form="change")
    old = metrics.bootstrap_slope_ci(depths[1:], result.per_text_hsic[:, 1:])
    assert (m["slope_per_text"], m["slope_per_text_ci_low"], m["slope_per_text_ci_high"]) == (
        own["slope"], own["ci_low"], own["ci_high"])
    assert m["slope_per_text"] == pytest.approx(old["slope"], rel=1e-9)
