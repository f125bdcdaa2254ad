"""What the control and the measurement cost a real training run, and whether Pythia-6.9B fits.

Contenders, in one process, on a Pythia-shaped model with random weights (registry config; no
download): plain AdamW training; the same under EqualStep (equal-step control); the same plus the
profile measurement (both models, hooks, StreamingCKA) every ``--measure-every`` steps. Prints
tokens/s, the ratio to plain training (target ≥ 0.95 on a GPU), and peak memory. On a GPU it then
tries one Pythia-6.9B step (bf16 autocast, gradient checkpointing) and reports whether it fits.

    python benchmarks/bench_run.py                  # GPU: Pythia-1.4B shapes; CPU: a small stand-in
    python benchmarks/bench_run.py --model EleutherAI/pythia-410m --steps 20

Absolute times mean something only on the GPU; on the CPU read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM

from depthfast.cka import StreamingCKA
from depthfast.layers import BlockCapture, discover_layers
from depthfast.memory import GiB
from depthfast.optim import EqualStep
from depthfast.registry import lookup
from targets import record  # this script's directory is on sys.path


def build(model_id: str, device: torch.device, small: bool = False):
    config = lookup(model_id).config()
    if small:  # the CPU stand-in: same family and block, a fraction of the size
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads = 2, 256, 4
        config.intermediate_size, config.vocab_size = 1024, 8192
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_loop(model, batches, device, control: str | None, measure_every: int, probe, bf16: bool) -> float:
    """Seconds per step, steady state (first two steps are warm-up)."""
    layers = discover_layers(model)
    groups = [ps for _, ps in layers.param_groups()]
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    if control is not None:
        optimizer = EqualStep(optimizer, groups, control=control)
    base = copy.deepcopy(model).eval() if measure_every else None
    base_layers = discover_layers(base) if base is not None else None
    times = []
    for step, batch in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if measure_every and (step + 1) % measure_every == 0:
            model.eval()
            cka = StreamingCKA(layers.num_blocks + 1)
            with torch.no_grad(), BlockCapture(base_layers) as cb, BlockCapture(layers) as ct, \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                for p in probe:
                    base(input_ids=p)
                    model(input_ids=p)
                    cka.update(cb.activations, ct.activations)
            cka.compute()
            model.train()
        sync(device)
        times.append(time.perf_counter() - start)
    return sum(times[2:]) / max(1, len(times) - 2)


def fits_pythia_6_9b(device: torch.device, seq: int) -> str:
    try:
        model = build("EleutherAI/pythia-6.9b", device)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        batch = torch.randint(0, 50000, (1, seq), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        theta0 = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
        return (f"fits: one {seq}-token step, peak {torch.cuda.max_memory_allocated() / GiB:.1f} GiB; a depthfast "
                f"run adds θ₀ ({theta0:.1f} GiB) on the device, or nothing there with --theta0-offload")
    except torch.cuda.OutOfMemoryError:
        return "does not fit (out of memory): needs FSDP over several GPUs or smaller optimizer states"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="EleutherAI/pythia-1.4b")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--measure-every", type=int, default=5)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    small = not gpu
    if small:  # a stand-in that runs in seconds: same family, 2 blocks of width 256, short sequences
        args.model, args.batch, args.seq, args.steps = "EleutherAI/pythia-160m", 2, 64, 6
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"device: {name}; model {args.model}{' (CPU stand-in: 2 blocks, width 256, vocab 8192)' if small else ''}; "
          f"batch {args.batch} × {args.seq} tokens; {args.steps} steps")
    vocab = 8192 if small else 50000
    batches = [torch.randint(0, vocab, (args.batch, args.seq), device=device) for _ in range(args.steps)]
    probe = [torch.randint(0, vocab, (args.batch, args.seq), device=device) for _ in range(2)]
    rows = []
    for label, control, measure_every in (("AdamW", None, 0), ("AdamW + equal-step", "equal-step", 0),
                                          ("AdamW + equal-step + measurement", "equal-step", args.measure_every)):
        model = build(args.model, device, small)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        seconds = train_loop(model, batches, device, control, measure_every, probe, bf16=gpu)
        peak = f"{torch.cuda.max_memory_allocated() / GiB:.1f}" if gpu else "n/a"  # CPU: no allocator peak
        rows.append((label, seconds, args.batch * args.seq / seconds, peak))
        del model
    print(f"{'contender':<36}{'ms/step':>10}{'tokens/s':>12}{'× plain':>9}{'peak GiB':>10}")
    for label, seconds, tps, peak in rows:
        print(f"{label:<36}{seconds * 1e3:>10.1f}{tps:>12.0f}{tps / rows[0][2]:>9.3f}{peak:>10}")
    record("train_tokens", rows[1][2] / rows[0][2], f"{args.model}, {args.batch} × {args.seq} tokens, bf16" if gpu
           else f"{args.model} CPU stand-in")
    if gpu:
        print(f"Pythia-6.9B on {name}: {fits_pythia_6_9b(device, 2048)}")


if __name__ == "__main__":
    main()
