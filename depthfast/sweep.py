"""``depthfast sweep GRID.yaml``: expand a grid of RunConfigs into runs and run each as a subprocess.

Grid file (YAML)::

    out: runs/demo_grid            # sweep directory (relative to the current directory); --out overrides
    base:                          # RunConfig fields shared by every run (optional)
      steps: 30
      probe_size: 96
    grid:                          # RunConfig fields → non-empty lists; the runs are their product
      objective: [cls, mlm]
      control: [none, equal-step]
      seed: [0, 1]

A study grid adds two optional keys, for settings that belong to a model or an objective::

    models:                        # one entry per model: crossed with the grid axes
      - model: bert-base-uncased
        objectives: [cls, mlm]     # optional; else the grid's or base's objective
        batch_size: 32             # any other RunConfig field: this model's own setting
      - model: EleutherAI/pythia-6.9b
        objectives: [cls, clm]
        precision: bf16
    per_objective:                 # RunConfig fields per objective (e.g. the dataset of each)
      cls: {dataset: nyu-mll/glue, dataset_config: sst2, text_column: sentence}
      clm: {dataset: Salesforce/wikitext, dataset_config: wikitext-103-raw-v1}

The runs are: for each models entry (file order), for each of its objectives, the product of the
grid lists. A run's fields, later winning: base, per_objective[its objective], its models entry,
its grid values. A field set by a models entry or per_objective cannot also be a grid axis, and
``model`` cannot be in base or grid when ``models`` is given.

Unknown keys (top level, base, grid, a models entry or per_objective), ``out`` anywhere but the top
level, a key in two places that would silently override each other, an empty list, or an objective a
registry model does not admit (mlm on a decoder, clm on an encoder) fail with one line. Every expanded
config is validated (RunConfig.validate) before anything runs.

``--dry-run`` lists every run with its memory estimate per process (``estimate_memory``: the model is
built on the meta device from the registry's config or a local directory's config.json, so nothing is
downloaded) and where it fits: one 80 GB H100, one 141 GB H200, or FSDP over N GPUs.

Each run lives in OUT/<name>/, the name built from its config (see ``run_name``); the sweep writes
OUT/<name>/config.json and runs ``python -m depthfast.run --config OUT/<name>/config.json --out
OUT/<name> --quiet [--resume]``, output to OUT/<name>/run.log.

Resume rule (``plan``): a run is skipped when OUT/<name>/results.json is a readable JSON object AND
OUT/<name>/config.json equals the expanded config (all RunConfig fields except ``out``). Otherwise it
runs: results.json of a stale or failed attempt is removed first (so results.json can only mean "this
config finished"), and ``--resume`` is passed only when the saved config equals the expanded one (an
interrupted attempt of the same run: it continues from its checkpoint, if it wrote one).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields

from depthfast.config import RunConfig
from depthfast.errors import DepthfastError
from depthfast.results import atomic_write_bytes, atomic_write_csv, atomic_write_json

TOP_LEVEL_KEYS = ("out", "base", "grid", "models", "per_objective")
# Fields that always appear in a run's name, bare (model and the two factors the study is about) …
NAMED_ALWAYS = ("model", "objective", "control", "seed")
# … and fields whose value differs between runs but that do not identify the run's content.
IGNORED_IN_COMPARISON = ("out",)


@dataclass
class Run:
    name: str
    config: RunConfig
    directory: str
    action: str = "run"  # "run" | "skip"
    reason: str = ""
    resume: bool = False
    status: str = "pending"  # pending | ok | failed | skipped
    seconds: float = 0.0
    note: str = ""


@dataclass
class Grid:
    out: str
    base: dict
    grid: dict = field(default_factory=dict)
    models: list[dict] | None = None  # [{"model": id, "objectives": [...], <RunConfig field>: value}]
    per_objective: dict = field(default_factory=dict)  # objective → {RunConfig field: value}


# ------------------------------------------------------------------------------------------------
# Grid file → configs
# ------------------------------------------------------------------------------------------------

def load_grid(path: str) -> Grid:
    """Read and check a grid YAML file (schema in the module docstring)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise DepthfastError(f"grid file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise DepthfastError(f"grid file {path!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_grid(data, source=path)


def parse_grid(data, source: str = "grid") -> Grid:
    if not isinstance(data, dict):
        raise DepthfastError(f"{source}: the grid file must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise DepthfastError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL_KEYS)}")
    base = data.get("base") or {}
    grid = data.get("grid") or {}
    out = data.get("out")
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise DepthfastError(f"{source}: 'base' and 'grid' must be mappings of RunConfig fields")
    known = [f.name for f in fields(RunConfig)]
    for section, mapping in (("base", base), ("grid", grid)):
        bad = sorted(set(mapping) - set(known))
        if bad:
            raise DepthfastError(f"{source}: unknown {section} key(s) {', '.join(map(str, bad))}; "
                                 f"RunConfig fields: {', '.join(known)}")
        if "out" in mapping:
            raise DepthfastError(f"{source}: 'out' cannot be set in {section}; the sweep names each run's directory")
    both = sorted(set(base) & set(grid))
    if both:
        raise DepthfastError(f"{source}: key(s) {', '.join(both)} are in both base and grid; keep one")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise DepthfastError(f"{source}: grid.{key} must be a non-empty list; got {values!r}")
    if out is not None and not isinstance(out, str):
        raise DepthfastError(f"{source}: 'out' must be a directory path; got {out!r}")
    per_objective = _parse_per_objective(data.get("per_objective"), grid, known, source)
    models = _parse_models(data["models"], base, grid, known, source) if "models" in data else None
    return Grid(out=out, base=dict(base), grid=dict(grid), models=models, per_objective=per_objective)


def _parse_per_objective(data, grid: dict, known: list[str], source: str) -> dict:
    from depthfast.config import OBJECTIVES

    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DepthfastError(f"{source}: 'per_objective' must map objectives ({', '.join(OBJECTIVES)}) to RunConfig fields")
    out = {}
    for objective, settings in data.items():
        where = f"per_objective.{objective}"
        if objective not in OBJECTIVES:
            raise DepthfastError(f"{source}: unknown objective {objective!r} in per_objective; known: {', '.join(OBJECTIVES)}")
        if not isinstance(settings, dict):
            raise DepthfastError(f"{source}: {where} must be a mapping of RunConfig fields; got {settings!r}")
        _check_fields(settings, known, where, source, forbidden=("out", "model", "objective"))
        clash = sorted(set(settings) & set(grid))
        if clash:
            raise DepthfastError(f"{source}: {', '.join(clash)} in both {where} and grid; keep one")
        out[objective] = dict(settings)
    return out


def _parse_models(data, base: dict, grid: dict, known: list[str], source: str) -> list[dict]:
    from depthfast.config import OBJECTIVES

    if not isinstance(data, list) or not data:
        raise DepthfastError(f"{source}: 'models' must be a non-empty list of {{model: ID, objectives: [...], ...}}")
    for where, mapping in (("base", base), ("grid", grid)):
        if "model" in mapping:
            raise DepthfastError(f"{source}: 'model' is in {where} and 'models' is given; list every model under models")
    entries = []
    for i, entry in enumerate(data):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise DepthfastError(f"{source}: {where} must be a mapping with 'model: ID'; got {entry!r}")
        where = f"models[{i}] ({entry['model']})"
        if "objective" in entry:
            raise DepthfastError(f"{source}: {where} has 'objective'; use 'objectives: [...]' (a list)")
        settings = {k: v for k, v in entry.items() if k not in ("model", "objectives")}
        _check_fields(settings, known, where, source, forbidden=("out",), extra=("model", "objectives"))
        clash = sorted(set(settings) & set(grid))
        if clash:
            raise DepthfastError(f"{source}: {', '.join(clash)} in both {where} and grid; keep one")
        objectives = entry.get("objectives")
        if objectives is not None:
            if not isinstance(objectives, list) or not objectives or len(set(map(str, objectives))) != len(objectives):
                raise DepthfastError(f"{source}: {where}: 'objectives' must be a non-empty list without repeats; "
                                     f"got {objectives!r}")
            bad = [o for o in objectives if o not in OBJECTIVES]
            if bad:
                raise DepthfastError(f"{source}: {where}: unknown objective(s) {', '.join(map(str, bad))}; "
                                     f"known: {', '.join(OBJECTIVES)}")
            if "objective" in grid:
                raise DepthfastError(f"{source}: {where} lists objectives and grid has 'objective'; keep one")
            _check_admits(entry["model"], objectives, where, source)
        entries.append(dict(entry))
    return entries


def _check_fields(mapping: dict, known: list[str], where: str, source: str, forbidden=(), extra=()) -> None:
    bad = sorted(set(map(str, mapping)) - set(known))
    if bad:
        raise DepthfastError(f"{source}: unknown key(s) {', '.join(bad)} in {where}; "
                             f"allowed: {', '.join([*extra, *known])}")
    for key in forbidden:
        if key in mapping:
            raise DepthfastError(f"{source}: '{key}' cannot be set in {where}")


def _check_admits(model: str, objectives: list[str], where: str, source: str) -> None:
    """A registry model's objectives are checked from its config (no download); others at run time."""
    from depthfast.models import check_objective
    from depthfast.registry import lookup

    spec = lookup(model)
    if spec is None:
        return
    for objective in objectives:
        try:
            check_objective(spec.config(), objective)
        except DepthfastError as exc:
            raise DepthfastError(f"{source}: {where}: {exc}") from None


def expand(grid: Grid) -> list[dict]:
    """Every run's fields: for each models entry (or once, without ``models``), for each of its
    objectives, the product of the grid lists in file order (the last key varies fastest). Fields,
    later winning: base, per_objective[objective], the models entry, the grid values."""
    keys = list(grid.grid)
    combos = [dict(zip(keys, combo)) for combo in itertools.product(*(grid.grid[k] for k in keys))] if keys else [{}]
    out = []
    for entry in grid.models or [{}]:
        settings = {k: v for k, v in entry.items() if k != "objectives"}
        for objective in entry.get("objectives") or [None]:
            for combo in combos:
                chosen = objective or combo.get("objective") or grid.base.get("objective") or RunConfig().objective
                values = {**grid.base, **grid.per_objective.get(chosen, {}), **settings, **combo}
                if objective:
                    values["objective"] = objective
                out.append(values)
    return out


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


# ------------------------------------------------------------------------------------------------
# Resume decision
# ------------------------------------------------------------------------------------------------

def _comparable(config: dict) -> dict | None:
    try:
        normalized = RunConfig.from_dict(config).to_dict()
    except (DepthfastError, TypeError):
        return None
    return {k: v for k, v in normalized.items() if k not in IGNORED_IN_COMPARISON}


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def saved_config_matches(run: Run) -> bool:
    saved = _read_json(os.path.join(run.directory, "config.json"))
    return isinstance(saved, dict) and _comparable(saved) == _comparable(run.config.to_dict())


def plan(runs: list[Run]) -> list[Run]:
    """Decide per run: skip (finished under this config) or run, with the reason and the --resume flag."""
    for run in runs:
        results = _read_json(os.path.join(run.directory, "results.json"))
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
    atomic_write_json(os.path.join(run.directory, "config.json"), run.config.to_dict())


def command(run: Run, python: str | None = None) -> list[str]:
    cmd = [python or sys.executable, "-m", "depthfast.run", "--config", os.path.join(run.directory, "config.json"),
           "--out", run.directory, "--quiet"]
    if run.resume:
        cmd.append("--resume")
    return cmd


# ------------------------------------------------------------------------------------------------
# Running: a pool of workers, one subprocess each (one per GPU on a GPU machine)
# ------------------------------------------------------------------------------------------------

def visible_gpus() -> list[str]:
    """GPU ids for CUDA_VISIBLE_DEVICES: the ones already visible, else torch's count (none on CPU)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def _last_error(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("depthfast: error:") or "Error" in line.split(":")[0]:
            return line[:200]
    return lines[-1][:200] if lines else ""


class _Pool:
    """N worker threads, each owning one slot (a GPU id or None) and running one subprocess at a time."""

    def __init__(self, slots: list[str | None], threads_per_run: int | None, echo) -> None:
        self.slots, self.threads_per_run, self.echo = slots, threads_per_run, echo
        self.procs: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def _run_one(self, run: Run, slot: str | None) -> None:
        prepare(run)
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        if self.threads_per_run:
            env.setdefault("OMP_NUM_THREADS", str(self.threads_per_run))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log_path = os.path.join(run.directory, "run.log")
        started = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"=== depthfast sweep: {time.strftime('%Y-%m-%d %H:%M:%S')}  {shlex.join(command(run))}"
                      f"{f'  CUDA_VISIBLE_DEVICES={slot}' if slot is not None else ''}\n")
            log.flush()
            proc = subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.procs[proc.pid] = proc
            rc = proc.wait()
            with self.lock:
                self.procs.pop(proc.pid, None)
        run.seconds = time.perf_counter() - started
        if rc == 0 and isinstance(_read_json(os.path.join(run.directory, "results.json")), dict):
            run.status = "ok"
        else:
            run.status = "failed"
            run.note = f"exit {rc}: {_last_error(log_path)}" if rc != 0 else "exit 0 but no results.json"
        self.echo(f"[{run.status:>6}] {run.name}  ({run.seconds:.1f} s){'  ' + run.note if run.note else ''}")

    def run(self, runs: list[Run]) -> None:
        jobs: queue.Queue = queue.Queue()
        for run in runs:
            jobs.put(run)

        def worker(slot):
            while not self.stopping:
                try:
                    run = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    self._run_one(run, slot)
                except Exception as exc:  # a broken run never stops the others
                    run.status, run.note = "failed", f"{type(exc).__name__}: {exc}"
                    self.echo(f"[failed] {run.name}  {run.note}")

        threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in self.slots]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
        except KeyboardInterrupt:
            self.stopping = True
            with self.lock:
                procs = list(self.procs.values())
            for proc in procs:  # only the subprocesses this sweep started
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise


def slots_for(workers: int | None) -> tuple[list[str | None], int | None]:
    """Worker slots and threads per run: one worker per visible GPU (``workers`` caps it), else ``workers``
    CPU workers (default 1) sharing the cores evenly through OMP_NUM_THREADS."""
    gpus = visible_gpus()
    if gpus:
        n = min(workers, len(gpus)) if workers else len(gpus)
        return gpus[:n], None
    n = workers or 1
    return [None] * n, (max(1, (os.cpu_count() or 1) // n) if n > 1 else None)


# ------------------------------------------------------------------------------------------------
# SLURM: a job list and an array script instead of running
# ------------------------------------------------------------------------------------------------

def write_slurm(runs: list[Run], out: str, options: list[str]) -> tuple[str, str]:
    """OUT/jobs.txt (one shell command per pending run) and OUT/sweep.sbatch (an array over its lines).

    Each array task runs line $SLURM_ARRAY_TASK_ID + 1 of jobs.txt. Default resources: 1 GPU, 8 CPUs;
    ``options`` ('--partition=gpu', '--time=02:00:00', '--gres=gpu:a100:1' …) are added as #SBATCH lines
    and win over the defaults of the same name.
    """
    for run in runs:
        prepare(run)
    cwd = os.getcwd()
    lines = [f"cd {shlex.quote(cwd)} && {shlex.join(command(run))} >> {shlex.quote(os.path.join(run.directory, 'run.log'))} 2>&1"
             for run in runs]
    jobs = os.path.abspath(os.path.join(out, "jobs.txt"))
    atomic_write_bytes(jobs, ("\n".join(lines) + "\n").encode() if lines else b"")
    defaults = {"--job-name": "depthfast", "--gres": "gpu:1", "--cpus-per-task": "8",
                "--output": os.path.abspath(os.path.join(out, "slurm-%A_%a.out"))}
    extra = []
    for option in options:
        key = option.split("=", 1)[0]
        if key in defaults and "=" in option:
            defaults[key] = option.split("=", 1)[1]
        else:
            extra.append(option)
    header = [f"#SBATCH {k}={v}" for k, v in defaults.items()] + [f"#SBATCH {o}" for o in extra]
    script = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --array=0-{max(0, len(lines) - 1)}",
        *header,
        "# Generated by `depthfast sweep --slurm`: one array task per line of jobs.txt.",
        "set -euo pipefail",
        f'CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(jobs)})',
        'eval "$CMD"',
        "",
    ])
    sbatch = os.path.abspath(os.path.join(out, "sweep.sbatch"))
    atomic_write_bytes(sbatch, script.encode())
    return jobs, sbatch


# ------------------------------------------------------------------------------------------------
# Memory estimate without a download: the model built on the meta device
# ------------------------------------------------------------------------------------------------

# Memory of each named GPU as the driver reports it (nvidia-smi MiB), and the share of it a run's
# estimate may take: the estimate leaves out the allocator's fragmentation and library workspaces.
GPUS = {"H100 80GB": 81_559 * 2**20, "H200 141GB": 143_771 * 2**20}
HEADROOM = 0.9
FSDP_SIZES = (2, 4, 8)  # processes (GPUs) of one node tried for runs that fit no single GPU


@dataclass
class Fit:
    """Where one run fits: ``per_gpu`` is the one-process estimate (bytes), ``plan`` a short verdict."""

    per_gpu: int | None
    fits: dict[str, bool]
    plan: str
    note: str = ""


_META_MODELS: dict[tuple[str, str], tuple] = {}


def _model_config(model: str):
    """The transformers config of a registry model or a local directory; None otherwise (a hub id
    outside the registry would need a download)."""
    from depthfast.registry import lookup

    spec = lookup(model)
    if spec is not None:
        return spec.config(), spec.num_layers
    if os.path.isdir(model):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        return config, None
    return None, None


def meta_model(model: str, objective: str):
    """(model on the meta device with the head of ``objective``, number of blocks), or (None, None).

    Parameters have their real shapes and dtype (float32, as depthfast loads them) but no storage, so
    building even Pythia-6.9B takes well under a second and no memory; cached per (model, objective).
    """
    key = (model, objective)
    if key not in _META_MODELS:
        import torch
        import transformers

        from depthfast.layers import discover_layers, family_of
        from depthfast.models import SequenceClassifier

        config, blocks = _model_config(model)
        if config is None:
            _META_MODELS[key] = (None, None)
            return _META_MODELS[key]
        architecture, _ = family_of(config)
        loader = {"cls": transformers.AutoModel, "mlm": transformers.AutoModelForMaskedLM,
                  "clm": transformers.AutoModelForCausalLM}[objective]
        with torch.device("meta"):
            built = loader.from_config(config)
            if objective == "cls":  # 2 labels: the head's size is negligible next to the model
                built = SequenceClassifier(built, 2, pooling="mean" if architecture == "encoder" else "last")
        if blocks is None:
            blocks = discover_layers(built).num_blocks
        _META_MODELS[key] = (built, blocks)
    return _META_MODELS[key]


def estimate_memory(cfg: RunConfig, num_processes: int = 1, shards: int = 1, theta0_on_device: bool | None = None):
    """``depthfast.memory.estimate_run_memory`` of a run, from a meta-device model; None when the model's
    config is not available offline. The control is assumed fused (a GPU with Triton: no weight snapshot)."""
    from depthfast.memory import estimate_run_memory

    model, blocks = meta_model(cfg.model, cfg.objective)
    if model is None:
        return None
    on_device = (not cfg.theta0_offload) if theta0_on_device is None else theta0_on_device
    return estimate_run_memory(model, cfg, blocks, num_processes, fused_control=True, shards=shards,
                               theta0_on_device=on_device)


def fit_of(cfg: RunConfig) -> Fit:
    """One GPU of each kind in ``GPUS`` (fits when the estimate ≤ HEADROOM × its memory); else the
    smallest FSDP size in ``FSDP_SIZES`` at which a process fits an H100 (then an H200). Under FSDP θ₀
    is sharded on the device (--theta0-offload is refused there)."""
    from depthfast.memory import human_bytes

    try:
        estimate = estimate_memory(cfg)
    except Exception as exc:  # an architecture the meta device cannot build: say so, never stop the listing
        return Fit(None, {}, "unknown", f"estimate failed: {type(exc).__name__}: {str(exc)[:80]}")
    if estimate is None:
        return Fit(None, {}, "unknown", "not in the registry: the config would need a download")
    fits = {gpu: estimate.total <= HEADROOM * size for gpu, size in GPUS.items()}

    def sharded_on(gpu: str) -> tuple[int, int] | None:
        for n in FSDP_SIZES:
            per_process = estimate_memory(cfg, num_processes=n, shards=n, theta0_on_device=True).total
            if per_process <= HEADROOM * GPUS[gpu]:
                return n, per_process
        return None

    def how(n: int, gpu: str, per_process: int) -> str:
        return (f"fsdp ×{n} {gpu}: {human_bytes(per_process)} per process (torchrun --nproc_per_node {n} "
                f"-m depthfast.run --parallel fsdp --config …"
                f"{'; theta0_offload false there: refused under fsdp' if cfg.theta0_offload else ''})")

    first = next((gpu for gpu, ok in fits.items() if ok), None)
    if first is not None:
        note = ""
        if not all(fits.values()):  # the alternative on the smaller GPU
            small = next(gpu for gpu, ok in fits.items() if not ok)
            alt = sharded_on(small)
            note = "or " + how(alt[0], small, alt[1]) if alt else ""
        return Fit(estimate.total, fits, f"1× {first}", note)
    for gpu in GPUS:
        found = sharded_on(gpu)
        if found:
            return Fit(estimate.total, fits, f"fsdp ×{found[0]} {gpu}", how(found[0], gpu, found[1]))
    return Fit(estimate.total, fits, f"too big for fsdp ×{FSDP_SIZES[-1]}")


def fit_summary(runs: list[Run], fits: list[Fit]) -> str:
    """One line per plan: how many runs, and which models."""
    plans: dict[str, list[str]] = {}
    for run, fit in zip(runs, fits):
        plans.setdefault(fit.plan, [])
        if run.config.model not in plans[fit.plan]:
            plans[fit.plan].append(run.config.model)
    lines = [f"memory (estimate per process ≤ {HEADROOM:.0%} of the GPU; θ₀ on the device unless --theta0-offload):"]
    for plan, models in plans.items():
        count = sum(f.plan == plan for f in fits)
        lines.append(f"  {plan}: {count} runs ({', '.join(models)})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Tables and the entry point
# ------------------------------------------------------------------------------------------------

def format_table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("─" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def summary(runs: list[Run]) -> str:
    rows = [[r.name, r.status, f"{r.seconds:.1f}" if r.seconds else "", r.note or r.reason] for r in runs]
    counts = {s: sum(r.status == s for r in runs) for s in ("ok", "failed", "skipped", "pending")}
    tail = f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts["pending"]:
        tail += f", {counts['pending']} not run (interrupted)"
    return format_table(["run", "status", "seconds", "note"], rows) + "\n" + tail


def sweep(grid_path: str, out: str | None = None, workers: int | None = None, dry_run: bool = False,
          slurm: bool = False, slurm_options: list[str] | None = None, echo=print) -> int:
    """Expand, plan, then run (or list, or write a SLURM array). Exit code: 0, or 1 if any run failed."""
    grid = load_grid(grid_path)
    out = out or grid.out
    if not out:
        raise DepthfastError(f"{grid_path}: no output directory; set 'out:' in the grid file or pass --out")
    runs = plan(build_runs(grid, out))
    pending = [r for r in runs if r.action == "run"]
    if dry_run:
        from depthfast.memory import human_bytes

        fits = [fit_of(r.config) for r in runs]
        gpus = list(GPUS)
        echo(format_table(["run", "action", "reason", "resume", "memory (1 GPU)", *[f"fits {g}" for g in gpus],
                           "plan", "note"],
                          [[r.name, r.action, r.reason, "yes" if r.resume else "",
                            human_bytes(f.per_gpu) if f.per_gpu is not None else "?",
                            *[("yes" if f.fits[g] else "no") if f.fits else "?" for g in gpus], f.plan, f.note]
                           for r, f in zip(runs, fits)]))
        echo(fit_summary(runs, fits))
        echo(f"{len(runs)} runs: {len(pending)} to run, {len(runs) - len(pending)} finished (skipped); "
             f"directory {out}")
        return 0
    os.makedirs(out, exist_ok=True)
    if slurm:
        jobs, sbatch = write_slurm(pending, out, slurm_options or [])
        echo(f"{len(pending)} runs to do ({len(runs) - len(pending)} finished, skipped): job list {jobs}\n"
             f"submit with: sbatch {sbatch}")
        return 0
    slots, threads = slots_for(workers)
    echo(f"sweep: {len(runs)} runs, {len(pending)} to run, {len(runs) - len(pending)} skipped; "
         f"{len(slots)} worker(s){' on GPUs ' + ','.join(slots) if slots[0] is not None else ' on the CPU'}; {out}")
    interrupted = False
    try:
        _Pool(slots, threads, echo).run(pending)
    except KeyboardInterrupt:
        interrupted = True
    table = summary(runs)
    echo(table)
    atomic_write_csv(os.path.join(out, "sweep_summary.csv"), ["run", "status", "seconds", "note", "directory"],
                     [[r.name, r.status, round(r.seconds, 2), r.note or r.reason, r.directory] for r in runs])
    if interrupted:
        echo("depthfast: sweep interrupted; finished runs are kept and will be skipped next time")
        return 130
    return 1 if any(r.status == "failed" for r in runs) else 0
