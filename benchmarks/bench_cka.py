"""Benchmark the CKA engine against plain-torch contenders, all in one process.

Exact (feature-space) statistics of L layers × n tokens × d, base X and tuned Y:
  torch_bmm            stacked bmm XᵀX, YᵀY, YᵀX (fp32 out) + column sums, no shift (FIELD-NOTES anchor;
                       loses the spread under massive activations)
  torch_bmm_shifted    the same after subtracting a per-channel shift (equal-accuracy baseline)
  store_then_compute   keep every activation, then float64 ``linear_cka`` per layer (memory reported)
  reference_fp64       depthfast.cka.StreamingCKA(backend="reference")
  engine               depthfast._C.exact_update (symmetric upper blocks, fused shift/mask/sums)
Unbiased minibatch HSIC₁ of the three pairs per layer:
  gram_materialized    K = XXᵀ, L = YYᵀ as (L, n, n) tensors, then the HSIC₁ formula
  engine_unbiased      depthfast._C.unbiased_update (no n × n Grams; feature or sample space by shape)

Reported: ms per update, ratio to the first contender of the section, TFLOP/s of the useful work
(2·n·(d² + d² + d²) for exact: the full three products; 2·n²·(d1 + d2) + n² for the Grams),
and |CKA − float64 CKA| (max over layers) on inputs with offsets of 1e4 on a few channels.

    python benchmarks/bench_cka.py                 # CPU: small shapes, < 1 min
    python benchmarks/bench_cka.py --device cuda   # 24×8192×2048 and 32×4096×4096, bf16
    python benchmarks/bench_cka.py --accuracy      # old vs new (change-relative) error per magnitude, update
                                                   # time old vs new; error vs number of updates

--accuracy: nearly identical X, Y (Y = X + 0.01·noise, 1 − CKA ≈ 1e-4, offsets of 1e3 on two channels)
streamed in probe batches of 4096 tokens up to a study-sized probe (256 updates ≈ 1 M tokens), the
engine with its Gram statistics accumulated in float32 (the old layout) and in float64 (each update's
fp32 products added into float64), against the float64 reference on the same inputs: relative error
|Δ(1 − CKA)| / (1 − CKA) after 1, 4, 16, 64, 256 updates.

On a GPU machine: `pip install --no-build-isolation --no-deps -e .` (builds csrc/*.cu when torch has
CUDA), `python -m pytest -q tests/test_cka.py -k cuda`, then this script with --device cuda.
GPU targets (issue 4): engine ≥ 1.3× torch_bmm_shifted at equal accuracy; engine_unbiased ≥ 3×
gram_materialized; CKA within 1e-5 of float64 for fp32 inputs (bf16: tests/test_cka.py tol_16bit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from depthfast import _ext, cka
from depthfast.cka import engine as cka_engine
from depthfast.cka import stats as cka_stats
from targets import record  # this script's directory is on sys.path


def timer(device: str, fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_acts(layers, n, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(layers, n, d, generator=g)
    x[:, :, : max(1, d // 64)] += 1e4  # massive activations
    y = 0.8 * x + 0.6 * torch.randn(layers, n, d, generator=g)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def cka_from_stats(sxx, syy, syx, sx, sy, n):
    """float64 CKA per layer from (uncentered or shifted) stacked statistics."""
    sxx, syy, syx, sx, sy = (t.double() for t in (sxx, syy, syx, sx, sy))
    cxx = sxx - sx.unsqueeze(2) * sx.unsqueeze(1) / n
    cyy = syy - sy.unsqueeze(2) * sy.unsqueeze(1) / n
    cyx = syx - sy.unsqueeze(2) * sx.unsqueeze(1) / n
    f = lambda t: torch.linalg.norm(t.flatten(1), dim=1)  # noqa: E731
    return (f(cyx) ** 2 / (f(cxx) * f(cyy))).cpu()


def row(name, ms, base_ms, flops, err, extra=""):
    tf = flops / (ms * 1e-3) / 1e12
    print(f"  {name:<20} {ms:10.2f} ms   ×{base_ms / ms:6.2f}   {tf:8.3f} TFLOP/s   err {err:9.2e}  {extra}")


def engine_error(x, y, truth, change: bool) -> float:
    """Max |CKA − truth| over layers of StreamingCKA on the extension, old (X, Y) or change (X, D) statistics."""
    cka_stats._CHANGE_FORM = change
    try:
        fresh = cka.StreamingCKA(x.shape[0], backend="extension")
        fresh.update(list(x), list(y))
        return (fresh.compute() - truth).abs().max().item()
    finally:
        cka_stats._CHANGE_FORM = True


def bench_exact(layers, n, d, dtype, device, reps, with_reference):
    x, y = make_acts(layers, n, d, dtype, device)
    truth = torch.stack([cka.linear_cka(x[i], y[i]) for i in range(layers)])
    flops = 2.0 * layers * n * 3 * d * d
    out = torch.float32
    print(f"exact  L={layers} n={n} d={d} {str(dtype).replace('torch.', '')} on {device}")

    def bmm32(a, b):
        return torch.bmm(a, b) if a.dtype == torch.float32 else torch.bmm(a, b, out_dtype=out)

    def torch_bmm(xx=x, yy=y):
        xt, yt = xx.transpose(1, 2), yy.transpose(1, 2)
        return bmm32(xt, xx), bmm32(yt, yy), bmm32(yt, xx), xx.sum(1, dtype=torch.float64), yy.sum(1, dtype=torch.float64)

    base_ms = timer(device, torch_bmm, reps)
    err = (cka_from_stats(*torch_bmm(), n) - truth).abs().max().item()
    row("torch_bmm", base_ms, base_ms, flops, err, "(no shift)")

    cx = x[:, :1].float().mean(1, keepdim=True).to(dtype)
    cy = y[:, :1].float().mean(1, keepdim=True).to(dtype)

    def torch_bmm_shifted():
        return torch_bmm((x.float() - cx.float()).to(dtype), (y.float() - cy.float()).to(dtype))

    shifted_ms = timer(device, torch_bmm_shifted, reps)
    err = (cka_from_stats(*torch_bmm_shifted(), n) - truth).abs().max().item()
    row("torch_bmm_shifted", shifted_ms, base_ms, flops, err)

    ext = _ext.extension()
    if ext is not None:
        g = cka.StreamingCKA(layers, backend="extension")
        g.update(list(x), list(y))
        st = g._layers[0]._stacked
        args = [list(x), list(y), None, st["shift_x"], st["shift_y"], st["sxx"], st["syy"], st["syx"], st["sx"],
                st["sy"], st["vx"], st["vy"], st["sc"], False, g._layers[0].upper_block]
        variants = [("engine", "0")] + ([("engine_syrk", "1")] if device == "cuda" else [])
        for name, syrk in variants:  # DEPTHFAST_CKA_SYRK is read at each call
            os.environ["DEPTHFAST_CKA_SYRK"] = syrk
            ms = timer(device, lambda: ext.exact_update(*args), reps, warmup=1)
            err = engine_error(x, y, truth, change=False)  # the statistics this row timed: X and Y
            how = "one-launch WMMA SYRK" if syrk == "1" else f"BLAS upper blocks of {g._layers[0].upper_block}"
            row(name, ms, base_ms, flops, err, f"(×{shifted_ms / ms:.2f} vs torch_bmm_shifted; {how})")
        os.environ.pop("DEPTHFAST_CKA_SYRK", None)
        if x.shape[2] == y.shape[2]:  # one width: what a run measures, X and the change D = Y − X
            ms = timer(device, lambda: ext.exact_update(*args, True), reps, warmup=1)
            err = engine_error(x, y, truth, change=True)
            row("engine_change", ms, base_ms, flops, err, f"(×{shifted_ms / ms:.2f} vs torch_bmm_shifted; "
                "statistics of X and D, staged in one pass)")
            record("cka_exact", shifted_ms / ms, f"L={layers} n={n} d={d} {str(dtype).replace('torch.', '')}")
    else:
        print("  engine               skipped: depthfast._C not built")

    if with_reference:
        def reference():
            m = cka.StreamingCKA(layers, backend="reference")
            m.update(list(x), list(y))
            return m
        ms = timer(device, reference, 1, warmup=0)
        row("reference_fp64", ms, base_ms, flops, (reference().compute() - truth).abs().max().item())

        store: list = []

        def store_then_compute():
            store.clear()
            store.append((x.clone(), y.clone()))
            xs = torch.cat([s[0] for s in store], 1)
            ys = torch.cat([s[1] for s in store], 1)
            return torch.stack([cka.linear_cka(xs[i], ys[i]) for i in range(layers)])
        ms = timer(device, store_then_compute, 1, warmup=0)
        stored = layers * n * 2 * d * x.element_size()
        state = layers * 3 * d * d * 4
        row("store_then_compute", ms, base_ms, flops, (store_then_compute() - truth).abs().max().item(),
            f"(stores {stored / 2**20:.1f} MiB per {n} tokens, grows with the probe set; streamed state "
            f"{state / 2**20:.1f} MiB fixed)")


def hsic_materialized(x, y):
    """Unbiased HSIC₁ of (X,Y), (X,X), (Y,Y) per layer with (L, n, n) Grams in memory (fp32)."""
    n = x.shape[1]
    xc, yc = x.float() - x.float().mean(1, keepdim=True), y.float() - y.float().mean(1, keepdim=True)
    k, l = torch.bmm(xc, xc.transpose(1, 2)), torch.bmm(yc, yc.transpose(1, 2))
    k.diagonal(dim1=1, dim2=2).zero_()
    l.diagonal(dim1=1, dim2=2).zero_()

    def h(a, b):
        tr = (a * b).sum((1, 2), dtype=torch.float64)
        sa, sb = a.sum((1, 2), dtype=torch.float64), b.sum((1, 2), dtype=torch.float64)
        cross = (a.sum(1, dtype=torch.float64) * b.sum(2, dtype=torch.float64)).sum(1)
        return (tr + sa * sb / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))
    return torch.stack([h(k, l), h(k, k), h(l, l)], 1)


def bench_unbiased(layers, n, d, dtype, device, reps):
    x, y = make_acts(layers, n, d, dtype, device, seed=1)
    print(f"unbiased  L={layers} minibatch n={n} d={d} {str(dtype).replace('torch.', '')} on {device}")
    truth = []
    for i in range(layers):
        xc = x[i].double() - x[i].double().mean(0)
        yc = y[i].double() - y[i].double().mean(0)
        k, l = xc @ xc.T, yc @ yc.T
        truth.append([float(cka.hsic1(k, l)), float(cka.hsic1(k, k)), float(cka.hsic1(l, l))])
    truth = torch.tensor(truth, dtype=torch.float64)
    to_cka = lambda h: h[:, 0] / torch.sqrt(h[:, 1] * h[:, 2])  # noqa: E731
    flops = layers * (2.0 * n * n * 2 * d + 3 * n * n)
    base_ms = timer(device, lambda: hsic_materialized(x, y), reps)
    err = (to_cka(hsic_materialized(x, y).cpu()) - to_cka(truth)).abs().max().item()
    row("gram_materialized", base_ms, base_ms, flops, err, f"({2 * layers * n * n * 4 / 2**20:.1f} MiB of Grams)")
    ext = _ext.extension()
    if ext is None:
        print("  engine_unbiased      skipped: depthfast._C not built")
        return
    for space in ("feature", "sample"):
        acc = torch.zeros(layers, 3, dtype=torch.float64, device=device)
        run = lambda: ext.unbiased_update(list(x), list(y), None, acc, n, False, space)  # noqa: E731
        ms = timer(device, run, reps)
        acc.zero_()
        run()
        err = (to_cka(acc.cpu()) - to_cka(truth)).abs().max().item()
        row(f"engine_{space}", ms, base_ms, flops, err)
        if x.shape[2] == y.shape[2]:  # one width: the change form a run uses
            acc = torch.zeros(layers, 3, dtype=torch.float64, device=device)
            run = lambda: ext.unbiased_update(list(x), list(y), None, acc, n, False, space, True)  # noqa: E731
            ms = timer(device, run, reps)
            acc.zero_()
            run()
            km, kk, mm = acc.cpu().unbind(1)  # change form: HSIC₁(K,M), HSIC₁(K,K), HSIC₁(M,M), L = K + M
            err = ((kk + km) / torch.sqrt(kk * (kk + 2 * km + mm)) - to_cka(truth)).abs().max().item()
            row(f"engine_{space}_change", ms, base_ms, flops, err, "(HSIC₁ of K and the change M)")
            record("cka_unbiased", base_ms / ms, f"{space} space, L={layers} n={n} d={d} "
                   f"{str(dtype).replace('torch.', '')}")


def bench_ride_along(device: str, reps: int) -> None:
    """The measurement's cost relative to the two forward passes it rides on: a Pythia-shaped base and
    tuned model (random weights, registry config; a 2-block stand-in on the CPU), hooks on every block,
    with and without StreamingCKA updates (the engine when built)."""
    import copy

    from transformers import AutoModelForCausalLM

    from depthfast.layers import BlockCapture, discover_layers
    from depthfast.registry import lookup

    config = lookup("EleutherAI/pythia-1.4b").config()
    tokens = (4, 2048)
    if device == "cpu":  # a stand-in that runs in seconds
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads = 2, 256, 4
        config.intermediate_size, tokens = 1024, (4, 256)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    layers_b, layers_t = discover_layers(base), discover_layers(tuned)
    ids = torch.randint(0, 50000, tokens, device=device)
    acc = cka.StreamingCKA(layers_b.num_blocks + 1)

    def forwards(measure: bool):
        with torch.no_grad(), BlockCapture(layers_b) as cb, BlockCapture(layers_t) as ct:
            base(input_ids=ids)
            tuned(input_ids=ids)
            if measure:
                acc.update(cb.activations, ct.activations)

    plain = timer(device, lambda: forwards(False), reps)
    measured = timer(device, lambda: forwards(True), reps)
    print(f"ride-along  {layers_b.num_blocks} blocks × {tokens[0] * tokens[1]} tokens, d {config.hidden_size}, "
          f"{dtype} on {device} (backend {acc.backend})")
    print(f"  two forwards with hooks   {plain:9.2f} ms")
    print(f"  + CKA statistics          {measured:9.2f} ms   (+{100 * (measured / plain - 1):.1f} %; target ≤ 10 % on a GPU)")
    record("measure_share", measured / plain - 1, f"{layers_b.num_blocks} blocks × {tokens[0] * tokens[1]} tokens, "
           f"d {config.hidden_size}, backend {acc.backend}")


def bench_production(device: str, reps: int) -> None:
    """StreamingCKA.update as measure.py calls it: a probe batch of 32 texts × 128 tokens (RunConfig
    defaults) per call, (batch, seq, d) block outputs with a padding mask, all layers, the block split
    gram_block picks; 25 layers of d = 2048 (Pythia-1.4B) bf16 on a GPU, 7 × 384 fp32 (MiniLM) on the CPU."""
    layers, d, dtype = (25, 2048, torch.bfloat16) if device == "cuda" else (7, 384, torch.float32)
    b, s = 32, 128
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(s)[None] < torch.randint(16, s + 1, (b,), generator=g)[:, None]).long()
    base = [(torch.randn(b, s, d, generator=g)).to(device, dtype) for _ in range(layers)]
    tuned = [(x.float() + 0.1 * torch.randn(b, s, d, generator=g).to(device)).to(dtype) for x in base]
    mask = mask.to(device)
    print(f"production  StreamingCKA.update, {layers} layers × ({b} × {s} tokens, {int(mask.sum())} real) × d {d}, "
          f"{str(dtype).replace('torch.', '')} on {device}")
    for estimator in ("exact", "unbiased"):
        m = cka.StreamingCKA(layers, estimator=estimator)
        ms = timer(device, lambda: m.update(base, tuned, mask), reps)
        flops = 2.0 * layers * b * s * 3 * d * d if estimator == "exact" else 0.0
        tf = f"{flops / (ms * 1e-3) / 1e12:8.3f} TFLOP/s" if flops else ""
        print(f"  {estimator:<10} backend {m.backend:<9} {ms:10.2f} ms per probe batch  {tf}")


def bench_accuracy(device: str, widths=(64, 256), batch: int = 4096, checkpoints=(1, 4, 16, 64, 256),
                   dtype=torch.float32, layers: int = 1) -> dict:
    """Relative error on 1 − CKA vs updates, engine with fp32 and float64 Gram sums vs the float64
    reference (same inputs). Returns {(d, accum): [errors at checkpoints]}."""
    ext = _ext.extension()
    if ext is None:
        print("accuracy  skipped: depthfast._C not built")
        return {}
    results = {}
    print(f"accuracy  1 − CKA ≈ 1e-4, batches of {batch} tokens, {str(dtype).replace('torch.', '')} inputs on {device}: "
          "relative error |Δ(1 − CKA)| / (1 − CKA) vs the float64 reference")
    print(f"  {'d':>5} {'Gram sums':>10} " + " ".join(f"{c:>9}" for c in checkpoints) + "   (updates)")
    for d in widths:
        g = torch.Generator(device=device).manual_seed(d)  # data made where it is used
        mix = torch.randn(d, d, generator=g, device=device) / d**0.5  # anisotropic, correlated channels
        accs = {"reference": cka.StreamingCKA(layers, backend="reference")}
        saved = cka_engine._GRAM_ACCUM_DTYPE
        for name in ("float32", "float64"):
            accs[name] = cka.StreamingCKA(layers, backend="extension")
        errs = {"float32": [], "float64": []}
        try:
            for u in range(1, max(checkpoints) + 1):
                x = torch.randn(batch, d, generator=g, device=device) @ mix
                x[:, :2] += 1e3
                y = x + 0.01 * torch.randn(batch, d, generator=g, device=device) * x.std(0)
                x, y = x.to(dtype), y.to(dtype)
                for name, m in accs.items():  # the float64 reference runs on the same device
                    # read when an accumulator allocates its state (its first update)
                    cka_engine._GRAM_ACCUM_DTYPE = torch.float32 if name == "float32" else torch.float64
                    m.update([x] * layers, [y] * layers)
                if u in checkpoints:
                    ref = 1.0 - float(accs["reference"].compute()[0])
                    for name in errs:
                        errs[name].append(abs((1.0 - float(accs[name].compute()[0])) - ref) / ref)
        finally:
            cka_engine._GRAM_ACCUM_DTYPE = saved
        for name, e in errs.items():
            results[(d, name)] = e
            print(f"  {d:>5} {name:>10} " + " ".join(f"{v:9.2e}" for v in e))
        print(f"  {d:>5} {'1 − CKA':>10} {ref:9.3e}")
    return results


# (n, d) of the update-speed comparison on the CPU: the unbiased estimator works in feature space for
# n ≥ 2d and in sample space below (one 256-row tile, then several), the exact one always in features.
UPDATE_SHAPES_CPU = ((2048, 256), (4096, 384), (512, 256), (256, 512), (1024, 768))


def bench_update_speed(device: str, n: int, d: int, dtype=torch.float32, reps: int = 3, layers: int = 4) -> None:
    """``StreamingCKA.update`` time with the change-relative statistics (new) over the old X, Y ones,
    per estimator, in this process: both accumulators are built first, then timed in alternation
    (order swapped every round) so that machine load falls on both alike; the ratio is the median of
    the paired ratios, and each side's median time is printed beside it."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, d, generator=g).to(device, dtype) for _ in range(layers)]
    ys = [x + 0.01 * torch.randn(x.shape, generator=g).to(device, dtype) for x in xs]
    rounds = max(9, 5 * reps)
    for est in ("exact", "unbiased"):
        acc = {}
        for change in (False, True):  # the form is fixed at an accumulator's first update
            cka_stats._CHANGE_FORM = change
            acc[change] = cka.StreamingCKA(layers, estimator=est)
            acc[change].update(xs, ys)  # allocation, shifts
        cka_stats._CHANGE_FORM = True
        ms = {False: [], True: []}
        for r in range(rounds):
            for change in ((False, True) if r % 2 == 0 else (True, False)):
                ms[change].append(timer(device, lambda: acc[change].update(xs, ys), 1, warmup=0))
        ratio = statistics.median(a / b for a, b in zip(ms[True], ms[False]))
        space = "features" if est == "exact" or 2 * d <= n else f"samples, {-(-n // 256)} tile rows"
        print(f"  update {est:8s} {layers} layers n {n} d {d} ({space}): old {statistics.median(ms[False]):.2f} ms, "
              f"new {statistics.median(ms[True]):.2f} ms, new/old {ratio:.3f} (median of {rounds} paired rounds)")
        record("change_update", ratio, f"{est}, n {n} d {d}, {space}, {str(dtype).replace('torch.', '')}")


def bench_change(device: str, n: int = 2048, d: int = 256, updates: int = 4, reps: int = 3,
                 dtype=torch.float32, emulate_tensor_cores: bool = False) -> None:
    """Old (XᵀX, YᵀX, YᵀY: ``stats._CHANGE_FORM = False``) vs new (X and the change D = Y − X)
    statistics through StreamingCKA: relative error of 1 − CKA against the float64 change-relative
    truth per magnitude (Y = X + εZ, offsets of 1e4 on 3 channels), and the time of ``update`` old vs
    new in this process."""
    ext = _ext.extension()
    if emulate_tensor_cores and ext is not None:
        ext._set_emulate_tensor_cores(True)
    label = str(dtype).replace("torch.", "") + (" (emulated tensor cores)" if emulate_tensor_cores else "")
    print(f"change    n = {n}, d = {d}, {updates} updates, {label} inputs on {device}, offsets 1e4 on 3 channels")
    try:
        for eps in (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
            g = torch.Generator().manual_seed(1)
            x = torch.randn(n, d, generator=g)
            x[:, :3] += 1e4
            z = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
            y = (x.double() + eps * z.double()).float()
            xq, yq = x.to(dtype), y.to(dtype)  # the truth is of the inputs the engine sees
            truth = {"exact": float(cka.linear_cka_change(xq, yq)),
                     "unbiased": float(cka.minibatch_cka_change(xq.split(n // updates), yq.split(n // updates)))}
            errs = []
            for change in (False, True):
                cka_stats._CHANGE_FORM = change
                for est in ("exact", "unbiased"):
                    m = cka.StreamingCKA(1, estimator=est)
                    for a, b in zip(xq.to(device).split(n // updates), yq.to(device).split(n // updates)):
                        m.update([a], [b])
                    errs.append(abs(float(m.compute_change()[0]) - truth[est]) / truth[est])
            print(f"  1 − CKA {truth['exact']:.1e}   old exact {errs[0]:.1e} unbiased {errs[1]:.1e}   "
                  f"new exact {errs[2]:.1e} unbiased {errs[3]:.1e}")
            key = "accuracy_fp32" if dtype == torch.float32 else "accuracy_16bit"
            record(key, max(errs[2:]), f"{label}, 1 − CKA {truth['exact']:.0e}, offsets 1e4, n {n} d {d}")
        if not emulate_tensor_cores:
            shapes = ((8192, 1024), (4096, 2048), (2048, 2048)) if device == "cuda" else UPDATE_SHAPES_CPU
            for n_, d_ in shapes:
                bench_update_speed(device, n_, d_, dtype, reps)
    finally:
        cka_stats._CHANGE_FORM = True
        if emulate_tensor_cores and ext is not None:
            ext._set_emulate_tensor_cores(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--accuracy", action="store_true", help="only the accuracy sweep (error on 1 − CKA vs updates)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.accuracy:
        bench_change(args.device)
        for dt in (torch.bfloat16, torch.float16):  # 16-bit operands (tensor cores, emulated on the CPU)
            bench_change(args.device, n=1024, d=128, dtype=dt, emulate_tensor_cores=args.device == "cpu")
        bench_accuracy(args.device)
        if args.device == "cuda":  # the tensor-core path: bf16 inputs, production probe batch width
            bench_accuracy(args.device, widths=(2048,), dtype=torch.bfloat16, checkpoints=(1, 16, 256))
        return
    if args.device == "cuda":
        reps = args.reps or 10
        for layers, n, d in ((24, 8192, 2048), (32, 4096, 4096)):
            bench_exact(layers, n, d, torch.bfloat16, "cuda", reps, with_reference=False)
        bench_unbiased(24, 1024, 2048, torch.bfloat16, "cuda", reps)
        bench_unbiased(24, 4096, 2048, torch.bfloat16, "cuda", reps)
    else:
        reps = args.reps or 3
        bench_exact(4, 2048, 512, torch.float32, "cpu", reps, with_reference=True)
        bench_exact(2, 1024, 1024, torch.float32, "cpu", reps, with_reference=False)
        bench_unbiased(4, 256, 512, torch.float32, "cpu", reps)
        bench_unbiased(4, 1024, 128, torch.float32, "cpu", reps)
    bench_production(args.device, reps)
    bench_ride_along(args.device, reps)
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
