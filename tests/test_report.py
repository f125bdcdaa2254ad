"""depthfast report on synthetic run directories: table, figures, markdown, and missing/corrupt runs."""

import csv
import json
import subprocess
import sys

import pytest

from depthfast import report as rp
from depthfast.config import RunConfig
from depthfast.metrics import profile_metrics


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
