"""Plain-text tables: aligned columns for the terminal, pipe tables for markdown (cells printed with
str()), and the cell formats of the report ("—" for a missing number)."""

from __future__ import annotations


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
