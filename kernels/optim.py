"""Triton kernels of the fused equal-step optimizer step: Adam/AdamW and SGD (private; launched by
depthfast.optim).

One launch per phase covers every parameter: tensors are described by device tables and each program
handles one chunk of one tensor.

Tables (:class:`Tables`, built once per parameter layout; E entries, C chunks):

    ptrs        int64 (E, PTR_COLS)  addresses of p, grad and two state tensors (columns PTR_P, PTR_GRAD,
                               PTR_S1, PTR_S2; Adam: exp_avg, exp_avg_sq; SGD: momentum_buffer, unused);
                               0 where an entry has no update; the
                               grad column is re-uploaded when a gradient moves; when a parameter's or
                               a state's storage moves, the host rebuilds the tables
    numel       int64 (E,)
    group       int32 (E,)     equal-step group of the entry, −1: stepped but in no group
    hyper_row   int32 (E,)     row of ``hyper``; −1: not stepped this time, only ‖W‖² is counted
    chunk_entry int32 (C,)     entry of each chunk
    chunk_start int64 (C,)     first element of each chunk in its tensor

    hyper       fp32 (H, HYPER_COLS)  one row per optimizer param group (SGD: two, the second for tensors
                               whose momentum buffer starts this step), filled with :func:`hyper_row`;
                               the columns are named once below (ADAM_*, SGD_*, HP_SIGN = −1: maximize)
                               and the kernel reads them as ``hp + NAME``.
        Adam:  lr·wd, wd, β1, 1 − β1, β2, 1 − β2, eps, step_size = lr / (1 − β1^t), sqrt(1 − β2^t)
               Differences are formed on the host in float64: 1 − β2 in fp32 is off by 1.3e-5 relative
               for β2 = 0.999 (6e-6 in the update).
        SGD:   lr, wd, buf_keep, buf_grad_w, grad_w, buf_w, has_buf

Adam. With m' = β1 m + (1 − β1) g (torch's lerp), v' = β2 v + (1 − β2) g²,
denom = sqrt(v') / sqrt(1 − β2^t) + eps, the full update (what the unmodified optimizer adds to W) is

    AdamW:  u = −lr·wd·W − step_size · m' / denom        (decoupled weight decay)
    Adam:   g ← g + wd·W before the moments; u = −step_size · m' / denom

SGD (torch.optim.SGD). g ← sign·g + wd·W; b' = buf_keep·b + buf_grad_w·g (momentum, 1 − dampening; on a
buffer's first step 0, 1: torch clones g); u = −lr·(grad_w·g + buf_w·b'), where (grad_w, buf_w) is
(0, 1) with momentum, (1, momentum) with Nesterov and (1, 0) without momentum (no buffer: has_buf 0).

Modes (``mode`` of :func:`launch`; the kernel sees them as the flags FIRST_PASS and WRITE_W):
    0 PHASE1  read W, g, state; write the new state; accumulate per group Σu², ΣW² into ``sums`` (fp64 (2G,))
    1 PHASE2  read W, state (SGD: and g when grad_w ≠ 0); recompute u (bit-identical to phase 1); write W + s_g·u
    2 SINGLE  read W, g, state; write the new state and W + s_g·u; accumulate Σu², ΣW²  (s_g known beforehand)

Sums of squares: fp32 tree sum over one BLOCK, fp64 across blocks and programs (fp64 atomics).
Bytes per element of each launch (P, G, S: bytes of a parameter, gradient, state element; the totals per
step, against torch's optimizers, are in README.md, "Bytes moved per parameter"):
    Adam  PHASE1 P + G + 4S, PHASE2 2P + 2S, SINGLE 2P + G + 4S
    SGD with momentum  PHASE1 P + G + 2S, PHASE2 2P + S (Nesterov: + G), SINGLE 2P + G + 2S;
        without momentum PHASE1 P + G, PHASE2 2P + G
The recompute in PHASE2 (DeepSpeed FusedLamb's trick) avoids storing u: same bytes as writing u into the
gradient buffer in PHASE1 and reading it back, and the gradients stay intact.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

PHASE1, PHASE2, SINGLE = 0, 1, 2
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Columns of the tables, named once for the host that fills them and the kernel that reads them
# (``hp + ADAM_EPS``). tl.constexpr, because compiled Triton reads only constexpr globals; on the host
# they index like ints (``row[ADAM_EPS]``), but take int() before arithmetic on them.
PTR_COLS = tl.constexpr(4)
PTR_P, PTR_GRAD, PTR_S1, PTR_S2 = (tl.constexpr(i) for i in range(4))

HYPER_COLS = tl.constexpr(10)
HP_SIGN = tl.constexpr(9)  # both algorithms: −1 maximize, else 1
ADAM_LR_WD = tl.constexpr(0)  # lr·wd
ADAM_WD = tl.constexpr(1)
ADAM_BETA1 = tl.constexpr(2)  # filled, not read: the kernel uses 1 − β1 (torch's lerp)
ADAM_ONE_M_BETA1 = tl.constexpr(3)
ADAM_BETA2 = tl.constexpr(4)
ADAM_ONE_M_BETA2 = tl.constexpr(5)
ADAM_EPS = tl.constexpr(6)
ADAM_STEP_SIZE = tl.constexpr(7)  # lr / (1 − β1^t)
ADAM_BC2_SQRT = tl.constexpr(8)  # sqrt(1 − β2^t)
SGD_LR = tl.constexpr(0)
SGD_WD = tl.constexpr(1)
SGD_BUF_KEEP = tl.constexpr(2)  # momentum; 0 on a buffer's first step
SGD_BUF_GRAD_W = tl.constexpr(3)  # 1 − dampening; 1 on a buffer's first step
SGD_GRAD_W = tl.constexpr(4)
SGD_BUF_W = tl.constexpr(5)
SGD_HAS_BUF = tl.constexpr(6)  # 1.0 with momentum (a buffer exists or starts), else 0.0


def hyper_row(values: dict) -> list[float]:
    """One row of ``hyper`` (HYPER_COLS floats) from {column: value}; columns not given are 0."""
    row = [0.0] * int(HYPER_COLS)
    for col, v in values.items():
        row[col] = float(v)
    return row


@triton.jit
def _adam_update(w, m, v, lr_wd, step_size, bc2_sqrt, eps, DECOUPLED: tl.constexpr):
    # One function for both phases so that phase 2 recomputes exactly the u of phase 1.
    denom = tl.sqrt(v) / bc2_sqrt + eps
    u = -step_size * (m / denom)
    if DECOUPLED:
        u = u - lr_wd * w
    return u


@triton.jit
def _cast_to(x, ptr, BF16_BY_HAND: tl.constexpr):
    # The interpreter rounds fp32 → bf16 toward zero, whatever fp_downcast_rounding says; compiled
    # Triton rounds to nearest even. By hand: add half an ulp (ties to even) and drop 16 bits.
    # BF16_BY_HAND is set by the host only for bf16 pointers under the interpreter.
    if BF16_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = tl.where(x != x, x.to(tl.bfloat16), (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True))
    else:
        y = x.to(ptr.dtype.element_ty)
    return y


@triton.jit
def _equal_step_kernel(
    chunk_entry, chunk_start, ptrs, numel, group, hyper_row, hyper, scales, sums,
    p_proto, g_proto, s_proto,
    NUM_GROUPS, CHUNK,
    FIRST_PASS: tl.constexpr, WRITE_W: tl.constexpr, SGD: tl.constexpr, DECOUPLED: tl.constexpr,
    BLOCK: tl.constexpr, P_BY_HAND: tl.constexpr, S_BY_HAND: tl.constexpr, VEC: tl.constexpr,
):
    # FIRST_PASS: read g, update the optimizer state, accumulate Σu², ΣW² (PHASE1, SINGLE). WRITE_W:
    # write W + s·u (PHASE2, SINGLE). SGD selects the algorithm (Adam/AdamW otherwise). Flags rather
    # than a MODE compared with module globals: compiled Triton only reads globals that are tl.constexpr.
    pid = tl.program_id(0)
    e = tl.load(chunk_entry + pid)
    start = tl.load(chunk_start + pid)
    n = tl.load(numel + e)
    stop = tl.minimum(start + CHUNK, n)
    if VEC > 0:
        # The host promises (Tables.vec): every address of this launch is 16-byte aligned and every numel
        # and chunk start a multiple of VEC elements. Pointers read from a table carry no alignment, so
        # without these hints every access is a 4-byte one; with them, 16-byte vector loads and stores.
        start = tl.multiple_of(start, VEC)
        stop = tl.multiple_of(stop, VEC)
    gid = tl.load(group + e)
    row = tl.load(hyper_row + e)
    w_ptr = tl.load(ptrs + PTR_COLS * e + PTR_P).to(p_proto.dtype)
    if VEC > 0:  # hints written inline: inside a helper @triton.jit function they are lost
        w_ptr = tl.multiple_of(w_ptr, 16)  # bytes
    lane = tl.arange(0, BLOCK)

    if row < 0:
        # A group parameter that is not stepped: ΔW = 0, but ‖W‖ still counts.
        if FIRST_PASS:
            if gid >= 0:
                acc_w = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
                for off in range(start, stop, BLOCK):
                    idx = off + lane
                    if VEC > 0:
                        idx = tl.max_contiguous(tl.multiple_of(idx, VEC), VEC)
                    w = tl.load(w_ptr + idx, mask=idx < stop, other=0.0).to(tl.float32)
                    acc_w += tl.sum(w * w, axis=0).to(tl.float64)
                tl.atomic_add(sums + NUM_GROUPS + gid, acc_w)
    else:
        g_ptr = tl.load(ptrs + PTR_COLS * e + PTR_GRAD).to(g_proto.dtype)
        m_ptr = tl.load(ptrs + PTR_COLS * e + PTR_S1).to(s_proto.dtype)  # Adam: exp_avg; SGD: momentum_buffer
        v_ptr = tl.load(ptrs + PTR_COLS * e + PTR_S2).to(s_proto.dtype)  # Adam: exp_avg_sq; SGD: unused
        if VEC > 0:
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
        hp = hyper + HYPER_COLS * row
        if SGD:
            lr = tl.load(hp + SGD_LR)
            wd = tl.load(hp + SGD_WD)
            buf_keep = tl.load(hp + SGD_BUF_KEEP)
            buf_grad_w = tl.load(hp + SGD_BUF_GRAD_W)
            grad_w = tl.load(hp + SGD_GRAD_W)
            buf_w = tl.load(hp + SGD_BUF_W)
            has_buf = tl.load(hp + SGD_HAS_BUF) != 0.0
            # Masked loads move no bytes: entries without a buffer (momentum 0) never touch one, and
            # phase 2 reads g only when the update needs it (Nesterov, no momentum). Masks by an
            # end index rather than `mask & flag` (the interpreter cannot AND those).
            buf_stop = tl.where(has_buf, stop, start)
            if FIRST_PASS:
                g_stop = stop
            else:
                g_stop = tl.where(grad_w != 0.0, stop, start)
            if VEC > 0:
                buf_stop = tl.multiple_of(buf_stop, VEC)
                g_stop = tl.multiple_of(g_stop, VEC)
        else:
            lr_wd = tl.load(hp + ADAM_LR_WD)
            wd = tl.load(hp + ADAM_WD)
            one_m_beta1 = tl.load(hp + ADAM_ONE_M_BETA1)
            beta2 = tl.load(hp + ADAM_BETA2)
            one_m_beta2 = tl.load(hp + ADAM_ONE_M_BETA2)
            eps = tl.load(hp + ADAM_EPS)
            step_size = tl.load(hp + ADAM_STEP_SIZE)
            bc2_sqrt = tl.load(hp + ADAM_BC2_SQRT)
        sign = tl.load(hp + HP_SIGN)
        # Entries outside every group keep the optimizer's update (scale 1).
        scale = tl.where(gid >= 0, tl.load(scales + tl.maximum(gid, 0)), 1.0)
        acc_u = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
        acc_w = tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0)
        for off in range(start, stop, BLOCK):
            idx = off + lane
            if VEC > 0:
                idx = tl.max_contiguous(tl.multiple_of(idx, VEC), VEC)
            mask = idx < stop
            # Everything is cast to fp32 right after the load: bf16 arithmetic is not exact (and is
            # wrong in the Triton interpreter).
            w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if SGD:
                buf_mask = idx < buf_stop
                buf = tl.load(m_ptr + idx, mask=buf_mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + idx, mask=idx < g_stop, other=0.0).to(tl.float32)
                g = g * sign + wd * w  # L2 weight decay, as torch.optim.SGD adds it to the gradient
                if FIRST_PASS:
                    # torch: buf ← clone(g) on the first step (buf_keep 0, buf_grad_w 1), then
                    # buf ← momentum·buf + (1 − dampening)·g.
                    buf_st = _cast_to(buf_keep * buf + buf_grad_w * g, m_ptr, S_BY_HAND)
                    tl.store(m_ptr + idx, buf_st, mask=buf_mask)
                    buf = tl.where(has_buf, buf_st.to(tl.float32), 0.0)
                # Nesterov: g + momentum·buf; momentum: buf; none: g. Same ops in both phases.
                u = -lr * (grad_w * g + buf_w * buf)
            else:
                m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                if FIRST_PASS:
                    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * sign
                    if not DECOUPLED:
                        g = g + wd * w
                    # torch.lerp with weight 1 − β1 < 0.5: m + w·(g − m)
                    m = m + one_m_beta1 * (g - m)
                    v = v * beta2 + one_m_beta2 * (g * g)
                    m_st = _cast_to(m, m_ptr, S_BY_HAND)
                    v_st = _cast_to(v, v_ptr, S_BY_HAND)
                    tl.store(m_ptr + idx, m_st, mask=mask)
                    tl.store(v_ptr + idx, v_st, mask=mask)
                    # Phase 2 reads the stored (rounded) moments: use them here too.
                    m = m_st.to(tl.float32)
                    v = v_st.to(tl.float32)
                u = _adam_update(w, m, v, lr_wd, step_size, bc2_sqrt, eps, DECOUPLED)
            if FIRST_PASS:
                u_sq = tl.where(mask, u * u, 0.0)
                acc_u += tl.sum(u_sq, axis=0).to(tl.float64)
                acc_w += tl.sum(w * w, axis=0).to(tl.float64)
            if WRITE_W:
                tl.store(w_ptr + idx, _cast_to(w + scale * u, w_ptr, P_BY_HAND), mask=mask)
        if FIRST_PASS:
            if gid >= 0:
                tl.atomic_add(sums + gid, acc_u)
                tl.atomic_add(sums + NUM_GROUPS + gid, acc_w)


@triton.jit
def _loop_probe_kernel(out, n):
    acc = 0.0
    for _ in range(0, n):  # a run-time bound, as in the kernel above
        acc += 1.0
    tl.store(out, acc)


_interpreter_verdict: bool | None = None


def interpreter_runs_loops() -> bool:
    """Whether this Triton interpreter runs loops with run-time bounds (cached; only meaningful under
    TRITON_INTERPRET=1). Triton 3.6's interpreter converts the bound with ``int()`` of a 1-element
    array, which NumPy ≥ 2.4 refuses; Triton 3.9 squeezes first."""
    global _interpreter_verdict
    if _interpreter_verdict is None:
        out = torch.zeros(1)
        try:
            _loop_probe_kernel[(1,)](out, 3)
            _interpreter_verdict = float(out[0]) == 3.0
        except Exception:  # the interpreter wraps the TypeError in its own error class
            _interpreter_verdict = False
    return _interpreter_verdict


ALIGN_ELEMENTS = 8  # numel multiple of this: 16 bytes of 2-byte elements, 32 of fp32


def vector_aligned(tensors) -> bool:
    """Whether an entry's tensors (p, grad, states; None skipped) may use 16-byte vector accesses:
    every address 16-byte aligned, and a numel that is a multiple of ALIGN_ELEMENTS (chunk starts are
    too), so that each 16-byte vector is wholly inside or wholly outside the tensor."""
    present = [t for t in tensors if t is not None]
    return present[0].numel() % ALIGN_ELEMENTS == 0 and all(t.data_ptr() % 16 == 0 for t in present)


class Entry(NamedTuple):
    """One tensor of a launch: plain (local) contiguous tensors and its two table indices. grad, s1, s2
    are None for entries that are not stepped (s1, s2 also where the optimizer keeps no such state:
    SGD has at most s1, the momentum buffer)."""

    p: torch.Tensor
    grad: torch.Tensor | None
    s1: torch.Tensor | None  # Adam: exp_avg; SGD: momentum_buffer
    s2: torch.Tensor | None  # Adam: exp_avg_sq
    group: int  # equal-step group; −1: stepped but in no group
    hyper_row: int  # row of ``hyper``; −1: not stepped this time (only ‖W‖² counts)

    @property
    def tensors(self) -> tuple:
        """(p, grad, s1, s2): the tensors the pointer table addresses, in its column order."""
        return self.p, self.grad, self.s1, self.s2

    @property
    def stepped(self) -> bool:
        return self.hyper_row >= 0


class Tables:
    """Device tables of one dtype bucket (same dtypes of p, grad and states); see the module docstring."""

    def __init__(self, entries: list[Entry], chunk: int, device: torch.device):
        self.entries = entries
        self.chunk = chunk
        self.device = device
        # Vector width promised to the kernel (VEC): elements per 16 bytes of the narrowest dtype, when
        # every entry is vector_aligned; 0 (4-byte accesses) otherwise.
        tensors = [t for en in entries for t in en.tensors if t is not None]
        aligned = chunk % ALIGN_ELEMENTS == 0 and all(vector_aligned(en.tensors) for en in entries)
        self.vec = min(ALIGN_ELEMENTS, 16 // min(t.element_size() for t in tensors)) if aligned else 0
        stepped = [en for en in entries if en.stepped]
        self.p_proto = entries[0].p
        self.g_proto = stepped[0].grad if stepped else entries[0].p
        self.s_proto = next((en.s1 for en in stepped if en.s1 is not None), entries[0].p)
        chunk_entry, chunk_start = [], []
        for i, en in enumerate(entries):
            n = en.p.numel()
            for s in range(0, n, chunk):
                chunk_entry.append(i)
                chunk_start.append(s)
        self.num_chunks = len(chunk_entry)
        self.grad_ptrs = [en.grad.data_ptr() if en.grad is not None else 0 for en in entries]
        self.ptrs = self._ptr_table()
        self.numel = torch.tensor([en.p.numel() for en in entries], dtype=torch.int64).to(device)
        self.group = torch.tensor([en.group for en in entries], dtype=torch.int32).to(device)
        self.hyper_row = torch.tensor([en.hyper_row for en in entries], dtype=torch.int32).to(device)
        self.chunk_entry = torch.tensor(chunk_entry, dtype=torch.int32).to(device)
        self.chunk_start = torch.tensor(chunk_start, dtype=torch.int64).to(device)

    def _ptr_table(self) -> torch.Tensor:
        # A missing state tensor (SGD: no momentum buffer, no second state) points at the parameter: the
        # kernel never reads it (masked), but the address stays valid.
        rows = []
        for en, gp in zip(self.entries, self.grad_ptrs):
            row = [0] * int(PTR_COLS)
            row[PTR_P], row[PTR_GRAD] = en.p.data_ptr(), gp
            row[PTR_S1], row[PTR_S2] = (t.data_ptr() if t is not None else en.p.data_ptr() for t in (en.s1, en.s2))
            rows.append(row)
        return to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1, int(PTR_COLS)), self.device)

    def refresh_grads(self, grads) -> bool:
        """Point the table at this step's gradient tensors (they move when grads are re-allocated).
        Returns False, changing nothing, when a new gradient breaks the vector alignment promised to
        the kernel (the caller rebuilds the tables)."""
        new = [g.data_ptr() if g is not None else 0 for g in grads]
        if self.vec and any(p % 16 for p in new):
            return False
        if new != self.grad_ptrs:
            self.grad_ptrs = new
            self.entries = [en._replace(grad=g) for en, g in zip(self.entries, grads)]
            self.ptrs = self._ptr_table()
        return True


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device copy that does not wait for the device (pinned staging; the caching host
    allocator keeps the block alive until the copy has run)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def compile_for(target_arch: int = 90, p_dtype: str = "fp32", s_dtype: str = "fp32", mode: int = SINGLE,
                decoupled: bool = True, block: int = 1024, sgd: bool = False, vec: int = 0):
    """Compile the kernel ahead of time for a CUDA target (no GPU needed; TRITON_INTERPRET must be
    unset when this module is imported). Returns the compiled kernel; for checks on CPU-only machines."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _equal_step_kernel
    sig = dict(chunk_entry="*i32", chunk_start="*i64", ptrs="*i64", numel="*i64", group="*i32", hyper_row="*i32",
               hyper="*fp32", scales="*fp32", sums="*fp64", p_proto="*" + p_dtype, g_proto="*" + p_dtype,
               s_proto="*" + s_dtype, NUM_GROUPS="i32", CHUNK="i32")
    consts = dict(FIRST_PASS=mode != PHASE2, WRITE_W=mode != PHASE1, SGD=sgd, DECOUPLED=decoupled, BLOCK=block,
                  P_BY_HAND=False, S_BY_HAND=False, VEC=vec)
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", target_arch, 32), options=dict(num_warps=4))


def device_guard(device: torch.device):
    """The context a launch for tensors on ``device`` runs in. Triton launches on the *current* CUDA
    device and its current stream, whatever device its pointer arguments live on: with parameters on
    cuda:1 while cuda:0 is current, an unguarded launch runs on cuda:0 and dereferences cuda:1
    addresses there. ``torch.cuda.device(device)`` makes the parameters' device current for the
    launch (and restores the caller's afterwards); CPU tensors (the interpreter) need nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(tables: Tables, mode: int, hyper: torch.Tensor, scales: torch.Tensor, sums: torch.Tensor,
           decoupled: bool, block: int, sgd: bool = False, num_warps: int = 4) -> None:
    """One launch of the kernel over every chunk of ``tables``, on the device the tables (and the
    tensors they point at) live on."""
    if tables.num_chunks == 0:
        return
    with device_guard(tables.device):
        _launch(tables, mode, hyper, scales, sums, decoupled, block, sgd, num_warps)


def _launch(tables, mode, hyper, scales, sums, decoupled, block, sgd, num_warps) -> None:
    _equal_step_kernel[(tables.num_chunks,)](
        tables.chunk_entry, tables.chunk_start, tables.ptrs, tables.numel, tables.group, tables.hyper_row,
        hyper, scales, sums, tables.p_proto, tables.g_proto, tables.s_proto,
        scales.numel(), tables.chunk,
        FIRST_PASS=mode != PHASE2, WRITE_W=mode != PHASE1, SGD=sgd, DECOUPLED=decoupled, BLOCK=block,
        P_BY_HAND=_INTERPRET and tables.p_proto.dtype == torch.bfloat16,
        S_BY_HAND=_INTERPRET and tables.s_proto.dtype == torch.bfloat16,
        VEC=tables.vec,
        num_warps=num_warps,
    )
