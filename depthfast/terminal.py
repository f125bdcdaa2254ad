"""Terminal and markdown output: aligned columns and pipe tables (``format_table``, ``markdown_table``, cells
printed with str()), the report's cell formats ("—" for a missing number: ``fmt_cell``, ``fmt_ci``), and a
run's or a compare's results as a terminal table (``print_table``, ``print_profile_rows``, ``locality_line``).
Imports nothing from depthfast (a leaf); not to be confused with depthfast.report.tables (the report's tables)."""

from __future__ import annotations

import sys


def format_table(header: list[str], rows: list[list]) -> str:
    """Columns padded to their widest cell, a rule of '─' under the header, two spaces between columns."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("─" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub pipe table; '|' in a cell is escaped and a newline becomes a space, so a cell stays one cell."""
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_cell(value, spec: str = ".3g") -> str:
    """A table cell: "—" for None, a float with ``spec``, anything else as str()."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def fmt_ci(low, high, spec: str = "+.2e") -> str:
    """A confidence-interval cell "[low, high]", "—" when either end is None."""
    return f"[{fmt_cell(low, spec)}, {fmt_cell(high, spec)}]" if low is not None and high is not None else "—"


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def weight_cell(value, has_group: bool) -> str:
    """A weight-change cell: the number, "no group" (a layer without parameters of its own, e.g. the
    embeddings of a tied model), or "n/a" (a group that moved from W₀ = 0: no relative change)."""
    if not has_group:
        return "no group"
    return "n/a" if value is None else f"{value:.3e}"


def group_notes(results: dict) -> list[str]:
    """One line on where a tied input/output matrix went, one if there is no embeddings group."""
    notes = []
    group = results.get("tied_embeddings_group")
    if results.get("tied_embeddings"):
        role = ("the output projection: free under the control, not in layer 0's weight change" if group == "head"
                else "the input embedding: equalized by the control, in layer 0's weight change")
        notes.append(f"tied input/output matrix: in group {group} (--tied-embeddings {group}), treated as {role}")
    names = [g["name"] for g in results.get("param_groups", [])]
    if names and "embeddings" not in names:
        notes.append("no embeddings group: layer 0 (the embedding output) has no parameters of its own here")
    return notes


def print_profile_rows(results: dict, file) -> None:
    """The profile table of a run or a compare: header, rule, one line per layer (depth, 1 − CKA, weight
    change as weight_cell; "not measured" on every line where results say weight_change_measured false)."""
    header = f"{'layer':<12}{'depth':>7}{'1 − CKA':>12}{'‖ΔW‖/‖W₀‖':>13}"
    print(header, file=file)
    print("─" * len(header), file=file)
    groups = {g["name"] for g in results.get("param_groups", [])} or {r["layer"] for r in results["layers"]}
    measured = results.get("weight_change_measured", True)  # only a compare writes the key
    for row in results["layers"]:
        weight = weight_cell(row["weight_change"], row["layer"] in groups) if measured else "not measured"
        print(f"{row['layer']:<12}{row['depth']:>7.3f}{row['change']:>12.4e}{weight:>13}", file=file)


def locality_line(slope: float | None) -> str:
    return ("locality gradient (OLS slope of 1 − CKA on depth, blocks only): "
            f"{'n/a' if slope is None else f'{slope:+.4e}'}")


def print_table(results: dict, file=None) -> None:
    """The profile as a terminal table, then the locality gradient and the task's probe scores."""
    file = file or sys.stdout
    print(f"\n{results['model']}  ({results['model_type']}, {results['block_type']} blocks)  "
          f"objective {results['objective']}  control {results['control']}", file=file)
    print_profile_rows(results, file)
    for line in group_notes(results):
        print(line, file=file)
    for quirk in results.get("family_quirks") or []:  # results.json before the field: none
        print(f"family quirk: {quirk}", file=file)
    print(locality_line(results["locality_gradient"]), file=file)
    m = results.get("metrics") or {}
    if m.get("slope_ci_low") is not None:
        print(f"  per-text bootstrap ({m['slope_ci_texts']} texts): slope {m['slope_per_text']:+.4e}, "
              f"{m['slope_ci_confidence']:.0%} CI [{m['slope_ci_low']:+.4e}, {m['slope_ci_high']:+.4e}]", file=file)
    shape = [f"{label} {fmt(m.get(key))}" for label, key in (
        ("steepness", "steepness"), ("width", "width_fraction"), ("centroid depth", "depth_centroid"))]
    print("shape: " + ", ".join(shape), file=file)
    distance = [f"{label} {fmt(m.get(key))}" for label, key in (
        ("loss/chance", "initial_loss_normalized"), ("1 − cos(∇pretrain, ∇finetune)", "gradient_alignment_distance"),
        ("kernel-target alignment", "kernel_target_alignment"))]
    print("objective distance at θ₀: " + ", ".join(distance), file=file)
    probe, train = results["probe"], results["train"]
    line = f"probe: {probe['texts']} texts, {probe['samples']} samples; loss {probe['loss_base']:.3f} → {probe['loss_tuned']:.3f}"
    if probe["accuracy_base"] is not None:
        line += f"; accuracy {probe['accuracy_base']:.3f} → {probe['accuracy_tuned']:.3f}"
    print(line, file=file)
    print(f"train: {train['steps']} steps, {train['tokens']} tokens, {train['seconds']:.1f} s; "
          f"wall {results['wall_seconds']:.1f} s", file=file)
