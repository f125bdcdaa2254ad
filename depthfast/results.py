"""A run's artifacts on disk: atomic writes (a temporary file, then a rename over), JSON without NaN
(``json_safe``, ``finite_or_none``) and reading it back (``read_json``), results.json / profile.csv /
train_log.csv (``write_results``; profile.png via ``depthfast.plotting``), and the terminal results table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile

from depthfast.registry import family_quirks


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The file gets the mode the umask gives a new file (0644 under 022; tempfile alone would leave 0600).
    Inside an open run directory (depthfast.rundir) an artifact's first write retracts the older run.
    """
    from depthfast import rundir

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    rundir.before_write(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, rundir.file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    rundir.after_write(path)


def finite_or_none(value):
    """A number for JSON or a table, or None where it is not finite: the one rule for "undefined".

    NaN and ±inf become None (JSON has no NaN, and a NaN must never pass as a number); other floats,
    and numpy or one-element torch scalars (as floats), are kept; None, bools, ints, strings and
    containers are returned as they are.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if not isinstance(value, float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return value
    return value if math.isfinite(value) else None


def json_safe(value):
    """``value`` with every non-finite float, in dicts, lists and tuples too, replaced by None (tuples
    become lists): JSON has no NaN, and a NaN must never pass as a number."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return finite_or_none(value)


def read_json(path: str):
    """(value, problem): the parsed JSON of ``path`` and "", or None and a short reason: "missing",
    or "unreadable (<error type>: <first 80 characters of the message>)"."""
    try:
        with open(path) as f:
            return json.load(f), ""
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})"


def atomic_write_json(path: str, data) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n").encode())


def atomic_write_csv(path: str, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def profile_rows(names: list[str], depths: list[float], changes: list[float]) -> list[dict]:
    """One row per measured layer: name, normalized depth, change = 1 − CKA (measured as such, see
    depthfast.probe.ProbeResult) and CKA = 1 − change."""
    return [{"layer": n, "depth": d, "cka": 1.0 - c, "change": c} for n, d, c in zip(names, depths, changes)]


def write_profile(out: str, rows: list[dict], title: str, slope: float | None) -> None:
    """profile.csv (layer, depth, cka, change, weight_change) and profile.png from the profile's rows
    (profile_rows plus "weight_change"), each atomically. A weight change of None (no group) is a gap in
    the figure, not 0."""
    from depthfast.plotting import plot_profile  # here, not at the top: plotting writes through this module

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
    import depthfast
    from depthfast.rundir import publish_results

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
    import sys

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
