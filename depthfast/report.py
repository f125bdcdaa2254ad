"""``depthfast report RUNS_DIR``: every run under RUNS_DIR in one table, figures and a markdown summary.

A run directory is any directory holding config.json, results.json or run.log (searched recursively;
the report's own output directory is left out). Each run's metrics come from results.json
"metrics" (written by the runner) or, for results without them, are computed here from the per-layer
rows with ``depthfast.metrics.profile_metrics`` over the blocks (no CI then). Runs whose results.json
is missing or unreadable are kept as rows with their status and listed in report.md and the terminal.

Output (default RUNS_DIR/report/):
    runs.csv (and runs.parquet if pyarrow imports)   one row per run: status, config, metrics, scores
    report.md                                        counts, problem runs, grouped tables, correlations
    profiles.png        change vs depth, one panel per block type (colour: control, line: objective)
    slopes.png          locality gradient per run with bootstrap CIs, by block type × objective, per control
    steepness_vs_distance.png   steepness vs each objective distance, Pearson r with bootstrap CI over runs
    width.png           width fraction and depth spread by architecture / block type
    trajectory.png      change profile over training, for runs whose results.json has "trajectory"
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field, fields

from depthfast.config import RunConfig
from depthfast.errors import DepthfastError
from depthfast.metrics import OBJECTIVE_DISTANCE_KEYS, pearson_ci, profile_metrics
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
    if record.results is not None:
        try:
            record.metrics, record.metrics_source = _metrics_of(record.results)
        except (TypeError, ValueError, KeyError) as exc:
            record.status, record.problem = "corrupt results", f"per-layer rows unusable ({exc})"
            record.results, record.metrics = None, {}
    return record


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
    row = {"run": record.name, "status": record.status, "problem": record.problem}
    for key in CONFIG_KEYS:
        row[key] = record.config.get(key)
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
# Grouped numbers
# ------------------------------------------------------------------------------------------------

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


def _slope_point(record: RunRecord):
    """(slope, low, high): the per-text estimator with its bootstrap CI when measured, else the plain slope."""
    m = record.metrics
    if m.get("slope_ci_low") is not None and m.get("slope_per_text") is not None:
        return m["slope_per_text"], m["slope_ci_low"], m["slope_ci_high"]
    return m.get("locality_gradient"), None, None


def group_table(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """Per (block type, objective, control): runs, mean slope, SD over runs, mean CI bounds, steepness, width."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.ok:
            key = (r.get("block_type") or "?", r.get("objective") or "?", r.get("control") or "?")
            groups.setdefault(key, []).append(r)
    header = ["block_type", "objective", "control", "runs", "slope mean", "slope sd", "CI low (mean)",
              "CI high (mean)", "steepness", "width fraction"]
    rows = []
    for key in sorted(groups):
        rs = groups[key]
        points = [_slope_point(r) for r in rs]
        rows.append([*key, len(rs), _fmt(_mean([p[0] for p in points]), "+.3e"), _fmt(_sd([p[0] for p in points]), ".2e"),
                     _fmt(_mean([p[1] for p in points]), "+.3e"), _fmt(_mean([p[2] for p in points]), "+.3e"),
                     _fmt(_mean([r.metrics.get("steepness") for r in rs])),
                     _fmt(_mean([r.metrics.get("width_fraction") for r in rs]))])
    return header, rows


def control_comparison(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    """Per (block type, objective): mean slope without control and under equal-step, and their ratio."""
    slopes: dict[tuple, dict[str, list]] = {}
    for r in records:
        if r.ok:
            key = (r.get("block_type") or "?", r.get("objective") or "?")
            slopes.setdefault(key, {}).setdefault(r.get("control"), []).append(_slope_point(r)[0])
    header = ["block_type", "objective", "slope (none)", "slope (equal-step)", "equal-step / none"]
    rows = []
    for key in sorted(slopes):
        none, eq = _mean(slopes[key].get("none", [])), _mean(slopes[key].get("equal-step", []))
        ratio = eq / none if none not in (None, 0) and eq is not None else None
        rows.append([*key, _fmt(none, "+.3e"), _fmt(eq, "+.3e"), _fmt(ratio, "+.3f")])
    return header, rows


def correlations(records: list[RunRecord], resamples: int) -> list[dict]:
    """Pearson r of steepness with each objective distance over the ok runs, with a bootstrap CI."""
    ok = [r for r in records if r.ok]
    out = []
    for key in OBJECTIVE_DISTANCE_KEYS:
        xs = [r.metrics.get(key) for r in ok]
        ys = [r.metrics.get("steepness") for r in ok]
        stats = pearson_ci(xs, ys, num_resamples=resamples)
        out.append({"distance": key, **stats})
    return out


# ------------------------------------------------------------------------------------------------
# Figures
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


def _short_label(r: RunRecord) -> str:
    return f"{r.get('objective')} · {r.get('control')} · seed {r.get('seed')}"


def plot_profiles(records: list[RunRecord], path: str) -> str | None:
    ok = [r for r in records if r.ok]
    if not ok:
        return None
    plt = _plt()
    types = sorted({r.get("block_type") or "?" for r in ok})
    fig, axes = plt.subplots(1, len(types), figsize=(5.2 * len(types), 3.8), dpi=110, squeeze=False)
    for ax, block_type in zip(axes[0], types):
        seen = set()
        for r in [r for r in ok if (r.get("block_type") or "?") == block_type]:
            rows = r.results["layers"]
            label = f"{r.get('objective')} · {r.get('control')}"
            ax.plot([row["depth"] for row in rows], [row["change"] for row in rows], marker="o", ms=3,
                    color=CONTROL_COLORS.get(r.get("control"), "gray"),
                    linestyle=OBJECTIVE_STYLES.get(r.get("objective"), "-"), alpha=0.75,
                    label=None if label in seen else label)
            seen.add(label)
        models = sorted({r.get("model_type") or "?" for r in ok if (r.get("block_type") or "?") == block_type})
        ax.set_title(f"block type {block_type} ({', '.join(models)})", fontsize=9)
        ax.set_xlabel("normalized depth ℓ / L")
        ax.set_ylabel("1 − CKA")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_slopes(records: list[RunRecord], path: str) -> str | None:
    ok = [r for r in records if r.ok and _slope_point(r)[0] is not None]
    if not ok:
        return None
    plt = _plt()
    cats = sorted({(r.get("block_type") or "?", r.get("objective") or "?") for r in ok})
    controls = sorted({r.get("control") or "?" for r in ok})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(cats) + 2), 4.0), dpi=110)
    width = 0.6 / max(1, len(controls))
    for j, control in enumerate(controls):
        offset = (j - (len(controls) - 1) / 2) * width
        labelled = False
        for i, cat in enumerate(cats):
            rs = [r for r in ok if (r.get("block_type") or "?", r.get("objective") or "?") == cat
                  and (r.get("control") or "?") == control]
            for k, r in enumerate(rs):
                y, lo, hi = _slope_point(r)
                x = i + offset + (k - (len(rs) - 1) / 2) * width * 0.25
                err = [[y - lo], [hi - y]] if lo is not None else None
                ax.errorbar(x, y, yerr=err, fmt="o", ms=4, capsize=2, color=CONTROL_COLORS.get(control, "gray"),
                            label=None if labelled else control)
                labelled = True
            if rs:
                ax.hlines(_mean([_slope_point(r)[0] for r in rs]), i + offset - width * 0.4, i + offset + width * 0.4,
                          color=CONTROL_COLORS.get(control, "gray"), linewidth=2)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels([f"{b}\n{o}" for b, o in cats], fontsize=8)
    ax.set_ylabel("locality gradient, per-text estimator\n(slope of 1 − CKA on depth)")
    ax.set_title("locality gradient per run (95 % bootstrap CI over probe texts\n"
                 "where measured); bar = mean over runs", fontsize=8)
    ax.legend(title="control", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_steepness_vs_distance(records: list[RunRecord], stats: list[dict], path: str) -> str | None:
    ok = [r for r in records if r.ok]
    usable = [s for s in stats if s["n"] >= 2]
    if not usable:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(usable), figsize=(4.6 * len(usable), 3.8), dpi=110, squeeze=False)
    for ax, s in zip(axes[0], usable):
        key = s["distance"]
        for r in ok:
            x, y = r.metrics.get(key), r.metrics.get("steepness")
            if x is not None and y is not None:
                ax.plot(x, y, linestyle="none", color=CONTROL_COLORS.get(r.get("control"), "gray"),
                        marker={"cls": "o", "mlm": "s", "clm": "^"}.get(r.get("objective"), "o"), alpha=0.8)
        ci = f" [{s['ci_low']:+.2f}, {s['ci_high']:+.2f}]" if s["ci_low"] is not None else ""
        ax.set_title(f"r = {_fmt(s['r'], '+.2f')}{ci}, n = {s['n']}", fontsize=9)
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("steepness ln(top/bottom)")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_width(records: list[RunRecord], path: str) -> str | None:
    ok = [r for r in records if r.ok and r.metrics.get("width_fraction") is not None]
    if not ok:
        return None
    plt = _plt()
    cats = sorted({f"{r.get('architecture') or '?'}/{r.get('block_type') or '?'}" for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.2 * len(cats) + 4), 3.6), dpi=110)
    for ax, key, label in ((axes[0], "width_fraction", "fraction of blocks ≥ ½ max change"),
                           (axes[1], "depth_spread", "depth spread around the centroid")):
        for i, cat in enumerate(cats):
            rs = [r for r in ok if f"{r.get('architecture') or '?'}/{r.get('block_type') or '?'}" == cat]
            for k, r in enumerate(rs):
                v = r.metrics.get(key)
                if v is not None:
                    ax.plot(i + (k - (len(rs) - 1) / 2) * 0.06, v, "o", alpha=0.8,
                            color=CONTROL_COLORS.get(r.get("control"), "gray"))
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(0, 1.05)
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
        ax.set_title(f"{r.name}", fontsize=7)
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


def run_rows(records: list[RunRecord]) -> tuple[list[str], list[list]]:
    # Two estimators, both named: the run's headline slope (exact CKA over all probe tokens) and the
    # per-text estimator that the bootstrap CI belongs to.
    header = ["run", "status", "block", "objective", "control", "seed", "slope (exact)", "slope (per-text)",
              "per-text 95% CI", "steepness", "width", "acc/loss tuned"]
    rows = []
    for r in records:
        if not r.ok:
            rows.append([r.name, r.status, "", _fmt(r.get("objective")), _fmt(r.get("control")), _fmt(r.get("seed")),
                         "", "", "", "", "", ""])
            continue
        y, lo, hi = _slope_point(r)
        probe = r.results.get("probe") or {}
        score = probe.get("accuracy_tuned") if probe.get("accuracy_tuned") is not None else probe.get("loss_tuned")
        rows.append([r.name, r.status, r.get("block_type"), r.get("objective"), r.get("control"), r.get("seed"),
                     _fmt(r.results.get("locality_gradient"), "+.3e"), _fmt(y, "+.3e"), f"[{_fmt(lo, '+.2e')}, {_fmt(hi, '+.2e')}]" if lo is not None else "—",
                     _fmt(r.metrics.get("steepness"), "+.3f"), _fmt(r.metrics.get("width_fraction"), ".2f"),
                     _fmt(score, ".3f")])
    return header, rows


def markdown(records: list[RunRecord], stats: list[dict], figures: list[str], tables: list[str], runs_dir: str) -> str:
    ok = [r for r in records if r.ok]
    bad = [r for r in records if not r.ok]
    parts = [f"# depthfast report: {runs_dir}", "",
             f"{len(records)} run directories: {len(ok)} with results, {len(bad)} missing or corrupt.", ""]
    if bad:
        parts += ["## Runs without usable results", "",
                  _md_table(["run", "status", "problem"], [[r.name, r.status, r.problem] for r in bad]), ""]
    computed = [r.name for r in ok if r.metrics_source == "computed"]
    if computed:
        parts += [f"Metrics computed by the report from the per-layer rows (results.json has no \"metrics\"; "
                  f"no bootstrap CI): {len(computed)} run(s).", ""]
    parts += ["## Locality gradient by block type, objective and control", "",
              "Slope of 1 − CKA on normalized depth over the blocks; where results carry per-text HSIC₁ the slope "
              "is the per-text ratio-of-sums estimator with its 95 % bootstrap CI over probe texts.", "",
              _md_table(*group_table(records)), "", "## Equal-step control vs none", "",
              _md_table(*control_comparison(records)), "",
              "## Steepness vs objective distance (Pearson r over runs, 95 % bootstrap CI)", "",
              _md_table(["distance", "n", "r", "CI"],
                        [[s["distance"], s["n"], _fmt(s["r"], "+.3f"),
                          f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]" if s["ci_low"] is not None else "—"]
                         for s in stats]), "",
              "## Runs", "", _md_table(*run_rows(records)), ""]
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
    echo(format_table(*run_rows(records)))
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
