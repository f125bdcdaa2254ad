"""depthfast report on synthetic run directories: table, figures, markdown, and missing/corrupt runs."""

import csv
import json
import subprocess
import sys

import pytest

from depthfast import metrics
from depthfast import report as rp
from depthfast.config import RunConfig
from depthfast.metrics import PER_TEXT_ESTIMATOR, profile_metrics


def _results(changes, block_type="sequential", architecture="encoder", objective="cls", control="none",
             metrics=None, trajectory=None):
    n = len(changes) - 1
    layers = [{"layer": "embeddings" if i == 0 else f"block.{i}", "depth": i / n, "cka": 1 - c, "change": c,
               "weight_change": 0.01} for i, c in enumerate(changes)]
    out = {"model": "m", "model_type": "bert" if architecture == "encoder" else "gpt2", "architecture": architecture,
           "block_type": block_type, "num_blocks": n, "objective": objective, "control": control,
           "layers": layers, "locality_gradient": None,
           "probe": {"texts": 24, "samples": 500, "loss_base": 2.0, "loss_tuned": 1.5, "accuracy_base": 0.1,
                     "accuracy_tuned": 0.4},
           "train": {"steps": 3, "seconds": 1.0}, "wall_seconds": 2.0}
    if metrics is not None:
        out["metrics"] = metrics
    if trajectory is not None:
        out["trajectory"] = trajectory
    return out


def _write_run(root, name, results=None, config=None, raw=None, log=None):
    d = root / name
    d.mkdir(parents=True)
    cfg = RunConfig(**(config or {}))
    cfg.out = str(d)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    if results is not None:
        (d / "results.json").write_text(json.dumps(results))
    if raw is not None:
        (d / "results.json").write_text(raw)
    if log is not None:
        (d / "run.log").write_text(log)
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "sweep"
    grow = [0.0, 0.01, 0.02, 0.05, 0.1]
    blocks = ([0.25, 0.5, 0.75, 1.0], grow[1:])
    stored = profile_metrics(*blocks)
    stored.update(slope_per_text=0.12, slope_ci_low=0.08, slope_ci_high=0.15, initial_loss_normalized=0.9,
                  gradient_alignment_distance=0.6, kernel_target_alignment=0.2)
    for i, (seed, control, scale) in enumerate([(0, "none", 1.0), (1, "none", 1.2), (0, "equal-step", 0.5),
                                                (1, "equal-step", 0.4)]):
        changes = [c * scale for c in grow]
        changes[1] += 0.004 * i  # shapes differ a little, so steepness varies across runs
        m = profile_metrics(blocks[0], changes[1:])
        m.update(initial_loss_normalized=0.8 + 0.05 * i, gradient_alignment_distance=0.3 + 0.1 * i,
                 kernel_target_alignment=None, slope_per_text=m["locality_gradient"],
                 slope_ci_low=m["locality_gradient"] * 0.8, slope_ci_high=m["locality_gradient"] * 1.2)
        traj = [{"step": k, "layers": [c * k / 3 for c in changes]} for k in (1, 2, 3)] if i == 0 else None
        _write_run(root, f"enc__cls__{control}__seed{seed}", _results(changes, control=control, metrics=m,
                                                                        trajectory=traj),
                   config={"seed": seed, "control": control})
    # a decoder run without "metrics": the report computes them
    _write_run(root, "dec__clm__none__seed0",
               _results([0.0, 0.1, 0.05, 0.02, 0.01], block_type="parallel", architecture="decoder",
                        objective="clm"), config={"objective": "clm"})
    _write_run(root, "corrupt__cls__none__seed2", raw='{"layers": [', config={"seed": 2})
    _write_run(root, "failed__mlm__none__seed0", config={"objective": "mlm"},
               log="loading\ndepthfast: error: probe set too small\n")
    _write_run(root, "nolayers__cls__none__seed3", results={"model": "m"}, config={"seed": 3})
    return root


def test_collect_statuses(runs):
    records = {r.name: r for r in rp.collect(str(runs))}
    assert len(records) == 8
    assert records["corrupt__cls__none__seed2"].status == "corrupt results"
    assert records["nolayers__cls__none__seed3"].status == "corrupt results"
    failed = records["failed__mlm__none__seed0"]
    assert failed.status == "missing results" and "probe set too small" in failed.problem
    dec = records["dec__clm__none__seed0"]
    assert dec.ok and dec.metrics_source == "computed"
    assert dec.metrics["locality_gradient"] < 0 and dec.metrics["steepness"] < 0
    assert dec.metrics["gradient_alignment_distance"] is None
    assert records["enc__cls__none__seed0"].metrics_source == "results"


def test_report_writes_everything(runs, tmp_path):
    lines = []
    assert rp.report(str(runs), resamples=200, echo=lines.append) == 0
    out = runs / "report"
    for name in ("runs.csv", "report.md", "profiles.png", "slopes.png", "steepness_vs_distance.png", "width.png",
                 "trajectory.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    by_run = {r["run"]: r for r in rows}
    assert by_run["corrupt__cls__none__seed2"]["status"] == "corrupt results"
    assert by_run["enc__cls__equal-step__seed1"]["control"] == "equal-step"
    assert float(by_run["enc__cls__none__seed0"]["steepness"]) > 0
    assert by_run["enc__cls__none__seed0"]["seed"] == "0" and by_run["dec__clm__none__seed0"]["objective"] == "clm"
    md = (out / "report.md").read_text()
    assert "corrupt__cls__none__seed2" in md and "failed__mlm__none__seed0" in md and "missing results" in md
    assert "gradient_alignment_distance" in md and "equal-step / none" in md
    stats = {s["distance"]: s for s in rp.correlations(rp.collect(str(runs), exclude=str(out)), 200)}
    assert stats["gradient_alignment_distance"]["n"] == 4 and stats["gradient_alignment_distance"]["r"] is not None
    assert stats["kernel_target_alignment"]["n"] == 0
    terminal = "\n".join(lines)
    assert "corrupt results" in terminal and "3 run(s) without usable results" in terminal
    # ratio of mean headline slopes, equal-step over none (the per-text slope never enters it)
    records = rp.collect(str(runs), exclude=str(out))
    header, table_rows = rp.control_comparison(records)
    enc = [r for r in table_rows if r[:4] == ["exact/token", "sequential", "cls", "unknown"]][0]
    slope = {(r.get("control"), r.get("seed")): r.metrics["locality_gradient"] for r in records if r.ok}
    expected = (slope["equal-step", 0] + slope["equal-step", 1]) / (slope["none", 0] + slope["none", 1])
    assert float(enc[6]) == pytest.approx(expected, abs=1e-3)
    # old results (no tied_embeddings, no slope_estimator): labelled from the config, tied "unknown"
    assert "headline estimator exact/token" in md and "Tied embeddings unknown" in md
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return
    assert pq.read_table(out / "runs.parquet").num_rows == 8


def test_report_rerun_ignores_its_own_output_and_survives_no_good_runs(tmp_path, runs):
    rp.report(str(runs), resamples=50, echo=lambda *_: None)
    assert len(rp.collect(str(runs), exclude=str(runs / "report"))) == 8
    only_bad = tmp_path / "bad"
    _write_run(only_bad, "x", raw="not json")
    assert rp.report(str(only_bad), echo=lambda *_: None) == 0
    assert "corrupt results" in (only_bad / "report" / "report.md").read_text()
    assert not (only_bad / "report" / "profiles.png").exists()


def test_trajectory_formats(runs):
    records = {r.name: r for r in rp.collect(str(runs))}
    traj = rp.trajectory_of(records["enc__cls__none__seed0"])
    assert [t[0] for t in traj] == [1, 2, 3] and len(traj[0][1]) == 5
    assert rp.trajectory_of(records["enc__cls__none__seed1"]) is None


def test_report_cli_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "depthfast.cli", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("depthfast: error:") and len(proc.stderr.strip().splitlines()) == 1


# --- one estimator per comparison; seed-to-seed uncertainty; the persists/collapses rule -------------

def _slope_run(root, name, slope, model="m", control="none", seed=0, estimator="exact", pooling="token",
               tied=None, per_text=None, new_fields=True):
    """A run whose headline slope is ``slope`` (profile: change = slope · depth over 4 blocks)."""
    depths = [0.25, 0.5, 0.75, 1.0]
    changes = [0.2 + slope * (d - 0.625) for d in depths]  # positive, OLS slope exactly ``slope``
    m = profile_metrics(depths, changes)
    if new_fields:
        m["slope_estimator"] = f"{estimator}/{pooling}"
    if per_text is not None:
        m.update(slope_per_text=per_text[0], slope_per_text_ci_low=per_text[1], slope_per_text_ci_high=per_text[2])
    results = _results([0.0] + changes, control=control, metrics=m)
    results.update(model=model, estimator=estimator, pooling=pooling)
    if tied is not None:
        results.update(tied_embeddings=tied, tied_embeddings_group="head" if tied else None)
    return _write_run(root, name, results, config={"model": model, "control": control, "seed": seed,
                                                    "estimator": estimator, "pooling": pooling})


# Slopes per seed (seed i on both sides: paired); the verdict each pair must get under PERSISTENCE_RULE.
BRANCHES = {
    "persists": ([0.10, 0.11, 0.12], [0.090, 0.095, 0.100]),        # R ≈ 0.86, tight: CI low > 0.5
    "collapses-zero": ([0.10, 0.11, 0.12], [-0.01, 0.00, 0.012]),   # R ≈ 0, Fieller CI [−0.31, 0.21] < 0.5
    "collapses-ratio": ([0.10, 0.11, 0.12], [0.019, 0.020, 0.021]),  # R ≈ 0.18: CI high < 0.5
    "inconclusive": ([0.10, 0.11, 0.12], [0.04, 0.06, 0.08]),        # R ≈ 0.55 with a CI across 0.5
    "none-flat": ([-0.05, 0.00, 0.06], [0.05, 0.06, 0.07]),          # no slope without control
    "wide-near-one": ([0.100, 0.101], [0.05, 0.15]),                 # issue 18: R ≈ 1, wide CI: never collapses
}
EXPECTED = {"persists": "persists", "collapses-zero": "collapses", "collapses-ratio": "collapses",
            "inconclusive": "inconclusive", "none-flat": "inconclusive", "wide-near-one": "inconclusive"}


@pytest.fixture
def branch_runs(tmp_path):
    root = tmp_path / "branches"
    for model, (none, eq) in BRANCHES.items():
        for control, slopes in (("none", none), ("equal-step", eq)):
            for seed, slope in enumerate(slopes):
                _slope_run(root, f"{model}__{control}__seed{seed}", slope, model=model, control=control, seed=seed)
    _slope_run(root, "single__none__seed0", 0.1, model="single", control="none")
    _slope_run(root, "single__equal-step__seed0", 0.09, model="single", control="equal-step")
    return root


def test_persistence_rule_branches_on_run_directories(branch_runs):
    comps = {c.none.model: c for c in rp.comparisons(rp.collect(str(branch_runs)))}
    assert set(comps) == set(BRANCHES) | {"single"}
    for model, verdict in EXPECTED.items():
        assert comps[model].verdict == verdict, (model, comps[model].reason, comps[model].ratio)
    # the rule changed (issue 18): collapses needs R's upper bound below 0.5, not equal-step's CI across 0
    assert comps["collapses-zero"].reason.startswith("R's 95 % CI [-0.31, +0.21] lies below 0.5")
    assert "lies below 0.5" in comps["collapses-ratio"].reason and "no slope" in comps["none-flat"].reason
    assert "straddles 0.5" in comps["wide-near-one"].reason and comps["wide-near-one"].result.ratio > 0.99
    assert comps["single"].verdict == "n/a (1 seed)"
    # the numbers behind a verdict: mean over seeds, t-CI with df = 2, R = ratio of the means, paired by seed
    p = comps["persists"]
    assert p.none.slope["mean"] == pytest.approx(0.11) and p.none.slope["sd"] == pytest.approx(0.01)
    assert p.none.slope["ci_low"] == pytest.approx(0.11 - 4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)
    assert p.result.ratio == pytest.approx(0.095 / 0.11) and p.result.df == 2
    assert p.result.paired and p.result.n_pairs == 3
    direct = metrics.verdict(*BRANCHES["persists"])  # the slopes read back from the profiles, to rounding
    assert (p.result.ci_low, p.result.ci_high) == pytest.approx((direct.ci_low, direct.ci_high), rel=1e-9)
    assert (p.result.verdict, p.result.seeds_needed) == (direct.verdict, direct.seeds_needed)
    header, rows = rp.control_tables(rp.collect(str(branch_runs)))["exact/token"]
    single = [r for r in rows if r[0] == "single"][0]
    assert "n/a (1 seed)" in single[6] and single[header.index("verdict")] == "n/a (1 seed)"
    inconclusive = [r for r in rows if r[0] == "inconclusive"][0]
    seeds_needed = inconclusive[header.index("seeds for a decisive verdict")]
    assert int(seeds_needed) == comps["inconclusive"].result.seeds_needed > 3
    assert inconclusive[header.index("R 95% CI (Fieller)")] == "[+0.12, +0.81]"
    lines = []
    rp.report(str(branch_runs), resamples=50, echo=lines.append)
    md = (branch_runs / "report" / "report.md").read_text()
    assert "Rule: R = mean slope(equal-step) / mean slope(none)" in md and "collapses" in md and "persists" in md
    assert "seeds for a decisive verdict" in md and f"~{seeds_needed} seeds per control would decide" in md
    terminal = "\n".join(lines)
    assert "seeds for a decisive verdict" in terminal and "straddles 0.5" in terminal
    seed_header, seed_rows = rp.group_tables(rp.collect(str(branch_runs)))["exact/token"]
    assert [r[seed_header.index("SD over seeds")] for r in seed_rows if r[0] == "single"] == ["n/a (1 seed)"] * 2


def test_estimators_are_never_mixed(tmp_path):
    """An unbiased and an exact run of the same model, with per-text CIs and one tied model: separate
    tables, separate columns, separate figure panels, every header naming its estimator."""
    root = tmp_path / "mixed"
    for seed in (0, 1):
        _slope_run(root, f"ex__none__seed{seed}", 0.10 + 0.01 * seed, seed=seed, per_text=(0.5, 0.4, 0.6), tied=False)
        _slope_run(root, f"ub__none__seed{seed}", 0.30 + 0.01 * seed, seed=seed, estimator="unbiased",
                   per_text=(0.5, 0.4, 0.6), tied=True)
    _slope_run(root, "old__none__seed0", 0.2, model="old", new_fields=False, pooling="mean")  # labelled from config
    records = rp.collect(str(root))
    assert sorted(rp.group_tables(records)) == ["exact/mean", "exact/token", "unbiased/token"]
    for est, (header, rows) in rp.group_tables(records).items():
        assert f"slope [{est}] mean" in header
        want = {"exact/token": [0.105], "unbiased/token": [0.305], "exact/mean": [0.2]}[est]
        assert [float(r[header.index(f"slope [{est}] mean")]) for r in rows] == pytest.approx(want, abs=1e-6)
    for est, (header, rows) in rp.run_tables(records).items():
        assert header[7] == f"slope [{est}]" and header[8] == rp.PER_TEXT_COLUMN
        assert all(r[8].startswith("+5.000e-01 [+4.00e-01, +6.00e-01]") or r[8] == "—" for r in rows)
    header, rows = rp.group_table(records)
    for row in rows:  # the design table: each row fills only its own estimator's columns
        filled = [h for h, v in zip(header, row) if h.startswith("slope [") and v != ""]
        assert filled and all(h.startswith(f"slope [{row[0]}]") for h in filled)
    tied = {row[0]: row[4] for row in rows}
    assert tied == {"exact/token": "untied", "unbiased/token": "tied (head)", "exact/mean": "unknown"}
    panels = rp.slope_panels(records)
    assert [p["estimator"] for p in panels] == ["exact/mean", "exact/token", "unbiased/token", PER_TEXT_ESTIMATOR]
    for panel in panels[:-1]:
        assert all(rp.estimator_of(r) == panel["estimator"] for item in panel["items"] for r in item[2])
        assert panel["estimator"] in panel["title"] and panel["estimator"] in panel["ylabel"]
    assert all(pt == (0.5, 0.4, 0.6) for item in panels[-1]["items"] for pt in item[3])
    assert {s["estimator"] for s in rp.correlations(records, 20)} == {"exact/mean", "exact/token", "unbiased/token"}
    rp.report(str(root), resamples=20, echo=lambda *_: None)
    md = (root / "report" / "report.md").read_text()
    assert "### Seed groups — headline estimator unbiased/token" in md and "n/a (1 seed)" in md
    with open(root / "report" / "runs.csv") as f:
        est = {r["run"]: r["slope_estimator"] for r in csv.DictReader(f)}
    assert est["ub__none__seed0"] == "unbiased/token" and est["old__none__seed0"] == "exact/mean"
