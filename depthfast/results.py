"""A run's results record: results.json (its entries and their assembly, ``write_results``), profile.csv,
train_log.csv and profile.png (``write_profile``; the figure via depthfast.plotting).

The atomic writers and JSON helpers live in depthfast.artifacts, the terminal table in depthfast.terminal;
both are re-exported here so ``from depthfast.results import …`` keeps working."""

from __future__ import annotations

import os

import depthfast
from depthfast.artifacts import (  # noqa: F401  (re-exported: the public names of the old module)
    atomic_write_bytes, atomic_write_csv, atomic_write_json, finite_or_none, json_safe, read_json)
from depthfast.plotting import plot_profile
from depthfast.registry import family_quirks
from depthfast.rundir import publish_results
from depthfast.terminal import (  # noqa: F401  (re-exported)
    fmt, group_notes, locality_line, print_profile_rows, print_table, weight_cell)


def profile_rows(names: list[str], depths: list[float], changes: list[float]) -> list[dict]:
    """One row per measured layer: name, normalized depth, change = 1 − CKA (measured as such, see
    depthfast.probe.ProbeResult) and CKA = 1 − change."""
    return [{"layer": n, "depth": d, "cka": 1.0 - c, "change": c} for n, d, c in zip(names, depths, changes)]


def write_profile(out: str, rows: list[dict], title: str, slope: float | None) -> None:
    """profile.csv (layer, depth, cka, change, weight_change) and profile.png from the profile's rows
    (profile_rows plus "weight_change"), each atomically. A weight change of None (no group) is a gap in
    the figure, not 0."""
    atomic_write_csv(os.path.join(out, "profile.csv"), ["layer", "depth", "cka", "change", "weight_change"],
                     [[r["layer"], r["depth"], r["cka"], r["change"], r["weight_change"]] for r in rows])
    plot_profile(os.path.join(out, "profile.png"), [r["depth"] for r in rows], [r["change"] for r in rows],
                 [float("nan") if r["weight_change"] is None else r["weight_change"] for r in rows], title, slope)


def write_train_log(out: str, group_names: list[str], rows: list[list]) -> None:
    """train_log.csv: step, loss, lr, then each group's update ratio before and after the control."""
    atomic_write_csv(os.path.join(out, "train_log.csv"),
                     ["step", "loss", "lr"] + [f"ratio_before:{n}" for n in group_names]
                     + [f"ratio_after:{n}" for n in group_names], rows)


def model_entries(layers) -> dict:
    """results.json's description of the measured model's depth axis (depthfast.layers.ModelLayers)."""
    return {"model_type": layers.model_type, "architecture": layers.architecture, "block_type": layers.block_type,
            "num_blocks": layers.num_blocks}


def group_entries(layers, tied_embeddings: str) -> dict:
    """results.json's role groups (depthfast.layers): a tied input/output matrix is in one of them, by
    --tied-embeddings; a tied model may have no embeddings group at all (Mamba under "head"): its
    layer 0 has no weight change."""
    return {"tied_embeddings": layers.tied_embeddings, "tied_embeddings_group": layers.tied_group(tied_embeddings),
            "param_groups": [{"name": name, "tensors": len(ps), "elements": sum(p.numel() for p in ps)}
                             for name, ps in layers.param_groups(tied_embeddings)]}


def probe_entry(texts: int, measured) -> dict:
    """results.json's probe summary (depthfast.probe.ProbeResult); a loss with nothing scored is null."""
    return {"texts": texts, "samples": measured.num_samples, "loss_base": finite_or_none(measured.loss_base),
            "loss_tuned": finite_or_none(measured.loss_tuned), "accuracy_base": measured.accuracy_base,
            "accuracy_tuned": measured.accuracy_tuned}


def write_results(cfg, layers, task, log, measured, group_changes: dict[str, float],
                  slope: float | None, metrics: dict, wall_seconds: float, torch_version: str, num_processes: int = 1,
                  extra: dict | None = None) -> dict:
    """Write config.json, results.json, profile.csv, train_log.csv and profile.png into ``cfg.out``.

    Each file is replaced atomically, results.json last: a reader that finds it finds the rest, and
    its ``manifest`` lists each artifact's sha256.
    """
    depths = layers.normalized_depths
    rows = profile_rows(layers.layer_names, depths, measured.change)
    for row in rows:
        row["weight_change"] = group_changes.get(row["layer"])
    steps = len(log.loss)
    mean_ratio = {
        name: sum(r[g] for r in log.ratios_before) / steps for g, name in enumerate(log.group_names)
    } if steps else {}
    results = {
        "depthfast_version": depthfast.__version__,
        "torch_version": torch_version,
        "model": cfg.model,
        **model_entries(layers),
        "objective": cfg.objective,
        "control": cfg.control,
        "estimator": cfg.estimator,
        "pooling": cfg.pooling,
        **group_entries(layers, cfg.tied_embeddings),
        "family_quirks": family_quirks(cfg.model),  # depthfast.registry: the study model's quirks, [] for others
        "layers": rows,
        "locality_gradient": slope,
        "metrics": metrics,
        "group_weight_change": group_changes,
        "mean_update_ratio": mean_ratio,
        "probe": probe_entry(len(task.probe_texts), measured),
        "train": {
            "steps": steps,
            "texts": len(task.train_texts),
            "first_loss": log.loss[0] if steps else None,
            "final_loss": log.loss[-1] if steps else None,
            "tokens": log.tokens,
            "seconds": log.seconds,
            "tokens_per_second": log.tokens / log.seconds if log.seconds > 0 else None,
            "unused_parameters": log.unused_parameters,  # no gradient at the first step: not trained
        },
        "trajectory": log.trajectory,
        "resumed_from_step": log.resumed_from,
        "num_processes": num_processes,
        "wall_seconds": wall_seconds,
        **(extra or {}),  # e.g. "lora": the LoRA settings and parameter counts (None for full fine-tuning)
    }
    out = cfg.out
    atomic_write_json(os.path.join(out, "config.json"), cfg.to_dict())
    write_profile(out, rows, f"{cfg.model} · {cfg.objective} · control {cfg.control} · {steps} steps", slope)
    write_train_log(out, log.group_names,
                    [[i + 1, log.loss[i], log.lr[i]] + log.ratios_before[i] + log.ratios_after[i] for i in range(steps)])
    return publish_results(out, results)  # last, with the manifest of every artifact (depthfast.rundir)
