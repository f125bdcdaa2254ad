"""The algorithms of the fused path: torch.optim.Adam / AdamW and torch.optim.SGD.

Each subclass of :class:`~depthfast.optim.fused.FusedEqualStep` creates and finds the optimizer's state
exactly as torch keeps it (so the wrapped optimizer can take over at any step) and fills the kernel's
hyper-parameter rows, by the column names defined in kernels/optim.py (``ADAM_*``, ``SGD_*``,
``HP_SIGN``); the update formulas are in that module's docstring.
"""

from __future__ import annotations

import math

import torch

from depthfast.optim.fused import FusedEqualStep, States


class FusedAdam(FusedEqualStep):
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
        return States(m, v, h)

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
        k = self.k
        rows = []
        for h, pg in enumerate(self.optimizer.param_groups):
            if h not in self.steps:
                rows.append(k.hyper_row({}))
                continue
            t = self.steps[h] + 1
            lr = float(pg["lr"])
            beta1, beta2 = (float(b) for b in pg["betas"])
            wd = float(pg["weight_decay"])
            rows.append(k.hyper_row({
                k.ADAM_LR_WD: lr * wd,
                k.ADAM_WD: wd,
                k.ADAM_BETA1: beta1,
                k.ADAM_ONE_M_BETA1: 1.0 - beta1,
                k.ADAM_BETA2: beta2,
                k.ADAM_ONE_M_BETA2: 1.0 - beta2,
                k.ADAM_EPS: float(pg["eps"]),
                k.ADAM_STEP_SIZE: lr / (1.0 - beta1**t),
                k.ADAM_BC2_SQRT: math.sqrt(1.0 - beta2**t),
                k.HP_SIGN: -1.0 if pg.get("maximize", False) else 1.0,
            }))
        return rows


class FusedSgd(FusedEqualStep):
    """torch.optim.SGD (momentum, dampening, Nesterov, L2 weight decay, maximize). State: one
    momentum_buffer per parameter when momentum ≠ 0, created on its first step as a copy of the
    gradient (torch's rule). Hyper rows 2h (buffer exists) and 2h + 1 (buffer starts this step)."""

    SGD = True

    def __init__(self, optimizer, *args):
        super().__init__(optimizer, *args)
        self._new_buffers = False

    def _states(self, p, h, pg):
        if float(pg["momentum"]) == 0.0:
            return States(None, None, 2 * h)
        state = self.optimizer.state[p]
        if state.get("momentum_buffer") is not None:
            return States(state["momentum_buffer"], None, 2 * h)
        # torch sets buf = clone(g) on this step; the kernel writes it (row 2h + 1: keep 0, weight 1).
        state["momentum_buffer"] = torch.zeros_like(p, dtype=self.state_dtype or p.dtype,
                                                     memory_format=torch.preserve_format)
        self._new_buffers = True
        return States(state["momentum_buffer"], None, 2 * h + 1)

    def _stale(self):
        # Tensors whose buffer started last step move to the row of existing buffers.
        return self._new_buffers

    def _build(self, flat):
        self._new_buffers = False
        super()._build(flat)

    def _state_tensors(self, p):
        return (self.optimizer.state.get(p, {}).get("momentum_buffer"),)

    def _hyper_rows(self):
        k = self.k
        rows = []
        for pg in self.optimizer.param_groups:
            lr, wd = float(pg["lr"]), float(pg["weight_decay"])
            momentum, dampening = float(pg["momentum"]), float(pg["dampening"])
            has_buf = 1.0 if momentum != 0.0 else 0.0
            grad_w, buf_w = (1.0, momentum) if pg["nesterov"] else (1.0 - has_buf, has_buf)
            common = {k.SGD_LR: lr, k.SGD_WD: wd, k.SGD_GRAD_W: grad_w, k.SGD_BUF_W: buf_w, k.SGD_HAS_BUF: has_buf,
                      k.HP_SIGN: -1.0 if pg.get("maximize", False) else 1.0}
            # Row 2h: the buffer exists (b' = momentum·b + (1 − dampening)·g); row 2h + 1: it starts
            # this step (b' = g).
            rows.append(k.hyper_row({**common, k.SGD_BUF_KEEP: momentum, k.SGD_BUF_GRAD_W: 1.0 - dampening}))
            rows.append(k.hyper_row({**common, k.SGD_BUF_KEEP: 0.0, k.SGD_BUF_GRAD_W: 1.0}))
        return rows


def _scalar_dtype():
    try:
        from torch.optim.optimizer import _get_scalar_dtype

        return _get_scalar_dtype()
    except ImportError:
        return torch.float32
