"""The equal-step control as a ``torch.optim.Optimizer`` that a ``transformers.Trainer`` (and accelerate)
can take: ``Trainer(optimizers=(equal_step_optimizer(model, args), None))``.

EqualStep (depthfast.optim) wraps a torch optimizer without being one. Trainer hands the optimizer to
``accelerator.prepare``, which wraps only ``torch.optim.Optimizer`` instances in AcceleratedOptimizer
(where fp16's GradScaler unscales gradients, checks for inf and skips the step), and torch's LR
schedulers refuse anything else (``TypeError: EqualStep is not an Optimizer``). EqualStepOptimizer is
that Optimizer: its ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects
(so the Trainer's scheduler sets the learning rate the wrapped AdamW reads), ``step`` is one
EqualStep step, and ``state_dict`` / ``load_state_dict`` are the wrapped optimizer's (Trainer's
checkpoints hold a plain AdamW state). Like accelerate's AcceleratedOptimizer it does not run
``Optimizer.__init__``, which would build param groups of its own.

Per optimizer step W(t) → W(t+1), for the role groups g of depthfast.layers (embeddings, block.ℓ, head):
r_g = ‖W_g(t+1) − W_g(t)‖_F / ‖W_g(t)‖_F, and under "equal-step" W_g(t+1) ← W_g(t) + (r*/r_g)(W_g(t+1) − W_g(t)).
Trainer steps the optimizer once per ``gradient_accumulation_steps`` micro-batches, after gradient
clipping, so the control acts once per optimizer step on the clipped, accumulated gradients.
"""

from __future__ import annotations

import dataclasses

import torch

from depthfast.config import RunConfig
from depthfast.layers import discover_layers, prepare_for_measurement
from depthfast.optim import EqualStep
from depthfast.train import build_control, build_optimizer


class EqualStepOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step`` is ``equal_step.step()`` (depthfast.optim.EqualStep).

    ``group_names``: names of EqualStep's groups, in order (default ``group.0``, ``group.1`` …).
    After each step: ``ratios_before``, ``ratios_after`` (float64 (G,)), as EqualStep; ``steps`` counts
    the optimizer steps taken (one per Trainer update, whatever the gradient accumulation).
    """

    def __init__(self, equal_step: EqualStep, group_names: list[str] | None = None) -> None:
        if not isinstance(equal_step, EqualStep):
            raise TypeError(f"EqualStepOptimizer wraps a depthfast.optim.EqualStep; got {type(equal_step).__name__}")
        names = list(group_names) if group_names is not None else [f"group.{i}" for i in range(len(equal_step.groups))]
        if len(names) != len(equal_step.groups):
            raise ValueError(f"{len(names)} group names for {len(equal_step.groups)} groups")
        self.equal_step = equal_step
        self.group_names = names
        self.steps = 0

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped torch optimizer (the AdamW whose state the checkpoints hold)."""
        return self.equal_step.optimizer

    @property
    def param_groups(self):
        return self.equal_step.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.equal_step.optimizer.param_groups = value

    @property
    def state(self):
        return self.equal_step.optimizer.state

    @state.setter
    def state(self, value):
        self.equal_step.optimizer.state = value

    @property
    def defaults(self):
        return self.equal_step.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.equal_step.optimizer.defaults = value

    @property
    def ratios_before(self) -> torch.Tensor:
        return self.equal_step.ratios_before

    @property
    def ratios_after(self) -> torch.Tensor:
        return self.equal_step.ratios_after

    def step(self, closure=None):
        loss = self.equal_step.step(closure)
        self.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.equal_step.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.equal_step.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.equal_step.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        raise ValueError("EqualStepOptimizer: the equal-step groups are fixed when it is built; build a new one")

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"EqualStepOptimizer(control={self.equal_step.control!r}, groups={len(self.group_names)}, "
                f"optimizer={type(self.optimizer).__name__}, fused={self.equal_step.fused})")


def find_equal_step(optimizer) -> EqualStepOptimizer | EqualStep | None:
    """The EqualStepOptimizer (or bare EqualStep) inside ``optimizer`` (Trainer's AcceleratedOptimizer
    wraps it as ``.optimizer``), or None when the Trainer runs some other optimizer."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, (EqualStepOptimizer, EqualStep)):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def equal_step_optimizer(model: torch.nn.Module, args=None, *, control: str = "equal-step",
                         lr: float | None = None, weight_decay: float | None = None, optimizer: str = "adamw",
                         momentum: float = 0.9, target: str | float = "mean", equal_step_head: bool = False,
                         tied_embeddings: str = "head", fused: bool | None = None) -> EqualStepOptimizer:
    """AdamW (or SGD) over ``model``'s role groups with depthfast's weight-decay rule, under the control.

    The optimizer and the control are depthfast.train's own (``build_optimizer``, ``build_control``), as
    ``python -m depthfast.run`` builds them: decay on matrices only (``ModelLayers.no_weight_decay``),
    the head group free under the control unless ``equal_step_head``, the tied input/output matrix in
    the group ``tied_embeddings`` names. ``args`` (TrainingArguments) gives lr, weight decay, Adam's
    betas and epsilon (``lr``/``weight_decay`` given here win), and the device: the model is moved
    there first (as Trainer would), so that EqualStep sees GPU parameters and picks its fused path.
    The learning-rate schedule is the Trainer's (``optimizers=(opt, None)``: from args) or your own
    scheduler over the returned optimizer. ``control="none"`` only records the update ratios and
    steps exactly as the plain AdamW would.
    """
    if args is not None and getattr(args, "place_model_on_device", True) and not getattr(model, "hf_device_map", None):
        model.to(args.device)  # as Trainer.__init__ would (it leaves a model dispatched over devices where it is)
    if lr is None:
        lr = args.learning_rate if args is not None else RunConfig.lr
    if weight_decay is None:
        weight_decay = args.weight_decay if args is not None else RunConfig.weight_decay
    prepare_for_measurement(model)
    layers = discover_layers(model)
    named = layers.param_groups(tied_embeddings)
    # warmup_steps 0 and steps 1: build_optimizer's own schedule then leaves the lr as given (factor 1);
    # the schedule that runs is the Trainer's.
    cfg = dataclasses.replace(RunConfig(), control=control, optimizer=optimizer, lr=float(lr),
                              weight_decay=float(weight_decay), momentum=momentum, warmup_steps=0, steps=1,
                              equal_step_target=str(target), equal_step_head=equal_step_head,
                              tied_embeddings=tied_embeddings).validate()
    opt, _ = build_optimizer(named, cfg, layers.no_weight_decay())
    for group in opt.param_groups:
        group.pop("initial_lr", None)  # left by build_optimizer's schedule; the Trainer's sets its own
        if args is not None and optimizer == "adamw":
            group["betas"] = (args.adam_beta1, args.adam_beta2)
            group["eps"] = args.adam_epsilon
    return EqualStepOptimizer(build_control(opt, named, cfg, fused=fused), [name for name, _ in named])
