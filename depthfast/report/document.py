"""report.md: counts, problem runs, the grouped tables and correlations, the run tables and links to
the files, every number labelled with its estimator."""

from __future__ import annotations

import os

from depthfast.metrics import PER_TEXT_ESTIMATOR, PERSISTENCE_RULE
from depthfast.report.records import RunRecord, estimator_of, tied_of
from depthfast.report.tables import (control_comparison, control_tables, group_table, group_tables, run_tables,
                                     width_tables)
from depthfast.terminal import markdown_table, fmt_cell


def _sections(title: str, tables: dict[str, tuple[list[str], list[list]]], note: str = "") -> list[str]:
    parts = []
    for est, (header, rows) in tables.items():
        parts += [f"### {title} — headline estimator {est}", ""]
        if note:
            parts += [note, ""]
        parts += [markdown_table(header, rows), ""]
    return parts


def markdown(records: list[RunRecord], stats: list[dict], figures: list[str], tables: list[str], runs_dir: str) -> str:
    ok = [r for r in records if r.ok]
    bad = [r for r in records if not r.ok]
    ests = sorted({estimator_of(r) for r in ok})
    parts = [f"# depthfast report: {runs_dir}", "",
             f"{len(records)} run directories: {len(ok)} with results, {len(bad)} missing or corrupt.", "",
             "## Estimators", "",
             "Every number is labelled with its estimator and no table column, row group or figure panel mixes "
             "two. The *headline* slope is the locality gradient of the run's own CKA (`--estimator`/`--pooling`, "
             f"written `estimator/pooling`; here: {', '.join(ests) or 'none'}); its uncertainty is the spread over "
             "seeds (runs that share model, objective, control and every other setting): mean, SD, SE and a "
             "Student-t 95 % CI, \"n/a (1 seed)\" with one seed. "
             f"`slope_per_text ({PER_TEXT_ESTIMATOR})` is a different estimator — the ratio of sums of token-level "
             "HSIC₁ per probe text, whatever the run's pooling — with a 95 % bootstrap CI over probe texts; it is "
             "shown in its own column and its own figure panel only.", ""]
    if bad:
        parts += ["## Runs without usable results", "",
                  markdown_table(["run", "status", "problem"], [[r.name, r.status, r.problem] for r in bad]), ""]
    computed = [r.name for r in ok if r.metrics_source == "computed"]
    if computed:
        parts += [f"Metrics computed by the report from the per-layer rows (results.json has no \"metrics\"; "
                  f"no per-text CI): {len(computed)} run(s).", ""]
    unknown = [r.name for r in ok if tied_of(r) == "unknown"]
    if unknown:
        parts += [f"Tied embeddings unknown (results.json predates the field): {len(unknown)} run(s).", ""]
    parts += ["## Locality gradient by block type × objective × control × tied embeddings", "",
              "Mean and SD over every run of the cell (all models and seeds); one estimator per column.", "",
              markdown_table(*group_table(records)), "",
              "## Seed groups: headline slope over seeds", ""]
    parts += _sections("Seed groups", group_tables(records))
    parts += ["## Equal-step control vs none: does the slope persist?", "", f"Rule: {PERSISTENCE_RULE}", ""]
    parts += _sections("Equal-step vs none", control_tables(records))
    parts += ["Coarse view (means over all runs of a cell, no uncertainty):", "",
              markdown_table(*control_comparison(records)), ""]
    parts += ["## Width by architecture", ""]
    parts += _sections("Width", width_tables(records))
    parts += ["## Steepness vs objective distance (Pearson r over runs, 95 % bootstrap CI over runs)", "",
              markdown_table(["estimator", "distance", "n", "r", "CI"],
                        [[s["estimator"], s["distance"], s["n"], fmt_cell(s["r"], "+.3f"),
                          f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]" if s["ci_low"] is not None else "—"]
                         for s in stats]), "", "## Runs", ""]
    parts += _sections("Runs", run_tables(records))
    parts += ["## Files", ""] + [f"- [{os.path.basename(p)}]({os.path.basename(p)})" for p in tables]
    parts += [f"- ![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures] + [""]
    return "\n".join(parts)
