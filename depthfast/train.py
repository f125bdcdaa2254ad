"""Fine-tuning loop: AdamW with linear warm-up and decay, wrapped by the equal-step control.

With control "none" the same wrapper only records each group's update ratio ‖ΔW‖/‖W‖, so every
run logs its update-ratio profile; with "equal-step" it also rescales the updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from depthfast.batches import training_batches
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
    tokens: int = 0
    seconds: float = 0.0


def warmup_linear(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def finetune(model: torch.nn.Module, layers: ModelLayers, task: Task, tokenizer, cfg: RunConfig,
             device: torch.device, progress: bool = True) -> TrainLog:
    import time

    named_groups = layers.param_groups()
    decay, no_decay = [], []
    for _, params in named_groups:
        for p in params:
            (decay if p.dim() >= 2 else no_decay).append(p)  # biases and norms are not decayed
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(cfg.warmup_steps, cfg.steps))
    target = "mean" if cfg.equal_step_target == "mean" else float(cfg.equal_step_target)
    control = EqualStep(optimizer, [params for _, params in named_groups], target=target, control=cfg.control)
    log = TrainLog(group_names=[name for name, _ in named_groups])
    batches = training_batches(cfg.objective, tokenizer, task.train_texts, task.train_labels, cfg.batch_size,
                               cfg.max_length, cfg.mlm_probability, cfg.seed)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"fine-tune ({cfg.control})", disable=not progress, unit="step")
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
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{log.tokens / elapsed:.0f}")
    log.seconds = time.perf_counter() - start
    return log
