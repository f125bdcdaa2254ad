"""The typed configuration of one run. Unknown keys fail loudly; the effective config is saved with the results."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

from depthfast.constants import ESTIMATORS, POOLINGS, TIED_EMBEDDINGS
from depthfast.errors import DepthfastError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
OBJECTIVES = ("cls", "mlm", "clm")
CONTROLS = ("none", "equal-step")
PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp", "hsdp")
OPTIMIZERS = ("adamw", "sgd")


def read_data_file(path: str, what: str, fmt: str = "json"):
    """The parsed contents of a JSON or YAML file (``fmt``), or one clear error naming ``what`` it is
    ("config file", "grid file"): missing, unreadable or not valid."""
    try:
        with open(path) as f:
            if fmt == "yaml":
                import yaml  # optional: only a YAML file needs it

                try:
                    return yaml.safe_load(f)
                except yaml.YAMLError as exc:
                    raise ValueError(" ".join(str(exc).split())) from None
            return json.load(f)
    except FileNotFoundError:
        raise DepthfastError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise DepthfastError(f"{what} {path!r} is a directory, not a file") from None
    except ValueError as exc:  # json.JSONDecodeError is one
        raise DepthfastError(f"{what} {path!r} is not valid {fmt.upper()}: {exc}") from None


def flag(default, help: str):
    """A config field with its command-line help: the one place a flag is described (``--help``,
    ``flag_reference`` → docs/cli.md). Metadata only: config.json and sweep hashes are unchanged."""
    return field(default=default, metadata={"help": help})


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "off" if not value else "on"
    return "none" if value == "" else f"`{value}`"


def flag_reference(cls, skip: tuple = ()) -> str:
    """The markdown table of ``cls``'s flags (flag | default | meaning), one row per field with help
    metadata, in field order: docs/cli.md holds it verbatim (tests/test_cli.py checks)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        rows.append(f"| `--{f.name.replace('_', '-')}` | {_default_text(f.default)} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


class TypedConfig:
    """What every typed config (a dataclass with defaults: RunConfig, CompareConfig) shares: a dict
    round trip in which unknown keys fail loudly and each value must have (or convert to) its field's
    type (the default's), and reading a JSON file. Errors name ``config_name``."""

    config_name = "config"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise DepthfastError(f"unknown {cls.config_name} key(s): {', '.join(unknown)}; known keys: {', '.join(known)}")
        values = {}
        for name, value in data.items():
            kind = type(getattr(cls(), name))
            if kind is bool and not isinstance(value, bool):
                raise DepthfastError(f"{cls.config_name} key {name!r} needs true or false; got {value!r}")
            try:
                values[name] = kind(value) if not isinstance(value, kind) else value
            except (TypeError, ValueError):
                raise DepthfastError(f"{cls.config_name} key {name!r} needs a {kind.__name__}; got {value!r}") from None
        return cls(**values)

    @classmethod
    def add_flags(cls, parser, help: dict, choices: dict, skip: tuple = ()) -> None:
        """One flag per field (``--field-name``; a bool field is a switch), default None = not given."""
        for f in fields(cls):
            if f.name in skip:
                continue
            text = help.get(f.name) or f.metadata.get("help") or "(no description)"
            flag, text = f"--{f.name.replace('_', '-')}", f"{text} (default: {_default_text(f.default).strip('`')})"
            if isinstance(f.default, bool):
                parser.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=text)
            else:
                parser.add_argument(flag, dest=f.name, type=type(f.default), default=None,
                                    choices=choices.get(f.name), help=text)

    @classmethod
    def from_args(cls, args):
        """--config's JSON file (or the defaults), overridden by every flag given; validated."""
        base = cls.from_json_file(args.config) if args.config else cls()
        overrides = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        return dataclasses.replace(base, **overrides).validate()

    @classmethod
    def from_json_file(cls, path: str):
        data = read_data_file(path, "config file")
        if not isinstance(data, dict):
            raise DepthfastError(f"config file {path!r} must hold a JSON object")
        return cls.from_dict(data)


@dataclass
class RunConfig(TypedConfig):
    """One fine-tuning run and its depth-profile measurement.

    model: HF hub id or local directory. objective: cls (sequence classification, fresh head),
    mlm (masked LM, encoders), clm (causal LM, decoders). control: none or equal-step.
    optimizer: adamw, or sgd (with ``momentum``; it needs a far larger ``lr`` than AdamW's default).
    dataset: "builtin:pydoc" (Python's documentation, offline), a hub name or a local file;
    dataset_config: the hub dataset's configuration name, if it has several (``sst2`` of ``nyu-mll/glue``).
    tied_embeddings: the group of a tied input/output matrix (LM head whose weight is the token
    embedding): "head" (the output projection: free under the control, not in layer 0's weight change)
    or "embeddings" (equalized with the profile's layers, counted in layer 0's weight change).
    """

    model: str = flag(DEFAULT_MODEL, "HF hub id or local directory (default: the shipped all-MiniLM-L6-v2)")
    objective: str = flag("cls",
                "cls: sequence classification (fresh head); mlm: masked LM (encoders); clm: causal LM (decoders)")
    control: str = flag("none",
                "none: the optimizer's own steps; equal-step: every group's ‖ΔW‖/‖W‖ made equal after each step")
    dataset: str = flag("builtin:pydoc",
                "builtin:pydoc (offline), a hub dataset name, or a local .txt/.json/.jsonl/.csv/.parquet file")
    dataset_config: str = flag("", "configuration name of a hub dataset that has several (e.g. sst2 of nyu-mll/glue)")
    text_column: str = flag("text", "column holding the text in a local or hub dataset")
    label_column: str = flag("label", "column holding the label (cls); class ids follow the sorted label names")
    steps: int = flag(60, "optimizer steps of fine-tuning (linear warm-up, then linear decay to 0)")
    optimizer: str = flag("adamw",
                "adamw (default), or sgd with --momentum (SGD needs a far larger --lr, e.g. 1e-2, and usually "
                "--weight-decay 0: with momentum, decay shrinks every weight by ~lr·wd/(1 − momentum) per step)")
    lr: float = flag(5e-5, "peak learning rate")
    momentum: float = flag(0.9, "SGD momentum (default 0.9; ignored by adamw)")
    weight_decay: float = flag(0.01,
                "decoupled weight decay, on matrices only (see Weight decay in docs/measurement.md)")
    warmup_steps: int = flag(6, "steps of linear learning-rate warm-up")
    batch_size: int = flag(16,
                "texts per optimizer step: one global batch, split over the processes and --grad-accum micro-steps")
    max_length: int = flag(128, "tokens per text at most (truncation); checked against the model's position limit")
    seed: int = flag(0,
                "seeds the split, the head, the batches and the masking: runs with one seed are paired across "
                "controls")
    probe_size: int = flag(192, "held-out probe texts the profile is measured on (at most half the data)")
    min_probe_size: int = flag(16, "refuse a run whose probe set would be smaller than this")
    probe_batch_size: int = flag(32, "probe texts per forward of the measurement")
    pooling: str = flag("token", "token: every real token is a CKA sample; mean: one mean-pooled sample per text")
    estimator: str = flag("exact",
                "exact: feature-space CKA over the whole probe set; unbiased: minibatch CKA (HSIC₁)")
    mlm_probability: float = flag(0.15, "share of tokens masked under --objective mlm")
    equal_step_target: str = flag("mean",
                "the ratio every group's ‖ΔW‖/‖W‖ is set to under equal-step: mean of the group ratios, or a fixed "
                "number")
    equal_step_head: bool = flag(False,
                "also equalize the head group (task head, final norm, pooler); by default the control equalizes the "
                "profile's layers (embeddings, blocks) and the head keeps the optimizer's update")
    tied_embeddings: str = flag("head",
                "group of a tied input/output matrix (GPT-2, OPT, Mamba, BERT's MLM decoder): head (default: the "
                "output projection, free under the control like an untied LM head, not in layer 0's weight change) or"
                " embeddings (equalized with the layers, counted in layer 0's weight change)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:1 …")
    precision: str = flag("fp32",
                "fp32, or bf16: bf16 autocast over fp32 weights and optimizer states (measured in the same precision)")
    parallel: str = flag("ddp",
                "with several processes: ddp (replicated model), fsdp (FSDP2, parameters sharded by block over all "
                "processes) or hsdp (sharded within groups of --shard-size processes, replicated across them)")
    shard_size: int = flag(0,
                "hsdp: processes per shard group (default 0: the processes of one node, LOCAL_WORLD_SIZE)")
    theta0_offload: bool = flag(False,
                "keep θ₀ (the pretrained copy measured against) in host memory: its weights stream to the device "
                "module by module during each measurement, saving one model's worth of device memory (one process or "
                "ddp)")
    grad_accum: int = flag(1, "micro-steps per optimizer step (the batch is split; the control acts once per step)")
    gradient_checkpointing: bool = flag(False,
                "recompute block activations in the backward pass (less memory, more time)")
    tensorboard: bool = flag(False,
                "also log loss, lr and update ratios to OUT/tensorboard (needs the tensorboard package)")
    no_memory_check: bool = flag(False, "start even when the memory estimate exceeds the device's memory")
    no_objective_distance: bool = flag(False,
                "skip the gradient-alignment distance at θ₀ (it loads the pretraining-style head)")
    out: str = flag("runs/default",
                "results directory (written atomically; locked while the run lasts; a finished run in it is refused "
                "unless --overwrite)")
    checkpoint_every: int = flag(50,
                "save a resumable checkpoint every N steps into --out (0: never; removed after success)")
    keep_checkpoints: bool = flag(False, "keep the last checkpoint after a successful run")
    measure_at: str = flag("", "comma-separated steps at which to measure the profile during training (0 = before)")
    lora_r: int = flag(0,
                "LoRA rank: train rank-r adapters (peft) on the blocks' linear layers, base weights frozen (0: full "
                "fine-tuning); update ratios and --control equal-step act on the merged weights")
    lora_alpha: float = flag(0.0, "LoRA α; the merged update is (α/r)·B·A (default 0: α = r, scale 1)")
    lora_targets: str = flag("", "comma-separated names of the blocks' linear layers to adapt (default: all of them)")
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch's input (default 0)")
    save_model: bool = flag(False,
                "save the fine-tuned model (save_pretrained, with its tokenizer) into OUT/model, e.g. for depthfast "
                "compare; under --objective cls only the backbone (the fresh classifier head is not saved)")
    all_pairs: bool = flag(False,
                "also write all_pairs.csv/.png: CKA of every θ₀ layer against every θ_T layer at the final "
                "measurement (unbiased minibatch HSIC₁; its diagonal is the profile under --estimator unbiased)")
    overwrite: bool = flag(False,
                "replace a finished run in --out whole (its results, profile, model/, all_pairs.* …); without it a "
                "directory holding results.json is refused")

    def measure_steps(self) -> set[int]:
        """Steps (after k optimizer steps; 0 = before training) at which the trajectory is measured."""
        return {int(s) for s in self.measure_at.replace(" ", "").split(",") if s}

    def validate(self) -> "RunConfig":
        checks = [
            *measurement_checks(self),
            (self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}; got {self.objective!r}"),
            (self.control in CONTROLS, f"control must be one of {CONTROLS}; got {self.control!r}"),
            (self.steps >= 1, f"steps must be ≥ 1; got {self.steps}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}"),
            (self.lr > 0, f"lr must be > 0; got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1); got {self.momentum}"),
            (self.batch_size >= 1, f"batch size must be ≥ 1; got {self.batch_size}"),
            (self.parallel in PARALLEL, f"parallel must be one of {PARALLEL}; got {self.parallel!r}"),
            (self.shard_size >= 0, f"shard size must be ≥ 0 (0 = the processes of one node); got {self.shard_size}"),
            (self.grad_accum >= 1, f"grad accum must be ≥ 1; got {self.grad_accum}"),
            (self.checkpoint_every >= 0, f"checkpoint every must be ≥ 0 (0 = never); got {self.checkpoint_every}"),
            (_is_step_list(self.measure_at, self.steps),
             f"measure at must be comma-separated steps in 0..{self.steps}; got {self.measure_at!r}"),
            (self.equal_step_target == "mean" or _is_positive_float(self.equal_step_target),
             f"equal-step target must be 'mean' or a positive number; got {self.equal_step_target!r}"),
        ]
        return raise_first(checks + lora_checks(self), self)


def raise_first(checks: list[tuple[bool, str]], config):
    """``config`` if every check holds; else a DepthfastError with the first failing check's message."""
    for ok, message in checks:
        if not ok:
            raise DepthfastError(message)
    return config


def measurement_checks(cfg) -> list[tuple[bool, str]]:
    """The checks of what every measurement shares (RunConfig, CompareConfig): the probe set, its
    batches and pooling, the estimator, the precision, the tied-embeddings policy."""
    return [
        (cfg.pooling in POOLINGS, f"pooling must be one of {POOLINGS}; got {cfg.pooling!r}"),
        (cfg.estimator in ESTIMATORS, f"estimator must be one of {ESTIMATORS}; got {cfg.estimator!r}"),
        (cfg.tied_embeddings in TIED_EMBEDDINGS,
         f"tied embeddings must be one of {TIED_EMBEDDINGS}; got {cfg.tied_embeddings!r}"),
        (cfg.precision in PRECISIONS, f"precision must be one of {PRECISIONS}; got {cfg.precision!r}"),
        (cfg.max_length >= 8, f"max length must be ≥ 8 tokens; got {cfg.max_length}"),
        (cfg.probe_batch_size >= 1, f"probe batch size must be ≥ 1; got {cfg.probe_batch_size}"),
        (cfg.min_probe_size >= 4, f"min probe size must be ≥ 4 (CKA needs > 3 samples); got {cfg.min_probe_size}"),
        (cfg.probe_size >= cfg.min_probe_size, f"probe size {cfg.probe_size} < min probe size {cfg.min_probe_size}"),
        (0 < cfg.mlm_probability < 1, f"mlm probability must be in (0, 1); got {cfg.mlm_probability}"),
    ]


def lora_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """What --lora-r needs and what it does not combine with (depthfast.lora)."""
    lora = cfg.lora_r > 0
    return [
        (cfg.lora_r >= 0, f"lora r must be ≥ 0 (0 = full fine-tuning); got {cfg.lora_r}"),
        (cfg.lora_alpha >= 0, f"lora alpha must be ≥ 0 (0 = r); got {cfg.lora_alpha}"),
        (0 <= cfg.lora_dropout < 1, f"lora dropout must be in [0, 1); got {cfg.lora_dropout}"),
        (lora or not (cfg.lora_alpha or cfg.lora_targets or cfg.lora_dropout),
         "--lora-alpha, --lora-targets and --lora-dropout need --lora-r R (R ≥ 1)"),
        (not lora or cfg.parallel == "ddp",
         f"--lora-r runs with one process or --parallel ddp, not {cfg.parallel}: sharding peft's adapter "
         "layers with FSDP2 is not supported here"),
        (not lora or not cfg.theta0_offload,
         "--theta0-offload does not combine with --lora-r: the merged weight change reads θ₀'s base weights "
         "and adapters from its module, which the offload leaves empty (the frozen base weights are "
         "on the device anyway)"),
    ]


def _is_positive_float(value: str) -> bool:
    try:
        return float(value) > 0
    except ValueError:
        return False


def _is_step_list(text: str, steps: int) -> bool:
    try:
        return all(0 <= int(s) <= steps for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        return False
