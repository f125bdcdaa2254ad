"""``python -m depthfast.run``: fine-tune a pretrained model and measure its depth profile.

With no arguments it runs offline on the shipped all-MiniLM-L6-v2, classifying paragraphs of
Python's documentation by topic, and writes runs/default/. Every flag mirrors a field of
``depthfast.config.RunConfig``; ``--config FILE.json`` sets several at once (flags win).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time

if __name__ == "__main__":  # before the heavy imports: Ctrl-C from the first moment is one line, exit 130
    from depthfast.rundir import interrupt_exits_130

    interrupt_exits_130()

from depthfast.constants import ESTIMATORS, POOLINGS
from depthfast.config import CONTROLS, OBJECTIVES, OPTIMIZERS, PARALLEL, PRECISIONS, TIED_EMBEDDINGS, RunConfig
from depthfast.errors import DepthfastError, exit_status
from depthfast.run_metrics import run_metrics  # also depthfast.run.run_metrics, as before
from depthfast.train import seed_everything  # also depthfast.run.seed_everything, as before

HELP = {
    "model": "HF hub id or local directory (default: the shipped all-MiniLM-L6-v2)",
    "objective": "cls: sequence classification (fresh head); mlm: masked LM (encoders); clm: causal LM (decoders)",
    "control": "none: the optimizer's own steps; equal-step: every group's ‖ΔW‖/‖W‖ made equal after each step",
    "optimizer": "adamw (default), or sgd with --momentum (SGD needs a far larger --lr, e.g. 1e-2, and usually "
                 "--weight-decay 0: with momentum, decay shrinks every weight by ~lr·wd/(1 − momentum) per step)",
    "momentum": "SGD momentum (default 0.9; ignored by adamw)",
    "dataset_config": "configuration name of a hub dataset that has several (e.g. sst2 of nyu-mll/glue)",
    "dataset": "builtin:pydoc (offline), a hub dataset name, or a local .txt/.json/.jsonl/.csv/.parquet file",
    "out": "results directory (written atomically; locked while the run lasts; a finished run in it is refused "
           "unless --overwrite)",
    "overwrite": "replace a finished run in --out whole (its results, profile, model/, all_pairs.* …); without it "
                 "a directory holding results.json is refused",
    "checkpoint_every": "save a resumable checkpoint every N steps into --out (0: never; removed after success)",
    "keep_checkpoints": "keep the last checkpoint after a successful run",
    "parallel": "with several processes: ddp (replicated model), fsdp (FSDP2, parameters sharded by block over "
                "all processes) or hsdp (sharded within groups of --shard-size processes, replicated across them)",
    "shard_size": "hsdp: processes per shard group (default 0: the processes of one node, LOCAL_WORLD_SIZE)",
    "theta0_offload": "keep θ₀ (the pretrained copy measured against) in host memory: its weights stream to the "
                      "device module by module during each measurement, saving one model's worth of device memory "
                      "(one process or ddp)",
    "no_objective_distance": "skip the gradient-alignment distance at θ₀ (it loads the pretraining-style head)",
    "no_memory_check": "start even when the memory estimate exceeds the device's memory",
    "tensorboard": "also log loss, lr and update ratios to OUT/tensorboard (needs the tensorboard package)",
    "save_model": "save the fine-tuned model (save_pretrained, with its tokenizer) into OUT/model, e.g. for "
                  "depthfast compare; under --objective cls only the backbone (the fresh classifier head is not saved)",
    "all_pairs": "also write all_pairs.csv/.png: CKA of every θ₀ layer against every θ_T layer at the final "
                 "measurement (unbiased minibatch HSIC₁; its diagonal is the profile under --estimator unbiased)",
    "measure_at": "comma-separated steps at which to measure the profile during training (0 = before)",
    "equal_step_head": "also equalize the head group (task head, final norm, pooler); by default the control "
                       "equalizes the profile's layers (embeddings, blocks) and the head keeps the optimizer's update",
    "lora_r": "LoRA rank: train rank-r adapters (peft) on the blocks' linear layers, base weights frozen "
              "(0: full fine-tuning); update ratios and --control equal-step act on the merged weights",
    "lora_alpha": "LoRA α; the merged update is (α/r)·B·A (default 0: α = r, scale 1)",
    "lora_targets": "comma-separated names of the blocks' linear layers to adapt (default: all of them)",
    "lora_dropout": "dropout on the LoRA branch's input (default 0)",
    "tied_embeddings": "group of a tied input/output matrix (GPT-2, OPT, Mamba, BERT's MLM decoder): head (default: "
                       "the output projection, free under the control like an untied LM head, not in layer 0's weight "
                       "change) or embeddings (equalized with the layers, counted in layer 0's weight change)",
}
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


def _run(cfg: RunConfig, rundir, progress: bool, resume: bool) -> dict:
    import torch

    from depthfast.checkpoint import config_fingerprint, remove_checkpoints, weights_fingerprint
    from depthfast.objective_distance import (backbone_of, distance_is_trivial, gradient_alignment_at_init,
                                              pretraining_head_parameters, pretraining_objective)
    from depthfast.distributed import offload_to_host, reshard, shard_mesh, shard_model
    from depthfast.layers import discover_layers, prepare_for_measurement
    from depthfast.probe import measure_probe, weight_changes
    from depthfast.memory import add_objective_distance, check_fits, estimate_run_memory, objective_distance_peak
    from depthfast.metrics import locality_gradient
    from depthfast.models import check_objective, check_positions, load_config, load_model, load_tokenizer
    from depthfast.results import profile_rows, write_results
    from depthfast.terminal import print_table
    from depthfast.train import autocast, finetune, make_accelerator

    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    model_config = load_config(cfg.model)
    check_objective(model_config, cfg.objective)  # fail before any data is read
    check_positions(model_config, cfg.max_length, cfg.model)
    if main:
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
    # The memory check comes first, from the model still on the host: nothing model-sized is on the
    # device yet (no θ₀ copy, no pretraining head for the objective distance).
    mesh = shard_mesh(cfg.parallel, cfg.shard_size, accelerator.num_processes, device) if sharded else None
    fused = device.type == "cuda" and importlib.util.find_spec("triton") is not None  # EqualStep's own choice
    estimate = estimate_run_memory(model, cfg, layers.num_blocks, accelerator.num_processes,
                                   fused_control=fused, shards=mesh.size(-1) if sharded else 1,
                                   theta0_on_device=not cfg.theta0_offload)
    with_distance = main and not cfg.no_objective_distance
    if with_distance and not distance_is_trivial(model_config, cfg, tokenizer):
        head = pretraining_head_parameters(model_config, pretraining_objective(model_config))
        add_objective_distance(estimate, objective_distance_peak(model, backbone_of(model), cfg,
                                                                 layers.num_blocks, head))
    if main and progress:
        print(f"estimated memory per process on {device}:\n{estimate.table()}", file=sys.stderr)
    if not cfg.no_memory_check:
        check_fits(estimate, device)
    # θ₀ for host memory is copied before the model moves: never two device copies at once.
    theta0_host = copy.deepcopy(model).eval() if cfg.theta0_offload and main else None
    model.to(device)
    alignment = None
    if with_distance:  # before any step and before θ₀'s device copy, on the unsharded model
        alignment = gradient_alignment_at_init(model, cfg, task, tokenizer, device)
    fingerprint = f"{config_fingerprint(cfg.to_dict())}-{weights_fingerprint(model)}"
    base = base_layers = base_groups = None
    if main or sharded:  # θ₀ (fresh head included, so step 0 compares identical models) on the measuring
        # process(es): the main one, or under FSDP2 all of them, each holding a shard of both models
        base = theta0_host if theta0_host is not None else copy.deepcopy(model).eval()
        base_layers = discover_layers(base)
        if sharded:
            shard_model(base, base_layers.blocks, mesh)
            shard_model(model, layers.blocks, mesh)
        base_groups = [(name, [p.detach() for p in ps]) for name, ps in base_layers.param_groups(cfg.tied_embeddings)]
        if theta0_host is not None:
            offload_to_host(base, device)  # base_groups keep the host tensors
    depths = layers.normalized_depths

    reuse = {}  # the CKA accumulator of the first measurement: θ₀'s statistics are computed once

    def measure(step: int, show: bool = False, all_pairs=None) -> dict:
        with autocast(cfg, device):  # the precision the model trains in (bf16 GEMMs under --precision bf16)
            result = measure_probe(base, model, base_layers, layers, probe, device, cfg.pooling, cfg.estimator,
                                   show, cka=reuse.get("cka"), all_pairs=all_pairs)
        reuse["cka"] = result.accumulator
        reshard(base, model)
        changes = result.change
        return {"step": step, "layers": profile_rows(layers.layer_names, depths, changes),
                "locality_gradient": locality_gradient(depths[1:], changes[1:]), "probe_loss": result.loss_tuned,
                "_result": result}

    log = finetune(model, layers, task, tokenizer, cfg, accelerator, progress, out=cfg.out, resume=resume,
                   fingerprint=fingerprint, measure=lambda step: _public(measure(step)))
    results = None
    if main or sharded:  # under FSDP2 both are collective: every process takes part
        pairs = None
        if cfg.all_pairs and main:  # skips a batch of ≤ 3 samples like the profile's estimator does
            from depthfast.all_pairs import AllPairsCKA

            pairs = AllPairsCKA(base_layers.num_blocks + 1, layers.num_blocks + 1, cfg.pooling, small_batches="skip")
        final = measure(cfg.steps, show=progress and main, all_pairs=pairs)
        if lora is not None:  # of the merged weights W₀ + (α/r)·B·A, per role group of the model's own weights
            from depthfast.lora import lora_weight_changes

            groups_change = lora_weight_changes(base, model, cfg.tied_embeddings)
        else:
            groups_change = weight_changes(base_groups, [(n, [p.detach() for p in ps])
                                           for n, ps in layers.param_groups(cfg.tied_embeddings)])
    if main:
        measured = final.pop("_result")
        changes = measured.change
        slope = locality_gradient(depths[1:], changes[1:])
        if cfg.measure_steps():
            log.trajectory.append(final)
        metrics = run_metrics(cfg, task, model, measured, depths, changes, alignment)
        if cfg.save_model:  # before results.json: a reader that finds it finds the model too
            save_model(model, tokenizer, cfg.objective, os.path.join(cfg.out, "model"))
        # all_pairs.csv/.png before results.json, which names them: a reader that finds it finds them
        pairs_entry = None
        if pairs is not None:
            from depthfast.all_pairs import record_all_pairs

            title = f"{os.path.basename(cfg.model.rstrip('/'))} · θ₀ vs θ_T after {cfg.steps} steps · {cfg.pooling} pooling"
            pairs_entry = record_all_pairs(cfg.out, pairs, base_layers.layer_names, layers.layer_names, title,
                                           cfg.pooling, cfg.estimator)
        results = write_results(cfg, layers, task, log, measured, groups_change, slope, metrics,
                                wall_seconds=time.perf_counter() - started, torch_version=torch.__version__,
                                num_processes=accelerator.num_processes,
                                extra={"lora": lora, "all_pairs": pairs_entry})
        if not cfg.keep_checkpoints:
            remove_checkpoints(cfg.out)
        print_table(results)
        print(f"results: {os.path.abspath(cfg.out)}/ (results.json, profile.csv, profile.png, train_log.csv, config.json)")
    accelerator.wait_for_everyone()
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

    from depthfast import rundir

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    rundir.before_write(path)  # an artifact: publishing starts (the older run retracted)
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
    rundir.after_write(path)


def _public(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


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
