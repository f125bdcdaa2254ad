"""LoRA fine-tuning (``--lora-r R``) through peft, and the weight change of the merged model.

A LoRA layer keeps its pretrained weight W₀ frozen and adds a rank-r update (Hu et al. 2021):

    W_merged = W₀ + (α/r) · B · A        A: (r, d_in), B: (d_out, r); B₀ = 0, so W_merged(θ₀) = W₀

(transposed for GPT-2's Conv1D, whose weight is (d_in, d_out)). The adapters are injected into the
model in place (``peft.inject_adapter_in_model``): the model keeps its class, its config and its
module tree, so ``discover_layers`` finds the same blocks, ``BlockCapture`` hooks the same block
modules, and each adapter parameter lives inside the block it adapts: the optimizer's groups
(``ModelLayers.param_groups``, trainable parameters only) are still the blocks. A forward of the
adapter model *is* a forward of the merged model (the LoRA layer computes W₀x + (α/r)·B(Ax)), so the
profile's CKA compares θ₀ with the adapter model directly; only the weight change needs the merged
weights, computed here per layer on the fly (``lora_weight_changes``), never a merged copy.

Trainable: the adapter factors A, B of every target, and for ``cls`` the fresh classifier head
(a frozen random head would leave the task unlearnable); everything else, biases and the LM heads of
mlm/clm included, stays at θ₀.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from depthfast.errors import DepthfastError

ADAPTER = "default"  # peft's adapter name: one adapter per run


def require_peft():
    """The peft module, or one clear error: LoRA is an optional dependency."""
    try:
        import peft
    except ImportError:
        raise DepthfastError("--lora-r needs the peft package (pip install peft)") from None
    return peft


def lora_alpha(cfg) -> float:
    """α: --lora-alpha, or r when it is 0 (the default). α = r makes the scale α/r = 1, so the merged
    update is B·A itself: the choice of the LoRA paper (α set to the first r tried, not tuned), and a
    scale that does not change when r is swept."""
    return float(cfg.lora_alpha) if cfg.lora_alpha else float(cfg.lora_r)


# Linear layers whose weight a family's forward reads directly (``layer.weight @ x`` or a fused kernel
# taking ``layer.weight``), bypassing the module's own forward: an adapter there would train nothing
# and change nothing. Mamba (transformers 5.24, MambaMixer.forward): dt_proj.weight is multiplied in
# directly on every path; under training with the mamba-ssm kernels mamba_inner_fn takes conv1d,
# x_proj, dt_proj and out_proj weights (peft itself refuses out_proj and conv1d for Mamba). Only
# in_proj is called as a module on every path.
BYPASSED: dict[str, frozenset[str]] = {
    "mamba": frozenset({"x_proj", "dt_proj", "out_proj", "conv1d"}),
    "mamba2": frozenset({"dt_proj", "out_proj", "conv1d"}),
}


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def target_modules(model: nn.Module, targets: str = "") -> list[str]:
    """Qualified names of the modules to adapt, all inside the blocks (found by structure).

    Default (``targets`` empty): every linear layer of every block (nn.Linear, and transformers'
    Conv1D for GPT-2): attention and MLP projections in every family, RWKV's key/value/receptance/
    output, Mamba's in_proj (its other projections are ``BYPASSED``). Otherwise ``targets`` is comma-separated module names, each
    matched as the last dotted segment(s) of a module name inside the blocks ("query,value",
    "attn.c_attn"); one that matches no linear layer of the blocks is an error naming the ones there are.
    """
    from depthfast.layers import discover_layers

    layers = discover_layers(model)
    bypassed = BYPASSED.get(layers.model_type, frozenset())
    linear = []  # (qualified name, name inside the block)
    for block_name, block in zip(layers.block_names, layers.blocks):
        linear += [(f"{block_name}.{name}", name) for name, m in block.named_modules() if name and _is_linear(m)]
    wanted = [t for t in (s.strip() for s in targets.split(",")) if t]
    for target in wanted:
        if target.split(".")[-1] in bypassed:
            raise DepthfastError(f"--lora-targets {target!r}: {layers.model_type}'s forward reads that layer's weight "
                                 "directly, so an adapter there would change nothing; adaptable: "
                                 + ", ".join(sorted({local.split('.')[-1] for _, local in linear} - bypassed)))
    linear = [(full, local) for full, local in linear if local.split(".")[-1] not in bypassed]
    if not wanted:
        if not linear:
            raise DepthfastError(f"{type(model).__name__}: its blocks have no linear layers to adapt with LoRA")
        return [full for full, _ in linear]
    chosen = []
    for target in wanted:
        hits = [full for full, local in linear if local == target or local.endswith(f".{target}")]
        if not hits:
            known = ", ".join(sorted({local.split(".")[-1] for _, local in linear}))
            raise DepthfastError(f"--lora-targets {target!r} matches no linear layer of the blocks; "
                                 f"their linear layers are: {known}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def apply_lora(model: nn.Module, cfg) -> dict:
    """Inject LoRA adapters into ``model`` in place and freeze all but the adapters (and a cls head).

    peft's LoraConfig with r = cfg.lora_r, α = ``lora_alpha(cfg)``, dropout cfg.lora_dropout (0 by
    default: the training forward is then the measured forward), no bias training, A initialised
    Kaiming-uniform from the torch RNG and B = 0 (peft's default). Returns the settings and the
    parameter counts for results.json.
    """
    peft = require_peft()
    from depthfast.models import SequenceClassifier

    names = target_modules(model, cfg.lora_targets)
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    conv1d = any(isinstance(modules[n], Conv1D) for n in names)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=lora_alpha(cfg), lora_dropout=cfg.lora_dropout,
                             target_modules=names, bias="none", fan_in_fan_out=conv1d)
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except (ValueError, TypeError) as exc:
        raise DepthfastError(f"peft cannot add LoRA adapters to {type(model).__name__}: "
                             f"{str(exc).splitlines()[0]}") from None
    head = isinstance(model, SequenceClassifier)
    if head:  # the fresh classifier trains in full (it is new, and tiny)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    return {
        "r": cfg.lora_r,
        "alpha": lora_alpha(cfg),
        "scaling": lora_alpha(cfg) / cfg.lora_r,
        "dropout": cfg.lora_dropout,
        "targets": sorted({n.split(".")[-1] for n in names}),
        "adapted_modules": len(names),
        "trainable_head": "classifier" if head else None,
        "trainable_parameters": trainable,
        "base_parameters": total,
        "trainable_fraction": trainable / total,
        # What the control's per-step ratios (train_log.csv, mean_update_ratio) are ratios of.
        "update_ratios_of": "trainable tensors per block group (adapter factors A, B; the cls head)",
    }


def _is_adapter(name: str) -> bool:
    return any(segment.startswith("lora_") for segment in name.split("."))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name of each adapted weight (``….base_layer.weight``) → its peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.base_layer.weight": m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and hasattr(m, "base_layer")}


def structural_groups(model: nn.Module, tied_embeddings: str = "head") -> list[tuple[str, list[str]]]:
    """The role groups of the model's own weights (adapter factors left out, frozen weights in), as
    parameter names: what the groups of a full fine-tuning of the same model would hold."""
    from depthfast.layers import discover_layers

    named = list(model.named_parameters())
    flags = [p.requires_grad for _, p in named]
    try:
        for name, p in named:
            p.requires_grad_(not _is_adapter(name))
        name_of = {id(p): name for name, p in named}
        groups = discover_layers(model).param_groups(tied_embeddings)
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
    return [(group, [name_of[id(p)] for p in ps]) for group, ps in groups]


@torch.no_grad()
def lora_weight_changes(base: nn.Module, tuned: nn.Module, tied_embeddings: str = "head") -> dict[str, float | None]:
    """‖W_merged,g(θ_T) − W_merged,g(θ₀)‖_F / ‖W_merged,g(θ₀)‖_F per role group g of the model's own
    weights, sums of squares in float64 (the rule of ``depthfast.measure.weight_changes``).

    ``base`` and ``tuned`` are the same LoRA-injected structure (θ₀ is a copy taken after injection,
    B = 0). For an adapted weight the difference is taken directly, never as a difference of merged
    float32 weights: ΔW = (W_T − W₀) + (α/r)(B_T A_T − B₀ A₀), one layer at a time (no merged copy of
    the model). A group that did not move reports 0.0; one that moved from W₀ = 0 reports None.
    """
    base_params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    base_lora, tuned_lora = lora_layers(base), lora_layers(tuned)
    changes = {}
    for group, names in structural_groups(base, tied_embeddings):
        delta_sq = norm_sq = 0.0
        for name in names:
            w0, wt = base_params[name].double(), tuned_params[name].double()
            merged0, delta = w0, wt - w0
            if name in tuned_lora:  # the same structure: adapted in both models
                delta0 = base_lora[name].get_delta_weight(ADAPTER).double()
                merged0 = w0 + delta0
                delta = delta + (tuned_lora[name].get_delta_weight(ADAPTER).double() - delta0)
            delta_sq += float(delta.square().sum())
            norm_sq += float(merged0.square().sum())
        changes[group] = 0.0 if delta_sq == 0 else (None if norm_sq == 0 else math.sqrt(delta_sq / norm_sq))
    return changes
