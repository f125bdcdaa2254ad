"""Collecting run directories into ``RunRecord``s, and what one record says (its headline estimator,
slopes, tied embeddings).

A run directory holds config.json, results.json or run.log; a record's status is "ok", "missing
results" (with run.log's last error as the problem), "corrupt results", or "mixed artifacts" (files
that do not match results.json's manifest: written by two runs, or changed since; depthfast.rundir). Metrics come from
results.json "metrics" or, without them, from ``profile_metrics`` over the block rows; non-finite
values become None.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from depthfast.errors import DepthfastError
from depthfast.metrics import profile_metrics, slope_estimator_label
from depthfast.objective_distance import OBJECTIVE_DISTANCE_KEYS
from depthfast.artifacts import finite_or_none, read_json
from depthfast.rundir import verify_manifest


RUN_MARKERS = ("config.json", "results.json", "run.log")
METRIC_KEYS = list(profile_metrics([0.5, 1.0], [0.1, 0.2]).keys()) + list(OBJECTIVE_DISTANCE_KEYS)


@dataclass
class RunRecord:
    name: str
    directory: str
    status: str = "ok"  # ok | missing results | corrupt results | mixed artifacts
    problem: str = ""
    config: dict = field(default_factory=dict)
    results: dict | None = None
    metrics: dict = field(default_factory=dict)
    metrics_source: str = ""
    has_config: bool = False  # config.json was read (its missing newer fields then take their defaults)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def get(self, key):
        for source in (self.metrics, self.config):
            if key in source:
                return source[key]
        return (self.results or {}).get(key)


def find_run_dirs(root: str, exclude: str | None = None) -> list[str]:
    """Directories under ``root`` (root itself included) that hold a run marker; not descending into runs."""
    found = []
    exclude = os.path.abspath(exclude) if exclude else None
    for directory, subdirs, files in os.walk(root):
        if exclude and os.path.abspath(directory) == exclude:
            subdirs[:] = []
            continue
        subdirs.sort()
        if any(m in files for m in RUN_MARKERS):
            found.append(directory)
            subdirs[:] = []
    return sorted(found)


def load_run(directory: str, root: str) -> RunRecord:
    name = os.path.relpath(directory, root)
    record = RunRecord(name="." if name == "." else name, directory=directory)
    config, problem = read_json(os.path.join(directory, "config.json"))
    if isinstance(config, dict):
        record.config = {k: v for k, v in config.items() if k != "out"}
        record.has_config = True
    results, problem = read_json(os.path.join(directory, "results.json"))
    if problem == "missing":
        record.status, record.problem = "missing results", _missing_reason(directory)
    elif problem or not isinstance(results, dict):
        record.status, record.problem = "corrupt results", problem or "results.json is not a JSON object"
    else:
        layers = results.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(r, dict) for r in layers):
            record.status, record.problem = "corrupt results", "results.json has no per-layer rows"
        else:
            mixed = verify_manifest(directory, results)
            if mixed:  # kept out of every table: its numbers may belong to another run than its files
                record.status, record.problem = "mixed artifacts", mixed
            else:
                record.results = results
    for key in ("model", "objective", "control"):  # a run without config.json still says what it was
        if key not in record.config and isinstance(results, dict) and key in results:
            record.config[key] = results[key]
    if source_of(record) == "compare":  # depthfast compare: two checkpoints, no training, no control
        record.config["control"] = "compare"
    if record.results is not None:
        try:
            record.metrics, record.metrics_source = _metrics_of(record.results)
        except (TypeError, ValueError, KeyError) as exc:
            record.status, record.problem = "corrupt results", f"per-layer rows unusable ({exc})"
            record.results, record.metrics = None, {}
    return record


def source_of(record: RunRecord) -> str:
    """What made the directory: results.json "source" ("compare", "trainer"), else "compare" for a
    config with base and tuned (a CompareConfig), else "run"."""
    if isinstance(record.results, dict) and "source" in record.results:
        return str(record.results["source"])
    return "compare" if {"base", "tuned"} <= set(record.config) else "run"


def _missing_reason(directory: str) -> str:
    log = os.path.join(directory, "run.log")
    if not os.path.exists(log):
        return "no results.json (never ran, or still running)"
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("depthfast: error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    return f"no results.json; run.log: {last[:160]}" if last else "no results.json"


def _metrics_of(results: dict) -> tuple[dict, str]:
    stored = results.get("metrics")
    if isinstance(stored, dict) and stored:
        metrics, source = dict(stored), "results"
    else:
        rows = results["layers"][1:]  # blocks only: the embedding row is left out, as for the slope
        depths = [float(r["depth"]) for r in rows]
        changes = [float(r["change"]) if r.get("change") is not None else float("nan") for r in rows]
        if any(not math.isfinite(c) for c in changes):
            raise ValueError("a layer's change is missing")
        metrics, source = profile_metrics(depths, changes), "computed"
    for key in METRIC_KEYS:
        metrics.setdefault(key, None)
    return {k: finite_or_none(v) for k, v in metrics.items()}, source


def collect(runs_dir: str, exclude: str | None = None) -> list[RunRecord]:
    if not os.path.isdir(runs_dir):
        raise DepthfastError(f"runs directory {runs_dir!r} does not exist")
    dirs = find_run_dirs(runs_dir, exclude)
    if not dirs:
        raise DepthfastError(f"no run directories (with config.json, results.json or run.log) under {runs_dir!r}")
    return [load_run(d, runs_dir) for d in dirs]


def estimator_of(record: RunRecord) -> str:
    """The headline slope's estimator, "<estimator>/<pooling>": metrics["slope_estimator"] when the run
    recorded it, else the run's config (or results) estimator and pooling, else "unknown"."""
    label = record.metrics.get("slope_estimator")
    if isinstance(label, str) and label:
        return label
    est, pool = record.get("estimator"), record.get("pooling")
    return slope_estimator_label(est, pool) if est and pool else "unknown"


def headline_slope(record: RunRecord):
    """The locality gradient of the run's own estimator (``estimator_of``)."""
    value = record.metrics.get("locality_gradient")
    return value if value is not None else (record.results or {}).get("locality_gradient")


def per_text_point(record: RunRecord):
    """(slope, low, high) of the per-text estimator (token HSIC₁ per text) with its bootstrap CI over
    probe texts; Nones where the run did not measure it."""
    m = record.metrics
    low, high = m.get("slope_per_text_ci_low"), m.get("slope_per_text_ci_high")
    if low is None or high is None:  # results written before the CI keys were named per text
        low, high = m.get("slope_ci_low"), m.get("slope_ci_high")
    return m.get("slope_per_text"), low, high


def tied_of(record: RunRecord) -> str:
    """"tied (<group>)", "untied" or "unknown" (results.json before the field existed)."""
    res = record.results or {}
    tied = res.get("tied_embeddings")
    if tied is True:
        group = res.get("tied_embeddings_group")
        return f"tied ({group})" if group else "tied"
    return "untied" if tied is False else "unknown"
