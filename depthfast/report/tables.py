"""The report's tables: runs.csv / runs.parquet (one row per run), and per headline estimator the
run, seed-group, control-comparison and width tables, each as (header, rows) of printable cells."""

from __future__ import annotations

import io
import json
import os
from dataclasses import fields

from depthfast.config import RunConfig
from depthfast.metrics import PER_TEXT_ESTIMATOR
from depthfast.report.groups import SEED_CI, by_estimator, comparisons, mean_of, sd_of, seed_groups
from depthfast.report.records import (METRIC_KEYS, RunRecord, estimator_of, headline_slope, per_text_point, source_of,
                                     tied_of)
from depthfast.artifacts import atomic_write_bytes, atomic_write_csv, finite_or_none
from depthfast.terminal import fmt_ci, fmt_cell


CONFIG_KEYS = [f.name for f in fields(RunConfig) if f.name != "out"]
PER_TEXT_COLUMN = f"slope_per_text ({PER_TEXT_ESTIMATOR}) [95% CI over texts]"


def row_of(record: RunRecord) -> dict:
    res = record.results or {}
    probe, train = res.get("probe") or {}, res.get("train") or {}
    row = {"run": record.name, "status": record.status, "problem": record.problem, "source": source_of(record)}
    for key in CONFIG_KEYS:
        row[key] = record.config.get(key)
    for key, value in record.config.items():  # a compare's own keys (base, tuned, offload), newer fields
        if key not in row and key != "out":
            row[key] = value
    row.update({
        "model_type": res.get("model_type"), "architecture": res.get("architecture"),
        "block_type": res.get("block_type"), "num_blocks": res.get("num_blocks"),
        "probe_loss_base": probe.get("loss_base"), "probe_loss_tuned": probe.get("loss_tuned"),
        "probe_accuracy_base": probe.get("accuracy_base"), "probe_accuracy_tuned": probe.get("accuracy_tuned"),
        "train_steps": train.get("steps"), "train_seconds": train.get("seconds"),
        "wall_seconds": res.get("wall_seconds"),
    })
    for key in METRIC_KEYS:
        row[key] = record.metrics.get(key)
    for key, value in record.metrics.items():  # metrics this version does not know yet
        row.setdefault(key, value)
    row["metrics_source"] = record.metrics_source
    row["slope_estimator"] = estimator_of(record) if record.ok else None  # what locality_gradient is
    row["tied_embeddings"] = res.get("tied_embeddings")
    row["tied_embeddings_group"] = res.get("tied_embeddings_group")
    return {k: finite_or_none(v) if not isinstance(v, (dict, list)) else json.dumps(v) for k, v in row.items()}


def table(records: list[RunRecord]) -> tuple[list[str], list[dict]]:
    rows = [row_of(r) for r in records]
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    return header, rows


def write_table(out: str, header: list[str], rows: list[dict]) -> list[str]:
    written = [os.path.join(out, "runs.csv")]
    atomic_write_csv(written[0], header, [["" if r.get(k) is None else r.get(k) for k in header] for r in rows])
    try:
        import pyarrow as pa  # optional: parquet output only
        import pyarrow.parquet as pq
    except ImportError:
        return written
    columns = {}
    for key in header:
        values = [r.get(key) for r in rows]
        kinds = {type(v) for v in values if v is not None}
        if kinds and not kinds <= {int, float} and kinds != {str} and kinds != {bool}:
            values = [None if v is None else str(v) for v in values]  # one type per parquet column
        elif kinds == {int, float}:
            values = [None if v is None else float(v) for v in values]
        columns[key] = values
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    atomic_write_bytes(os.path.join(out, "runs.parquet"), buffer.getvalue())
    written.append(os.path.join(out, "runs.parquet"))
    return written


def _seed_cells(s: dict) -> list[str]:
    """mean, SD, SE, CI cells of a seed_summary: "n/a (1 seed)" where there is one seed."""
    if s["n"] == 1:
        return [fmt_cell(s["mean"], "+.3e"), "n/a (1 seed)", "n/a (1 seed)", "n/a (1 seed)"]
    return [fmt_cell(s["mean"], "+.3e"), fmt_cell(s["sd"], ".2e"), fmt_cell(s["se"], ".2e"), fmt_ci(s["ci_low"], s["ci_high"])]


def group_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: one row per seed group with the slope's mean, SD, SE and t-CI over seeds."""
    out = {}
    for est, groups in by_estimator(seed_groups(records)).items():
        header = ["model", "block_type", "objective", "control", "tied embeddings", "settings", "seeds",
                  f"slope [{est}] mean", "SD over seeds", "SE", SEED_CI, f"steepness [{est}]",
                  f"width fraction [{est}]"]
        rows = [[g.model, g.block_type, g.objective, g.control, g.tied, g.settings, len(g.runs), *_seed_cells(g.slope),
                 fmt_cell(mean_of([r.metrics.get("steepness") for r in g.runs])),
                 fmt_cell(mean_of([r.metrics.get("width_fraction") for r in g.runs]))] for g in groups]
        out[est] = (header, rows)
    return out


def group_table(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """The study's design table: per headline estimator × block type × objective × control × tied
    embeddings, the slope over runs (all models and seeds of the cell). The estimator is a column here
    and never shares a number column: rows of different estimators carry them in separate columns."""
    ok = [r for r in records if r.ok]
    ests = sorted({estimator_of(r) for r in ok})
    cells: dict[tuple, list[RunRecord]] = {}
    for r in ok:
        key = (estimator_of(r), r.get("block_type") or "?", r.get("objective") or "?", r.get("control") or "?",
               tied_of(r))
        cells.setdefault(key, []).append(r)
    header = ["estimator", "block_type", "objective", "control", "tied embeddings", "runs", "models"]
    for est in ests:
        header += [f"slope [{est}] mean over runs", f"slope [{est}] SD over runs"]
    rows = []
    for key in sorted(cells):
        rs = cells[key]
        slopes = [headline_slope(r) for r in rs]
        row = [*key, len(rs), len({r.get("model") for r in rs})]
        for est in ests:
            row += [fmt_cell(mean_of(slopes), "+.3e"), fmt_cell(sd_of(slopes), ".2e")] if est == key[0] else ["", ""]
        rows.append(row)
    return header, rows


def control_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: none vs equal-step per pair of seed groups (``depthfast.metrics.verdict``,
    paired by seed): R with Fieller's CI, the verdict, the seeds a decisive verdict would need, the reason."""
    out = {}
    for est, comps in by_estimator(comparisons(records)).items():
        header = ["model", "block_type", "objective", "tied embeddings", "settings", "seeds (none / equal-step)",
                  f"slope [{est}] none: mean {SEED_CI}", f"slope [{est}] equal-step: mean {SEED_CI}",
                  "R = equal-step / none", "R 95% CI (Fieller)", "paired", "verdict",
                  "seeds for a decisive verdict", "why"]
        rows = []
        for c in comps:
            cell = lambda s: (f"{fmt_cell(s['mean'], '+.3e')} " + ("n/a (1 seed)" if s["n"] == 1  # noqa: E731
                                                                else fmt_ci(s["ci_low"], s["ci_high"])))
            rows.append([c.none.model, c.none.block_type, c.none.objective, c.none.tied, c.none.settings,
                         f"{len(c.none.runs)} / {len(c.equal.runs)}", cell(c.none.slope), cell(c.equal.slope),
                         fmt_cell(c.result.ratio, "+.3f"), c.result.ci_text,
                         f"yes ({c.result.n_pairs} seeds)" if c.result.paired else "no",
                         c.verdict, fmt_cell(c.result.seeds_needed), c.reason])
        out[est] = (header, rows)
    return out


def control_comparison(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """Per estimator × block type × objective × tied: the mean slope over all none runs and all
    equal-step runs, and their ratio (the coarse view; verdicts are in ``control_tables``)."""
    slopes: dict[tuple, dict[str, list]] = {}
    for r in records:
        if r.ok:
            key = (estimator_of(r), r.get("block_type") or "?", r.get("objective") or "?", tied_of(r))
            slopes.setdefault(key, {}).setdefault(r.get("control"), []).append(headline_slope(r))
    header = ["estimator", "block_type", "objective", "tied embeddings", "slope (none) mean over runs",
              "slope (equal-step) mean over runs", "equal-step / none"]
    rows = []
    for key in sorted(slopes):
        none, eq = mean_of(slopes[key].get("none", [])), mean_of(slopes[key].get("equal-step", []))
        ratio = eq / none if none not in (None, 0) and eq is not None else None
        rows.append([*key, fmt_cell(none, "+.3e"), fmt_cell(eq, "+.3e"), fmt_cell(ratio, "+.3f")])
    return header, rows


def width_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: width fraction and depth spread by architecture / block type × control."""
    out = {}
    for est, rs in by_estimator([r for r in records if r.ok], estimator_of).items():
        cells: dict[tuple, list[RunRecord]] = {}
        for r in rs:
            cells.setdefault((r.get("architecture") or "?", r.get("block_type") or "?", r.get("control") or "?"),
                             []).append(r)
        header = ["architecture", "block_type", "control", "runs", f"width fraction [{est}] mean", "SD",
                  f"depth spread [{est}] mean", "SD"]
        rows = []
        for key in sorted(cells):
            w = [r.metrics.get("width_fraction") for r in cells[key]]
            s = [r.metrics.get("depth_spread") for r in cells[key]]
            rows.append([*key, len(cells[key]), fmt_cell(mean_of(w), ".3f"), fmt_cell(sd_of(w), ".3f"), fmt_cell(mean_of(s), ".3f"),
                         fmt_cell(sd_of(s), ".3f")])
        out[est] = (header, rows)
    return out


def run_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: every run (failed ones too) with its headline slope and, in its own
    column, the per-text estimator with its bootstrap CI over probe texts."""
    out = {}
    for est, rs in by_estimator(records, estimator_of).items():
        header = ["run", "status", "block", "objective", "control", "tied embeddings", "seed", f"slope [{est}]",
                  PER_TEXT_COLUMN, f"steepness [{est}]", f"width [{est}]", "acc/loss tuned"]
        rows = []
        for r in rs:
            if not r.ok:
                rows.append([r.name, r.status, "", fmt_cell(r.get("objective")), fmt_cell(r.get("control")), "",
                             fmt_cell(r.get("seed")), "", "", "", "", ""])
                continue
            y, lo, hi = per_text_point(r)
            probe = r.results.get("probe") or {}
            score = probe.get("accuracy_tuned") if probe.get("accuracy_tuned") is not None else probe.get("loss_tuned")
            rows.append([r.name, r.status, r.get("block_type"), r.get("objective"), r.get("control"), tied_of(r),
                         r.get("seed"), fmt_cell(headline_slope(r), "+.3e"),
                         f"{fmt_cell(y, '+.3e')} {fmt_ci(lo, hi)}" if y is not None else "—",
                         fmt_cell(r.metrics.get("steepness"), "+.3f"), fmt_cell(r.metrics.get("width_fraction"), ".2f"),
                         fmt_cell(score, ".3f")])
        out[est] = (header, rows)
    return out
