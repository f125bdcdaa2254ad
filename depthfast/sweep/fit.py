"""Where a run fits, for ``--dry-run``: its memory estimate without a download (the model built on the
meta device from the registry's config or a local config.json) against one H100, one H200, or FSDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

from depthfast.config import RunConfig
from depthfast.layers import discover_layers, family_of
from depthfast.memory import estimate_run_memory, human_bytes
from depthfast.models import SequenceClassifier
from depthfast.registry import lookup
from depthfast.sweep.runs import Run


# Memory of each named GPU as the driver reports it (nvidia-smi MiB), and the share of it a run's
# estimate may take: the estimate leaves out the allocator's fragmentation and library workspaces.
GPUS = {"H100 80GB": 81_559 * 2**20, "H200 141GB": 143_771 * 2**20}
HEADROOM = 0.9
FSDP_SIZES = (2, 4, 8)  # processes (GPUs) of one node tried for runs that fit no single GPU


@dataclass
class Fit:
    """Where one run fits: ``per_gpu`` is the one-process estimate (bytes), ``plan`` a short verdict."""

    per_gpu: int | None
    fits: dict[str, bool]
    plan: str
    note: str = ""


_META_MODELS: dict[tuple[str, str], tuple] = {}


def _model_config(model: str):
    """The transformers config of a registry model or a local directory; None otherwise (a hub id
    outside the registry would need a download)."""
    spec = lookup(model)
    if spec is not None:
        return spec.config(), spec.num_layers
    if os.path.isdir(model):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        return config, None
    return None, None


def meta_model(model: str, objective: str):
    """(model on the meta device with the head of ``objective``, number of blocks), or (None, None).

    Parameters have their real shapes and dtype (float32, as depthfast loads them) but no storage, so
    building even Pythia-6.9B takes well under a second and no memory; cached per (model, objective).
    """
    key = (model, objective)
    if key not in _META_MODELS:
        import torch  # here, with transformers: only a memory fit builds a meta model
        import transformers

        config, blocks = _model_config(model)
        if config is None:
            _META_MODELS[key] = (None, None)
            return _META_MODELS[key]
        architecture, _ = family_of(config)
        loader = {"cls": transformers.AutoModel, "mlm": transformers.AutoModelForMaskedLM,
                  "clm": transformers.AutoModelForCausalLM}[objective]
        with torch.device("meta"):
            built = loader.from_config(config)
            if objective == "cls":  # 2 labels: the head's size is negligible next to the model
                built = SequenceClassifier(built, 2, pooling="mean" if architecture == "encoder" else "last")
        if blocks is None:
            blocks = discover_layers(built).num_blocks
        _META_MODELS[key] = (built, blocks)
    return _META_MODELS[key]


def estimate_memory(cfg: RunConfig, num_processes: int = 1, shards: int = 1, theta0_on_device: bool | None = None):
    """``depthfast.memory.estimate_run_memory`` of a run, from a meta-device model; None when the model's
    config is not available offline. The control is assumed fused (a GPU with Triton: no weight snapshot)."""
    model, blocks = meta_model(cfg.model, cfg.objective)
    if model is None:
        return None
    on_device = (not cfg.theta0_offload) if theta0_on_device is None else theta0_on_device
    return estimate_run_memory(model, cfg, blocks, num_processes, fused_control=True, shards=shards,
                               theta0_on_device=on_device)


def fit_of(cfg: RunConfig) -> Fit:
    """One GPU of each kind in ``GPUS`` (fits when the estimate ≤ HEADROOM × its memory); else the
    smallest FSDP size in ``FSDP_SIZES`` at which a process fits an H100 (then an H200). Under FSDP θ₀
    is sharded on the device (--theta0-offload is refused there)."""
    try:
        estimate = estimate_memory(cfg)
    except Exception as exc:  # an architecture the meta device cannot build: say so, never stop the listing
        return Fit(None, {}, "unknown", f"estimate failed: {type(exc).__name__}: {str(exc)[:80]}")
    if estimate is None:
        return Fit(None, {}, "unknown", "not in the registry: the config would need a download")
    fits = {gpu: estimate.total <= HEADROOM * size for gpu, size in GPUS.items()}

    def sharded_on(gpu: str) -> tuple[int, int] | None:
        for n in FSDP_SIZES:
            per_process = estimate_memory(cfg, num_processes=n, shards=n, theta0_on_device=True).total
            if per_process <= HEADROOM * GPUS[gpu]:
                return n, per_process
        return None

    def how(n: int, gpu: str, per_process: int) -> str:
        return (f"fsdp ×{n} {gpu}: {human_bytes(per_process)} per process (torchrun --nproc_per_node {n} "
                f"-m depthfast.run --parallel fsdp --config …"
                f"{'; theta0_offload false there: refused under fsdp' if cfg.theta0_offload else ''})")

    first = next((gpu for gpu, ok in fits.items() if ok), None)
    if first is not None:
        note = ""
        if not all(fits.values()):  # the alternative on the smaller GPU
            small = next(gpu for gpu, ok in fits.items() if not ok)
            alt = sharded_on(small)
            note = "or " + how(alt[0], small, alt[1]) if alt else ""
        return Fit(estimate.total, fits, f"1× {first}", note)
    for gpu in GPUS:
        found = sharded_on(gpu)
        if found:
            return Fit(estimate.total, fits, f"fsdp ×{found[0]} {gpu}", how(found[0], gpu, found[1]))
    return Fit(estimate.total, fits, f"too big for fsdp ×{FSDP_SIZES[-1]}")


def fit_summary(runs: list[Run], fits: list[Fit]) -> str:
    """One line per plan: how many runs, and which models."""
    plans: dict[str, list[str]] = {}
    for run, fit in zip(runs, fits):
        plans.setdefault(fit.plan, [])
        if run.config.model not in plans[fit.plan]:
            plans[fit.plan].append(run.config.model)
    lines = [f"memory (estimate per process ≤ {HEADROOM:.0%} of the GPU; θ₀ on the device unless --theta0-offload):"]
    for plan, models in plans.items():
        count = sum(f.plan == plan for f in fits)
        lines.append(f"  {plan}: {count} runs ({', '.join(models)})")
    return "\n".join(lines)
