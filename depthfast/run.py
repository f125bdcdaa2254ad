"""``python -m depthfast.run``: fine-tune a pretrained model and measure its depth profile.

With no arguments it runs offline on the shipped all-MiniLM-L6-v2, classifying paragraphs of
Python's documentation by topic, and writes runs/default/. Every flag mirrors a field of
``depthfast.config.RunConfig``; ``--config FILE.json`` sets several at once (flags win).
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if __name__ == "__main__":  # before the heavy imports: Ctrl-C from the first moment is one line, exit 130
    from depthfast.rundir import interrupt_exits_130

    interrupt_exits_130()

from depthfast.constants import ESTIMATORS, POOLINGS
from depthfast.config import CONTROLS, OBJECTIVES, OPTIMIZERS, PARALLEL, PRECISIONS, TIED_EMBEDDINGS, RunConfig
from depthfast.errors import DepthfastError, exit_status
from depthfast.run_metrics import run_metrics  # also depthfast.run.run_metrics, as before
from depthfast.train import seed_everything  # also depthfast.run.seed_everything, as before

if TYPE_CHECKING:
    from depthfast.measure import ProbeSession

# Each flag's help lives in its RunConfig field (config.flag); this view is kept for importers.
HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(RunConfig) if "help" in f.metadata}
CHOICES = {"objective": OBJECTIVES, "control": CONTROLS, "pooling": POOLINGS, "estimator": ESTIMATORS,
           "parallel": PARALLEL, "precision": PRECISIONS, "optimizer": OPTIMIZERS,
           "tied_embeddings": TIED_EMBEDDINGS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m depthfast.run", description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("--config", help="JSON file of RunConfig fields (unknown keys are an error)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out if there is one (else start fresh)")
    RunConfig.add_flags(parser, HELP, CHOICES)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig.from_args(args)


def run(cfg: RunConfig, progress: bool = True, resume: bool = False) -> dict:
    """Fine-tune, measure, write ``cfg.out``; returns the results dictionary (also results.json).

    With ``resume``, training continues from the checkpoint in ``cfg.out`` when there is one.
    """
    from depthfast.rundir import RunDir

    # The directory first, before anything is loaded: a bad --out is refused within seconds, and the lock
    # is held for the run's life (only the main process writes; every rank shares one directory).
    main_rank = os.environ.get("RANK", "0") == "0"
    rundir = RunDir(cfg.out, overwrite=cfg.overwrite, resume=resume)
    rundir.open() if main_rank else rundir.check()
    try:
        return _run(cfg, rundir, progress, resume)
    finally:
        rundir.close()


@dataclass
class Setup:
    """What a run prepares before θ₀ is copied: the checked model config, tokenizer, task and probe, and
    the model (LoRA applied, prepared for measurement) with its layers; ``mesh`` under fsdp/hsdp."""

    model_config: object
    tokenizer: object
    task: object
    probe: list
    model: object
    layers: object
    lora: dict | None
    sharded: bool
    mesh: object


def _run(cfg: RunConfig, rundir, progress: bool, resume: bool) -> dict:
    from depthfast.checkpoint import config_fingerprint, weights_fingerprint
    from depthfast.objective_distance import gradient_alignment_at_init
    from depthfast.train import finetune, make_accelerator

    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    setup = prepare(cfg, rundir, accelerator)
    model = setup.model
    with_distance = main and not cfg.no_objective_distance
    check_memory(cfg, setup, accelerator, with_distance, show=main and progress)
    # θ₀ for host memory is copied before the model moves: never two device copies at once.
    theta0_host = copy.deepcopy(model) if cfg.theta0_offload and main else None
    model.to(device)
    alignment = None
    if with_distance:  # before any step and before θ₀'s device copy, on the unsharded model
        alignment = gradient_alignment_at_init(model, cfg, setup.task, setup.tokenizer, device)
    fingerprint = f"{config_fingerprint(cfg.to_dict())}-{weights_fingerprint(model)}"
    session = probe_session(cfg, setup, accelerator, theta0_host)
    # finetune measures on the measuring process(es) only; the others wait at the same steps
    measure = session.measure if session is not None else None
    log = finetune(model, setup.layers, setup.task, setup.tokenizer, cfg, accelerator, progress, out=cfg.out,
                   resume=resume, fingerprint=fingerprint, measure=measure or (lambda step: None))
    results = final = groups = pairs = None
    if session is not None:  # under FSDP2 both are collective: every process takes part
        if cfg.all_pairs and main:  # skips a batch of ≤ 3 samples like the profile's estimator does
            from depthfast.all_pairs import AllPairsCKA

            pairs = AllPairsCKA(session.theta0.layers.num_blocks + 1, setup.layers.num_blocks + 1, cfg.pooling,
                                small_batches="skip")
        final = session.final(cfg.steps, all_pairs=pairs, show=progress and main)
        groups = session.weight_changes()  # of the merged weights under LoRA
    if main:
        results = write_run(cfg, setup, accelerator, log, session, final, groups, pairs, alignment, started)
    accelerator.wait_for_everyone()
    return results


def prepare(cfg: RunConfig, rundir, accelerator) -> Setup:
    """Check the model config, the disk and the flags, build the probe and load the model (seeded), LoRA
    applied; every refusal comes before any model is loaded."""
    import torch

    from depthfast.distributed import shard_mesh
    from depthfast.layers import discover_layers, prepare_for_measurement
    from depthfast.models import check_objective, check_positions, load_config, load_model, load_tokenizer

    model_config = load_config(cfg.model)
    check_objective(model_config, cfg.objective)  # fail before any data is read
    check_positions(model_config, cfg.max_length, cfg.model)
    if accelerator.is_main_process:
        from depthfast.rundir import disk_need, weights_bytes_of

        weights = weights_bytes_of(model_config, cfg.objective)
        if weights is not None:
            rundir.check_space(disk_need(weights, cfg))
    tokenizer = load_tokenizer(cfg.model, cfg.objective)
    # Every process builds the probe (cheap), so that a probe set with nothing to compare is refused
    # on all of them alike, before any model is loaded.
    task, probe = task_and_probe(cfg, tokenizer)
    if cfg.lora_r:
        from depthfast.lora import require_peft

        require_peft()  # before any model is loaded
    sharded = cfg.parallel in ("fsdp", "hsdp") and accelerator.num_processes > 1
    if cfg.theta0_offload and sharded:
        raise DepthfastError("--theta0-offload runs with one process or --parallel ddp: under fsdp/hsdp θ₀ is "
                             "sharded over the processes already")
    if cfg.save_model and sharded:
        raise DepthfastError("--save-model runs with one process or --parallel ddp (its parameters are sharded here)")
    seed_everything(cfg.seed)
    model = load_model(cfg.model, cfg.objective, num_labels=task.num_labels)  # on the host, identical everywhere
    if accelerator.process_index:
        torch.manual_seed(cfg.seed + 1_000 * accelerator.process_index)  # own dropout draws per process
    prepare_for_measurement(model)
    lora = None
    if cfg.lora_r:  # in place, before θ₀ is copied: θ₀ is the same structure with B = 0 (the same forward)
        from depthfast.lora import apply_lora

        lora = apply_lora(model, cfg)
    layers = discover_layers(model)
    mesh = shard_mesh(cfg.parallel, cfg.shard_size, accelerator.num_processes, accelerator.device) if sharded else None
    return Setup(model_config, tokenizer, task, probe, model, layers, lora, sharded, mesh)


def check_memory(cfg: RunConfig, setup: Setup, accelerator, with_distance: bool, show: bool) -> None:
    """The memory estimate per process, checked against the device (unless --no-memory-check). It comes
    first, from the model still on the host: nothing model-sized is on the device yet (no θ₀ copy, no
    pretraining head for the objective distance)."""
    from depthfast.memory import add_objective_distance, check_fits, estimate_run_memory, objective_distance_peak
    from depthfast.objective_distance import (backbone_of, distance_is_trivial, pretraining_head_parameters,
                                              pretraining_objective)

    device, model, blocks = accelerator.device, setup.model, setup.layers.num_blocks
    fused = device.type == "cuda" and importlib.util.find_spec("triton") is not None  # EqualStep's own choice
    estimate = estimate_run_memory(model, cfg, blocks, accelerator.num_processes, fused_control=fused,
                                   shards=setup.mesh.size(-1) if setup.sharded else 1,
                                   theta0_on_device=not cfg.theta0_offload)
    if with_distance and not distance_is_trivial(setup.model_config, cfg, setup.tokenizer):
        head = pretraining_head_parameters(setup.model_config, pretraining_objective(setup.model_config))
        add_objective_distance(estimate, objective_distance_peak(model, backbone_of(model), cfg, blocks, head))
    if show:
        print(f"estimated memory per process on {device}:\n{estimate.table()}", file=sys.stderr)
    if not cfg.no_memory_check:
        check_fits(estimate, device)


def probe_session(cfg: RunConfig, setup: Setup, accelerator, theta0_host) -> ProbeSession | None:
    """θ₀ (fresh head included, so step 0 compares identical models) and the probe session on the
    measuring process(es): the main one, or under FSDP2 all of them, each holding a shard of both models.
    None on the other processes. ``theta0_host``: θ₀ already copied in host memory (--theta0-offload)."""
    from depthfast.distributed import shard_model
    from depthfast.measure import ProbeSession, Theta0
    from depthfast.train import autocast

    if not (accelerator.is_main_process or setup.sharded):
        return None
    device = accelerator.device
    theta0 = Theta0(theta0_host if theta0_host is not None else copy.deepcopy(setup.model), cfg.tied_embeddings,
                    mesh=setup.mesh, offload_to=device if theta0_host is not None else None)
    if setup.sharded:
        shard_model(setup.model, setup.layers.blocks, setup.mesh)
    # the precision the model trains in (bf16 GEMMs under --precision bf16)
    return ProbeSession(theta0, setup.model, setup.layers, setup.probe, device, cfg.pooling, cfg.estimator,
                        precision=lambda: autocast(cfg, device), lora=setup.lora is not None)


def write_run(cfg: RunConfig, setup: Setup, accelerator, log, session: ProbeSession, final, groups: dict,
              pairs, alignment, started: float) -> dict:
    """The main process's writes, in order: the model, all_pairs.*, then results.json (a reader that
    finds it finds the files it names); then the checkpoints go and the table is printed."""
    import torch

    from depthfast.checkpoint import remove_checkpoints
    from depthfast.results import print_table, write_results

    entry, measured = final
    if cfg.measure_steps():
        log.trajectory.append(entry)
    depths = setup.layers.normalized_depths
    metrics = run_metrics(cfg, setup.task, setup.model, measured, depths, measured.change, alignment)
    if cfg.save_model:  # before results.json: a reader that finds it finds the model too
        save_model(setup.model, setup.tokenizer, cfg.objective, os.path.join(cfg.out, "model"))
    pairs_entry = None
    if pairs is not None:
        from depthfast.all_pairs import record_all_pairs

        title = f"{os.path.basename(cfg.model.rstrip('/'))} · θ₀ vs θ_T after {cfg.steps} steps · {cfg.pooling} pooling"
        pairs_entry = record_all_pairs(cfg.out, pairs, session.theta0.layers.layer_names, setup.layers.layer_names,
                                       title, cfg.pooling, cfg.estimator)
    results = write_results(cfg, setup.layers, setup.task, log, measured, groups, entry["locality_gradient"], metrics,
                            wall_seconds=time.perf_counter() - started, torch_version=torch.__version__,
                            num_processes=accelerator.num_processes,
                            extra={"lora": setup.lora, "all_pairs": pairs_entry})
    if not cfg.keep_checkpoints:
        remove_checkpoints(cfg.out)
    print_table(results)
    print(f"results: {os.path.abspath(cfg.out)}/ (results.json, profile.csv, profile.png, train_log.csv, config.json)")
    return results


def task_and_probe(cfg: RunConfig, tokenizer):
    """The run's task (training texts, held-out probe texts and labels) and its probe batches, from the
    config alone: the same probe for every run and compare given the same dataset flags and seed."""
    from depthfast.batches import probe_batches
    from depthfast.data import load_task

    task = load_task(cfg.dataset, cfg.objective, probe_size=cfg.probe_size, min_probe_size=cfg.min_probe_size,
                     seed=cfg.seed, text_column=cfg.text_column, label_column=cfg.label_column,
                     dataset_config=cfg.dataset_config)
    probe = probe_batches(cfg.objective, tokenizer, task.probe_texts, task.probe_labels, cfg.probe_batch_size,
                          cfg.max_length, cfg.mlm_probability, cfg.seed)
    return task, probe


def save_model(model, tokenizer, objective: str, path: str) -> None:
    """save_pretrained the fine-tuned model and its tokenizer into ``path``, replacing it whole: written
    beside it first, then renamed over. Under cls the backbone only (from_pretrained has no class for
    depthfast's fresh classifier head)."""
    import shutil
    import tempfile

    from depthfast import artifacts, rundir

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    artifacts.before_write(path)  # an artifact: publishing starts (the older run retracted)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".model.")
    try:
        (model.backbone if objective == "cls" else model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        rundir.apply_modes(tmp)  # mkdtemp makes it 0700, safetensors its file 0600
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifacts.after_write(path)




def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def work():
        cfg = config_from_args(args)
        from depthfast.models import quiet_libraries

        quiet_libraries(datasets_too=args.quiet)
        run(cfg, progress=not args.quiet, resume=args.resume)

    try:
        return exit_status(work, interrupted="interrupted; earlier results are untouched, and --resume continues "
                                             "from the last checkpoint in --out")
    finally:
        if "depthfast.train" in sys.modules:  # under torchrun: destroyed before interpreter teardown
            sys.modules["depthfast.train"].end_process_group()


if __name__ == "__main__":
    sys.exit(main())
