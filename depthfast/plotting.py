"""Figures: matplotlib without a display, PNGs written atomically, and a run's profile.png."""

from __future__ import annotations

import io

from depthfast.artifacts import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed: runs on cluster nodes and in CI)."""
    import matplotlib  # here: figures only, and the backend is set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Lay out ``fig``, write it to ``path`` as a PNG atomically, close it; returns ``path``."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_profile(path: str, depths: list[float], changes: list[float], weight_changes: list[float],
                 title: str, slope: float | None) -> None:
    """profile.png: representational change (and weight change) against normalized depth."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(depths, changes, "o-", color="tab:blue", label="1 − CKA (probe set)")
    ax.set_xlabel("normalized depth ℓ / L")
    ax.set_ylabel("representational change 1 − CKA", color="tab:blue")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    twin.plot(depths, weight_changes, "s--", color="tab:orange", alpha=0.8, label="‖W_T − W_0‖ / ‖W_0‖")
    twin.set_ylabel("weight change ‖W_T − W_0‖ / ‖W_0‖", color="tab:orange")
    twin.set_ylim(bottom=0)
    slope_text = f"locality gradient {slope:+.4g}" if slope is not None else "locality gradient n/a"
    ax.set_title(f"{title}\n{slope_text}", fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
