"""What ``depthfast compare`` writes and prints: config.json, profile.csv, profile.png and results.json
(last; each atomically, depthfast.artifacts), the refusal to overwrite a run's results, and the terminal
table."""

from __future__ import annotations

import os
import sys

import depthfast
from depthfast.adapters import adapter_config
from depthfast.artifacts import atomic_write_json, read_json
from depthfast.compare.config import CompareConfig
from depthfast.errors import DepthfastError
from depthfast.results import group_entries, model_entries, probe_entry, profile_rows, write_profile
from depthfast.rundir import publish_results
from depthfast.terminal import locality_line, print_profile_rows


def check_out(out: str) -> None:
    """Refuse, naming what is there, an --out holding a run's results (not a compare's): the clearer line for
    the commonest mix-up. Any finished results, a compare's too, are then refused by depthfast.rundir unless
    --overwrite, which replaces either whole."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return
    data, _ = read_json(path)  # unreadable or not a JSON object: not a compare's either
    source = data.get("source") if isinstance(data, dict) else None
    if source != "compare":
        raise DepthfastError(f"--out {out!r} already holds results that are not a compare's (results.json); "
                             "choose another directory")


def write_compare_results(cfg: CompareConfig, layers, task, measured, group_changes: dict | None,
                          slope: float | None, metrics: dict, note: str | None,
                          adapter: str | None, wall_seconds: float, torch_version: str,
                          all_pairs: dict | None = None) -> dict:
    """config.json, profile.csv, profile.png, then results.json, each atomically; returns the results."""
    depths = layers.normalized_depths
    rows = profile_rows(layers.layer_names, depths, measured.change)
    for row in rows:
        row["weight_change"] = group_changes.get(row["layer"]) if group_changes is not None else None
    results = {
        "depthfast_version": depthfast.__version__,
        "torch_version": torch_version,
        "source": "compare",
        "model": cfg.tuned,
        "base_model": cfg.base,
        "tuned_model": cfg.tuned,
        "tuned_kind": "peft adapter, merged" if adapter else "checkpoint",
        "adapter": ({k: adapter_config(adapter).get(k) for k in ("peft_type", "base_model_name_or_path", "r",
                                                                 "lora_alpha", "target_modules")}
                    if adapter else None),
        **model_entries(layers),
        "objective": cfg.objective,
        "control": None,
        "estimator": cfg.estimator,
        "pooling": cfg.pooling,
        **group_entries(layers, cfg.tied_embeddings),
        "layers": rows,
        "locality_gradient": slope,
        "metrics": metrics,
        "weight_change_measured": group_changes is not None,
        "weight_change_note": note,
        "group_weight_change": group_changes,
        "all_pairs": all_pairs,  # the files and estimator of --all-pairs, else None
        "mean_update_ratio": None,
        "probe": probe_entry(len(task.probe_texts), measured),  # objective none: nothing scored, losses null
        "train": None,
        "trajectory": None,
        "resumed_from_step": None,
        "num_processes": 1,
        "wall_seconds": wall_seconds,
    }
    out = cfg.out
    atomic_write_json(os.path.join(out, "config.json"), cfg.to_dict())
    write_profile(out, rows, f"{cfg.base} → {cfg.tuned} · {cfg.objective} · compare", slope)
    return publish_results(out, results)  # last, with the manifest of every artifact


def print_compare(results: dict, file=None) -> None:
    """The profile as a terminal table, the locality gradient and the probe scores."""
    file = file or sys.stdout
    print(f"\n{results['base_model']} → {results['tuned_model']}  ({results['model_type']}, "
          f"{results['block_type']} blocks)  objective {results['objective']}", file=file)
    print_profile_rows(results, file)
    print(locality_line(results["locality_gradient"]), file=file)
    probe = results["probe"]
    line = f"probe: {probe['texts']} texts, {probe['samples']} samples"
    if probe["loss_base"] is not None:  # the objective scored a loss
        line += f"; loss {probe['loss_base']:.3f} → {probe['loss_tuned']:.3f}"
    print(line + f"; wall {results['wall_seconds']:.1f} s", file=file)


