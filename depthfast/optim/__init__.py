"""The equal-step control: after every optimizer step, every layer moves by the same relative amount.

For parameter groups g (embeddings, each block, head) and one optimizer step W(t) → W(t+1):

    r_g = ‖W_g(t+1) − W_g(t)‖_F / ‖W_g(t)‖_F        (over the group's concatenated parameters)
    W_g(t+1) ← W_g(t) + (r* / r_g) · (W_g(t+1) − W_g(t))

with r* = mean_g r_g (``target="mean"``) or a fixed float. It separates "later layers change more
because their gradients are larger" from "later layers change more for a reason that survives equal
steps".

Groups that cannot be rescaled keep the optimizer's update and stay out of the mean: a group whose
update is zero this step (r_g = 0: nothing to scale) and a group with ‖W_g(t)‖ = 0 (a zero-initialised
head: r_g is infinite). Their ratios are reported as 0 and +inf; never NaN. Groups named ``free`` are
treated the same way whatever their ratio: the runner frees the head (task head, final norm, pooler),
which is not one of the profile's layers.

Two implementations behind one class, :class:`EqualStep`:

* the reference (any optimizer, any device): snapshot the parameters, step, norms in float64, rescale;
* the fused path (torch.optim.Adam / AdamW / SGD on a GPU, or forced with ``fused=True``; Triton kernels in
  ``depthfast.kernels.optim``): no snapshot, one multi-tensor launch per phase for all parameters, the
  per-group sums of squares (fp64) and the scales stay on the device (no host sync per step).

Bytes moved per parameter by each path against torch's own step: README.md, "Bytes moved per
parameter" (the one copy of that table). The reference moves more still (float64 copies) and syncs
with the host per group.

Modules:
    equal_step.py        EqualStep, EqualStepAdamW (the public API) and the reference path
    scales.py            ratios r_g, target r*, scales s_g (shared by both paths)
    fused_support.py     whether the fused path can run (fused_unsupported_reason), its launch_config
    fused.py             the fused path's host engine: device tables, launches, device-side scales
    fused_algorithms.py  Adam/AdamW and SGD on that engine: optimizer state and hyper-parameter rows
"""

from depthfast.optim.equal_step import CONTROLS, MODES, EqualStep, EqualStepAdamW
from depthfast.optim.fused_support import FUSED_OPTIMIZERS, fused_unsupported_reason, launch_config
from depthfast.optim.scales import device_target_and_scales, equal_step_scales, group_update_ratio, ratios_from_sums

__all__ = [
    "CONTROLS",
    "FUSED_OPTIMIZERS",
    "MODES",
    "EqualStep",
    "EqualStepAdamW",
    "device_target_and_scales",
    "equal_step_scales",
    "fused_unsupported_reason",
    "group_update_ratio",
    "launch_config",
    "ratios_from_sums",
]
