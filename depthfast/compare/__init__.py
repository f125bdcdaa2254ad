"""``depthfast compare BASE TUNED``: the depth profile between two existing checkpoints, no training.

BASE and TUNED are hub ids or local directories (``from_pretrained``); TUNED may also be a PEFT LoRA
adapter directory (adapter_config.json), applied on BASE and merged (depthfast.adapters). The probe is
built exactly as a run builds it (depthfast.data.load_task, depthfast.batches.probe_batches: same
dataset flags, seed and sizes give the same probe texts as a clm or mlm run), and measured with
depthfast.probe:

    change_ℓ        = 1 − CKA(H_ℓ(BASE), H_ℓ(TUNED))            ℓ = 0 (embedding output) … L
    weight_change_g = ‖W_g(TUNED) − W_g(BASE)‖_F / ‖W_g(BASE)‖_F  per role group, float64 sums, only
                      when both models have the same parameter names and shapes

Writes ``out``: config.json (the effective CompareConfig), profile.csv, profile.png, results.json (last;
every file atomically). results.json has a run's schema plus ``"source": "compare"``; the train-only
fields are null: ``control``, ``train``, ``mean_update_ratio``, ``trajectory``, ``resumed_from_step``,
and ``metrics["gradient_alignment_distance"]``.

Objective (how the probe loss is scored; the profile itself compares blocks and does not depend on it
except through the probe's masked copy): ``clm`` (decoders) and ``mlm`` (encoders) score each
checkpoint with its own LM head and are refused when a checkpoint has no such head; ``none`` scores
nothing and compares the backbones; ``auto`` (default) is clm for decoders, mlm for encoders whose
checkpoints both carry their MLM head, else none. ``cls`` is refused: a classification head is fresh
in every run and is not part of a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

from depthfast.config import DEFAULT_MODEL, PRECISIONS, TIED_EMBEDDINGS
from depthfast.errors import DepthfastError

COMPARE_OBJECTIVES = ("auto", "none", "mlm", "clm")
OFFLOAD = ("none", "base", "tuned")


@dataclass
class CompareConfig:
    """The depth profile between two checkpoints (see the module docstring).

    base, tuned: hub ids or local directories; tuned may be a PEFT LoRA adapter directory.
    offload: which model (none, base, tuned) stays in host memory, its weights streamed to the device
    module by module during the measurement (as run's --theta0-offload does for θ₀).
    label_column is accepted for the dataset flags' sake; no objective of compare reads labels.
    """

    base: str = DEFAULT_MODEL
    tuned: str = ""
    out: str = "runs/compare"
    objective: str = "auto"
    dataset: str = "builtin:pydoc"
    dataset_config: str = ""
    text_column: str = "text"
    label_column: str = "label"
    probe_size: int = 192
    min_probe_size: int = 16
    probe_batch_size: int = 32
    max_length: int = 128
    mlm_probability: float = 0.15
    pooling: str = "token"
    estimator: str = "exact"
    tied_embeddings: str = "head"
    precision: str = "fp32"
    device: str = "auto"
    offload: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("base", "tuned", "out", "dataset"):  # pathlib paths are welcome where names are strings
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))

    def validate(self) -> "CompareConfig":
        from depthfast.cka import ESTIMATORS, POOLINGS

        checks = [
            (bool(self.tuned), "compare needs TUNED: a hub id, a local checkpoint or a PEFT adapter directory"),
            (bool(self.base), "compare needs BASE: a hub id or a local checkpoint directory"),
            (self.objective != "cls", "objective 'cls' needs a trained classification head, and a checkpoint has none "
                                      "(a run's head is fresh); use none (representational change only), mlm or clm"),
            (self.objective in COMPARE_OBJECTIVES,
             f"objective must be one of {COMPARE_OBJECTIVES}; got {self.objective!r}"),
            (self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}; got {self.pooling!r}"),
            (self.estimator in ESTIMATORS, f"estimator must be one of {ESTIMATORS}; got {self.estimator!r}"),
            (self.tied_embeddings in TIED_EMBEDDINGS,
             f"tied embeddings must be one of {TIED_EMBEDDINGS}; got {self.tied_embeddings!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}; got {self.precision!r}"),
            (self.offload in OFFLOAD, f"offload must be one of {OFFLOAD}; got {self.offload!r}"),
            (self.max_length >= 8, f"max length must be ≥ 8 tokens; got {self.max_length}"),
            (self.probe_batch_size >= 1, f"probe batch size must be ≥ 1; got {self.probe_batch_size}"),
            (self.min_probe_size >= 4, f"min probe size must be ≥ 4 (CKA needs > 3 samples); got {self.min_probe_size}"),
            (self.probe_size >= self.min_probe_size, f"probe size {self.probe_size} < min probe size {self.min_probe_size}"),
            (0 < self.mlm_probability < 1, f"mlm probability must be in (0, 1); got {self.mlm_probability}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DepthfastError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompareConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DepthfastError(f"unknown compare config key(s): {', '.join(unknown)}; known keys: {', '.join(known)}")
        values = {}
        for name, value in data.items():
            kind = type(getattr(cls(), name))
            if kind is bool and not isinstance(value, bool):
                raise DepthfastError(f"compare config key {name!r} needs true or false; got {value!r}")
            try:
                values[name] = kind(value) if not isinstance(value, kind) else value
            except (TypeError, ValueError):
                raise DepthfastError(f"compare config key {name!r} needs a {kind.__name__}; got {value!r}") from None
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str) -> "CompareConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DepthfastError(f"config file {path!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise DepthfastError(f"config file {path!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DepthfastError(f"config file {path!r} must hold a JSON object")
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------------------
# Loading the two sides
# ------------------------------------------------------------------------------------------------

def _lm_class(architecture: str):
    """The family's LM class: every checkpoint loads through it, so both sides have the same names."""
    import transformers

    return transformers.AutoModelForMaskedLM if architecture == "encoder" else transformers.AutoModelForCausalLM


def _from_pretrained(name: str, architecture: str):
    """(model, missing checkpoint keys) of ``name`` loaded as the family's LM class, on the host, fp32."""
    import torch

    from depthfast.hub import hub_reachable
    from depthfast.models import resolve_model_path

    path = resolve_model_path(name)
    # Offline, a hub id is looked up in the local cache only (as depthfast.models does).
    offline = {} if os.path.isdir(path) or hub_reachable() else {"local_files_only": True}
    try:
        model, info = _lm_class(architecture).from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                              **offline)
    except (OSError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DepthfastError(f"cannot load the weights of {name!r}: {text}") from None
    return model, sorted(info.get("missing_keys") or [])


def _backbone_module():
    import torch
    from torch import nn

    class BackboneOnly(nn.Module):
        """A checkpoint's backbone (blocks, embeddings, final norm; no LM head) for ``--objective none``.

        forward(input_ids, attention_mask, labels) runs the backbone and scores nothing: the probe's
        labels are all −100, so measure_probe records no loss (null in results.json).
        """

        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone  # the attribute ModelLayers looks for (as on SequenceClassifier)
            self.config = backbone.config

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None):
            self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            return None

    return BackboneOnly


def _same(a: str, b: str) -> bool:
    """Whether two model names denote the same model (the same string, or the same resolved directory)."""
    from depthfast.models import resolve_model_path

    if a == b:
        return True
    try:
        ra, rb = resolve_model_path(a), resolve_model_path(b)
    except DepthfastError:
        return False
    return os.path.isdir(ra) and os.path.isdir(rb) and os.path.realpath(ra) == os.path.realpath(rb)


def _head_missing(missing: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """(missing head keys, missing backbone keys) of a checkpoint loaded as its LM class."""
    backbone = [k for k in missing if k.startswith(prefix + ".")]
    return [k for k in missing if k not in backbone], backbone


def _load_side(name: str, architecture: str, adapter: str | None, base_name: str):
    """(model as the LM class, missing keys): the checkpoint ``name``, or BASE with the adapter merged."""
    from depthfast.adapters import load_adapter, saved_keys

    model, missing = _from_pretrained(name, architecture)
    if adapter is None:
        return model, missing
    prefix = model.base_model_prefix
    # An adapter made on the LM class names its modules under the backbone's prefix
    # ("base_model.model.transformer.h.0…"); one made on the bare backbone (AutoModel) does not.
    on_lm = any(k.startswith(f"base_model.model.{prefix}.") for k in saved_keys(adapter))
    if on_lm:
        return load_adapter(model, adapter, base_name), missing
    load_adapter(model.base_model, adapter, base_name)  # merged in place inside ``model``
    return model, missing


def _param_shapes(model) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _layers_or_error(model, which: str, name: str):
    from depthfast.layers import discover_layers, prepare_for_measurement

    prepare_for_measurement(model)
    try:
        return discover_layers(model)
    except DepthfastError as exc:
        raise DepthfastError(f"{which} {name!r}: {exc}") from None


def _block_count(config) -> int | None:
    value = getattr(config, "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


def _probe(cfg: CompareConfig, objective: str, tokenizer, texts: list[str]):
    """The probe batches of a run with this objective; under ``none`` clm's batches with every label −100."""
    from depthfast.batches import probe_batches

    batches = probe_batches("clm" if objective == "none" else objective, tokenizer, texts, None,
                            cfg.probe_batch_size, cfg.max_length, cfg.mlm_probability, cfg.seed)
    if objective == "none":
        for batch in batches:
            batch["labels"] = batch["labels"].new_full(batch["labels"].shape, -100)
    return batches


def _check_out(out: str) -> None:
    """Refuse to overwrite a run's results with a compare's (a compare may replace an earlier compare)."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            source = json.load(f).get("source")
    except (OSError, ValueError, AttributeError):
        source = None
    if source != "compare":
        raise DepthfastError(f"--out {out!r} already holds results that are not a compare's (results.json); "
                             "choose another directory")


# ------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------

def compare(cfg: CompareConfig, progress: bool = True) -> dict:
    """Measure the profile between ``cfg.base`` and ``cfg.tuned``, write ``cfg.out``; return results.json's dict."""
    import torch

    from depthfast.adapters import adapter_base, is_adapter_dir, require_peft
    from depthfast.data import load_task
    from depthfast.distributed import offload_to_host
    from depthfast.layers import family_of
    from depthfast.probe import measure_probe, weight_changes
    from depthfast.metrics import locality_gradient
    from depthfast.models import check_objective, load_config, load_tokenizer
    from depthfast.run import run_metrics, seed_everything
    from depthfast.train import autocast, resolve_device

    started = time.perf_counter()
    cfg.validate()
    adapter = cfg.tuned if is_adapter_dir(cfg.tuned) else None
    if adapter is not None:
        require_peft()
        recorded = adapter_base(adapter)
        if recorded and not _same(recorded, cfg.base):
            raise DepthfastError(f"adapter {cfg.tuned!r} was made on {recorded!r}, not on BASE {cfg.base!r}")
    elif cfg.tuned.startswith((".", "/", "~")) and not os.path.exists(cfg.tuned):
        raise DepthfastError(f"TUNED {cfg.tuned!r} does not exist")
    _check_out(cfg.out)
    device = resolve_device(cfg.device)

    base_config = load_config(cfg.base)
    tuned_config = base_config if adapter is not None else load_config(cfg.tuned)
    if base_config.model_type != tuned_config.model_type:
        raise DepthfastError(f"BASE {cfg.base!r} is a {base_config.model_type!r} model and TUNED {cfg.tuned!r} a "
                             f"{tuned_config.model_type!r} one: compare needs one architecture")
    architecture, _ = family_of(base_config)
    counts = _block_count(base_config), _block_count(tuned_config)
    if None not in counts and counts[0] != counts[1]:
        raise DepthfastError(f"BASE {cfg.base!r} has {counts[0]} blocks and TUNED {cfg.tuned!r} {counts[1]}: "
                             "compare needs the same depth")
    objective = cfg.objective
    if objective in ("mlm", "clm"):
        check_objective(base_config, objective)
    tokenizer = load_tokenizer(cfg.base, "mlm" if objective == "mlm" else "clm")  # mlm: one line if no mask token
    task = load_task(cfg.dataset, "clm", probe_size=cfg.probe_size, min_probe_size=cfg.min_probe_size,
                     seed=cfg.seed, text_column=cfg.text_column, label_column=cfg.label_column,
                     dataset_config=cfg.dataset_config)  # every objective of compare is unlabelled: clm's probe
    # The probe as BASE's tokenizer splits it; TUNED's own tokenizer, if it has one, must split it alike.
    check_batches = _probe(cfg, "clm", tokenizer, task.probe_texts)
    if adapter is None:
        _check_tokenizer(cfg, check_batches, task.probe_texts)

    seed_everything(cfg.seed)
    base, base_missing = _load_side(cfg.base, architecture, None, cfg.base)
    tuned, tuned_missing = _load_side(cfg.base if adapter else cfg.tuned, architecture, adapter, cfg.base)
    prefix = base.base_model_prefix
    heads = {}
    for which, name, missing in (("BASE", cfg.base, base_missing), ("TUNED", cfg.tuned, tuned_missing)):
        head, backbone = _head_missing(missing, prefix)
        if backbone:
            raise DepthfastError(f"{which} {name!r} lacks weights of its backbone ({len(backbone)} tensors, first: "
                                 f"{backbone[0]}): not a complete checkpoint")
        heads[which] = head
    lm_kind = "mlm" if architecture == "encoder" else "clm"
    if objective == "auto":
        scorable = not heads["BASE"] and not heads["TUNED"] and (lm_kind == "clm" or tokenizer.mask_token is not None)
        objective = lm_kind if scorable else "none"
    elif objective == lm_kind:
        for which, name in (("BASE", cfg.base), ("TUNED", cfg.tuned)):
            if heads[which]:
                raise DepthfastError(f"objective {objective!r} scores the checkpoints' own LM heads, and {which} "
                                     f"{name!r} has none ({heads[which][0]} missing); use --objective none")
    if objective == "none":
        wrap = _backbone_module()
        base, tuned = wrap(base.base_model), wrap(tuned.base_model)
    base_layers = _layers_or_error(base, "BASE", cfg.base)
    tuned_layers = _layers_or_error(tuned, "TUNED", cfg.tuned)
    if base_layers.num_blocks != tuned_layers.num_blocks:
        raise DepthfastError(f"BASE {cfg.base!r} has {base_layers.num_blocks} blocks and TUNED {cfg.tuned!r} "
                             f"{tuned_layers.num_blocks}: compare needs the same depth")
    probe = check_batches if objective in ("clm",) else _probe(cfg, objective, tokenizer, task.probe_texts)

    # Weight change on the host, before anything moves: both state dicts must match name for name.
    base_shapes, tuned_shapes = _param_shapes(base), _param_shapes(tuned)
    note = None
    if base_shapes == tuned_shapes:
        group_changes = weight_changes(
            [(n, [p.detach() for p in ps]) for n, ps in base_layers.param_groups(cfg.tied_embeddings)],
            [(n, [p.detach() for p in ps]) for n, ps in tuned_layers.param_groups(cfg.tied_embeddings)])
    else:
        group_changes = None
        note = _mismatch_note(base_shapes, tuned_shapes)
        print(f"depthfast: {note}", file=sys.stderr)
    for which, model in (("base", base), ("tuned", tuned)):
        if cfg.offload == which:
            offload_to_host(model, device)
        else:
            model.to(device)
    with autocast(cfg, device):
        measured = measure_probe(base, tuned, base_layers, tuned_layers, probe, device, cfg.pooling, cfg.estimator,
                                 progress)
    depths = base_layers.normalized_depths
    changes = [1.0 - c for c in measured.cka]
    slope = locality_gradient(depths[1:], changes[1:])
    effective = dataclasses.replace(cfg, objective=objective)
    metrics = run_metrics(effective, task, base, measured, depths, changes, None)
    results = write_compare_results(effective, base_layers, task, measured, group_changes, changes, slope, metrics,
                                    note=note, adapter=adapter, wall_seconds=time.perf_counter() - started,
                                    torch_version=torch.__version__)
    return results


def _check_tokenizer(cfg: CompareConfig, batches: list[dict], texts: list[str]) -> None:
    from depthfast.models import load_tokenizer

    try:
        tuned_tokenizer = load_tokenizer(cfg.tuned, "clm")
    except DepthfastError:
        return  # TUNED ships no tokenizer (e.g. weights only): BASE's is the one it was tuned with
    theirs = _probe(cfg, "clm", tuned_tokenizer, texts)
    same = len(theirs) == len(batches) and all(
        a["input_ids"].shape == b["input_ids"].shape and bool((a["input_ids"] == b["input_ids"]).all())
        for a, b in zip(batches, theirs))
    if not same:
        raise DepthfastError(f"the tokenizers of BASE {cfg.base!r} and TUNED {cfg.tuned!r} split the probe texts "
                             "differently; compare feeds both models the same token ids")


def _mismatch_note(base: dict, tuned: dict) -> str:
    only = sorted(set(base) ^ set(tuned))
    shaped = sorted(n for n in set(base) & set(tuned) if base[n] != tuned[n])
    what = (f"parameter {shaped[0]} is {base[shaped[0]]} in BASE and {tuned[shaped[0]]} in TUNED" if shaped
            else f"parameter {only[0]} is in only one of them")
    return (f"BASE and TUNED do not share parameter names and shapes ({what}): weight change not measured, "
            "representational change only")


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------

def write_compare_results(cfg: CompareConfig, layers, task, measured, group_changes: dict | None,
                          changes: list[float], slope: float | None, metrics: dict, note: str | None,
                          adapter: str | None, wall_seconds: float, torch_version: str) -> dict:
    """config.json, profile.csv, profile.png, then results.json, each atomically; returns the results."""
    import depthfast
    from depthfast.adapters import adapter_config
    from depthfast.plotting import plot_profile
    from depthfast.results import atomic_write_csv, atomic_write_json, profile_rows

    depths = layers.normalized_depths
    rows = profile_rows(layers.layer_names, depths, measured.cka)
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
        "model_type": layers.model_type,
        "architecture": layers.architecture,
        "block_type": layers.block_type,
        "num_blocks": layers.num_blocks,
        "objective": cfg.objective,
        "control": None,
        "estimator": cfg.estimator,
        "pooling": cfg.pooling,
        "tied_embeddings": layers.tied_embeddings,
        "tied_embeddings_group": layers.tied_group(cfg.tied_embeddings),
        "param_groups": [{"name": name, "tensors": len(ps), "elements": sum(p.numel() for p in ps)}
                         for name, ps in layers.param_groups(cfg.tied_embeddings)],
        "layers": rows,
        "locality_gradient": slope,
        "metrics": metrics,
        "weight_change_measured": group_changes is not None,
        "weight_change_note": note,
        "group_weight_change": group_changes,
        "mean_update_ratio": None,
        "probe": {
            "texts": len(task.probe_texts),
            "samples": measured.num_samples,
            "loss_base": _finite(measured.loss_base),  # NaN (objective none: nothing scored) → null
            "loss_tuned": _finite(measured.loss_tuned),
            "accuracy_base": measured.accuracy_base,
            "accuracy_tuned": measured.accuracy_tuned,
        },
        "train": None,
        "trajectory": None,
        "resumed_from_step": None,
        "num_processes": 1,
        "wall_seconds": wall_seconds,
    }
    out = cfg.out
    atomic_write_json(os.path.join(out, "config.json"), cfg.to_dict())
    atomic_write_csv(os.path.join(out, "profile.csv"), ["layer", "depth", "cka", "change", "weight_change"],
                     [[r["layer"], r["depth"], r["cka"], r["change"], r["weight_change"]] for r in rows])
    plot_profile(os.path.join(out, "profile.png"), depths, changes,
                 [float("nan") if r["weight_change"] is None else r["weight_change"] for r in rows],
                 f"{cfg.base} → {cfg.tuned} · {cfg.objective} · compare", slope)
    atomic_write_json(os.path.join(out, "results.json"), results)
    return results


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def print_compare(results: dict, file=None) -> None:
    """The profile as a terminal table, the locality gradient and the probe scores."""
    from depthfast.results import weight_cell

    file = file or sys.stdout
    print(f"\n{results['base_model']} → {results['tuned_model']}  ({results['model_type']}, "
          f"{results['block_type']} blocks)  objective {results['objective']}", file=file)
    header = f"{'layer':<12}{'depth':>7}{'1 − CKA':>12}{'‖ΔW‖/‖W₀‖':>13}"
    print(header, file=file)
    print("─" * len(header), file=file)
    groups = {g["name"] for g in results["param_groups"]}
    for row in results["layers"]:
        weight = (weight_cell(row["weight_change"], row["layer"] in groups) if results["weight_change_measured"]
                  else "not measured")
        print(f"{row['layer']:<12}{row['depth']:>7.3f}{row['change']:>12.4e}{weight:>13}", file=file)
    slope = results["locality_gradient"]
    print(f"locality gradient (OLS slope of 1 − CKA on depth, blocks only): "
          f"{'n/a' if slope is None else f'{slope:+.4e}'}", file=file)
    probe = results["probe"]
    line = f"probe: {probe['texts']} texts, {probe['samples']} samples"
    if probe["loss_base"] is not None:  # the objective scored a loss
        line += f"; loss {probe['loss_base']:.3f} → {probe['loss_tuned']:.3f}"
    print(line + f"; wall {results['wall_seconds']:.1f} s", file=file)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

HELP = {
    "out": "results directory (written atomically; a directory holding a run's results is refused)",
    "objective": "how the probe loss is scored: auto (clm for decoders, mlm for encoders with their MLM head, "
                 "else none), none (backbones, no loss), mlm, clm",
    "offload": "keep one model (base or tuned) in host memory, its weights streamed to the device per module "
               "during the measurement",
    "dataset": "builtin:pydoc (offline), a hub dataset name, or a local .txt/.json/.jsonl/.csv/.parquet file or "
               "directory (the probe: its validation split, else test, else a seeded hold-out, as a clm run's)",
    "tied_embeddings": "group of a tied input/output matrix: head (default) or embeddings (as in run)",
}
# --objective has no argparse choices: validate() refuses cls with the reason, not just "invalid choice".
CHOICES = {"offload": OFFLOAD, "precision": PRECISIONS,
           "tied_embeddings": TIED_EMBEDDINGS}


def build_parser() -> argparse.ArgumentParser:
    from depthfast.cka import ESTIMATORS, POOLINGS

    choices = {**CHOICES, "pooling": POOLINGS, "estimator": ESTIMATORS}
    parser = argparse.ArgumentParser(
        prog="depthfast compare", description="The depth profile between two existing checkpoints, no training: "
                                              "1 − CKA per layer on the probe set, and the weight change per group.")
    parser.add_argument("base", help="BASE: hub id or local checkpoint directory")
    parser.add_argument("tuned", help="TUNED: hub id, local checkpoint directory, or PEFT (LoRA) adapter directory")
    parser.add_argument("--config", help="JSON file of CompareConfig fields (unknown keys are an error)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for f in fields(CompareConfig):
        if f.name in ("base", "tuned"):
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                            choices=choices.get(f.name), help=HELP.get(f.name, f"default: {f.default}"))
    return parser


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    base = CompareConfig.from_json_file(args.config) if args.config else CompareConfig()
    overrides = {f.name: getattr(args, f.name) for f in fields(CompareConfig) if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **overrides).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = config_from_args(args)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # missing heads etc. are checked and said by compare itself
        hf_logging.disable_progress_bar()
        results = compare(cfg, progress=not args.quiet)
        print_compare(results)
        print(f"results: {os.path.abspath(cfg.out)}/ (results.json, profile.csv, profile.png, config.json)")
    except DepthfastError as exc:
        print(f"depthfast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthfast: interrupted; earlier results in --out are untouched", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
