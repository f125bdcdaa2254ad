"""The equal-step control: after every optimizer step, every layer moves by the same relative amount.

For parameter groups g (embeddings, each block, head) and one optimizer step W(t) → W(t+1):

    r_g = ‖W_g(t+1) − W_g(t)‖_F / ‖W_g(t)‖_F        (over the group's concatenated parameters)
    W_g(t+1) ← W_g(t) + (r* / r_g) · (W_g(t+1) − W_g(t))

with r* = mean_g r_g (``target="mean"``) or a fixed float. It separates "later layers change more
because their gradients are larger" from "later layers change more for a reason that survives equal
steps".

Groups that cannot be rescaled keep the optimizer's update and stay out of the mean: a group whose
update is zero this step (r_g = 0: nothing to scale) and a group with ‖W_g(t)‖ = 0 (a zero-initialised
head: r_g is infinite). Their ratios are reported as 0 and +inf; never NaN.

This is the reference implementation: it snapshots the parameters and computes norms in float64.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

CONTROLS = ("equal-step", "none")


class EqualStep:
    """Wrap ``optimizer`` so that each ``step()`` is followed by the equal-step rescale.

    groups: list of lists of parameters (disjoint). target: "mean" or a positive float.
    control: "equal-step" rescales; "none" only records the ratios (the update-ratio profile).

    After each step: ``ratios_before`` and ``ratios_after`` (float64 tensors (G,)), ``target_ratio``
    (the r* used, a float; NaN-free: 0.0 when no group could be rescaled) and ``scales`` (float64 (G,)).
    The wrapped optimizer's state is not touched; everything else is delegated to it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: Sequence[Iterable[torch.nn.Parameter]],
        target: str | float = "mean",
        control: str = "equal-step",
    ) -> None:
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}; got {control!r}")
        if not (target == "mean" or (isinstance(target, (int, float)) and math.isfinite(target) and target > 0)):
            raise ValueError(f"target must be 'mean' or a positive finite float; got {target!r}")
        self.groups = [list(g) for g in groups]
        if not self.groups or any(len(g) == 0 for g in self.groups):
            raise ValueError("groups must be a non-empty list of non-empty parameter lists")
        seen: set[int] = set()
        for g in self.groups:
            for p in g:
                if id(p) in seen:
                    raise ValueError("a parameter appears in more than one group")
                seen.add(id(p))
        self.optimizer = optimizer
        self.target = target
        self.control = control
        num_groups = len(self.groups)
        self.ratios_before = torch.zeros(num_groups, dtype=torch.float64)
        self.ratios_after = torch.zeros(num_groups, dtype=torch.float64)
        self.scales = torch.ones(num_groups, dtype=torch.float64)
        self.target_ratio = 0.0

    # Delegation keeps the wrapper a drop-in replacement where code only uses the optimizer protocol.
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        before = [[p.detach().clone() for p in g] for g in self.groups]
        if closure is not None:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        else:
            loss = self.optimizer.step()
        self.ratios_before = torch.tensor(
            [group_update_ratio(g, b) for g, b in zip(self.groups, before)], dtype=torch.float64
        )
        self.scales = equal_step_scales(self.ratios_before, self.target)
        self.target_ratio = _target_of(self.ratios_before, self.target)
        if self.control == "equal-step":
            for g, b, s in zip(self.groups, before, self.scales.tolist()):
                if s != 1.0:
                    for p, p0 in zip(g, b):
                        rescaled = p0.to(torch.float64) + s * (p.to(torch.float64) - p0.to(torch.float64))
                        p.copy_(rescaled)
            self.ratios_after = torch.tensor(
                [group_update_ratio(g, b) for g, b in zip(self.groups, before)], dtype=torch.float64
            )
        else:
            self.ratios_after = self.ratios_before.clone()
        return loss


def group_update_ratio(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> float:
    """‖W(t+1) − W(t)‖_F / ‖W(t)‖_F over a group, sums of squares in float64.

    Returns 0.0 for a zero update and +inf for a non-zero update of an all-zero group.
    """
    delta_sq = sum(float(torch.sum((p.to(torch.float64) - b.to(torch.float64)) ** 2)) for p, b in zip(params, before))
    weight_sq = sum(float(torch.sum(b.to(torch.float64) ** 2)) for b in before)
    if delta_sq == 0.0:
        return 0.0
    if weight_sq == 0.0:
        return math.inf
    return math.sqrt(delta_sq / weight_sq)


def _rescalable(ratios: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(ratios) & (ratios > 0)


def _target_of(ratios: torch.Tensor, target: str | float) -> float:
    ok = _rescalable(ratios)
    if not bool(ok.any()):
        return 0.0
    return float(ratios[ok].mean()) if target == "mean" else float(target)


def equal_step_scales(ratios: torch.Tensor, target: str | float = "mean") -> torch.Tensor:
    """Per-group scale s_g = r* / r_g (float64 (G,)); 1 for groups that cannot be rescaled."""
    ok = _rescalable(ratios)
    scales = torch.ones_like(ratios, dtype=torch.float64)
    if bool(ok.any()):
        scales[ok] = _target_of(ratios, target) / ratios[ok].to(torch.float64)
    return scales
