"""Fine-tuning loop: AdamW with linear warm-up and decay, wrapped by the equal-step control.

With control "none" the same wrapper only records each group's update ratio ‖ΔW‖/‖W‖, so every
run logs its update-ratio profile; with "equal-step" it also rescales the updates. The loop
checkpoints every ``checkpoint_every`` steps and resumes from the latest checkpoint bit for bit
(same batches, same masking, same dropout draws); at the steps in ``measure_at`` it calls back to
measure the profile trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from depthfast.batches import training_batches
from depthfast.checkpoint import load_checkpoint, read_pointer, save_checkpoint
from depthfast.config import RunConfig
from depthfast.data import Task
from depthfast.distributed import is_sharded
from depthfast.errors import DepthfastError
from depthfast.layers import ModelLayers
from depthfast.optim import EqualStep


LOG_EVERY = 10  # steps between host synchronisations for the per-step log


@dataclass
class TrainLog:
    group_names: list[str]
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    ratios_before: list[list[float]] = field(default_factory=list)  # (steps, groups) optimizer's own ‖ΔW‖/‖W‖
    ratios_after: list[list[float]] = field(default_factory=list)  # (steps, groups) after the control
    trajectory: list[dict] = field(default_factory=list)  # profiles measured during training
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    # Trainable parameters that got no gradient at the first step (structurally unused by the
    # objective's loss, e.g. BERT's pooler under mean-pooled cls); they keep their pretrained values.
    unused_parameters: list[str] = field(default_factory=list)


# The attribute of a model whose equal-step control is not the plain one (depthfast.lora.apply_lora: the
# control on the merged LoRA weights): a class called like LoraEqualStep(optimizer, named_groups, model,
# tied_embeddings, target=, control=, free=).
CONTROL_HOOK = "depthfast_control"

def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators seeded alike (a run, a compare)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_linear(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(named_groups, cfg: RunConfig, no_decay: set[int]):
    """AdamW or SGD with momentum over the groups' parameters, and its linear warm-up/decay schedule.

    Weight decay cfg.weight_decay on every parameter except those whose id is in ``no_decay``
    (``ModelLayers.no_weight_decay()``, the one rule: biases, norms, Mamba's A_log/D, RWKV's time_*;
    see depthfast.layers.decays).
    """
    decay, exempt = [], []
    for _, params in named_groups:
        for p in params:
            (exempt if id(p) in no_decay else decay).append(p)
    param_groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(cfg.warmup_steps, cfg.steps))
    return optimizer, scheduler


def free_groups(named_groups, cfg: RunConfig) -> list[int]:
    """Indices of the groups the control leaves free (their update is the optimizer's, out of the mean).

    The control equalizes the profile's layers; the head (a fresh task head, whose relative steps are
    tens of times the blocks', the final norm / pooler, the LM head, and under --tied-embeddings head
    the tied input/output matrix) would otherwise pull the mean target. --equal-step-head frees none.
    """
    return [] if cfg.equal_step_head else [i for i, (name, _) in enumerate(named_groups) if name == "head"]


def build_control(optimizer, named_groups, cfg: RunConfig, fused: bool | None = None,
                  model: torch.nn.Module | None = None) -> EqualStep:
    """The equal-step wrapper (or, with control "none", the ratio recorder) over the role groups.

    EqualStep wraps the torch optimizer itself (not accelerate's wrapper), so on a GPU it can pick its
    fused Triton path; both paths get the same groups and free indices. A ``model`` that carries a
    ``CONTROL_HOOK`` (depthfast.lora.apply_lora sets one: LoraEqualStep, the ratios of the merged weights)
    gets the control it names, built from the same arguments; training never imports the LoRA module.
    """
    target = "mean" if cfg.equal_step_target == "mean" else float(cfg.equal_step_target)
    hook = getattr(model, CONTROL_HOOK, None) if model is not None else None
    if hook is not None:
        return hook(optimizer, named_groups, model, cfg.tied_embeddings, target=target,
                    control=cfg.control, free=free_groups(named_groups, cfg))
    return EqualStep(optimizer, [params for _, params in named_groups], target=target, control=cfg.control,
                     free=free_groups(named_groups, cfg), fused=fused)


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device ("auto": a GPU if there is one); a clear error for a bad or missing one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DepthfastError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthfastError("device 'cuda' requested but no GPU is available")
    return device


_OWN_PROCESS_GROUP = False  # whether make_accelerator (accelerate) created the default process group


def make_accelerator(cfg: RunConfig):
    """One Accelerator per process: single device, or DDP when launched with torchrun / accelerate launch.

    A process group it creates (accelerate does, under torchrun) is this process's to destroy:
    ``end_process_group`` at the end of ``depthfast.run.main``."""
    global _OWN_PROCESS_GROUP
    from accelerate import Accelerator

    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # accelerate places a single process on the current GPU
    existed = _process_group_initialized()
    # Precision is not accelerate's business here (see ``autocast``): its state is process-wide and
    # refuses a second run in the same process with another setting.
    accelerator = Accelerator(cpu=device.type == "cpu")
    _OWN_PROCESS_GROUP = _OWN_PROCESS_GROUP or (not existed and _process_group_initialized())
    return accelerator


def _process_group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def end_process_group() -> None:
    """Destroy the default process group if make_accelerator created it (a caller's own is left alone),
    and forget accelerate's process-wide state, which refers to it.

    Called once all processes are past their last collective (run() ends with wait_for_everyone), or
    on the way out after an error. Without it the group lives until interpreter teardown, where its
    native threads were destroyed while still joinable now and then: with the CUDA build of torch,
    2 in 44 two-process DDP runs aborted after writing their results ("terminate called without an
    active exception", exit status 134)."""
    global _OWN_PROCESS_GROUP
    if not _OWN_PROCESS_GROUP:
        return
    _OWN_PROCESS_GROUP = False
    if _process_group_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 autocast over fp32 weights under --precision bf16 (training and measurement alike), else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def prepare_ddp(model: torch.nn.Module, accelerator, cfg: RunConfig, tokenizer, task: Task) -> torch.nn.Module:
    """``accelerator.prepare(model)``: DDP with several processes, the model itself on a single one.

    DDP waits in every backward for a gradient of every trainable parameter, and one that the loss
    does not reach (BERT's pooler under mean-pooled cls; any head the objective bypasses) leaves its
    reduction unfinished: the next step raises. So before wrapping, one forward of this process's
    first micro-batch finds the parameters the autograd graph does not reach (see
    ``unreached_parameters``); if any process has one, DDP runs with find_unused_parameters=True.
    Such parameters keep grad None on every process, as in a single process (the optimizer skips
    them; they stay in their layer group, ΔW = 0, their ‖W‖ counted), so 2 processes still equal 1.
    Models without them keep DDP's default (no graph traversal per step)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1:
        batch = next(training_batches(cfg.objective, tokenizer, task.train_texts, task.train_labels, cfg.batch_size,
                                      cfg.max_length, cfg.mlm_probability, cfg.seed))
        piece = move(shard(batch, rank, world, 0, cfg.grad_accum), accelerator.device)
        local = unreached_parameters(model, piece, cfg, accelerator.device)
        count = torch.tensor([len(local)], device=accelerator.device)
        if int(accelerator.reduce(count, reduction="sum")) > 0:
            from accelerate.utils import DistributedDataParallelKwargs

            accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    return accelerator.prepare(model)


def unreached_parameters(model: torch.nn.Module, batch: dict, cfg: RunConfig, device: torch.device) -> list[str]:
    """Names of the trainable parameters that the loss of ``model(**batch)`` does not depend on: the
    AccumulateGrad leaves not reachable from ``loss.grad_fn`` (the traversal DDP's own
    find_unused_parameters does). One forward in train mode, no backward; the RNG (dropout) is
    restored, so training draws the same numbers as without the check."""
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=devices), autocast(cfg, device):
            loss = model(**batch).loss
        reached, seen, stack = set(), set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
            if variable is not None:
                reached.add(id(variable))
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
        del loss
    finally:
        model.train(was_training)
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def shard(batch: dict, rank: int, world: int, micro: int, num_micro: int) -> dict:
    """This process's micro-batch ``micro`` of a global batch: rows split first by rank, then by micro-step.

    Every piece has the same number of sequences, so averaging per-piece mean losses over pieces (DDP
    averages over ranks; accumulation over micro-steps) gives the global mean for cls and a
    token-weighted approximation of it for LM objectives.
    """
    rows = next(iter(batch.values())).shape[0]
    per_rank = rows // world
    per_micro = per_rank // num_micro
    begin = rank * per_rank + micro * per_micro
    return {k: v[begin:begin + per_micro] for k, v in batch.items()}


def finetune(model: torch.nn.Module, layers: ModelLayers, task: Task, tokenizer, cfg: RunConfig,
             accelerator, progress: bool = True, out: str | None = None, resume: bool = False,
             fingerprint: str = "", measure: Callable[[int], dict] | None = None) -> TrainLog:
    """Train ``model`` for cfg.steps optimizer steps; returns the log (also checkpointed under ``out``).

    Each step consumes one global batch of cfg.batch_size sequences, split over the processes and
    over cfg.grad_accum micro-steps; the equal-step control acts once per optimizer step.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise DepthfastError(f"batch size {cfg.batch_size} must be divisible by processes × grad accum "
                             f"= {world} × {cfg.grad_accum}")
    named_groups = layers.param_groups(cfg.tied_embeddings)
    optimizer, scheduler = build_optimizer(named_groups, cfg, layers.no_weight_decay())
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    sharded = any(is_sharded(p) for p in model.parameters())  # FSDP2, sharded by run()
    # DDP (or a single device) through accelerate; FSDP2 models are already sharded, and torch's
    # fully_shard is used directly because accelerate's FSDP path needs an accelerator.
    model_p = model if sharded else prepare_ddp(model, accelerator, cfg, tokenizer, task)
    # EqualStep wraps the torch optimizer itself (not accelerate's wrapper), so on a GPU it can pick
    # its fused Triton path. Nothing is lost: micro-steps are handled here, and bf16 needs no scaler.
    control = build_control(optimizer, named_groups, cfg, model=model)
    log, start_step = TrainLog(group_names=[name for name, _ in named_groups]), 0
    if resume and out and read_pointer(out):
        start_step, log = resume_from(out, model, optimizer, scheduler, fingerprint, rank, sharded, cfg)
    first_step = True  # of this process: unused parameters are read off its gradients
    measure_steps = cfg.measure_steps()
    main = accelerator.is_main_process

    def measure_now(step: int) -> None:  # the main process measures while the others wait …
        entry = measure(step) if main or sharded else None  # … unless the models are sharded: all forward
        accelerator.wait_for_everyone()
        if entry is not None:
            log.trajectory.append(entry)

    if measure and start_step == 0 and 0 in measure_steps:
        measure_now(0)
    batches = training_batches(cfg.objective, tokenizer, task.train_texts, task.train_labels, cfg.batch_size,
                               cfg.max_length, cfg.mlm_probability, cfg.seed, start_step=start_step)
    writer = open_tensorboard(out) if cfg.tensorboard and main and out else None
    model_p.train()
    pending: list = []  # (step, loss, lr, ratios before, ratios after) not yet copied to the host
    started, seconds_before = time.perf_counter(), log.seconds
    bar = tqdm(range(start_step, cfg.steps), desc=f"fine-tune ({cfg.control})", disable=not (progress and main),
               unit="step", initial=start_step, total=cfg.steps)
    for step in bar:
        batch = next(batches)
        step_loss = accumulate_gradients(model, model_p, batch, cfg, accelerator, sharded)
        if first_step:
            log.unused_parameters = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            first_step = False
        lr = scheduler.get_last_lr()[0]
        control.step()
        control.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        # Loss and ratios stay on the device until the next flush: one host synchronisation every
        # LOG_EVERY steps, not one per step (the fused control itself never waits for the device).
        pending.append((done, accelerator.reduce(step_loss, reduction="mean"), lr,
                        control.ratios_before.detach().clone(), control.ratios_after.detach().clone()))
        log.tokens += int(batch["attention_mask"].sum())
        at_measure = measure is not None and done in measure_steps and done < cfg.steps
        at_checkpoint = bool(out and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps)
        if len(pending) >= LOG_EVERY or at_measure or at_checkpoint or done == cfg.steps:
            flush(pending, log, writer, cfg)  # raises on a non-finite loss, before any checkpoint is written
            log.seconds = seconds_before + time.perf_counter() - started
            bar.set_postfix(loss=f"{log.loss[-1]:.3f}", tok_s=f"{log.tokens / max(log.seconds, 1e-9):.0f}")
        if at_measure:
            measure_now(done)
            model_p.train()
        if at_checkpoint:
            save_checkpoint(out, done, model, optimizer, scheduler, dataclasses.asdict(log), fingerprint,
                            rank=rank, is_main=main, barrier=accelerator.wait_for_everyone, sharded=sharded,
                            config=cfg.to_dict())
    if writer is not None:
        writer.close()
    return log


def resume_from(out: str, model, optimizer, scheduler, fingerprint: str, rank: int, sharded: bool,
                cfg: RunConfig) -> tuple[int, TrainLog]:
    """The step and log of the checkpoint in ``out``, its weights and optimizer state loaded in place."""
    start_step, state = load_checkpoint(out, model, optimizer, scheduler, fingerprint, rank=rank,
                                        sharded=sharded, config=cfg.to_dict())
    log = TrainLog(**state)
    log.resumed_from = start_step
    return start_step, log


def accumulate_gradients(model: torch.nn.Module, model_p: torch.nn.Module, batch: dict, cfg: RunConfig,
                         accelerator, sharded: bool) -> torch.Tensor:
    """Forward and backward this process's share of one global batch, in cfg.grad_accum micro-steps; the
    gradients are synchronised on the last one only. Returns the step's loss (float64, on the device)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for micro in range(cfg.grad_accum):
        piece = move(shard(batch, rank, world, micro, cfg.grad_accum), accelerator.device)
        last = micro == cfg.grad_accum - 1
        if sharded:
            model.set_requires_gradient_sync(last)
        with accelerator.no_sync(model_p) if not (last or sharded) else contextlib.nullcontext():
            with autocast(cfg, accelerator.device):
                loss = model_p(**piece).loss / cfg.grad_accum
            accelerator.backward(loss)
        step_loss += loss.detach().double()
    return step_loss


def flush(pending: list, log: TrainLog, writer, cfg: RunConfig) -> None:
    """Copy the pending steps' loss and ratios to the host (one synchronisation) and append them to the log."""
    if not pending:
        return
    losses = torch.stack([loss for _, loss, _, _, _ in pending]).tolist()
    before = torch.stack([b for _, _, _, b, _ in pending]).tolist()
    after = torch.stack([a for _, _, _, _, a in pending]).tolist()
    for (done, _, lr, _, _), value, ratio_before, ratio_after in zip(pending, losses, before, after):
        if not math.isfinite(value):
            raise DepthfastError(f"loss is {value} at step {done}; lower --lr (now {cfg.lr:g}) or check the data")
        log.loss.append(value)
        log.lr.append(lr)
        log.ratios_before.append(ratio_before)
        log.ratios_after.append(ratio_after)
        if writer is not None:
            writer.add_scalar("loss", value, done)
            writer.add_scalar("lr", lr, done)
            for name, b, a in zip(log.group_names, ratio_before, ratio_after):
                writer.add_scalars(f"update_ratio/{name}", {"before": b, "after": a}, done)
    pending.clear()


def open_tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional (tensorboard): only under --tensorboard
    except ImportError:
        raise DepthfastError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(log_dir=os.path.join(out, "tensorboard"))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute block activations in the backward pass (HF models, or the backbone of our classifier)."""
    target = getattr(model, "backbone", model)
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise DepthfastError(f"{type(target).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}  # the reentrant variant drops hooks' and autocast's state
    if hasattr(target, "activation_checkpointing_enable"):  # transformers ≥ 5.2x renamed it
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
