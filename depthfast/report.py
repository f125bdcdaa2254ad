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
group (``seed_groups``: same settings but the seed), and the equal-step vs none verdict follows
``depthfast.metrics.PERSISTENCE_RULE``.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field, fields

from depthfast.config import RunConfig
from depthfast.errors import DepthfastError
from depthfast.metrics import (OBJECTIVE_DISTANCE_KEYS, PER_TEXT_ESTIMATOR, PERSISTENCE_RULE, pearson_ci,
                               persistence_verdict, profile_metrics, ratio_ci, seed_summary, slope_estimator_label)
from depthfast.results import atomic_write_bytes, atomic_write_csv
from depthfast.sweep import format_table

RUN_MARKERS = ("config.json", "results.json", "run.log")
CONFIG_KEYS = [f.name for f in fields(RunConfig) if f.name != "out"]
METRIC_KEYS = list(profile_metrics([0.5, 1.0], [0.1, 0.2]).keys()) + list(OBJECTIVE_DISTANCE_KEYS)
RESULT_KEYS = ["model_type", "architecture", "block_type", "num_blocks", "probe_loss_base", "probe_loss_tuned",
               "probe_accuracy_base", "probe_accuracy_tuned", "train_steps", "train_seconds", "wall_seconds"]
CONTROL_COLORS = {"none": "tab:blue", "equal-step": "tab:red"}
OBJECTIVE_STYLES = {"cls": "-", "mlm": "--", "clm": ":"}


@dataclass
class RunRecord:
    name: str
    directory: str
    status: str = "ok"  # ok | missing results | corrupt results
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


# ------------------------------------------------------------------------------------------------
# Collecting
# ------------------------------------------------------------------------------------------------

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


def _load_json(path: str):
    """(value, problem): problem is '' when fine, else a short reason."""
    try:
        with open(path) as f:
            return json.load(f), ""
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})"


def _finite_or_none(value):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return value


def load_run(directory: str, root: str) -> RunRecord:
    name = os.path.relpath(directory, root)
    record = RunRecord(name="." if name == "." else name, directory=directory)
    config, problem = _load_json(os.path.join(directory, "config.json"))
    if isinstance(config, dict):
        record.config = {k: v for k, v in config.items() if k != "out"}
        record.has_config = True
    results, problem = _load_json(os.path.join(directory, "results.json"))
    if problem == "missing":
        record.status, record.problem = "missing results", _missing_reason(directory)
    elif problem or not isinstance(results, dict):
        record.status, record.problem = "corrupt results", problem or "results.json is not a JSON object"
    else:
        layers = results.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(r, dict) for r in layers):
            record.status, record.problem = "corrupt results", "results.json has no per-layer rows"
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
    """"compare" (depthfast compare: results.json "source", or a config with base and tuned) or "run"."""
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
    return {k: _finite_or_none(v) for k, v in metrics.items()}, source


def collect(runs_dir: str, exclude: str | None = None) -> list[RunRecord]:
    if not os.path.isdir(runs_dir):
        raise DepthfastError(f"runs directory {runs_dir!r} does not exist")
    dirs = find_run_dirs(runs_dir, exclude)
    if not dirs:
        raise DepthfastError(f"no run directories (with config.json, results.json or run.log) under {runs_dir!r}")
    return [load_run(d, runs_dir) for d in dirs]


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------

def row_of(record: RunRecord) -> dict:
    res = record.results or {}
    probe, train = res.get("probe") or {}, res.get("train") or {}
    row = {"run": record.name, "status": record.status, "problem": record.problem, "source": source_of(record)}
    for key in CONFIG_KEYS:
        row[key] = record.config.get(key)
    for key, value in record.config.items():  # a compare's own keys (base, tuned, offload), newer fields
        if key not in row:
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
    return {k: _finite_or_none(v) if not isinstance(v, (dict, list)) else json.dumps(v) for k, v in row.items()}


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
        import pyarrow as pa
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


# ------------------------------------------------------------------------------------------------
# Grouped numbers: one estimator per table, figure panel and comparison
# ------------------------------------------------------------------------------------------------

# Config fields that do not change what a run measures: runs differing only in these (and the seed)
# are seeds of one group.
NOT_A_SETTING = ("out", "seed", "device", "tensorboard", "no_memory_check", "checkpoint_every", "keep_checkpoints",
                 "measure_at", "theta0_offload", "save_model", "offload")
# Shown in their own columns, so left out of the "settings" text.
OWN_COLUMNS = ("model", "objective", "control", "estimator", "pooling")
PER_TEXT_COLUMN = f"slope_per_text ({PER_TEXT_ESTIMATOR}) [95% CI over texts]"
SEED_CI = "95% CI over seeds (t)"


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _sd(values):
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _ci(low, high, spec: str = "+.2e") -> str:
    return f"[{_fmt(low, spec)}, {_fmt(high, spec)}]" if low is not None and high is not None else "—"


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


def _settings_of(record: RunRecord) -> dict:
    config = dict(record.config)
    if record.has_config and source_of(record) == "run":  # fields added later default to what the older run did
        config = {**RunConfig().to_dict(), **config}
    return {k: v for k, v in config.items() if k not in NOT_A_SETTING}


def _varying(records: list[RunRecord]) -> list[str]:
    """Settings (other than the own-column ones) whose value differs between the ok runs."""
    seen: dict[str, set] = {}
    for r in records:
        for k, v in _settings_of(r).items():
            seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    return sorted(k for k, vs in seen.items() if len(vs) > 1 and k not in OWN_COLUMNS)


@dataclass
class SeedGroup:
    """Runs that share model, objective, control and every other setting: they differ in the seed only."""

    estimator: str
    model: str
    block_type: str
    architecture: str
    objective: str
    control: str
    tied: str
    settings: str  # the varying settings other than the own columns, "lr=5e-05, steps=30"
    key: str  # everything but the control: the pairing key of the control comparison
    runs: list[RunRecord]
    slope: dict  # seed_summary of the headline slopes

    @property
    def seeds(self) -> list:
        return sorted((r.get("seed") for r in self.runs), key=lambda s: (s is None, s))


def seed_groups(records: list[RunRecord]) -> list[SeedGroup]:
    ok = [r for r in records if r.ok]
    varying = _varying(ok)
    groups: dict[str, list[RunRecord]] = {}
    for r in ok:
        settings = _settings_of(r)
        ident = {**settings, "_estimator": estimator_of(r), "_block_type": r.get("block_type"), "_tied": tied_of(r)}
        groups.setdefault(json.dumps(ident, sort_keys=True, default=str), []).append(r)
    out = []
    for ident, rs in groups.items():
        first = rs[0]
        settings = _settings_of(first)
        key = json.loads(ident)
        key.pop("control", None)
        out.append(SeedGroup(
            estimator=estimator_of(first), model=str(first.get("model") or "?"),
            block_type=str(first.get("block_type") or "?"), architecture=str(first.get("architecture") or "?"),
            objective=str(first.get("objective") or "?"), control=str(first.get("control") or "?"),
            tied=tied_of(first), settings=", ".join(f"{k}={_fmt(settings.get(k))}" for k in varying) or "—",
            key=json.dumps(key, sort_keys=True), runs=rs, slope=seed_summary([headline_slope(r) for r in rs])))
    return sorted(out, key=lambda g: (g.estimator, g.block_type, g.objective, g.control, g.model, g.tied, g.settings))


def _by_estimator(items, estimator=lambda item: item.estimator) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items:
        out.setdefault(estimator(item), []).append(item)
    return dict(sorted(out.items()))


def _seed_cells(s: dict) -> list[str]:
    """mean, SD, SE, CI cells of a seed_summary: "n/a (1 seed)" where there is one seed."""
    if s["n"] == 1:
        return [_fmt(s["mean"], "+.3e"), "n/a (1 seed)", "n/a (1 seed)", "n/a (1 seed)"]
    return [_fmt(s["mean"], "+.3e"), _fmt(s["sd"], ".2e"), _fmt(s["se"], ".2e"), _ci(s["ci_low"], s["ci_high"])]


def group_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: one row per seed group with the slope's mean, SD, SE and t-CI over seeds."""
    out = {}
    for est, groups in _by_estimator(seed_groups(records)).items():
        header = ["model", "block_type", "objective", "control", "tied embeddings", "settings", "seeds",
                  f"slope [{est}] mean", "SD over seeds", "SE", SEED_CI, f"steepness [{est}]",
                  f"width fraction [{est}]"]
        rows = [[g.model, g.block_type, g.objective, g.control, g.tied, g.settings, len(g.runs), *_seed_cells(g.slope),
                 _fmt(_mean([r.metrics.get("steepness") for r in g.runs])),
                 _fmt(_mean([r.metrics.get("width_fraction") for r in g.runs]))] for g in groups]
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
            row += [_fmt(_mean(slopes), "+.3e"), _fmt(_sd(slopes), ".2e")] if est == key[0] else ["", ""]
        rows.append(row)
    return header, rows


@dataclass
class Comparison:
    estimator: str
    none: SeedGroup
    equal: SeedGroup
    ratio: dict
    verdict: str
    reason: str


def comparisons(records: list[RunRecord]) -> list[Comparison]:
    """Equal-step vs none for every pair of seed groups that differ in the control only."""
    groups = seed_groups(records)
    pairs: dict[str, dict[str, SeedGroup]] = {}
    for g in groups:
        pairs.setdefault(g.key, {})[g.control] = g
    out = []
    for sides in pairs.values():
        if "none" in sides and "equal-step" in sides:
            none, eq = sides["none"], sides["equal-step"]
            ratio = ratio_ci(eq.slope, none.slope)
            verdict, reason = persistence_verdict(eq.slope, none.slope, ratio)
            out.append(Comparison(none.estimator, none, eq, ratio, verdict, reason))
    return sorted(out, key=lambda c: (c.estimator, c.none.block_type, c.none.objective, c.none.model, c.none.tied))


def control_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: none vs equal-step per pair of seed groups, R with its CI and the verdict."""
    out = {}
    for est, comps in _by_estimator(comparisons(records)).items():
        header = ["model", "block_type", "objective", "tied embeddings", "settings", "seeds (none / equal-step)",
                  f"slope [{est}] none: mean {SEED_CI}", f"slope [{est}] equal-step: mean {SEED_CI}",
                  "R = equal-step / none", "R 95% CI (delta, t)", "verdict", "why"]
        rows = []
        for c in comps:
            cell = lambda s: (f"{_fmt(s['mean'], '+.3e')} " + ("n/a (1 seed)" if s["n"] == 1  # noqa: E731
                                                                else _ci(s["ci_low"], s["ci_high"])))
            rows.append([c.none.model, c.none.block_type, c.none.objective, c.none.tied, c.none.settings,
                         f"{len(c.none.runs)} / {len(c.equal.runs)}", cell(c.none.slope), cell(c.equal.slope),
                         _fmt(c.ratio["ratio"], "+.3f"), _ci(c.ratio["ci_low"], c.ratio["ci_high"], "+.3f"),
                         c.verdict, c.reason])
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
        none, eq = _mean(slopes[key].get("none", [])), _mean(slopes[key].get("equal-step", []))
        ratio = eq / none if none not in (None, 0) and eq is not None else None
        rows.append([*key, _fmt(none, "+.3e"), _fmt(eq, "+.3e"), _fmt(ratio, "+.3f")])
    return header, rows


def width_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: width fraction and depth spread by architecture / block type × control."""
    out = {}
    for est, rs in _by_estimator([r for r in records if r.ok], estimator_of).items():
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
            rows.append([*key, len(cells[key]), _fmt(_mean(w), ".3f"), _fmt(_sd(w), ".3f"), _fmt(_mean(s), ".3f"),
                         _fmt(_sd(s), ".3f")])
        out[est] = (header, rows)
    return out


def correlations(records: list[RunRecord], resamples: int) -> list[dict]:
    """Per headline estimator, Pearson r of steepness with each objective distance over the ok runs,
    with a bootstrap CI over runs. Each dict: {"estimator", "distance", "r", "ci_low", "ci_high", "n", …}."""
    out = []
    for est, ok in _by_estimator([r for r in records if r.ok], estimator_of).items():
        for key in OBJECTIVE_DISTANCE_KEYS:
            xs = [r.metrics.get(key) for r in ok]
            ys = [r.metrics.get("steepness") for r in ok]
            out.append({"estimator": est, "distance": key, **pearson_ci(xs, ys, num_resamples=resamples)})
    return out


# ------------------------------------------------------------------------------------------------
# Figures: one panel (or row of panels) per estimator
# ------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    _plt().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_profiles(records: list[RunRecord], path: str) -> str | None:
    ok = [r for r in records if r.ok]
    if not ok:
        return None
    plt = _plt()
    by_est = _by_estimator(ok, estimator_of)
    types = sorted({r.get("block_type") or "?" for r in ok})
    fig, axes = plt.subplots(len(by_est), len(types), figsize=(5.2 * len(types), 3.8 * len(by_est)), dpi=110,
                             squeeze=False)
    for row, (est, rs_est) in zip(axes, by_est.items()):
        for ax, block_type in zip(row, types):
            seen = set()
            rs = [r for r in rs_est if (r.get("block_type") or "?") == block_type]
            for r in rs:
                rows = r.results["layers"]
                label = f"{r.get('objective')} · {r.get('control')}"
                ax.plot([x["depth"] for x in rows], [x["change"] for x in rows], marker="o", ms=3,
                        color=CONTROL_COLORS.get(r.get("control"), "gray"),
                        linestyle=OBJECTIVE_STYLES.get(r.get("objective"), "-"), alpha=0.75,
                        label=None if label in seen else label)
                seen.add(label)
            models = sorted({r.get("model_type") or "?" for r in rs})
            ax.set_title(f"[{est}] block type {block_type} ({', '.join(models) or 'no runs'})", fontsize=9)
            ax.set_xlabel("normalized depth ℓ / L")
            ax.set_ylabel(f"1 − CKA [{est}]")
            ax.grid(alpha=0.3)
            if seen:
                ax.legend(fontsize=7)
    return _save(fig, path)


def _category(r: RunRecord) -> tuple:
    return (r.get("block_type") or "?", r.get("objective") or "?", tied_of(r))


def slope_panels(records: list[RunRecord]) -> list[dict]:
    """The panels of slopes.png: one per headline estimator, then one for the per-text estimator.

    Each {"estimator", "title", "ylabel", "items"}; an item is (category, control, runs, points, summary)
    with category = (block type, objective, tied embeddings), points [(y, low, high)] one per run, and
    summary (mean, CI low, CI high) over seeds or None. A panel holds one estimator only.
    """
    ok = [r for r in records if r.ok]
    panels = []
    for est, groups in _by_estimator(seed_groups(records)).items():
        items = [(_category(g.runs[0]), g.control, g.runs, [(headline_slope(r), None, None) for r in g.runs],
                  (g.slope["mean"], g.slope["ci_low"], g.slope["ci_high"])) for g in groups]
        panels.append({"estimator": est, "items": items, "ylabel": f"locality gradient [{est}]",
                       "title": f"headline slope [{est}]: runs (dots); seed-group mean, {SEED_CI} (bars)"})
    per_text = [r for r in ok if per_text_point(r)[0] is not None]
    if per_text:
        panels.append({"estimator": PER_TEXT_ESTIMATOR, "ylabel": f"slope_per_text ({PER_TEXT_ESTIMATOR})",
                       "title": f"slope_per_text ({PER_TEXT_ESTIMATOR}): runs with 95% bootstrap CI over probe texts",
                       "items": [(_category(r), r.get("control") or "?", [r], [per_text_point(r)], None)
                                 for r in per_text]})
    return [p for p in panels if any(pt[0] is not None for it in p["items"] for pt in it[3])]


def plot_slopes(records: list[RunRecord], path: str) -> str | None:
    """slopes.png from ``slope_panels``; x: block type × objective × tied embeddings, colour: control."""
    panels = slope_panels(records)
    if not panels:
        return None
    plt = _plt()
    width_in = max(6.0, 1.8 * len({it[0] for p in panels for it in p["items"]}) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 4.0 * len(panels)), dpi=110, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        title, ylabel, items = panel["title"], panel["ylabel"], panel["items"]
        cats = sorted({it[0] for it in items})
        controls = sorted({it[1] for it in items})
        width = 0.6 / max(1, len(controls))
        labelled = set()
        slots: dict[tuple, list] = {}  # the points of one (category, control), spread side by side
        for item in items:
            slots.setdefault((item[0], item[1]), []).extend(item[3])
        placed: dict[tuple, int] = {}
        for category, control, _runs, points, summary in items:
            i, j = cats.index(category), controls.index(control)
            x0 = i + (j - (len(controls) - 1) / 2) * width
            color = CONTROL_COLORS.get(control, "gray")
            total = len(slots[category, control])
            for y, lo, hi in points:
                k = placed[category, control] = placed.get((category, control), -1) + 1
                if y is None:
                    continue
                x = x0 + (k - (total - 1) / 2) * width * 0.15
                err = [[y - lo], [hi - y]] if lo is not None and hi is not None else None
                ax.errorbar(x, y, yerr=err, fmt="o", ms=3 if summary else 4, capsize=2, color=color, alpha=0.6,
                            label=None if control in labelled else control)
                labelled.add(control)
            if summary and summary[0] is not None:
                mean, lo, hi = summary
                ax.hlines(mean, x0 - width * 0.4, x0 + width * 0.4, color=color, linewidth=2)
                if lo is not None:
                    ax.vlines(x0 + width * 0.35, lo, hi, color=color, linewidth=1.2)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([f"{b}\n{o}\n{t}" for b, o, t in cats], fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.legend(title="control", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_steepness_vs_distance(records: list[RunRecord], stats: list[dict], path: str) -> str | None:
    usable = [s for s in stats if s["n"] >= 2]
    if not usable:
        return None
    plt = _plt()
    by_est = _by_estimator(usable, lambda s: s["estimator"])
    cols = max(len(v) for v in by_est.values())
    fig, axes = plt.subplots(len(by_est), cols, figsize=(4.6 * cols, 3.8 * len(by_est)), dpi=110, squeeze=False)
    for row, (est, ss) in zip(axes, by_est.items()):
        ok = [r for r in records if r.ok and estimator_of(r) == est]
        for ax, s in zip(row, ss):
            key = s["distance"]
            for r in ok:
                x, y = r.metrics.get(key), r.metrics.get("steepness")
                if x is not None and y is not None:
                    ax.plot(x, y, linestyle="none", color=CONTROL_COLORS.get(r.get("control"), "gray"),
                            marker={"cls": "o", "mlm": "s", "clm": "^"}.get(r.get("objective"), "o"), alpha=0.8)
            ci = f" [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]" if s["ci_low"] is not None else ""
            ax.set_title(f"[{est}] r = {_fmt(s['r'], '+.2f')}{ci}, n = {s['n']}", fontsize=9)
            ax.set_xlabel(key.replace("_", " "))
            ax.set_ylabel(f"steepness ln(top/bottom) [{est}]")
            ax.grid(alpha=0.3)
        for ax in row[len(ss):]:
            ax.axis("off")
    return _save(fig, path)


def plot_width(records: list[RunRecord], path: str) -> str | None:
    ok = [r for r in records if r.ok and r.metrics.get("width_fraction") is not None]
    if not ok:
        return None
    plt = _plt()
    by_est = _by_estimator(ok, estimator_of)
    cats = sorted({f"{r.get('architecture') or '?'}/{r.get('block_type') or '?'}" for r in ok})
    fig, axes = plt.subplots(len(by_est), 2, figsize=(max(7.0, 2.2 * len(cats) + 4), 3.6 * len(by_est)), dpi=110,
                             squeeze=False)
    for row, (est, rs_est) in zip(axes, by_est.items()):
        for ax, key, label in ((row[0], "width_fraction", "fraction of blocks ≥ ½ max change"),
                               (row[1], "depth_spread", "depth spread around the centroid")):
            for i, cat in enumerate(cats):
                rs = [r for r in rs_est if f"{r.get('architecture') or '?'}/{r.get('block_type') or '?'}" == cat]
                for k, r in enumerate(rs):
                    v = r.metrics.get(key)
                    if v is not None:
                        ax.plot(i + (k - (len(rs) - 1) / 2) * 0.06, v, "o", alpha=0.8,
                                color=CONTROL_COLORS.get(r.get("control"), "gray"))
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, fontsize=8)
            ax.set_ylabel(f"{label} [{est}]", fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        row[0].set_ylim(0, 1.05)
    return _save(fig, path)


def trajectory_of(record: RunRecord) -> list[tuple[int, list[float], list[float]]] | None:
    """[(step, depths, changes)] from results["trajectory"] = [{"step": k, "layers": [...]}, …].

    "layers" may be the per-layer rows ({"depth", "change"}) or plain change values aligned with
    results["layers"]. None when absent or unusable.
    """
    traj = (record.results or {}).get("trajectory")
    if not isinstance(traj, list) or not traj:
        return None
    base_depths = [row["depth"] for row in record.results["layers"]]
    out = []
    try:
        for entry in traj:
            layers = entry["layers"]
            if layers and isinstance(layers[0], dict):
                depths = [float(row["depth"]) for row in layers]
                changes = [float(row["change"]) if row.get("change") is not None else float("nan") for row in layers]
            else:
                changes = [float(v) if v is not None else float("nan") for v in layers]
                depths = base_depths[-len(changes):] if len(changes) <= len(base_depths) else list(range(len(changes)))
            out.append((int(entry["step"]), depths, changes))
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return sorted(out, key=lambda t: t[0]) or None


def plot_trajectories(records: list[RunRecord], path: str, max_panels: int = 12) -> str | None:
    runs = [(r, t) for r in records if r.ok for t in [trajectory_of(r)] if t]
    if not runs:
        return None
    runs = runs[:max_panels]
    plt = _plt()
    cols = min(4, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (r, traj) in zip(axes.flat, runs):
        last = max(1, traj[-1][0])
        for step, depths, changes in traj:
            ax.plot(depths, changes, color=cmap(step / last), marker=".", ms=3, label=f"step {step}")
        ax.set_title(f"{r.name} [{estimator_of(r)}]", fontsize=7)
        ax.set_xlabel("normalized depth")
        ax.set_ylabel("1 − CKA")
        ax.grid(alpha=0.3)
        if len(traj) <= 8:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    return _save(fig, path)




# ------------------------------------------------------------------------------------------------
# Markdown, terminal, entry point
# ------------------------------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list]) -> str:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_tables(records: list[RunRecord]) -> dict[str, tuple[list[str], list[list]]]:
    """Per headline estimator: every run (failed ones too) with its headline slope and, in its own
    column, the per-text estimator with its bootstrap CI over probe texts."""
    out = {}
    for est, rs in _by_estimator(records, estimator_of).items():
        header = ["run", "status", "block", "objective", "control", "tied embeddings", "seed", f"slope [{est}]",
                  PER_TEXT_COLUMN, f"steepness [{est}]", f"width [{est}]", "acc/loss tuned"]
        rows = []
        for r in rs:
            if not r.ok:
                rows.append([r.name, r.status, "", _fmt(r.get("objective")), _fmt(r.get("control")), "",
                             _fmt(r.get("seed")), "", "", "", "", ""])
                continue
            y, lo, hi = per_text_point(r)
            probe = r.results.get("probe") or {}
            score = probe.get("accuracy_tuned") if probe.get("accuracy_tuned") is not None else probe.get("loss_tuned")
            rows.append([r.name, r.status, r.get("block_type"), r.get("objective"), r.get("control"), tied_of(r),
                         r.get("seed"), _fmt(headline_slope(r), "+.3e"),
                         f"{_fmt(y, '+.3e')} {_ci(lo, hi)}" if y is not None else "—",
                         _fmt(r.metrics.get("steepness"), "+.3f"), _fmt(r.metrics.get("width_fraction"), ".2f"),
                         _fmt(score, ".3f")])
        out[est] = (header, rows)
    return out


def _sections(title: str, tables: dict[str, tuple[list[str], list[list]]], note: str = "") -> list[str]:
    parts = []
    for est, (header, rows) in tables.items():
        parts += [f"### {title} — headline estimator {est}", ""]
        if note:
            parts += [note, ""]
        parts += [_md_table(header, rows), ""]
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
                  _md_table(["run", "status", "problem"], [[r.name, r.status, r.problem] for r in bad]), ""]
    computed = [r.name for r in ok if r.metrics_source == "computed"]
    if computed:
        parts += [f"Metrics computed by the report from the per-layer rows (results.json has no \"metrics\"; "
                  f"no per-text CI): {len(computed)} run(s).", ""]
    unknown = [r.name for r in ok if tied_of(r) == "unknown"]
    if unknown:
        parts += [f"Tied embeddings unknown (results.json predates the field): {len(unknown)} run(s).", ""]
    parts += ["## Locality gradient by block type × objective × control × tied embeddings", "",
              "Mean and SD over every run of the cell (all models and seeds); one estimator per column.", "",
              _md_table(*group_table(records)), "",
              "## Seed groups: headline slope over seeds", ""]
    parts += _sections("Seed groups", group_tables(records))
    parts += ["## Equal-step control vs none: does the slope persist?", "", f"Rule: {PERSISTENCE_RULE}", ""]
    parts += _sections("Equal-step vs none", control_tables(records))
    parts += ["Coarse view (means over all runs of a cell, no uncertainty):", "",
              _md_table(*control_comparison(records)), ""]
    parts += ["## Width by architecture", ""]
    parts += _sections("Width", width_tables(records))
    parts += ["## Steepness vs objective distance (Pearson r over runs, 95 % bootstrap CI over runs)", "",
              _md_table(["estimator", "distance", "n", "r", "CI"],
                        [[s["estimator"], s["distance"], s["n"], _fmt(s["r"], "+.3f"),
                          f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]" if s["ci_low"] is not None else "—"]
                         for s in stats]), "", "## Runs", ""]
    parts += _sections("Runs", run_tables(records))
    parts += ["## Files", ""] + [f"- [{os.path.basename(p)}]({os.path.basename(p)})" for p in tables]
    parts += [f"- ![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures] + [""]
    return "\n".join(parts)


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
        echo(format_table(h[:-1], [r[:-1] for r in rs]))
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
