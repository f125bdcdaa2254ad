"""The equal-step arithmetic: per-group update ratios r_g, the target r*, the scales s_g = r*/r_g.

    r_g = sqrt(Σ‖ΔW‖² / Σ‖W‖²) over the group's parameters (float64 (G,))
    r*  = mean of r_g over the rescalable groups (target "mean") or a fixed float
    s_g = r* / r_g for rescalable groups, 1 otherwise

A group is rescalable when 0 < r_g < ∞ and it is ``allowed`` (not free): r_g = 0 (a zero update,
nothing to scale) and r_g = +inf (‖W_g‖ = 0, e.g. a zero-initialised head) keep the optimizer's update
and stay out of the mean; never NaN. Shared by the reference path (host floats) and the fused path
(device tensors, no host sync).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from depthfast.distributed import group_sums_of_squares


def ratios_from_sums(delta_sq: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
    """r_g = sqrt(Σ‖ΔW‖² / Σ‖W‖²) per group (float64 (G,)): 0 for a zero update, +inf for a zero W.

    Pure tensor ops (no host sync), for sums that live on a device.
    """
    delta_sq = delta_sq.to(torch.float64)
    weight_sq = weight_sq.to(torch.float64)
    safe = torch.where(weight_sq > 0, weight_sq, torch.ones_like(weight_sq))
    r = torch.sqrt(delta_sq / safe)
    r = torch.where(weight_sq > 0, r, torch.full_like(r, math.inf))
    return torch.where(delta_sq > 0, r, torch.zeros_like(r))


def reference_ratios(groups, before) -> torch.Tensor:
    """Per-group r_g (float64 (G,), on the CPU) from float64 sums over every process's shards."""
    sums = group_sums_of_squares(groups, before)
    return ratios_from_sums(sums[:, 0], sums[:, 1])


def group_update_ratio(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> float:
    """‖W(t+1) − W(t)‖_F / ‖W(t)‖_F over a group, sums of squares in float64.

    Returns 0.0 for a zero update and +inf for a non-zero update of an all-zero group.
    """
    return float(reference_ratios([params], [before])[0])


def rescalable(ratios: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """bool (G,): the groups whose step can be scaled (0 < r_g < ∞) and that are ``allowed`` (not free)."""
    ok = torch.isfinite(ratios) & (ratios > 0)
    return ok if allowed is None else ok & allowed


def target_of(ratios: torch.Tensor, target: str | float, allowed: torch.Tensor | None = None) -> float:
    """r* as a host float (syncs): 0.0 when no group is rescalable."""
    ok = rescalable(ratios, allowed)
    if not bool(ok.any()):
        return 0.0
    return float(ratios[ok].mean()) if target == "mean" else float(target)


def device_target_and_scales(ratios: torch.Tensor, target: str | float = "mean",
                             allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r*, s) without a host sync: r* a 0-dim float64 tensor (0 when no group is rescalable) and
    s_g = r*/r_g (float64 (G,)), 1 for groups that cannot be rescaled or are not ``allowed`` (bool (G,),
    on the ratios' device; None: all)."""
    ratios = ratios.to(torch.float64)
    ok = rescalable(ratios, allowed)
    count = ok.sum()
    if target == "mean":
        r_star = torch.where(ok, ratios, torch.zeros_like(ratios)).sum() / count.clamp(min=1)
    else:
        r_star = torch.full((), float(target), dtype=torch.float64, device=ratios.device)
    r_star = torch.where(count > 0, r_star, torch.zeros_like(r_star))
    safe = torch.where(ok, ratios, torch.ones_like(ratios))
    scales = torch.where(ok, r_star / safe, torch.ones_like(ratios))
    return r_star, scales


def equal_step_scales(ratios: torch.Tensor, target: str | float = "mean",
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group scale s_g = r* / r_g (float64 (G,)); 1 for groups that cannot be rescaled or are
    not ``allowed``."""
    return device_target_and_scales(ratios, target, allowed)[1]
