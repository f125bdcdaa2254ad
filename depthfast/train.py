"""Fine-tuning loop: AdamW with linear warm-up and decay, wrapped by the equal-step control.

With control "none" the same wrapper only records each group's update ratio ‖ΔW‖/‖W‖, so every
run logs its update-ratio profile; with "equal-step" it also rescales the updates. The loop
checkpoints every ``checkpoint_every`` steps and resumes from the latest checkpoint bit for bit
(same batches, same masking, same dropout draws); at the steps in ``measure_at`` it calls back to
measure the profile trajectory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from depthfast.batches import training_batches
from depthfast.checkpoint import load_checkpoint, read_pointer, save_checkpoint
from depthfast.config import RunConfig
from depthfast.data import Task
from depthfast.errors import DepthfastError
from depthfast.layers import ModelLayers
from depthfast.optim import EqualStep


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


def warmup_linear(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(named_groups, cfg: RunConfig):
    """AdamW (no decay on biases and norms), its schedule, and the EqualStep wrapper over the groups."""
    decay, no_decay = [], []
    for _, params in named_groups:
        for p in params:
            (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(cfg.warmup_steps, cfg.steps))
    target = "mean" if cfg.equal_step_target == "mean" else float(cfg.equal_step_target)
    control = EqualStep(optimizer, [params for _, params in named_groups], target=target, control=cfg.control)
    return optimizer, scheduler, control


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def finetune(model: torch.nn.Module, layers: ModelLayers, task: Task, tokenizer, cfg: RunConfig,
             device: torch.device, progress: bool = True, out: str | None = None, resume: bool = False,
             fingerprint: str = "", measure: Callable[[int], dict] | None = None) -> TrainLog:
    """Train ``model`` for cfg.steps steps; returns the log (also checkpointed under ``out``)."""
    named_groups = layers.param_groups()
    optimizer, scheduler, control = build_optimizer(named_groups, cfg)
    log = TrainLog(group_names=[name for name, _ in named_groups])
    start_step = 0
    if resume and out and read_pointer(out):
        start_step, state = load_checkpoint(out, model, optimizer, scheduler, fingerprint)
        log = TrainLog(**state)
        log.resumed_from = start_step
    measure_steps = cfg.measure_steps()
    if measure and start_step == 0 and 0 in measure_steps:
        log.trajectory.append(measure(0))
    batches = training_batches(cfg.objective, tokenizer, task.train_texts, task.train_labels, cfg.batch_size,
                               cfg.max_length, cfg.mlm_probability, cfg.seed, start_step=start_step)
    model.train()
    started, seconds_before = time.perf_counter(), log.seconds
    bar = tqdm(range(start_step, cfg.steps), desc=f"fine-tune ({cfg.control})", disable=not progress, unit="step",
               initial=start_step, total=cfg.steps)
    for step in bar:
        batch = move(next(batches), device)
        loss = model(**batch).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DepthfastError(f"loss is {value} at step {step + 1}; lower --lr (now {cfg.lr:g}) or check the data")
        loss.backward()
        log.lr.append(scheduler.get_last_lr()[0])
        control.step()
        control.zero_grad(set_to_none=True)
        scheduler.step()
        log.loss.append(value)
        log.ratios_before.append(control.ratios_before.tolist())
        log.ratios_after.append(control.ratios_after.tolist())
        log.tokens += int(batch["attention_mask"].sum())
        log.seconds = seconds_before + time.perf_counter() - started
        bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{log.tokens / max(log.seconds, 1e-9):.0f}")
        done = step + 1
        if measure and done in measure_steps and done < cfg.steps:
            log.trajectory.append(measure(done))
            model.train()
        if out and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(out, done, model, optimizer, scheduler, dataclasses.asdict(log), fingerprint)
    return log
