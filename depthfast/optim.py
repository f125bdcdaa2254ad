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

Bytes moved per parameter, with P, G, S the bytes of one element of the parameter, gradient and each
Adam moment (fp32 everything: P = G = S = 4; bf16 params and grads with fp32 states: P = G = 2, S = 4):

    torch AdamW (fused), the minimum for any Adam step:   2P + G + 4S      fp32 28   bf16/fp32-states 22
    mode="exact" (default): phase 1 reads W, g, m, v and
      writes m, v; phase 2 reads W, m, v and writes W:    3P + G + 6S      fp32 40   bf16/fp32-states 32
    mode="single-pass": one pass, scales from the
      previous step's ratios                              2P + G + 4S      fp32 28   bf16/fp32-states 22
    control="none": one pass, scale 1, ratios recorded:   2P + G + 4S      fp32 28   bf16/fp32-states 22
    ForeachEqualStep (by hand, below): snapshot 2P, step, W − W0 3P, two norms 2P, rescale 2P + 3P,
      copy back 2P:                                       16P + G + 4S     fp32 84   (+2P of memory)

(bf16 everything, as torch keeps states for bf16 params: AdamW 14, exact 20.) SGD with momentum keeps one
state (S counted once): torch 2P + G + 2S (fp32 20), exact 3P + G + 3S (28; Nesterov re-reads G: 32),
single pass and control "none" 2P + G + 2S (20). The reference EqualStep
moves more still (float64 copies) and syncs with the host per group.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import torch

from depthfast.distributed import group_sums_of_squares, local_shard, shard_process_groups, sum_over_shards

CONTROLS = ("equal-step", "none")
# Exactly these classes (not subclasses, whose step may differ) run on the fused kernels.
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
MODES = ("exact", "single-pass")


class EqualStep:
    """Wrap ``optimizer`` so that each ``step()`` is followed by the equal-step rescale.

    groups: list of lists of parameters (disjoint). target: "mean" or a positive float.
    control: "equal-step" rescales; "none" only records the ratios (the update-ratio profile).
    fused: None picks the fused kernels when ``optimizer`` is exactly torch.optim.Adam, AdamW or SGD (no
    amsgrad / capturable / differentiable) with its parameters on a GPU, else the reference; True forces
    the fused path (ValueError if unsupported; on a CPU it needs ``TRITON_INTERPRET=1``); False forces
    the reference.
    mode (fused path only): "exact" (two passes, every step's ratios equal) or "single-pass" (scale this
    step's update by r*/r_g of the previous step: AdamW's memory traffic, ratios only nearly equal; the
    first step is exact). Measured on a char-level GPT-2 (d 64, 4 layers, AdamW lr 3e-3, 60 steps, CPU):
    max_g |r_g / mean r − 1| per step had median 0.10 and worst 1.47 (a step where one block's ratio
    jumped ×3), against 1.29 / 2.57 without control and ~1e-7 in exact mode.
    free: indices of groups that are measured (their ratios are reported) but keep the optimizer's
    update and stay out of the mean target, e.g. a task head that is not one of the profile's layers.
    state_dtype (fused path only): dtype of freshly created exp_avg / exp_avg_sq (SGD: momentum_buffer), e.g. torch.float32 for
    bf16 parameters (torch's own Adam cannot step such a state, so this pins the fused path).

    After each step: ``ratios_before`` and ``ratios_after`` (float64 (G,)), ``scales`` (float64 (G,))
    and ``target_ratio`` (the r* used, a float; 0.0 when no group could be rescaled). On the fused path
    the tensors live on the parameters' device and ``ratios_after`` = scales · ratios_before (the ratio
    of the update as computed, before rounding to the parameter dtype); ``target_ratio`` syncs only
    when read. In single-pass mode, ``scales`` and ``target_ratio`` are those applied this step (from
    the previous step's ratios). The wrapped optimizer's state (exp_avg, exp_avg_sq, step) is kept as
    torch.optim.Adam/AdamW keeps it (SGD: momentum_buffer, as torch.optim.SGD); everything else is
    delegated to it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        groups: Sequence[Iterable[torch.nn.Parameter]],
        target: str | float = "mean",
        control: str = "equal-step",
        fused: bool | None = None,
        mode: str = "exact",
        state_dtype: torch.dtype | None = None,
        free: Sequence[int] = (),
    ) -> None:
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}; got {control!r}")
        if not (target == "mean" or (isinstance(target, (int, float)) and not isinstance(target, bool)
                                     and math.isfinite(target) and target > 0)):
            raise ValueError(f"target must be 'mean' or a positive finite float; got {target!r}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False; got {fused!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        self.groups = [list(g) for g in groups]
        if not self.groups or any(len(g) == 0 for g in self.groups):
            raise ValueError("groups must be a non-empty list of non-empty parameter lists")
        free = tuple(sorted(set(free)))
        if any(not isinstance(i, int) or not 0 <= i < len(self.groups) for i in free):
            raise ValueError(f"free must hold group indices in 0..{len(self.groups) - 1}; got {free!r}")
        self.free = free
        self._allowed = torch.tensor([i not in free for i in range(len(self.groups))])
        seen: set[int] = set()
        for g in self.groups:
            for p in g:
                if not isinstance(p, torch.Tensor):
                    raise ValueError(f"groups must hold tensors; got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("a parameter appears in more than one group")
                seen.add(id(p))
        self.optimizer = optimizer
        self.target = target
        self.control = control
        self.mode = mode

        reason = fused_unsupported_reason(optimizer, self.groups, forced=fused is True)
        if fused is True and reason is not None:
            raise ValueError(f"fused=True, but the fused equal-step path cannot run: {reason}")
        self.fused = reason is None if fused is None else fused
        if not self.fused and mode != "exact":
            raise ValueError(f"mode={mode!r} needs the fused path, which is not used here ({reason or 'fused=False'})")
        if not self.fused and state_dtype is not None:
            raise ValueError("state_dtype needs the fused path (torch's Adam keeps states in the parameter dtype)")
        self._engine = None
        if self.fused:
            engine = _FusedSgd if type(optimizer) is torch.optim.SGD else _FusedAdam
            self._engine = engine(optimizer, self.groups, target, control, mode, state_dtype, self._allowed)

        num_groups = len(self.groups)
        self.ratios_before = torch.zeros(num_groups, dtype=torch.float64)
        self.ratios_after = torch.zeros(num_groups, dtype=torch.float64)
        self.scales = torch.ones(num_groups, dtype=torch.float64)
        self._target_ratio: float | torch.Tensor = 0.0

    @property
    def target_ratio(self) -> float:
        """r* of the last step (a float; on the fused path reading it waits for the device)."""
        return float(self._target_ratio)

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
        if self._engine is not None:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.ratios_before, self.ratios_after, self.scales, self._target_ratio = self._engine.step()
            return loss
        return self._reference_step(closure)

    def _reference_step(self, closure=None):
        # Sharded (FSDP2) parameters: the snapshot, the sums and the rescale act on local shards,
        # and one all-reduce of the (G, 2) partial sums makes every rank's ratios global.
        before = [[local_shard(p).detach().clone() for p in g] for g in self.groups]
        if closure is not None:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        else:
            loss = self.optimizer.step()
        self.ratios_before = _reference_ratios(self.groups, before)
        self.scales = equal_step_scales(self.ratios_before, self.target, self._allowed)
        self._target_ratio = _target_of(self.ratios_before, self.target, self._allowed)
        if self.control == "equal-step":
            for g, b, s in zip(self.groups, before, self.scales.tolist()):
                if s != 1.0:
                    for p, p0 in zip(g, b):
                        _rescale_update(local_shard(p), p0, s)
            self.ratios_after = _reference_ratios(self.groups, before)
        else:
            self.ratios_after = self.ratios_before.clone()
        return loss


@torch.no_grad()
def _rescale_update(shard: torch.Tensor, before: torch.Tensor, scale: float) -> None:
    """W ← W(t) + s·(W − W(t)), computed in float64 and rounded once to the parameter's dtype."""
    before64 = before.to(torch.float64)
    shard.copy_(shard.to(torch.float64).sub_(before64).mul_(scale).add_(before64))


def _reference_ratios(groups, before) -> torch.Tensor:
    """Per-group r_g (float64 (G,), on the CPU) from float64 sums over every process's shards."""
    sums = group_sums_of_squares(groups, before)
    return ratios_from_sums(sums[:, 0], sums[:, 1])


class EqualStepAdamW(EqualStep):
    """torch.optim.AdamW with the equal-step control built in: ``EqualStep(AdamW(params, ...), groups, ...)``.

    ``params`` defaults to the concatenation of ``groups``. Same attributes as :class:`EqualStep`; the
    AdamW is ``self.optimizer``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | None = None,
        groups: Sequence[Iterable[torch.nn.Parameter]] = (),
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        target: str | float = "mean",
        control: str = "equal-step",
        fused: bool | None = None,
        mode: str = "exact",
        state_dtype: torch.dtype | None = None,
        free: Sequence[int] = (),
    ) -> None:
        groups = [list(g) for g in groups]
        params = [p for g in groups for p in g] if params is None else list(params)
        if not params:
            raise ValueError("EqualStepAdamW needs parameters (params or groups)")
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(optimizer, groups, target=target, control=control, fused=fused, mode=mode,
                         state_dtype=state_dtype, free=free)


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


def fused_unsupported_reason(optimizer, groups, forced: bool = False) -> str | None:
    """Why the fused path cannot run this optimizer (a sentence), or None when it can.

    Without ``forced`` the parameters must be on a GPU; with it, CPU parameters run in the Triton
    interpreter (TRITON_INTERPRET=1).
    """
    if type(optimizer) not in FUSED_OPTIMIZERS:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in FUSED_OPTIMIZERS)
        return f"the wrapped optimizer is {type(optimizer).__name__}; the fused path covers {names}"
    decoupled = set()
    for pg in optimizer.param_groups:
        for flag in ("amsgrad", "capturable", "differentiable"):
            if pg.get(flag, False):
                return f"{flag}=True is not supported by the fused path"
        if type(optimizer) is torch.optim.SGD:
            continue
        decoupled.add(type(optimizer) is torch.optim.AdamW or bool(pg.get("decoupled_weight_decay", False)))
        if isinstance(pg["betas"][0], torch.Tensor) or isinstance(pg["betas"][1], torch.Tensor):
            return "tensor betas are not supported by the fused path"
    if len(decoupled) > 1:
        return "param groups mix decoupled and L2 weight decay"
    params = [p for pg in optimizer.param_groups for p in pg["params"]] + [p for g in groups for p in g]
    devices = {p.device for p in params}
    if len(devices) != 1:
        return f"parameters are on several devices {sorted(map(str, devices))}"
    device = next(iter(devices))
    if any(p.is_complex() for p in params):
        return "complex parameters are not supported by the fused path"
    if any(p.is_sparse for p in params):
        return "sparse parameters are not supported by the fused path"
    if device.type != "cuda":
        if not forced:
            return f"parameters are on {device}, not a GPU"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return f"parameters are on {device}: set TRITON_INTERPRET=1 (before importing depthfast) to run the kernels on a CPU"
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if device.type != "cuda":
        from depthfast.kernels import optim as kernels

        if not kernels.interpreter_runs_loops():
            import numpy

            return (f"the Triton interpreter of triton {triton.__version__} cannot run the kernels' loops with "
                    f"numpy {numpy.__version__} (triton 3.9's interpreter runs them)")
    return None


def group_update_ratio(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> float:
    """‖W(t+1) − W(t)‖_F / ‖W(t)‖_F over a group, sums of squares in float64.

    Returns 0.0 for a zero update and +inf for a non-zero update of an all-zero group.
    """
    return float(_reference_ratios([params], [before])[0])


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


def _rescalable(ratios: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    ok = torch.isfinite(ratios) & (ratios > 0)
    return ok if allowed is None else ok & allowed


def _target_of(ratios: torch.Tensor, target: str | float, allowed: torch.Tensor | None = None) -> float:
    ok = _rescalable(ratios, allowed)
    if not bool(ok.any()):
        return 0.0
    return float(ratios[ok].mean()) if target == "mean" else float(target)


def device_target_and_scales(ratios: torch.Tensor, target: str | float = "mean",
                             allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r*, s) without a host sync: r* a 0-dim float64 tensor (0 when no group is rescalable) and
    s_g = r*/r_g (float64 (G,)), 1 for groups that cannot be rescaled or are not ``allowed`` (bool (G,),
    on the ratios' device; None: all)."""
    ratios = ratios.to(torch.float64)
    ok = _rescalable(ratios, allowed)
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


def launch_config(device: torch.device) -> tuple[int, int]:
    """(BLOCK, CHUNK) of the fused kernels for parameters on ``device``: elements per loop iteration
    of a program and per program. GPU: 1024 and 64 K (BLOCK 1024 compiles to 48–64 registers without
    spills on sm_90, BLOCK 4096 to 243). Interpreter (CPU): 4096 and 64 K, since each program and
    each loop iteration costs milliseconds there. The environment variables DEPTHFAST_OPTIM_BLOCK
    and DEPTHFAST_OPTIM_CHUNK override them (for experiments)."""
    on_gpu = device.type == "cuda"
    block = int(os.environ.get("DEPTHFAST_OPTIM_BLOCK", 1024 if on_gpu else 4096))
    chunk = int(os.environ.get("DEPTHFAST_OPTIM_CHUNK", 64 * block if on_gpu else 16 * block))
    if block < 16 or block & (block - 1) or chunk % block:
        raise ValueError(f"DEPTHFAST_OPTIM_BLOCK must be a power of two ≥ 16 and DEPTHFAST_OPTIM_CHUNK a "
                         f"multiple of it; got {block} and {chunk}")
    return block, chunk


class _FusedEqualStep:
    """Host side of the fused path: lazy state init, device tables, launches, device-side scales.

    Per step, Python work is O(number of tensors) (like torch's own optimizer), device work is one
    (control "none", single-pass) or two (exact) kernel launches per dtype bucket plus a handful of
    (G,)-sized ops; nothing waits for the device. Under FSDP2 or HSDP (DTensor parameters) each
    rank works on its local shards and the (2G,) partial sums are all-reduced once, over the mesh
    dimension the parameters are sharded on (HSDP: not over the replicas).
    Subclasses supply the algorithm: its state tensors, its hyperparameter rows and its kernel flag.
    """

    SGD = False  # the kernel's algorithm flag

    def __init__(self, optimizer, groups, target, control, mode, state_dtype, allowed):
        from depthfast.kernels import optim as kernels

        self.k = kernels
        self.optimizer = optimizer
        self.groups = groups
        self.target = target
        self.control = control
        self.mode = mode
        self.state_dtype = state_dtype
        self.num_groups = len(groups)
        self.group_of = {id(p): gi for gi, g in enumerate(groups) for p in g}
        self.group_params = [p for g in groups for p in g]
        self.device = self.group_params[0].device
        self.block, self.chunk = launch_config(self.device)
        self.process_groups = None
        self._key = None
        self._storage_at_build = None  # _storage() when the tables were built
        self._next_scales = None  # single-pass: r*/r_g of the previous step (float64 (G,), device)
        self._next_target = None
        self._ones = torch.ones(self.num_groups, dtype=torch.float32, device=self.device)
        self.allowed = allowed.to(self.device)

    # -- the algorithm (subclasses) -------------------------------------------------------------------
    decoupled = False

    def _states(self, p, h, pg):
        """(s1, s2, hyper row) of a stepped parameter, creating the optimizer state as torch would."""
        raise NotImplementedError

    def _hyper_rows(self) -> list[list[float]]:
        raise NotImplementedError

    def _stale(self) -> bool:
        """Whether the tables must be rebuilt although the parameters and grads are the same."""
        return False

    def _advance(self) -> None:
        """Host-side bookkeeping of one step (step counters), before the launches."""

    def _state_tensors(self, p) -> tuple:
        """The optimizer-state tensors of ``p`` the tables may point at (None where absent), read
        without creating any."""
        raise NotImplementedError

    def _storage(self, flat) -> list[int]:
        """The address of every tensor the tables point at other than gradients (those are checked by
        ``Tables.refresh_grads``): each parameter's (local) storage and its state tensors. Storage can
        move under a built table: ``p.data = new``, ``model.to(dtype)``, a state tensor replaced in
        ``optimizer.state``; the table would then step orphaned copies (or, once they are freed, write
        to freed memory). O(tensors) per step, a few ``data_ptr`` calls each."""
        sig = []
        for p in (*flat, *self.group_params):
            sig.append(local_shard(p).data_ptr())
            sig.extend(local_shard(t).data_ptr() if isinstance(t, torch.Tensor) else 0 for t in self._state_tensors(p))
        return sig

    # -- layout -------------------------------------------------------------------------------------
    def _build(self, flat):
        flat_index = {id(p): i for i, p in enumerate(flat)}
        entries = []
        stepped_ids = set()
        for h, pg in enumerate(self.optimizer.param_groups):
            for p in pg["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("the fused equal-step path does not support sparse gradients (use fused=False)")
                stepped_ids.add(id(p))
                s1, s2, row = self._states(p, h, pg)
                w = local_shard(p).detach()
                s1, s2 = (local_shard(t) if t is not None else None for t in (s1, s2))
                if not all(t.is_contiguous() for t in (w, s1, s2) if t is not None):
                    raise ValueError("the fused equal-step path needs contiguous parameters and states (use fused=False)")
                if any(t is not None and t.shape != w.shape for t in (s1, s2)):
                    raise ValueError("the optimizer state does not match its parameter in shape")
                entries.append((w, None, s1, s2, self.group_of.get(id(p), -1), row, p, flat_index[id(p)]))
        for p in self.group_params:
            if id(p) not in stepped_ids:
                w = local_shard(p).detach()
                if not w.is_contiguous():
                    raise ValueError("the fused equal-step path needs contiguous parameters (use fused=False)")
                entries.append((w, None, None, None, self.group_of[id(p)], -1, p, -1))
        devices = {en[0].device for en in entries}
        if devices != {self.device}:
            raise ValueError(f"parameters moved to {sorted(map(str, devices))}; the fused path was set up on {self.device}")
        self.process_groups = self._process_groups([en[6] for en in entries])

        # Buckets of equal dtypes and vector alignment (one launch per phase each; a tensor at an odd
        # offset or of odd size must not stop the others' 16-byte accesses); unstepped entries join a
        # bucket with their parameter dtype, since only W is read for them.
        entries = [en[:1] + (self._checked_grad(en[6].grad, en[0]) if en[5] >= 0 else None,) + en[2:] for en in entries]
        buckets: dict[tuple, list] = {}
        for en in entries:
            if en[5] >= 0:
                state_dtype = en[2].dtype if en[2] is not None else en[0].dtype
                key = (en[0].dtype, en[1].dtype, state_dtype, self.k.vector_aligned(en[:4]))
                buckets.setdefault(key, []).append(en)
        for en in entries:
            if en[5] < 0:
                aligned = self.k.vector_aligned(en[:1])
                key = next((k for k in buckets if k[0] == en[0].dtype and k[3] == aligned),
                           (en[0].dtype, None, None, aligned))
                buckets.setdefault(key, []).append(en)
        self.buckets = [(self.k.Tables([en[:6] for en in members], self.chunk, self.device), [en[7] for en in members])
                        for members in buckets.values()]
        self._storage_at_build = self._storage(flat)

    def _checked_grad(self, grad, w):
        g = local_shard(grad)
        if g.shape != w.shape or g.device != w.device:
            raise ValueError(f"gradient of shape {tuple(g.shape)} on {g.device} for a parameter of shape {tuple(w.shape)} on {w.device}")
        return g if g.is_contiguous() else g.contiguous()

    def _process_groups(self, params):
        try:
            return shard_process_groups(params)
        except ValueError as exc:
            raise ValueError(f"the fused path cannot reduce these parameters' norms: {exc}; use fused=False") from None

    def _layout(self):
        # Per-step Python cost O(tensors) with a small constant; the tables are rebuilt only when the
        # set of stepped parameters, the optimizer state (load_state_dict), the storage of a parameter
        # or state tensor, or the algorithm's own bookkeeping (a step count, a new momentum buffer)
        # changed.
        opt = self.optimizer
        flat = [p for pg in opt.param_groups for p in pg["params"]]
        grads = [p.grad for p in flat]
        key = (id(opt.state), tuple(map(id, flat)), tuple(g is None for g in grads))
        if key != self._key or self._stale() or self._storage(flat) != self._storage_at_build:
            self._build(flat)
            self._key = key
            return
        for tables, flat_idx in self.buckets:
            local = [(local_shard(grads[i]) if i >= 0 else None) for i in flat_idx]
            if [g.data_ptr() if g is not None else 0 for g in local] != tables.grad_ptrs:
                local = [self._checked_grad(g, en[0]) if g is not None else None for g, en in zip(local, tables.entries)]
                if not tables.refresh_grads(local):  # a gradient lost the alignment its bucket relies on
                    self._build(flat)
                    return

    # -- step ---------------------------------------------------------------------------------------
    def _launch(self, mode, hyper, scales, sums):
        for tables, _ in self.buckets:
            self.k.launch(tables, mode, hyper, scales, sums, self.decoupled, self.block, sgd=self.SGD)

    def _ratios(self, sums):
        sum_over_shards(sums, self.process_groups)
        g = self.num_groups
        return ratios_from_sums(sums[:g], sums[g:])

    def step(self):
        self._layout()
        hyper = self.k.to_device(torch.tensor(self._hyper_rows(), dtype=torch.float32), self.device)
        self._advance()
        sums = torch.zeros(2 * self.num_groups, dtype=torch.float64, device=self.device)
        k = self.k
        if self.control == "none":
            self._launch(k.SINGLE, hyper, self._ones, sums)
            ratios = self._ratios(sums)
            # As the reference: the scales that the control would apply are reported, not applied.
            r_star, scales = device_target_and_scales(ratios, self.target, self.allowed)
            return ratios, ratios.clone(), scales, r_star
        if self.mode == "single-pass" and self._next_scales is not None:
            scales, r_star = self._next_scales, self._next_target
            self._launch(k.SINGLE, hyper, scales.to(torch.float32), sums)
            ratios = self._ratios(sums)
            self._next_target, self._next_scales = device_target_and_scales(ratios, self.target, self.allowed)
            return ratios, ratios * scales, scales, r_star
        self._launch(k.PHASE1, hyper, self._ones, sums)
        ratios = self._ratios(sums)
        r_star, scales = device_target_and_scales(ratios, self.target, self.allowed)
        self._launch(k.PHASE2, hyper, scales.to(torch.float32), sums)
        self._next_target, self._next_scales = r_star, scales
        return ratios, ratios * scales, scales, r_star


class _FusedAdam(_FusedEqualStep):
    """torch.optim.Adam / AdamW: state exp_avg, exp_avg_sq and a step count per parameter; one hyper
    row per param group (the step count, hence the bias corrections, is shared within a group)."""

    def __init__(self, optimizer, *args):
        super().__init__(optimizer, *args)
        pg0 = optimizer.param_groups[0]
        self.decoupled = type(optimizer) is torch.optim.AdamW or bool(pg0.get("decoupled_weight_decay", False))
        self.steps: dict[int, int] = {}
        self.step_tensors: list[torch.Tensor] = []
        self.step_probe: dict[int, torch.Tensor] = {}

    def _states(self, p, h, pg):
        state = self.optimizer.state[p]
        if len(state) == 0:
            # As torch.optim.Adam._init_group creates it: step a CPU scalar (on the device for torch's
            # fused=True, which insists on it), moments like the parameter.
            dtype = self.state_dtype or p.dtype
            on_device = p.device if pg.get("fused") else None
            state["step"] = torch.zeros((), dtype=_scalar_dtype(), device=on_device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if m.dtype != v.dtype:
            raise ValueError("exp_avg and exp_avg_sq differ in dtype")
        # One step count per param group, checked here and then tracked on the host.
        st = state["step"]
        t = int(float(st))
        if self.steps.setdefault(h, t) != t:
            raise ValueError(
                f"param group {h} holds parameters at different step counts ({self.steps[h]} and {t}); "
                "the fused path needs one step count per param group (use fused=False)"
            )
        self.step_tensors.append(st)
        # One CPU step tensor per param group, read every step to notice outside changes cheaply.
        if h not in self.step_probe and st.device.type == "cpu":
            self.step_probe[h] = st
        return m, v, h

    def _build(self, flat):
        self.steps, self.step_tensors, self.step_probe = {}, [], {}  # refilled by _states
        super()._build(flat)

    def _state_tensors(self, p):
        state = self.optimizer.state.get(p, {})
        return state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")

    def _stale(self):
        return any(int(float(t)) != self.steps[h] for h, t in self.step_probe.items())

    def _advance(self):
        if self.step_tensors:
            torch._foreach_add_(self.step_tensors, 1.0)
        for h in self.steps:
            self.steps[h] += 1

    def _hyper_rows(self):
        rows = []
        for h, pg in enumerate(self.optimizer.param_groups):
            if h not in self.steps:
                rows.append([0.0] * self.k.HYPER_COLS)
                continue
            t = self.steps[h] + 1
            lr = float(pg["lr"])
            beta1, beta2 = (float(b) for b in pg["betas"])
            bc1 = 1.0 - beta1**t
            bc2_sqrt = math.sqrt(1.0 - beta2**t)
            sign = -1.0 if pg.get("maximize", False) else 1.0
            wd = float(pg["weight_decay"])
            rows.append([lr * wd, wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, float(pg["eps"]), lr / bc1, bc2_sqrt, sign])
        return rows


class _FusedSgd(_FusedEqualStep):
    """torch.optim.SGD (momentum, dampening, Nesterov, L2 weight decay, maximize). State: one
    momentum_buffer per parameter when momentum ≠ 0, created on its first step as a copy of the
    gradient (torch's rule). Hyper rows 2h (buffer exists) and 2h + 1 (buffer starts this step)."""

    SGD = True

    def __init__(self, optimizer, *args):
        super().__init__(optimizer, *args)
        self._new_buffers = False

    def _states(self, p, h, pg):
        if float(pg["momentum"]) == 0.0:
            return None, None, 2 * h
        state = self.optimizer.state[p]
        if state.get("momentum_buffer") is not None:
            return state["momentum_buffer"], None, 2 * h
        # torch sets buf = clone(g) on this step; the kernel writes it (row 2h + 1: keep 0, weight 1).
        state["momentum_buffer"] = torch.zeros_like(p, dtype=self.state_dtype or p.dtype,
                                                     memory_format=torch.preserve_format)
        self._new_buffers = True
        return state["momentum_buffer"], None, 2 * h + 1

    def _stale(self):
        # Tensors whose buffer started last step move to the row of existing buffers.
        return self._new_buffers

    def _build(self, flat):
        self._new_buffers = False
        super()._build(flat)

    def _state_tensors(self, p):
        return (self.optimizer.state.get(p, {}).get("momentum_buffer"),)

    def _hyper_rows(self):
        rows = []
        for pg in self.optimizer.param_groups:
            lr, wd = float(pg["lr"]), float(pg["weight_decay"])
            momentum, dampening = float(pg["momentum"]), float(pg["dampening"])
            sign = -1.0 if pg.get("maximize", False) else 1.0
            has_buf = 1.0 if momentum != 0.0 else 0.0
            grad_w, buf_w = (1.0, momentum) if pg["nesterov"] else (1.0 - has_buf, has_buf)
            pad = [0.0, 0.0]
            rows.append([lr, wd, momentum, 1.0 - dampening, grad_w, buf_w, has_buf, *pad, sign])
            rows.append([lr, wd, 0.0, 1.0, grad_w, buf_w, has_buf, *pad, sign])
        return rows


def _scalar_dtype():
    try:
        from torch.optim.optimizer import _get_scalar_dtype

        return _get_scalar_dtype()
    except ImportError:
        return torch.float32
