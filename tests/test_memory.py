"""The memory estimate: its static parts are exact, and an impossible run is refused up front."""

import pytest
import torch

import tiny_models
from depthfast.config import RunConfig
from depthfast.errors import DepthfastError
from depthfast.layers import discover_layers
from depthfast.memory import MemoryEstimate, check_fits, estimate_run_memory
from depthfast.registry import lookup


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_static_parts_match_real_tensors_after_a_step(optimizer):
    from depthfast.train import build_optimizer

    model, tokenizer = tiny_models.build("gpt2")
    cfg = RunConfig(objective="clm", batch_size=4, max_length=16, optimizer=optimizer)
    estimate = estimate_run_memory(model, cfg, discover_layers(model).num_blocks)
    opt, _ = build_optimizer([("all", list(model.parameters()))], cfg, discover_layers(model).no_weight_decay())
    batch = tokenizer(["a b c d e f g h"] * 4, return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    unique = {id(p): p for p in model.parameters()}.values()
    assert estimate.parts["weights"] == sum(p.numel() * p.element_size() for p in unique)
    assert estimate.parts["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in unique)
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert estimate.parts["optimizer states"] == sum(t.numel() * t.element_size() for t in states) > 0


def test_checkpointing_and_bf16_shrink_activations():
    spec = lookup("EleutherAI/pythia-1.4b")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(spec.config())
    full = estimate_run_memory(model, RunConfig(objective="clm", batch_size=8, max_length=2048), 24)
    lean = estimate_run_memory(model, RunConfig(objective="clm", batch_size=8, max_length=2048, precision="bf16",
                                                gradient_checkpointing=True), 24)
    assert lean.parts["activations"] < full.parts["activations"] / 20
    assert full.parts["weights"] == pytest.approx(1.41e9 * 4, rel=0.01)  # 1.41 B fp32 parameters
    # FSDP2 over 8 processes, or HSDP with shard groups of 8: per-process model state is 1/8; the
    # activations (this process's share of the batch) are not sharded.
    sharded = estimate_run_memory(model, RunConfig(objective="clm", batch_size=8, max_length=2048), 24, shards=8)
    for name in ("weights", "gradients", "optimizer states", "control snapshot", "θ₀ copy"):
        assert sharded.parts[name] == full.parts[name] // 8, name
    assert sharded.parts["activations"] == full.parts["activations"]
    host = estimate_run_memory(model, RunConfig(objective="clm", batch_size=8, max_length=2048), 24,
                               theta0_on_device=False)  # --theta0-offload
    assert host.parts["θ₀ copy"] == 0 and host.total == full.total - full.parts["θ₀ copy"]


def test_a_run_that_cannot_fit_is_refused():
    huge = MemoryEstimate({"weights": 1 << 60})
    with pytest.raises(DepthfastError, match="exceeds the .* GiB of cpu"):
        check_fits(huge, torch.device("cpu"))
    check_fits(MemoryEstimate({"weights": 1 << 20}), torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is read from the CUDA allocator")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_brackets_measured_peak_on_gpu(checkpointing):
    """Weights + gradients + AdamW states + activations + logits of one real training step, against
    torch.cuda.max_memory_allocated: within a factor of 2 either way (the activation count is a model)."""
    from transformers import AutoModelForCausalLM

    from depthfast.train import enable_gradient_checkpointing

    spec = lookup("EleutherAI/pythia-160m")
    model = AutoModelForCausalLM.from_config(spec.config()).cuda()
    if checkpointing:
        enable_gradient_checkpointing(model)
    cfg = RunConfig(objective="clm", batch_size=4, max_length=512, gradient_checkpointing=checkpointing)
    estimate = estimate_run_memory(model, cfg, spec.num_layers)
    training = sum(v for k, v in estimate.parts.items() if k not in ("control snapshot", "θ₀ copy", "measurement"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    batch = torch.randint(0, 50000, (4, 512), device="cuda")
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert 0.5 * peak <= training <= 2.0 * peak, f"estimate {training / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB"


def test_estimate_matches_measured_peak_on_cpu(tmp_path):
    """One real training step on the CPU, its peak read from the profiler's memory timeline: the
    estimate of weights, gradients, AdamW states, activations and logits lies within 15 % of it."""
    import json
    import warnings

    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    spec = lookup("EleutherAI/pythia-160m")
    config = spec.config()
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    cfg = RunConfig(objective="clm", batch_size=2, max_length=128)
    estimate = estimate_run_memory(model, cfg, 2)
    training = sum(v for k, v in estimate.parts.items() if k not in ("control snapshot", "θ₀ copy", "measurement"))
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, config.vocab_size, (2, 128))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    timeline = tmp_path / "timeline.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA in favour of memory snapshots
        prof.export_memory_timeline(str(timeline), device="cpu")
    _, sizes = json.loads(timeline.read_text())
    peak = max(sum(s) for s in sizes)
    assert 0.85 * peak <= training <= 1.15 * peak, f"estimate {training / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB"
