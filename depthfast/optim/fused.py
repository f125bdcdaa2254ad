"""Host side of the fused equal-step path: the launcher of the Triton kernels in kernels/optim.py.

:class:`FusedEqualStep` builds the kernels' device tables from the optimizer's parameters and states,
keeps them valid (rebuilt when a parameter, state or gradient layout changes), launches one or two
passes per step and turns the per-group sums of squares into ratios and scales on the device. The
algorithm (its state tensors and hyper-parameter rows) comes from a subclass in fused_algorithms.py.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from depthfast.distributed import local_shard, shard_process_groups, sum_over_shards
from depthfast.optim.fused_support import launch_config
from depthfast.optim.scales import device_target_and_scales, ratios_from_sums


class States(NamedTuple):
    """What an algorithm gives for one stepped parameter (FusedEqualStep.states)."""

    s1: torch.Tensor | None  # Adam: exp_avg; SGD: momentum_buffer (None without momentum)
    s2: torch.Tensor | None  # Adam: exp_avg_sq; SGD: None
    hyper_row: int  # its row of the hyper table


class Slot(NamedTuple):
    """One tensor of the layout: the kernel's table entry, the parameter it was made from, and the
    parameter's index in the optimizer's flat parameter list (−1: a group parameter not stepped now)."""

    entry: Any  # kernels.optim.Entry (the kernels module is imported lazily)
    param: torch.Tensor
    flat_index: int


class BucketKey(NamedTuple):
    """Entries of one launch share these (one kernel specialisation each)."""

    p_dtype: torch.dtype
    grad_dtype: torch.dtype | None  # None: a bucket of unstepped entries only
    state_dtype: torch.dtype | None
    aligned: bool  # 16-byte vector accesses (kernels.optim.vector_aligned)


class Bucket(NamedTuple):
    tables: Any  # kernels.optim.Tables
    flat_index: list[int]  # per table entry, as Slot.flat_index


class StepResult(NamedTuple):
    """What one step reports (EqualStep's attributes of the same names); device tensors."""

    ratios_before: torch.Tensor  # float64 (G,)
    ratios_after: torch.Tensor  # float64 (G,)
    scales: torch.Tensor  # float64 (G,)
    target_ratio: torch.Tensor  # float64 0-dim


class FusedEqualStep:
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
        from depthfast.kernels import optim as kernels  # Triton (optional): only on the fused GPU path

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
        self.buckets: list[Bucket] = []
        self._key = None
        self._storage_at_build = None  # _storage() when the tables were built
        self._next_scales = None  # single-pass: r*/r_g of the previous step (float64 (G,), device)
        self._next_target = None
        self._ones = torch.ones(self.num_groups, dtype=torch.float32, device=self.device)
        self.allowed = allowed.to(self.device)

    # -- the algorithm (subclasses) -------------------------------------------------------------------
    decoupled = False

    def _states(self, p, h, pg) -> States:
        """The states and hyper row of a stepped parameter, creating the optimizer state as torch would."""
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
        Entry = self.k.Entry
        flat_index = {id(p): i for i, p in enumerate(flat)}
        slots: list[Slot] = []
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
                slots.append(Slot(Entry(w, None, s1, s2, self.group_of.get(id(p), -1), row), p, flat_index[id(p)]))
        for p in self.group_params:
            if id(p) not in stepped_ids:
                w = local_shard(p).detach()
                if not w.is_contiguous():
                    raise ValueError("the fused equal-step path needs contiguous parameters (use fused=False)")
                slots.append(Slot(Entry(w, None, None, None, self.group_of[id(p)], -1), p, -1))
        devices = {s.entry.p.device for s in slots}
        if devices != {self.device}:
            raise ValueError(f"parameters moved to {sorted(map(str, devices))}; the fused path was set up on {self.device}")
        self.process_groups = self._process_groups([s.param for s in slots])

        # Buckets of equal dtypes and vector alignment (one launch per phase each; a tensor at an odd
        # offset or of odd size must not stop the others' 16-byte accesses); unstepped entries join a
        # bucket with their parameter dtype, since only W is read for them.
        slots = [s._replace(entry=s.entry._replace(grad=self._checked_grad(s.param.grad, s.entry.p)))
                 if s.entry.stepped else s for s in slots]
        buckets: dict[BucketKey, list[Slot]] = {}
        for s in slots:
            en = s.entry
            if en.stepped:
                state_dtype = en.s1.dtype if en.s1 is not None else en.p.dtype
                key = BucketKey(en.p.dtype, en.grad.dtype, state_dtype, self.k.vector_aligned(en.tensors))
                buckets.setdefault(key, []).append(s)
        for s in slots:
            en = s.entry
            if not en.stepped:
                aligned = self.k.vector_aligned((en.p,))
                key = next((k for k in buckets if k.p_dtype == en.p.dtype and k.aligned == aligned),
                           BucketKey(en.p.dtype, None, None, aligned))
                buckets.setdefault(key, []).append(s)
        self.buckets = [Bucket(self.k.Tables([s.entry for s in members], self.chunk, self.device),
                               [s.flat_index for s in members])
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
        for bucket in self.buckets:
            tables = bucket.tables
            local = [(local_shard(grads[i]) if i >= 0 else None) for i in bucket.flat_index]
            if [g.data_ptr() if g is not None else 0 for g in local] != tables.grad_ptrs:
                local = [self._checked_grad(g, en.p) if g is not None else None for g, en in zip(local, tables.entries)]
                if not tables.refresh_grads(local):  # a gradient lost the alignment its bucket relies on
                    self._build(flat)
                    return

    # -- step ---------------------------------------------------------------------------------------
    def _launch(self, mode, hyper, scales, sums):
        for bucket in self.buckets:
            self.k.launch(bucket.tables, mode, hyper, scales, sums, self.decoupled, self.block, sgd=self.SGD)

    def _ratios(self, sums):
        # sums: fp64 (2G,), Σu² of every group, then ΣW² of every group (the kernel's layout).
        sum_over_shards(sums, self.process_groups)
        g = self.num_groups
        return ratios_from_sums(sums[:g], sums[g:])

    def step(self) -> StepResult:
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
            return StepResult(ratios, ratios.clone(), scales, r_star)
        if self.mode == "single-pass" and self._next_scales is not None:
            scales, r_star = self._next_scales, self._next_target
            self._launch(k.SINGLE, hyper, scales.to(torch.float32), sums)
            ratios = self._ratios(sums)
            self._next_target, self._next_scales = device_target_and_scales(ratios, self.target, self.allowed)
            return StepResult(ratios, ratios * scales, scales, r_star)
        self._launch(k.PHASE1, hyper, self._ones, sums)
        ratios = self._ratios(sums)
        r_star, scales = device_target_and_scales(ratios, self.target, self.allowed)
        self._launch(k.PHASE2, hyper, scales.to(torch.float32), sums)
        self._next_target, self._next_scales = r_star, scales
        return StepResult(ratios, ratios * scales, scales, r_star)
