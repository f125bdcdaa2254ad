"""``depthfast report RUNS_DIR``: every run under RUNS_DIR in one table, figures and a markdown summary.

A run directory is any directory holding config.json, results.json or run.log (searched recursively;
the report's own output directory is left out). Each run's metrics come from results.json
"metrics" (written by the runner) or, for results without them, are computed here from the per-layer
rows with ``depthfast.metrics.profile_metrics`` over the blocks (no CI then). Runs whose results.json
is missing or unreadable are kept as rows with their status and listed in report.md and the terminal.
A ``depthfast compare`` directory (results.json "source": "compare", config.json a CompareConfig) is
collected like a run: column ``source`` says which, its control reads "compare" (so it never pairs with
a run's), and no RunConfig default is filled into its settings.

Output (default RUNS_DIR/report/):
    runs.csv (and runs.parquet if pyarrow imports)   one row per run: status, config, metrics, scores
    report.md                                        counts, problem runs, grouped tables, correlations
    profiles.png        change vs depth, one row per estimator, one panel per block type
    slopes.png          one panel per headline estimator (runs, seed-group mean with its t-CI over seeds) and
                        one for the per-text estimator (runs with their bootstrap CI over probe texts);
                        x: block type × objective × tied embeddings, colour: control
    steepness_vs_distance.png   steepness vs each objective distance, per estimator, Pearson r with bootstrap CI
    width.png           width fraction and depth spread by architecture / block type, per estimator
    trajectory.png      change profile over training, for runs whose results.json has "trajectory"

One estimator per comparison: the headline slope ("locality_gradient", the run's own --estimator and
--pooling, labelled "estimator/pooling" from metrics["slope_estimator"] or the config) and the per-text
slope ("slope_per_text", token HSIC₁ per probe text, with a bootstrap CI over texts) are different
estimators; no table column, row group or figure panel holds both, and runs of different headline
estimators are in separate tables. The headline slope's uncertainty is the spread over seeds of a seed
group (``seed_groups``: same settings but the seed), and the equal-step vs none verdict is
``depthfast.metrics.verdict`` per comparison, paired by seed (rule ``depthfast.metrics.PERSISTENCE_RULE``).

Modules: ``records`` (run directories → ``RunRecord``), ``groups`` (seed groups, control comparisons,
correlations), ``tables`` (runs.csv and the grouped tables), ``figures`` (the PNGs), ``document``
(report.md); ``report`` below ties them together and prints the terminal summary.
"""

from __future__ import annotations

import os

from depthfast.report.document import markdown
from depthfast.report.figures import (plot_profiles, plot_slopes, plot_steepness_vs_distance, plot_trajectories,
                                      plot_width, slope_panels, trajectory_of)
from depthfast.report.groups import Comparison, SeedGroup, comparisons, correlations, seed_groups
from depthfast.report.records import (RunRecord, collect, estimator_of, find_run_dirs, headline_slope, load_run,
                                      per_text_point, tied_of)
from depthfast.report.tables import (PER_TEXT_COLUMN, control_comparison, control_tables, group_table, group_tables,
                                     row_of, run_tables, table, width_tables, write_table)
from depthfast.artifacts import atomic_write_bytes
from depthfast.terminal import format_table

__all__ = ["Comparison", "PER_TEXT_COLUMN", "RunRecord", "SeedGroup", "collect", "comparisons", "control_comparison",
           "control_tables", "correlations", "estimator_of", "find_run_dirs", "group_table", "group_tables",
           "headline_slope", "load_run", "markdown", "per_text_point", "plot_profiles", "plot_slopes",
           "plot_steepness_vs_distance", "plot_trajectories", "plot_width", "report", "row_of", "run_tables",
           "seed_groups", "slope_panels", "table", "tied_of", "trajectory_of", "width_tables", "write_table"]


def report(runs_dir: str, out: str | None = None, resamples: int = 2000, echo=print) -> int:
    """Collect, write table + figures + report.md into ``out`` (default RUNS_DIR/report), print a summary."""
    out = out or os.path.join(runs_dir, "report")
    records = collect(runs_dir, exclude=out)
    header, rows = table(records)
    os.makedirs(out, exist_ok=True)
    tables = write_table(out, header, rows)
    stats = correlations(records, resamples)
    figures = [p for p in (
        plot_profiles(records, os.path.join(out, "profiles.png")),
        plot_slopes(records, os.path.join(out, "slopes.png")),
        plot_steepness_vs_distance(records, stats, os.path.join(out, "steepness_vs_distance.png")),
        plot_width(records, os.path.join(out, "width.png")),
        plot_trajectories(records, os.path.join(out, "trajectory.png")),
    ) if p]
    atomic_write_bytes(os.path.join(out, "report.md"), markdown(records, stats, figures, tables, runs_dir).encode())
    for est, (h, rs) in run_tables(records).items():
        echo(f"runs — headline estimator {est}")
        echo(format_table(h, rs))
        echo("")
    for est, (h, rs) in control_tables(records).items():
        echo(f"equal-step vs none — headline estimator {est}")
        echo(format_table(h, rs))
        echo("")
    echo(format_table(*group_table(records)))
    bad = [r for r in records if not r.ok]
    if bad:
        echo("")
        echo(f"{len(bad)} run(s) without usable results:")
        echo(format_table(["run", "status", "problem"], [[r.name, r.status, r.problem] for r in bad]))
    echo(f"\nreport: {os.path.join(out, 'report.md')} ({len(records) - len(bad)} ok, {len(bad)} missing/corrupt; "
         f"{len(figures)} figures)")
    return 0
