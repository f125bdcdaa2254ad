"""The report's figures, one panel (or row of panels) per headline estimator: profiles.png, slopes.png,
steepness_vs_distance.png, width.png, trajectory.png. Each plot_* returns the path written, or None
when there is nothing to draw."""

from __future__ import annotations

import math

from depthfast.metrics import PER_TEXT_ESTIMATOR
from depthfast.plotting import pyplot, save_figure
from depthfast.report.groups import SEED_CI, by_estimator, seed_groups
from depthfast.report.records import RunRecord, estimator_of, headline_slope, per_text_point, tied_of
from depthfast.terminal import fmt_cell


CONTROL_COLORS = {"none": "tab:blue", "equal-step": "tab:red"}
OBJECTIVE_STYLES = {"cls": "-", "mlm": "--", "clm": ":"}


def plot_profiles(records: list[RunRecord], path: str) -> str | None:
    ok = [r for r in records if r.ok]
    if not ok:
        return None
    plt = pyplot()
    by_est = by_estimator(ok, estimator_of)
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
    return save_figure(fig, path)


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
    for est, groups in by_estimator(seed_groups(records)).items():
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
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_steepness_vs_distance(records: list[RunRecord], stats: list[dict], path: str) -> str | None:
    usable = [s for s in stats if s["n"] >= 2]
    if not usable:
        return None
    plt = pyplot()
    by_est = by_estimator(usable, lambda s: s["estimator"])
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
            ax.set_title(f"[{est}] r = {fmt_cell(s['r'], '+.2f')}{ci}, n = {s['n']}", fontsize=9)
            ax.set_xlabel(key.replace("_", " "))
            ax.set_ylabel(f"steepness ln(top/bottom) [{est}]")
            ax.grid(alpha=0.3)
        for ax in row[len(ss):]:
            ax.axis("off")
    return save_figure(fig, path)


def plot_width(records: list[RunRecord], path: str) -> str | None:
    ok = [r for r in records if r.ok and r.metrics.get("width_fraction") is not None]
    if not ok:
        return None
    plt = pyplot()
    by_est = by_estimator(ok, estimator_of)
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
    return save_figure(fig, path)


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
    plt = pyplot()
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
    return save_figure(fig, path)
