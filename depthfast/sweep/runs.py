"""The runs of a grid: their directory names (``run_name``, unique per sweep), the resume decision
(``plan``: skip, run, or run with --resume) and what runs one (``prepare``, ``command``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass

from depthfast.config import RunConfig
from depthfast.errors import DepthfastError
from depthfast.artifacts import atomic_write_json, read_json
from depthfast.sweep.grid import Grid, expand


# Fields that always appear in a run's name, bare (model and the two factors the study is about) …
NAMED_ALWAYS = ("model", "objective", "control", "seed")
# … and fields whose value differs between runs but that do not identify the run's content.
IGNORED_IN_COMPARISON = ("out", "overwrite")


@dataclass
class Run:
    name: str
    config: RunConfig
    directory: str
    action: str = "run"  # "run" | "skip"
    reason: str = ""
    resume: bool = False
    status: str = "pending"  # pending | ok | failed | interrupted | skipped
    seconds: float = 0.0
    note: str = ""


def _slug(value) -> str:
    text = str(value).strip().lower()
    text = re.sub(r"[^a-z0-9.+-]+", "-", text)
    return text.strip("-.") or "x"


def model_short_name(model: str) -> str:
    """The last component of a hub id or path, lower-cased: 'sentence-transformers/all-MiniLM-L6-v2' →
    'all-minilm-l6-v2', '/ckpt/tiny_gpt2/' → 'tiny_gpt2' → 'tiny-gpt2'."""
    return _slug(os.path.basename(os.path.normpath(model)) or model)


def _value_text(value) -> str:
    if isinstance(value, float):
        return repr(value)  # 5e-05, 0.0001: short and exact
    return str(value)


def run_name(config: RunConfig, varied: list[str]) -> str:
    """Readable directory name: model__objective__control__seed<k>, then one part per other grid key.

    Numbers read key+value (lr5e-05, steps30), words key-value (pooling-mean); '_' in field names
    becomes '-'. Example: all-minilm-l6-v2__cls__equal-step__seed0__lr5e-05.
    """
    parts = [model_short_name(config.model), _slug(config.objective), _slug(config.control), f"seed{config.seed}"]
    for key in varied:
        if key in NAMED_ALWAYS:
            continue
        value = getattr(config, key)
        label = "lr" if key == "lr" else key.replace("_", "-")
        text = _value_text(value)
        joiner = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
        parts.append(f"{label}{joiner}{_slug(text)}")
    return "__".join(parts)


def config_hash(config: RunConfig) -> str:
    content = {k: v for k, v in config.to_dict().items() if k not in IGNORED_IN_COMPARISON}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]


def build_runs(grid: Grid, out: str) -> list[Run]:
    """Expanded, validated runs with unique directory names under ``out``.

    Two runs whose readable names coincide (e.g. two models with the same basename) both get
    '__' + the first 8 hex digits of the SHA-1 of their config appended. Identical configs are an error.
    """
    varied = list(grid.grid)
    configs = []
    for i, values in enumerate(expand(grid)):
        try:
            cfg = RunConfig.from_dict({**values, "out": ""}).validate()
        except DepthfastError as exc:
            raise DepthfastError(f"run {i + 1} of the grid ({values}): {exc}") from None
        configs.append(cfg)
    names = [run_name(cfg, varied) for cfg in configs]
    hashes = [config_hash(cfg) for cfg in configs]
    if len(set(hashes)) != len(hashes):
        raise DepthfastError("the grid expands to identical runs (a value is repeated in a grid list)")
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    runs = []
    for cfg, name, digest in zip(configs, names, hashes):
        if counts[name] > 1:
            name = f"{name}__{digest}"
        directory = os.path.join(out, name)
        cfg.out = directory
        runs.append(Run(name=name, config=cfg, directory=directory))
    return runs


def _comparable(config: dict) -> dict | None:
    try:
        normalized = RunConfig.from_dict(config).to_dict()
    except (DepthfastError, TypeError):
        return None
    return {k: v for k, v in normalized.items() if k not in IGNORED_IN_COMPARISON}


def saved_config_matches(run: Run) -> bool:
    saved, _ = read_json(os.path.join(run.directory, "config.json"))
    return isinstance(saved, dict) and _comparable(saved) == _comparable(run.config.to_dict())


def plan(runs: list[Run]) -> list[Run]:
    """Decide per run: skip (finished under this config) or run, with the reason and the --resume flag."""
    for run in runs:
        results, _ = read_json(os.path.join(run.directory, "results.json"))
        same = saved_config_matches(run)
        if isinstance(results, dict) and same:
            run.action, run.reason, run.status = "skip", "finished", "skipped"
        elif not os.path.isdir(run.directory):
            run.action, run.reason = "run", "new"
        elif not same:
            run.action, run.reason = "run", "config changed" if os.path.exists(
                os.path.join(run.directory, "config.json")) else "no saved config"
        else:
            run.action = "run"
            run.reason = ("unreadable results.json" if os.path.exists(os.path.join(run.directory, "results.json"))
                          else "unfinished")
        run.resume = run.action == "run" and same
    return runs


def prepare(run: Run) -> None:
    """Remove a stale results.json, then write the run's config.json (atomically)."""
    results = os.path.join(run.directory, "results.json")
    if os.path.exists(results):
        os.unlink(results)
    atomic_write_json(os.path.join(run.directory, "config.json"), {**run.config.to_dict(), "overwrite": False})


def command(run: Run, python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "depthfast.run", "--config", os.path.join(run.directory, "config.json"),
           "--out", run.directory, "--quiet"]
    # Not resuming: the run replaces whatever an earlier attempt of another config left (its results.json
    # is gone already, see prepare; --overwrite also clears its model/, all_pairs.* …).
    cmd.append("--resume" if run.resume else "--overwrite")
    return cmd
