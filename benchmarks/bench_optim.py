"""Benchmark of the equal-step optimizer step: every contender timed in the same process.

    python benchmarks/bench_optim.py                # full sizes on a GPU; tiny sizes on a CPU
    python benchmarks/bench_optim.py --drift-only   # only the single-pass drift measurement

Contenders (one optimizer step each, gradients fixed), for AdamW and for SGD with momentum 0.9:
    torch-fused     torch.optim.AdamW / SGD (fused=True), no control               (the 1.00× line)
    torch-foreach   the same with foreach=True, no control
    by-hand         optim_baselines.ForeachEqualStep (next to this file): snapshot + step + _foreach_norm + rescale
    reference       depthfast.optim.EqualStep(fused=False): snapshot, float64 norms, host syncs
    fused-exact     EqualStep(fused=True): two passes, ratios equal every step
    fused-1pass     EqualStep(fused=True, mode="single-pass"): scales from the previous step
    fused-none      EqualStep(fused=True, control="none"): AdamW plus the per-group ratios

Shapes: "pythia-1.4b" (24 blocks, d 2048, vocab 50304: 1.41 B fp32 parameters, 26 groups: embedding,
each block, head) and "many-small" (4000 bf16 tensors of 1 K–64 K elements, 100 groups); SGD runs the
first only. On a CPU
both are shrunk and the fused contenders run in the Triton interpreter: those timings mean nothing.

Columns: median ms per step, ratio to torch-fused, GB/s against the contender's byte count
(bytes_per_param below: README.md, "Bytes moved per parameter"; none for the reference), peak extra
device memory over the step (GPU only).

The drift section trains a tiny character-level GPT-2 (Python's own docs as text) with the fused
single-pass control and reports how far each step's applied group ratios stray from equal:
max_g |r_g / mean(r) − 1| per step, against the exact mode (0 up to rounding) and no control.
On a CPU the whole script takes about a minute (the interpreter); on a GPU, memory for the 1.41 B
shape peaks near 30 GB (params, grads, states, plus one contender's extra).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before depthfast.kernels is imported

from depthfast.optim import EqualStep, launch_config  # noqa: E402
from optim_baselines import ForeachEqualStep  # noqa: E402  (this script's directory is on sys.path)
from targets import record  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
if not GPU:
    # Two intra-op threads on a shared 2-core machine stall on each other (200× swings measured);
    # one thread gives steadier CPU numbers, which are only a smoke test anyway.
    torch.set_num_threads(1)


# -- shapes -----------------------------------------------------------------------------------------

def pythia_like(blocks: int, d: int, vocab: int, dtype=torch.float32):
    """Parameter shapes of a GPT-NeoX model (Pythia): groups [embedding, block 1 … block L, head]."""
    def block():
        return [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    groups = [[(vocab, d)]] + [block() for _ in range(blocks)] + [[(d,), (d,), (vocab, d)]]
    return groups, dtype


def many_small(tensors: int, lo: int, hi: int, groups: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(lo, hi + 1, (tensors,), generator=gen).tolist()
    per = -(-tensors // groups)
    return [[(n,) for n in sizes[i:i + per]] for i in range(0, tensors, per)], dtype


def materialize(shape_groups, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    groups = []
    for g in shape_groups:
        ps = []
        for s in g:
            p = torch.nn.Parameter(torch.randn(s, device=DEVICE, dtype=torch.float32, generator=gen).mul_(0.02).to(dtype))
            p.grad = torch.randn(s, device=DEVICE, dtype=torch.float32, generator=gen).mul_(1e-3).to(dtype)
            ps.append(p)
        groups.append(ps)
    return groups


# -- contenders -------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": lambda params, **kw: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **kw),
    "sgd": lambda params, **kw: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw),
}


def contenders(groups, algo):
    make = OPTIMIZERS[algo]
    params = [p for g in groups for p in g]
    yield "torch-fused", lambda: make(params, fused=True), None
    yield "torch-foreach", lambda: make(params, foreach=True), None
    yield "by-hand", lambda: ForeachEqualStep(make(params, fused=True), groups), "by-hand"
    yield "reference", lambda: EqualStep(make(params, foreach=True), groups, fused=False), None
    yield "fused-exact", lambda: EqualStep(make(params), groups, fused=True), "exact"
    yield "fused-1pass", lambda: EqualStep(make(params), groups, fused=True, mode="single-pass"), "single"
    yield "fused-none", lambda: EqualStep(make(params), groups, fused=True, control="none"), "single"


def bytes_per_param(kind, algo, p_bytes, g_bytes, s_bytes):
    """Bytes moved per parameter, the formulas of README.md's "Bytes moved per parameter": Adam keeps
    two states (read and written once per pass), SGD with momentum one."""
    states = 2 if algo == "adamw" else 1
    if kind is None or kind == "single":
        return 2 * p_bytes + g_bytes + 2 * states * s_bytes
    if kind == "exact":
        return 3 * p_bytes + g_bytes + 3 * states * s_bytes
    if kind == "by-hand":
        return 16 * p_bytes + g_bytes + 2 * states * s_bytes
    raise ValueError(kind)


def _sync():
    if GPU:
        torch.cuda.synchronize()


def time_step(opt, warmup: int, iters: int):
    for _ in range(warmup):
        opt.step()
    _sync()
    base = torch.cuda.memory_allocated() if GPU else 0
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            opt.step()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) if GPU else None
    return statistics.median(times), peak


def run_shape(name, shape_groups, dtype, warmup, iters, skip, algo="adamw"):
    groups = materialize(shape_groups, dtype)
    params = [p for g in groups for p in g]
    n = sum(p.numel() for p in params)
    label_algo = {"adamw": "AdamW", "sgd": "SGD momentum 0.9"}[algo]
    print(f"\n== {label_algo}, {name}: {n / 1e6:.2f} M params in {len(params)} tensors, {len(groups)} groups, "
          f"{dtype} on {torch.cuda.get_device_name() if GPU else 'CPU'} ==")
    if not GPU:
        print("   (CPU: the fused-* rows run in the Triton interpreter; their timings mean nothing)")
    block, chunk = launch_config(DEVICE)  # what production launches (env overrides included)
    print(f"   fused kernels: BLOCK {block}, CHUNK {chunk}")
    print(f"   {'contender':<14} {'ms':>10} {'× torch-fused':>14} {'B/param':>8} {'GB/s':>8} {'peak extra':>11}")
    base_ms = None
    p_bytes = g_bytes = params[0].element_size()
    for label, make, kind in contenders(groups, algo):
        if label in skip:
            continue
        try:
            opt = make()
        except (RuntimeError, ValueError) as e:  # e.g. a torch without fused SGD on this device
            print(f"   {label:<14} not run: {str(e).splitlines()[0][:90]}")
            continue
        it = iters if label != "reference" else max(1, iters // 4)
        ms, peak = time_step(opt, warmup if label != "reference" else 1, it)
        state = (opt.optimizer if hasattr(opt, "optimizer") else opt).state
        s_bytes = next(iter(t for t in state[params[0]].values() if t is not None and t.dim())).element_size()
        base_ms = ms if label == "torch-fused" else base_ms
        ratio = f"{ms / base_ms:8.2f}×" if base_ms else "      —"
        if label == "reference":
            bpp, gbs = "—", "—"
        else:
            b = bytes_per_param(kind, algo, p_bytes, g_bytes, s_bytes)
            bpp, gbs = str(b), f"{b * n / (ms * 1e-3) / 1e9:.0f}"
        mem = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a"
        if label == "fused-exact" and algo == "adamw" and base_ms:
            record("optim_equal_step", ms / base_ms, f"{name}, {n / 1e6:.0f} M params, {dtype}")
        print(f"   {label:<14} {ms:10.2f} {ratio:>14} {bpp:>8} {gbs:>8} {mem:>11}")
        del opt, state
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()
    del groups, params
    gc.collect()


# -- single-pass drift on a real (tiny) training run ---------------------------------------------------

def drift(steps: int, controls=("none", "exact", "single-pass")):
    import transformers
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8", "replace")
    data = torch.tensor(list(text[:400_000]), dtype=torch.long)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    print(f"\n== single-pass drift: char-level GPT-2 (d 64, 4 layers) on pydoc text, {steps} steps, "
          f"AdamW lr 3e-3, batch 16 × 64 ==")
    print("   spread = max_g |r_g / mean r − 1| of the applied ratios, per step (step 1 left out: single-pass")
    print("   starts with an exact step); max at step k; max over the steps after 10")
    print(f"   {'control':<12} {'median':>9} {'max':>9} {'at':>4} {'max >10':>9} {'last loss':>10} {'time':>9}")
    kinds = {"none": dict(control="none"), "exact": dict(), "single-pass": dict(mode="single-pass")}
    for label, kw in [(c, kinds[c]) for c in controls]:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).to(DEVICE)
        blocks = [list(b.parameters()) for b in model.transformer.h]
        emb = list(model.transformer.wte.parameters()) + list(model.transformer.wpe.parameters())
        seen = {id(p) for g in blocks + [emb] for p in g}
        groups = [emb] + blocks + [[p for p in model.parameters() if id(p) not in seen]]
        # On a CPU only single-pass needs the (interpreted) kernels; the others run the reference.
        fused = GPU or label == "single-pass"
        opt = EqualStep(torch.optim.AdamW(model.parameters(), lr=3e-3), groups, fused=fused, **kw)
        gen = torch.Generator().manual_seed(1)
        spreads = []
        t0 = time.perf_counter()
        for _ in range(steps):
            starts = torch.randint(0, len(data) - 65, (16,), generator=gen)
            ids = torch.stack([data[s:s + 64] for s in starts]).to(DEVICE)
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            r = opt.ratios_after.double()
            spreads.append(float((r / r.mean() - 1).abs().max()))
        sp = spreads[1:]  # step 1 of single-pass is exact
        secs = time.perf_counter() - t0
        at = 2 + max(range(len(sp)), key=sp.__getitem__)
        late = max(spreads[10:]) if len(spreads) > 10 else float("nan")
        print(f"   {label:<12} {statistics.median(sp):9.2e} {max(sp):9.2e} {at:4d} {late:9.2e} {loss.item():10.3f} {secs:7.1f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drift-only", action="store_true")
    ap.add_argument("--no-drift", action="store_true")
    ap.add_argument("--iters", type=int, default=20 if GPU else 1)
    ap.add_argument("--drift-steps", type=int, default=100 if GPU else 12)
    ap.add_argument("--skip", default="", help="comma-separated contenders to leave out")
    ap.add_argument("--drift-controls", default="none,exact,single-pass")
    ap.add_argument("--no-sgd", action="store_true", help="leave out the SGD-with-momentum section")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.time()
    if not args.drift_only:
        if GPU:
            run_shape("pythia-1.4b", *pythia_like(24, 2048, 50304), warmup=3, iters=args.iters, skip=skip)
            run_shape("many-small", *many_small(4000, 1024, 65536, 100), warmup=3, iters=args.iters, skip=skip)
            if not args.no_sgd:
                run_shape("pythia-1.4b", *pythia_like(24, 2048, 50304), warmup=3, iters=args.iters, skip=skip, algo="sgd")
        else:
            run_shape("pythia-like tiny", *pythia_like(2, 64, 512), warmup=1, iters=args.iters, skip=skip)
            run_shape("many-small tiny", *many_small(60, 16, 512, 10), warmup=1, iters=args.iters, skip=skip)
            if not args.no_sgd:
                run_shape("pythia-like tiny", *pythia_like(2, 64, 512), warmup=1, iters=args.iters, skip=skip, algo="sgd")
    if not args.no_drift:
        drift(args.drift_steps, args.drift_controls.split(","))
    print(f"\n(total {time.time() - t0:.1f} s; torch {torch.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
