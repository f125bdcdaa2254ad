"""Whether the fused equal-step path can run an optimizer, and how its kernels are launched.

:func:`fused_unsupported_reason` is the one rule :class:`~depthfast.optim.EqualStep` applies to pick
(``fused=None``) or refuse (``fused=True``) the fused path; :func:`launch_config` is the block and
chunk every fused launch uses.
"""

from __future__ import annotations

import os

import torch

# Exactly these classes (not subclasses, whose step may differ) run on the fused kernels.
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


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
        import triton  # optional: no Triton, no fused path
    except ImportError:
        return "triton is not installed"
    if device.type != "cuda":
        from depthfast.kernels import optim as kernels  # Triton (optional), after the interpreter flag

        if not kernels.interpreter_runs_loops():
            import numpy

            return (f"the Triton interpreter of triton {triton.__version__} cannot run the kernels' loops with "
                    f"numpy {numpy.__version__} (triton 3.9's interpreter runs them)")
    return None


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
