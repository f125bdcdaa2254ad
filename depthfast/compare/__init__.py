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

Modules: config (CompareConfig, the command line), checkpoints (loading both sides, the checks that make
them comparable), results (writing and printing); this one runs the comparison.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from depthfast.all_pairs import AllPairsCKA, record_all_pairs
from depthfast.compare.checkpoints import (backbone_module, check_architectures, check_run_manifests, check_tokenizer,
                                           discover_both,
                                           compare_probe, load_sides, mismatch_note, param_shapes, resolve_adapter,
                                           resolve_objective)
from depthfast.compare.config import (CHOICES, COMPARE_OBJECTIVES, HELP, OFFLOAD, CompareConfig, build_parser,
                                      config_from_args)
from depthfast.compare.results import check_out, print_compare, write_compare_results
from depthfast.data import load_task
from depthfast.distributed import offload_to_host
from depthfast.errors import exit_status
from depthfast.metrics import locality_gradient
from depthfast.models import check_objective, check_positions, load_tokenizer, quiet_libraries
from depthfast.measure import ProbeSession, Theta0
from depthfast.rundir import RunDir
from depthfast.run_metrics import run_metrics
from depthfast.train import autocast, resolve_device, seed_everything

__all__ = ["COMPARE_OBJECTIVES", "OFFLOAD", "CompareConfig", "HELP", "CHOICES", "build_parser", "config_from_args",
           "compare", "write_compare_results", "print_compare", "main"]


def compare(cfg: CompareConfig, progress: bool = True) -> dict:
    """Measure the profile between ``cfg.base`` and ``cfg.tuned``, write ``cfg.out``; return results.json's dict.

    ``cfg.out`` is checked and locked first (depthfast.rundir): a file, an unwritable directory, finished
    results (unless ``overwrite``) or another run holding it are refused before any model loads."""
    started = time.perf_counter()
    cfg.validate()
    adapter = resolve_adapter(cfg)
    if not cfg.overwrite:
        check_out(cfg.out)
    rundir = RunDir(cfg.out, overwrite=cfg.overwrite).open()  # checked and locked before any model loads
    try:
        return _compare(cfg, adapter, started, progress)
    finally:
        rundir.close()


def _compare(cfg: CompareConfig, adapter, started: float, progress: bool) -> dict:
    device = resolve_device(cfg.device)
    check_run_manifests(cfg)
    base_config, architecture = check_architectures(cfg, adapter)
    check_positions(base_config, cfg.max_length, cfg.base)
    if cfg.objective in ("mlm", "clm"):
        check_objective(base_config, cfg.objective)
    tokenizer = load_tokenizer(cfg.base, "mlm" if cfg.objective == "mlm" else "clm")  # mlm: one line if no mask token
    task = load_task(cfg.dataset, "clm", probe_size=cfg.probe_size, min_probe_size=cfg.min_probe_size,
                     seed=cfg.seed, text_column=cfg.text_column, label_column=cfg.label_column,
                     dataset_config=cfg.dataset_config)  # every objective of compare is unlabelled: clm's probe
    # The probe as BASE's tokenizer splits it; TUNED's own tokenizer, if it has one, must split it alike.
    check_batches = compare_probe(cfg, "clm", tokenizer, task.probe_texts)
    if adapter is None:
        check_tokenizer(cfg, check_batches, task.probe_texts)

    seed_everything(cfg.seed)
    base, tuned, heads = load_sides(cfg, architecture, adapter)
    objective = resolve_objective(cfg, architecture, tokenizer, heads)
    if objective == "none":
        wrap = backbone_module()
        base, tuned = wrap(base.base_model), wrap(tuned.base_model)
    base_layers, tuned_layers = discover_both(cfg, base, tuned)
    batches = check_batches if objective in ("clm",) else compare_probe(cfg, objective, tokenizer, task.probe_texts)

    # θ₀ is BASE; its groups are taken here, on the host, before either side moves or is offloaded.
    session = ProbeSession(Theta0(base, cfg.tied_embeddings, layers=base_layers), tuned, tuned_layers, batches,
                           device, cfg.pooling, cfg.estimator, precision=lambda: autocast(cfg, device),
                           progress=progress)
    # Weight change on the host, before anything moves: both state dicts must match name for name.
    base_shapes, tuned_shapes = param_shapes(base), param_shapes(tuned)
    note = None
    if base_shapes == tuned_shapes:
        group_changes = session.weight_changes()
    else:
        group_changes = None
        note = mismatch_note(base_shapes, tuned_shapes)
        print(f"depthfast: {note}", file=sys.stderr)
    for which, model in (("base", base), ("tuned", tuned)):
        if cfg.offload == which:
            offload_to_host(model, device)
        else:
            model.to(device)
    pairs = None
    if cfg.all_pairs:  # skips a batch of ≤ 3 samples like the profile's estimator does
        pairs = AllPairsCKA(base_layers.num_blocks + 1, tuned_layers.num_blocks + 1, cfg.pooling, small_batches="skip")
    measured = session.probe(all_pairs=pairs)
    pairs_entry = None
    if pairs is not None:  # before results.json, which names the files
        title = f"{os.path.basename(cfg.base.rstrip('/'))} vs {os.path.basename(cfg.tuned.rstrip('/'))} · {cfg.pooling} pooling"
        pairs_entry = record_all_pairs(cfg.out, pairs, base_layers.layer_names, tuned_layers.layer_names, title,
                                       cfg.pooling, cfg.estimator)
    depths = base_layers.normalized_depths
    changes = measured.change
    slope = locality_gradient(depths[1:], changes[1:])
    effective = dataclasses.replace(cfg, objective=objective)
    metrics = run_metrics(effective, task, base, measured, depths, changes, None)
    results = write_compare_results(effective, base_layers, task, measured, group_changes, slope, metrics,
                                    note=note, adapter=adapter, all_pairs=pairs_entry, wall_seconds=time.perf_counter() - started,
                                    torch_version=torch.__version__)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def work():
        cfg = config_from_args(args)
        quiet_libraries(datasets_too=args.quiet)  # missing heads etc. are checked and said by compare itself
        results = compare(cfg, progress=not args.quiet)
        print_compare(results)
        print(f"results: {os.path.abspath(cfg.out)}/ (results.json, profile.csv, profile.png, config.json)")

    return exit_status(work, interrupted="interrupted; earlier results in --out are untouched")
