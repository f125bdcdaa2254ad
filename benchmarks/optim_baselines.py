"""The equal-step control written by hand with torch foreach ops: bench_optim.py's "by-hand" baseline.

Not part of depthfast: it is what a user would write without the fused path, kept here so that the
benchmark measures it and tests/test_optim.py checks it against the reference (a baseline that
computed something else would make the comparison meaningless). Bytes moved: README.md, "Bytes
moved per parameter" (the "by hand" row).
"""

from __future__ import annotations

import torch

from depthfast.optim import device_target_and_scales, ratios_from_sums


class ForeachEqualStep:
    """The equal-step control as written by hand with torch foreach ops: the benchmark's baseline.

    Per step: W0 = clone(W); optimizer.step(); D = W − W0; r_g = sqrt(Σ‖D‖² / Σ‖W0‖²) from
    ``torch._foreach_norm`` (norms in the parameter dtype, squares summed in fp32 per group);
    W = W0 + s_g D. No host sync; zero and infinite ratios as in :class:`EqualStep`. ``ratios_before``
    and ``scales`` are device tensors (fp32 (G,)).
    """

    def __init__(self, optimizer, groups, target: str | float = "mean") -> None:
        self.optimizer = optimizer
        self.params = [p for g in groups for p in g]
        self.target = target
        self.index = torch.tensor([gi for gi, g in enumerate(groups) for _ in g], device=self.params[0].device)
        self.num_groups = len(groups)
        bounds = [0]
        for g in groups:
            bounds.append(bounds[-1] + len(g))
        self.slices = list(zip(bounds[:-1], bounds[1:]))

    @torch.no_grad()
    def step(self):
        params = [p.detach() for p in self.params]
        before = [p.clone() for p in params]
        self.optimizer.step()
        delta = torch._foreach_sub(params, before)
        sums = torch.zeros(2, self.num_groups, dtype=torch.float32, device=self.index.device)
        sums[0].index_add_(0, self.index, torch.stack(torch._foreach_norm(delta)).float() ** 2)
        sums[1].index_add_(0, self.index, torch.stack(torch._foreach_norm(before)).float() ** 2)
        self.ratios_before = ratios_from_sums(sums[0], sums[1]).float()
        _, scales = device_target_and_scales(self.ratios_before, self.target)
        self.scales = scales.float()
        scales = self.scales.to(params[0].dtype)
        for gi, (a, b) in enumerate(self.slices):  # one foreach launch per group, scale a device scalar
            torch._foreach_mul_(delta[a:b], scales[gi])
        torch._foreach_add_(before, delta)
        torch._foreach_copy_(params, before)
