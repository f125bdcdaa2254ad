"""The typed configuration of one run. Unknown keys fail loudly; the effective config is saved with the results."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

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
            flag, text = f"--{f.name.replace('_', '-')}", help.get(f.name, f"default: {f.default}")
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

    model: str = DEFAULT_MODEL
    objective: str = "cls"
    control: str = "none"
    dataset: str = "builtin:pydoc"
    dataset_config: str = ""
    text_column: str = "text"
    label_column: str = "label"
    steps: int = 60
    optimizer: str = "adamw"
    lr: float = 5e-5
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup_steps: int = 6
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    probe_size: int = 192
    min_probe_size: int = 16
    probe_batch_size: int = 32
    pooling: str = "token"
    estimator: str = "exact"
    mlm_probability: float = 0.15
    equal_step_target: str = "mean"
    equal_step_head: bool = False
    tied_embeddings: str = "head"
    device: str = "auto"
    precision: str = "fp32"
    parallel: str = "ddp"
    shard_size: int = 0
    theta0_offload: bool = False
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    tensorboard: bool = False
    no_memory_check: bool = False
    no_objective_distance: bool = False
    out: str = "runs/default"
    checkpoint_every: int = 50
    keep_checkpoints: bool = False
    measure_at: str = ""
    lora_r: int = 0
    lora_alpha: float = 0.0
    lora_targets: str = ""
    lora_dropout: float = 0.0
    save_model: bool = False  # save_pretrained the fine-tuned model into OUT/model (for depthfast compare)
    all_pairs: bool = False
    overwrite: bool = False  # replace a finished run in --out whole (else refused: depthfast.rundir)

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
