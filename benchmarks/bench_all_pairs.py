"""All-layer-pairs minibatch CKA: depthfast.all_pairs.AllPairsCKA against the installed peer libraries.

Every contender gets the same precomputed activations: n probe samples in minibatches of m, L layers
per model of width d (float32, channel offsets ~3σ, tuned layer j a noisy linear map of base layer j)
and computes the (L, L) minibatch CKA matrix Σ_b HSIC₁(K_i, L_j) / sqrt(Σ_b HSIC₁(K_i,K_i) Σ_b HSIC₁(L_j,L_j)).

    depthfast f64 / f32   AllPairsCKA(gram_dtype=float64 / float32): float64-centered operands, products
                          in float64 / fp32, every sum float64, all pairs as GEMMs; "sample": m×m Grams,
                          "feature": d×e cross products (space="auto", the default, takes the one with
                          fewer flops; the ratio column is against the f64 row that auto picks)
    pytorch-cka f32 / f64 ``cka.hsic.hsic`` on the stacked Grams ``torch.mm(f, f.T)`` per batch, summed
                          in that dtype, then ``CKA._compute_cka_matrix`` (what ``CKA._compare`` does per
                          dataloader batch; no centering, result clamped to [0, 1])
    ckatorch              ``ckatorch.core.cka_batch(X_i, Y_j)`` per pair on all batches at once (B, m, d):
                          float64, bmm(K, L) = O(m³) per batch and pair, Grams recomputed per pair, all B
                          Grams of a pair held at once
    torch-cka             ``torch_cka.CKA.compare`` on two replay modules that return the stored
                          activations (a DataLoader of batch indices): float32, K @ L = O(m³) per pair,
                          the tuned Gram recomputed per base layer, a .item() sync per HSIC
The accuracy reference is an independent float64 computation: float64-centered samples, float64
Grams, pytorch-cka's ``hsic`` in float64. "max |Δ|" is the largest absolute error of the matrix.

Peak memory: the largest resident set size (RSS, /proc/self/statm) sampled every millisecond during
the contender, minus the RSS just before it (after gc and malloc_trim); tracemalloc would not see
torch's allocations. Input activations are allocated before and not counted.

    PYTHONPATH=$PWD python benchmarks/bench_all_pairs.py [--n 1000,10000,100000] [--m 256] [--d 128] [--layers 5]
                                                         [--threads 1] [--repeat 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import os
import threading
import time
import warnings

import torch

from depthfast.all_pairs import AllPairsCKA

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: self.peak = max RSS sampled every ``interval`` s above the RSS at entry."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval, self.peak = interval, 0

    def __enter__(self):
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = rss()
        self._top, self._stop = self.base, threading.Event()

        def sample():
            while not self._stop.is_set():
                self._top = max(self._top, rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._top = max(self._top, rss())
        self._stop.set()
        self._thread.join()
        self.peak = self._top - self.base


def make_data(n: int, m: int, d: int, layers: int, seed: int = 0):
    """[(base (layers, m, d), tuned (layers, m, d))] float32 per batch; n // m batches."""
    g = torch.Generator().manual_seed(seed)
    offsets = 3.0 * torch.randn(layers, 1, d, generator=g)
    maps = torch.randn(layers, d, d, generator=g) / d**0.5
    batches = []
    for _ in range(max(1, n // m)):
        z = torch.randn(m, d, generator=g)
        xs = torch.stack([z + (i + 1) * 0.3 * torch.randn(m, d, generator=g) for i in range(layers)])
        ys = torch.bmm(xs, maps) + 0.5 * torch.randn(layers, m, d, generator=g)
        batches.append((xs + offsets, ys + offsets))
    return batches


# --- contenders --------------------------------------------------------------------------------------------
def reference_f64(batches):
    from cka.hsic import hsic

    layers = batches[0][0].shape[0]
    xy = torch.zeros(layers, layers, dtype=torch.float64)
    xx, yy = torch.zeros(layers, dtype=torch.float64), torch.zeros(layers, dtype=torch.float64)
    for xs, ys in batches:
        xc = xs.double() - xs.double().mean(dim=1, keepdim=True)
        yc = ys.double() - ys.double().mean(dim=1, keepdim=True)
        a, b, c = hsic(torch.bmm(xc, xc.transpose(1, 2)), torch.bmm(yc, yc.transpose(1, 2)))
        xy += a
        xx += b
        yy += c
    return xy / torch.sqrt(xx[:, None] * yy[None, :])


def depthfast_all_pairs(dtype, space="auto"):
    def run(batches):
        layers = batches[0][0].shape[0]
        acc = AllPairsCKA(layers, layers, gram_dtype=dtype, space=space)
        for xs, ys in batches:
            acc.update(list(xs), list(ys))
        return acc.compute()
    return run


def pytorch_cka(dtype):
    def run(batches):
        from cka import CKA
        from cka.hsic import hsic

        layers = batches[0][0].shape[0]
        xy = torch.zeros(layers, layers, dtype=dtype)
        xx, yy = torch.zeros(layers, dtype=dtype), torch.zeros(layers, dtype=dtype)
        for xs, ys in batches:
            grams1 = torch.stack([torch.mm(f, f.T) for f in xs.to(dtype)])
            grams2 = torch.stack([torch.mm(f, f.T) for f in ys.to(dtype)])
            a, b, c = hsic(grams1, grams2)
            xy += a
            xx += b
            yy += c
        return CKA._compute_cka_matrix(None, xy, xx, yy)  # uses no instance state
    return run


def ckatorch_pairs(batches):
    from ckatorch.core import cka_batch

    xs = torch.stack([x for x, _ in batches], dim=1)  # (layers, B, m, d)
    ys = torch.stack([y for _, y in batches], dim=1)
    layers = xs.shape[0]
    out = torch.zeros(layers, layers, dtype=torch.float64)
    for i in range(layers):
        for j in range(layers):
            out[i, j] = cka_batch(xs[i], ys[j])
    return out


class _Replay(torch.nn.Module):
    """Layers that return stored activations of batch ``idx``, so torch-cka's hooks capture them."""

    def __init__(self, acts):  # acts: [(layers, m, d)] per batch
        super().__init__()
        self.acts = acts
        self.layer = torch.nn.ModuleList(_Pick(self, i) for i in range(acts[0].shape[0]))

    def forward(self, idx):
        b = int(idx[0])
        for layer in self.layer:
            layer(b)


class _Pick(torch.nn.Module):
    def __init__(self, owner, i):
        super().__init__()
        self.get = lambda b: owner.acts[b][i]

    def forward(self, b):
        return self.get(b)


def torch_cka_compare(batches):
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    layers = batches[0][0].shape[0]
    names = [f"layer.{i}" for i in range(layers)]
    loader = DataLoader(TensorDataset(torch.arange(len(batches))), batch_size=1)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        cka = CKA(_Replay([x for x, _ in batches]), _Replay([y for _, y in batches]), "base", "tuned",
                  model1_layers=names, model2_layers=names, device="cpu")
        cka.compare(loader)
    return cka.export()["CKA"].double()


def measure(fn, batches, repeat):
    best, peak, out = float("inf"), 0, None
    for _ in range(repeat):
        with PeakRSS() as mem, torch.no_grad():
            t0 = time.perf_counter()
            out = fn(batches)
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    return best, peak, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="1000,10000,100000", help="comma-separated total probe samples")
    p.add_argument("--m", type=int, default=256, help="samples per minibatch")
    p.add_argument("--d", type=int, default=128, help="width of every layer")
    p.add_argument("--layers", type=int, default=5, help="layers per model (embeddings + blocks)")
    p.add_argument("--cubic-max-n", type=int, default=10000,
                   help="largest n for the O(m³)-per-pair peers (ckatorch, torch-cka)")
    p.add_argument("--repeat", type=int, default=2, help="best of this many runs (the machine is shared)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, overloaded machine two threads made "
                        "these small GEMMs ~10× slower, spinning on each other; same setting for every contender)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    contenders = [
        ("float64 reference", reference_f64, None),
        ("depthfast f64 sample", depthfast_all_pairs(torch.float64, "sample"), None),
        ("depthfast f64 feature", depthfast_all_pairs(torch.float64, "feature"), None),
        ("depthfast f32 sample", depthfast_all_pairs(torch.float32, "sample"), None),
        ("depthfast f32 feature", depthfast_all_pairs(torch.float32, "feature"), None),
        ("pytorch-cka f64", pytorch_cka(torch.float64), None),
        ("pytorch-cka f32", pytorch_cka(torch.float32), None),
        ("ckatorch", ckatorch_pairs, args.cubic_max_n),
        ("torch-cka", torch_cka_compare, args.cubic_max_n),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, os.cpu_count() {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}; L = {args.layers}, d = {args.d}, m = {args.m}")
    warm = make_data(args.m, args.m, args.d, args.layers, seed=1)
    missing = set()
    for name, fn, _ in contenders:  # imports, first-call allocations and BLAS set-up out of the timings
        try:
            fn(warm)
        except ImportError as exc:  # the peers are benchmark-only extras (pip install pytorch-cka ckatorch torch-cka)
            print(f"{name}: not installed ({exc.name}); left out")
            missing.add(name)
    contenders = [c for c in contenders if c[0] not in missing]
    probe = AllPairsCKA(args.layers)
    probe.update(list(warm[0][0]), list(warm[0][1]))
    auto = f"depthfast f64 {probe.last_space}"
    print(f"space='auto' picks {probe.last_space} at this shape")
    print(f"{'n':>7} {'contender':<22} {'seconds':>9} {'× ' + auto:>26} {'peak RSS MiB':>13} {'max |Δ|':>10}")
    for n in (int(v) for v in args.n.split(",")):
        batches = make_data(n, args.m, args.d, args.layers)
        truth, rows = None, []
        for name, fn, max_n in contenders:
            if max_n is not None and n > max_n:
                rows.append((name, None, None, None))
                continue
            seconds, peak, out = measure(fn, batches, args.repeat)
            truth = out if truth is None else truth
            rows.append((name, seconds, peak, float((out.double() - truth).abs().max())))
        ours = next(sec for name, sec, _, _ in rows if name == auto)
        for name, seconds, peak, err in rows:
            if seconds is None:
                print(f"{n:>7} {name:<22} {'skipped':>9}  (O(m³) per pair and per batch: above --cubic-max-n)")
                continue
            print(f"{n:>7} {name:<22} {seconds:>9.3f} {seconds / ours:>26.2f} {peak / 2**20:>13.1f} {err:>10.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
