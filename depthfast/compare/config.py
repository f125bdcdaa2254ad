"""The configuration of ``depthfast compare``: CompareConfig (typed, checked; unknown keys fail loudly) and
its command line, every field a flag (as depthfast.run does for RunConfig)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from depthfast.constants import ESTIMATORS, POOLINGS
from depthfast.config import DEFAULT_MODEL, PRECISIONS, TIED_EMBEDDINGS, TypedConfig, measurement_checks, raise_first

COMPARE_OBJECTIVES = ("auto", "none", "mlm", "clm")
OFFLOAD = ("none", "base", "tuned")


@dataclass
class CompareConfig(TypedConfig):
    """The depth profile between two checkpoints (see the docstring of depthfast.compare).

    base, tuned: hub ids or local directories; tuned may be a PEFT LoRA adapter directory.
    offload: which model (none, base, tuned) stays in host memory, its weights streamed to the device
    module by module during the measurement (as run's --theta0-offload does for θ₀).
    label_column is accepted for the dataset flags' sake; no objective of compare reads labels.
    """

    config_name = "compare config"  # in its errors (a class attribute, not a field)
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
    all_pairs: bool = False
    overwrite: bool = False  # replace finished results in --out whole (else refused: depthfast.rundir)

    def __post_init__(self) -> None:
        for name in ("base", "tuned", "out", "dataset"):  # pathlib paths are welcome where names are strings
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))

    def validate(self) -> "CompareConfig":
        checks = [
            (bool(self.tuned), "compare needs TUNED: a hub id, a local checkpoint or a PEFT adapter directory"),
            (bool(self.base), "compare needs BASE: a hub id or a local checkpoint directory"),
            (self.objective != "cls", "objective 'cls' needs a trained classification head, and a checkpoint has none "
                                      "(a run's head is fresh); use none (representational change only), mlm or clm"),
            (self.objective in COMPARE_OBJECTIVES,
             f"objective must be one of {COMPARE_OBJECTIVES}; got {self.objective!r}"),
            (self.offload in OFFLOAD, f"offload must be one of {OFFLOAD}; got {self.offload!r}"),
            *measurement_checks(self),
        ]
        return raise_first(checks, self)



HELP = {
    "all_pairs": "also write all_pairs.csv/.png: CKA of every BASE layer against every TUNED layer (unbiased "
                 "minibatch HSIC₁; its diagonal is the profile under --estimator unbiased)",
    "out": "results directory (written atomically, locked while the compare lasts; a directory holding results is "
           "refused unless --overwrite)",
    "overwrite": "replace the results in --out (a compare's or a run's) whole, old artifacts included",
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
    choices = {**CHOICES, "pooling": POOLINGS, "estimator": ESTIMATORS}
    parser = argparse.ArgumentParser(
        prog="depthfast compare", description="The depth profile between two existing checkpoints, no training: "
                                              "1 − CKA per layer on the probe set, and the weight change per group.")
    parser.add_argument("base", help="BASE: hub id or local checkpoint directory")
    parser.add_argument("tuned", help="TUNED: hub id, local checkpoint directory, or PEFT (LoRA) adapter directory")
    parser.add_argument("--config", help="JSON file of CompareConfig fields (unknown keys are an error)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    CompareConfig.add_flags(parser, HELP, choices, skip=("base", "tuned"))
    return parser


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig.from_args(args)

