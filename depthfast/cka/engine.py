"""The compiled CKA engine (depthfast._C, csrc/) as StreamingCKA drives it.

Choice of backend, the engine's view of a probe batch (flattened rows + row mask, one dtype per
call), the stacked per-width-group state it accumulates into, the fall-back to the float64
reference when the engine cannot run on a device (a _C built for another GPU architecture), and the
guard that keeps fp32 matmuls IEEE (no TF32) inside CKA. Module attributes read at call time, so
tests and benchmarks may set them here: ``_GRAM_ACCUM_DTYPE`` and ``_GRAM_BLOCK_OVERRIDE`` (read
when a group's state is allocated), ``_BROKEN_DEVICES`` and ``_FALLBACK_NOTICE`` (per process).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from depthfast.cka import stats as _stats
from depthfast.cka.reference import pool_activations
from depthfast.cka.stats import _ExactLayerStats, _mirror_upper_blocks
from depthfast.errors import DepthfastError

BACKENDS = ("auto", "reference", "extension")


def _resolve_backend(backend: str):
    from depthfast import _ext  # here: _C loads (and a missing build says so) when a kernel is first used

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    ext = _ext.extension()
    if backend == "extension" and ext is None:
        raise DepthfastError("backend='extension' but depthfast._C is not built; run `pip install -e .`")
    if backend == "reference" or ext is None:
        return None
    return ext


def _flatten_for_engine(acts: torch.Tensor, mask: torch.Tensor | None, pooling: str):
    """(samples (n, d), row mask (n,) float32 or None) as the engine takes them: token pooling keeps
    padded rows in place and zeroes them with the mask (no gather); mean pooling pools here."""
    if acts.dim() == 2:
        return acts, None
    if acts.dim() != 3:
        raise ValueError(f"activations must be (batch, seq, d) or (n, d); got shape {tuple(acts.shape)}")
    if pooling == "mean":
        return pool_activations(acts, mask, pooling), None
    if mask is not None and mask.shape != acts.shape[:2]:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match activations {tuple(acts.shape[:2])}")
    flat = acts.reshape(-1, acts.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    if mask is None:
        return flat, None
    return flat, mask.reshape(-1).to(device=acts.device, dtype=torch.float32)


_ENGINE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GRAM_BLOCK_OVERRIDE: int | None = None  # tests force the symmetric block split on small widths
# Dtype of the engine's Gram statistics Sxx, Syy, Syx. Each update's products are fp32 (BLAS, or
# tensor cores with fp32 accumulation) and are added into these: float64 keeps the sum over a
# study-sized probe (≈ 256 updates of 4096 tokens) from adding √U·2⁻²⁴ of relative error per entry,
# which is already 1e-2 of 1 − CKA when 1 − CKA ≈ 1e-4 (benchmarks/bench_cka.py --accuracy).
# float32 is the old layout, kept so the tests and the benchmark can show the difference.
_GRAM_ACCUM_DTYPE = torch.float64

# Messages of RuntimeErrors that mean "the compiled kernels cannot run on this device" (a _C built
# for another architecture, a launch failure): the accumulator then falls back to the reference.
_DEVICE_FAILURES = ("no kernel image is available", "cudaErrorNoKernelImageForDevice", "CUDA error",
                    "CUDA kernel errors", "invalid device function", "cudaError")
_BROKEN_DEVICES: set[str] = set()  # devices on which the engine failed in this process
_FALLBACK_NOTICE = [False]  # printed once per process


def _is_device_failure(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_FAILURES)


def _fallback_notice(device, exc: BaseException) -> None:
    if not _FALLBACK_NOTICE[0]:
        _FALLBACK_NOTICE[0] = True
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"depthfast: the compiled CKA engine failed on {device} ({first}); using the float64 reference "
              "path for CKA from now on (statistics so far are kept)", file=sys.stderr)


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Inside: fp32 matmuls on CUDA in IEEE fp32 (no TF32: its 10-bit mantissa would make the CKA Grams
    a 10-bit computation); the user's settings are restored on exit, also after an exception. Uses
    the fp32_precision API where torch has it (≥ 2.9; mixing it with allow_tf32 makes torch raise),
    else allow_tf32. The compiled engine also holds at::NoTF32Guard around its own products."""
    saved = []
    for mod in (torch.backends.cuda.matmul, torch.backends.cudnn):
        if hasattr(mod, "fp32_precision"):
            saved.append((mod, "fp32_precision", mod.fp32_precision))
            mod.fp32_precision = "ieee"
        else:  # pragma: no cover (torch < 2.9)
            saved.append((mod, "allow_tf32", mod.allow_tf32))
            mod.allow_tf32 = False
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _is_broken(device) -> bool:
    """Whether the engine already failed on ``device`` in this process."""
    return str(device) in _BROKEN_DEVICES


def _mark_broken(device, exc: BaseException) -> None:
    """Record a device failure of the engine (for every later accumulator) and say so once."""
    _BROKEN_DEVICES.add(str(device))
    _fallback_notice(device, exc)


def _engine_inputs(base_acts, tuned_acts, attention_mask, pooling: str):
    """(xs, ys, n, row mask) of one update as the engine takes them: each layer flattened
    (``_flatten_for_engine``), n the real rows per layer, and every tensor in one common dtype."""
    xs, ys, n, mask = [], [], None, None
    for layer, (xb, yb) in enumerate(zip(base_acts, tuned_acts)):
        if xb.device != yb.device:
            raise ValueError(f"layer {layer}: base activations on {xb.device}, tuned on {yb.device}")
        x, mx = _flatten_for_engine(xb.detach(), attention_mask, pooling)
        y, _ = _flatten_for_engine(yb.detach(), attention_mask, pooling)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"layer {layer}: base has {x.shape[0]} samples, tuned has {y.shape[0]}")
        if mask is None and mx is not None:
            mask = mx
        rows = x.shape[0] if mx is None else None
        if n is None:
            n = rows if rows is not None else int(round(float(mx.sum())))
        xs.append(x)
        ys.append(y)
    dtypes = {t.dtype for t in (*xs, *ys)}
    if len(dtypes) > 1:  # the engine takes one dtype per call (e.g. fp32 base, bf16 tuned → fp32)
        common = dtypes.pop()
        for dt in dtypes:
            common = torch.promote_types(common, dt)
        xs, ys = [t.to(common) for t in xs], [t.to(common) for t in ys]
    return xs, ys, n, mask


def _exact_update(ext, stats, gx, gy, mask, n) -> None:
    """One engine update of a width group: ``stats`` (_ExactLayerStats, one per layer of the group)
    become views into stacked (G, …) buffers on the first call; shifts = the first batch's means.
    Change form (one width, ``stats._CHANGE_FORM``): the engine stages D = y − x itself (no copy of
    the activations here), and the y-fields and shift_y are those of D."""
    first = stats[0]
    g, d1, d2, dev = len(stats), gx[0].shape[1], gy[0].shape[1], gx[0].device
    if first.change is None:
        for s in stats:
            s.change = _stats._CHANGE_FORM and d1 == d2
    change = first.change
    if first.sx is None:  # allocate stacked state; per-layer stats are views into it
        f32 = dict(dtype=torch.float32, device=dev)
        f64 = dict(dtype=torch.float64, device=dev)
        gram = dict(dtype=_GRAM_ACCUM_DTYPE, device=dev)
        block = _GRAM_BLOCK_OVERRIDE or int(ext.gram_block(max(d1, d2), dev.type == "cuda"))
        st = dict(
            shift_x=torch.zeros(g, d1, **f32), shift_y=torch.zeros(g, d2, **f32),
            sxx=torch.zeros(g, d1, d1, **gram), syy=torch.zeros(g, d2, d2, **gram),
            syx=torch.zeros(g, d2, d1, **gram), sx=torch.zeros(g, d1, **f64), sy=torch.zeros(g, d2, **f64),
            vx=torch.zeros(g, 2, d1, **f64), vy=torch.zeros(g, 2, d2, **f64), sc=torch.zeros(g, 5, **f64),
        )
        for j, s in enumerate(stats):
            for name, t in st.items():
                setattr(s, name, t[j])
            s.upper_block = block
            s._stacked = st
            s.shift_x = s.shift_y = None
    st = first._stacked
    for which, acts in (("shift_x", gx), ("shift_y", gy)):
        if getattr(first, which) is None:  # first batch (of this pass): shift by its mean
            if which == "shift_y" and change:  # the change's own mean, in float64
                means = [_masked_mean(y, mask, n, base=x) for x, y in zip(gx, gy)]
            else:
                means = [_masked_mean(a, mask, n) for a in acts]
            st[which].copy_(torch.stack(means))
            for j, s in enumerate(stats):
                setattr(s, which, st[which][j])
    frozen = first.frozen_n is not None
    ext.exact_update(gx, gy, mask, st["shift_x"], st["shift_y"], st["sxx"], st["syy"], st["syx"],
                     st["sx"], st["sy"], st["vx"], st["vy"], st["sc"], frozen, first.upper_block, change)
    for s in stats:
        s.n += n


def _unbiased_update(ext, stats, gx, gy, mask, n) -> None:
    """One engine update of a width group: HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L) of this minibatch per
    layer (change form, one width: HSIC₁(K,M), HSIC₁(K,K), HSIC₁(M,M)), added into ``stats``
    (_UnbiasedLayerStats)."""
    if stats[0].change is None:
        for s in stats:
            s.change = _stats._CHANGE_FORM and gx[0].shape[1] == gy[0].shape[1]
    acc = torch.zeros(len(stats), 3, dtype=torch.float64, device=gx[0].device)
    frozen = stats[0].frozen_sizes is not None
    # change form: acc = [Σ HSIC₁(K,M), HSIC₁(K,K), HSIC₁(M,M)] of the change M = L − K
    ext.unbiased_update(gx, gy, mask, acc, n, frozen, "auto", stats[0].change)
    for s, (kl, kk, ll) in zip(stats, acc.tolist()):
        s.add(kl, kk, ll, n)


def _to_reference(layers) -> None:
    """Convert engine-filled statistics in place for the float64 reference: upper blocks mirrored,
    everything float64 and detached from the stacked engine buffers. Any shift is exact for the
    statistics, so the reference continues with the engine's."""
    for s in layers:
        if isinstance(s, _ExactLayerStats) and getattr(s, "_stacked", None) is not None:
            f64 = lambda t: None if t is None else t.to(torch.float64, copy=True)  # noqa: E731
            s.sxx = f64(_mirror_upper_blocks(s.sxx, s.upper_block))
            s.syy = f64(_mirror_upper_blocks(s.syy, s.upper_block))
            for name in ("syx", "sx", "sy", "vx", "vy", "sc", "shift_x", "shift_y"):
                setattr(s, name, f64(getattr(s, name)))
            s.upper_block = 0
            s._stacked = None


def _masked_mean(a: torch.Tensor, mask: torch.Tensor | None, n: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """Column mean over real rows in float64 (of a − base when base is given: the change), rounded to
    the input's precision when that is 16-bit and no base is given (then x − c is exact in that format
    for every channel whose values lie within 2× of c — the massive-activation channels — so the CUDA
    tensor-core operand keeps their spread). The change's mean stays fp32: the change has no offset,
    and its operand is rounded after the shift."""
    a64 = a.to(torch.float64) if base is None else a.to(torch.float64) - base.to(torch.float64)
    if mask is None:
        m = a64.mean(dim=0)
    else:
        m = torch.where(mask.unsqueeze(1) != 0, a64, 0.0).sum(dim=0) / n
    if base is None and a.dtype in (torch.float16, torch.bfloat16):
        m = m.to(a.dtype)
    return m.to(torch.float32)
