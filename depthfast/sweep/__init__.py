"""``depthfast sweep GRID.yaml``: expand a grid of RunConfigs into runs and run each as a subprocess.

Grid file (YAML)::

    out: runs/demo_grid            # sweep directory (relative to the current directory); --out overrides
    base:                          # RunConfig fields shared by every run (optional)
      steps: 30
      probe_size: 96
    grid:                          # RunConfig fields → non-empty lists; the runs are their product
      objective: [cls, mlm]
      control: [none, equal-step]
      seed: [0, 1]

A study grid adds two optional keys, for settings that belong to a model or an objective::

    models:                        # one entry per model: crossed with the grid axes
      - model: bert-base-uncased
        objectives: [cls, mlm]     # optional; else the grid's or base's objective
        batch_size: 32             # any other RunConfig field: this model's own setting
      - model: EleutherAI/pythia-6.9b
        objectives: [cls, clm]
        precision: bf16
    per_objective:                 # RunConfig fields per objective (e.g. the dataset of each)
      cls: {dataset: nyu-mll/glue, dataset_config: sst2, text_column: sentence}
      clm: {dataset: Salesforce/wikitext, dataset_config: wikitext-103-raw-v1}

The runs are: for each models entry (file order), for each of its objectives, the product of the
grid lists. A run's fields, later winning: base, per_objective[its objective], its models entry,
its grid values. A field set by a models entry or per_objective cannot also be a grid axis, and
``model`` cannot be in base or grid when ``models`` is given.

Unknown keys (top level, base, grid, a models entry or per_objective), ``out`` anywhere but the top
level, a key in two places that would silently override each other, an empty list, or an objective a
registry model does not admit (mlm on a decoder, clm on an encoder) fail with one line. Every expanded
config is validated (RunConfig.validate) before anything runs.

``--dry-run`` lists every run with its memory estimate per process (``estimate_memory``: the model is
built on the meta device from the registry's config or a local directory's config.json, so nothing is
downloaded) and where it fits: one 80 GB H100, one 141 GB H200, or FSDP over N GPUs.

Each run lives in OUT/<name>/, the name built from its config (see ``run_name``); the sweep writes
OUT/<name>/config.json and runs ``python -m depthfast.run --config OUT/<name>/config.json --out
OUT/<name> --quiet [--resume]``, output to OUT/<name>/run.log.

Resume rule (``plan``): a run is skipped when OUT/<name>/results.json is a readable JSON object AND
OUT/<name>/config.json equals the expanded config (all RunConfig fields except ``out``). Otherwise it
runs: results.json of a stale or failed attempt is removed first (so results.json can only mean "this
config finished"), and ``--resume`` is passed only when the saved config equals the expanded one (an
interrupted attempt of the same run: it continues from its checkpoint, if it wrote one).

Modules: ``grid`` (the grid file → run fields), ``runs`` (names, the resume plan, the command),
``pool`` (running them), ``slurm`` (--slurm), ``fit`` (--dry-run's memory estimate); ``sweep`` below
ties them together.
"""

from __future__ import annotations

import os

from depthfast.artifacts import atomic_write_csv
from depthfast.errors import DepthfastError
from depthfast.memory import human_bytes
from depthfast.sweep.fit import Fit, GPUS, estimate_memory, fit_of, fit_summary, meta_model
from depthfast.sweep.grid import Grid, expand, load_grid, parse_grid
from depthfast.sweep.pool import Pool, slots_for, visible_gpus
from depthfast.sweep.runs import Run, build_runs, command, model_short_name, plan, prepare, run_name
from depthfast.sweep.slurm import write_slurm
from depthfast.terminal import format_table

__all__ = ["Fit", "Grid", "Run", "build_runs", "command", "estimate_memory", "expand", "fit_of", "load_grid",
           "meta_model", "model_short_name", "parse_grid", "plan", "prepare", "run_name", "summary", "sweep",
           "visible_gpus", "write_slurm"]


def summary(runs: list[Run]) -> str:
    rows = [[r.name, r.status, f"{r.seconds:.1f}" if r.seconds else "", r.note or r.reason] for r in runs]
    counts = {s: sum(r.status == s for r in runs) for s in ("ok", "failed", "interrupted", "skipped", "pending")}
    tail = f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts["interrupted"]:
        tail += f", {counts['interrupted']} interrupted"
    if counts["pending"]:
        tail += f", {counts['pending']} not run (interrupted)"
    return format_table(["run", "status", "seconds", "note"], rows) + "\n" + tail


def sweep(grid_path: str, out: str | None = None, workers: int | None = None, dry_run: bool = False,
          slurm: bool = False, slurm_options: list[str] | None = None, echo=print) -> int:
    """Expand, plan, then run (or list, or write a SLURM array). Exit code: 0, or 1 if any run failed."""
    grid = load_grid(grid_path)
    out = out or grid.out
    if not out:
        raise DepthfastError(f"{grid_path}: no output directory; set 'out:' in the grid file or pass --out")
    runs = plan(build_runs(grid, out))
    pending = [r for r in runs if r.action == "run"]
    if dry_run:
        fits = [fit_of(r.config) for r in runs]
        gpus = list(GPUS)
        echo(format_table(["run", "action", "reason", "resume", "memory (1 GPU)", *[f"fits {g}" for g in gpus],
                           "plan", "note"],
                          [[r.name, r.action, r.reason, "yes" if r.resume else "",
                            human_bytes(f.per_gpu) if f.per_gpu is not None else "?",
                            *[("yes" if f.fits[g] else "no") if f.fits else "?" for g in gpus], f.plan, f.note]
                           for r, f in zip(runs, fits)]))
        echo(fit_summary(runs, fits))
        echo(f"{len(runs)} runs: {len(pending)} to run, {len(runs) - len(pending)} finished (skipped); "
             f"directory {out}")
        return 0
    os.makedirs(out, exist_ok=True)
    if slurm:
        jobs, sbatch = write_slurm(pending, out, slurm_options or [])
        echo(f"{len(pending)} runs to do ({len(runs) - len(pending)} finished, skipped): job list {jobs}\n"
             f"submit with: sbatch {sbatch}")
        return 0
    slots, threads = slots_for(workers)
    echo(f"sweep: {len(runs)} runs, {len(pending)} to run, {len(runs) - len(pending)} skipped; "
         f"{len(slots)} worker(s){' on GPUs ' + ','.join(slots) if slots[0] is not None else ' on the CPU'}; {out}")
    interrupted = False
    try:
        Pool(slots, threads, echo).run(pending)
    except KeyboardInterrupt:
        interrupted = True
    table = summary(runs)
    echo(table)
    atomic_write_csv(os.path.join(out, "sweep_summary.csv"), ["run", "status", "seconds", "note", "directory"],
                     [[r.name, r.status, round(r.seconds, 2), r.note or r.reason, r.directory] for r in runs])
    if interrupted:
        echo("depthfast: sweep interrupted; finished runs are kept and will be skipped next time")
        return 130
    return 1 if any(r.status == "failed" for r in runs) else 0
