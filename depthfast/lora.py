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
from transformers.pytorch_utils import Conv1D

from depthfast import adapters
from depthfast.errors import DepthfastError
from depthfast.layers import discover_layers
from depthfast.models import SequenceClassifier
from depthfast.optim.scales import ratios_from_sums, rescalable, target_of
from depthfast.probe import relative_change
from depthfast.train import CONTROL_HOOK

ADAPTER = "default"  # peft's adapter name: one adapter per run


def require_peft():
    """The peft module, or one clear error: LoRA is an optional dependency (depthfast.adapters)."""
    return adapters.require_peft("--lora-r")


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
    return isinstance(module, (nn.Linear, Conv1D))


def target_modules(model: nn.Module, targets: str = "") -> list[str]:
    """Qualified names of the modules to adapt, all inside the blocks (found by structure).

    Default (``targets`` empty): every linear layer of every block (nn.Linear, and transformers'
    Conv1D for GPT-2): attention and MLP projections in every family, RWKV's key/value/receptance/
    output, Mamba's in_proj (its other projections are ``BYPASSED``). Otherwise ``targets`` is comma-separated module names, each
    matched as the last dotted segment(s) of a module name inside the blocks ("query,value",
    "attn.c_attn"); one that matches no linear layer of the blocks is an error naming the ones there are.
    """
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
    Kaiming-uniform from the torch RNG and B = 0 (peft's default). Marks the model with
    depthfast.train.CONTROL_HOOK = LoraEqualStep (its equal-step control measures the merged weights).
    Returns the settings and the parameter counts for results.json.
    """
    peft = require_peft()
    names = target_modules(model, cfg.lora_targets)
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
    setattr(model, CONTROL_HOOK, LoraEqualStep)  # depthfast.train.build_control: the merged weights' control
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
        "update_ratios_of": "merged weights W₀ + (α/r)·B·A per role group (depthfast.lora.LoraEqualStep)",
    }


def _is_adapter(name: str) -> bool:
    return any(segment.startswith("lora_") for segment in name.split("."))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name of each adapted weight (``….base_layer.weight``) → its peft LoRA layer."""
    from peft.tuners.lora import LoraLayer  # peft is optional (--lora-r, adapters)

    return {f"{name}.base_layer.weight": m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and hasattr(m, "base_layer")}


def structural_groups(model: nn.Module, tied_embeddings: str = "head") -> list[tuple[str, list[str]]]:
    """The role groups of the model's own weights (adapter factors left out, frozen weights in), as
    parameter names: what the groups of a full fine-tuning of the same model would hold."""
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
    weights, sums of squares in float64 (the rule of ``depthfast.probe.weight_changes``).

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
        changes[group] = relative_change(delta_sq, norm_sq)
    return changes


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, d_in), B (d_out, r), α/r) of a peft LoRA linear layer."""
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER])


def _gram_inner(u1: torch.Tensor, v1: torch.Tensor, u2: torch.Tensor, v2: torch.Tensor) -> float:
    """⟨U₁V₁, U₂V₂⟩_F = tr((U₁ᵀU₂)(V₂V₁ᵀ)) for thin factors (U: (m, k), V: (k, n)), in O((m + n)k²)."""
    return float(((u1.T @ u2) * (v1 @ v2.T)).sum())


def solve_step_scale(a: float, b: float, c: float, target_sq: float) -> float:
    """The smallest s > 0 with s²(a + 2bs + cs²) = target_sq (a, c ≥ 0, a + 2bs + cs² ≥ 0 for all s).

    The merged step of a group whose factor updates are scaled by s is ΔW(s) = sX + s²Y, so
    ‖ΔW(s)‖² = s²a + 2s³b + s⁴c with a = ‖X‖² (+ ‖ΔP‖² of tensors that step linearly), b = ⟨X, Y⟩,
    c = ‖Y‖². F(s) = ‖ΔW(s)‖² − target_sq is −target_sq at 0; the smallest positive root is the first
    crossing, the one reached from s = 0 along the optimizer's own direction (a later root can lie past a
    turning point of ‖ΔW‖, where the s²Y term has reversed the step). F'(s) = 2s(a + 3bs + 2cs²): F is
    monotone between the positive roots of a + 3bs + 2cs², so the first of the intervals [0, s₁], [s₁, s₂],
    [s₂, ∞) whose right end has F ≥ 0 brackets it (the last one by doubling); bisection to float64
    resolution then finds it (exact to ~1e-16 relative).
    """
    f = lambda s: s * s * (a + s * (2 * b + s * c)) - target_sq  # noqa: E731
    if c != 0:
        disc = 9 * b * b - 8 * a * c
        turning = sorted(r for r in ((-3 * b - math.sqrt(disc)) / (4 * c), (-3 * b + math.sqrt(disc)) / (4 * c))
                         if r > 0) if disc >= 0 else []
    else:
        turning = [-a / (3 * b)] if b != 0 and -a / (3 * b) > 0 else []
    lo = 0.0
    for hi in turning:
        if f(hi) >= 0:
            break
        lo = hi
    else:
        hi = max(2 * lo, 1.0)
        while f(hi) < 0:
            lo, hi = hi, hi * 2
            if hi > 1e300:
                raise ArithmeticError("no finite step scale reaches the target ratio")
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return hi


class LoraEqualStep:
    """The equal-step control (and, with control "none", the ratio recorder) on merged LoRA weights.

    Group g's weights are its role group of the model's own weights (``structural_groups``: the whole
    block, frozen weights included), merged: W_g = W₀ + (α/r)·B·A for every adapted layer. One step
    of the optimizer moves the factors by ΔA, ΔB (and any other trainable tensor P of the group, e.g.
    the cls head, by ΔP). The control scales the whole step of a group by one s_g:

        A ← A⁰ + s ΔA,   B ← B⁰ + s ΔB,   P ← P⁰ + s ΔP,
        ΔW_ℓ(s) = (α/r)[(B⁰ + sΔB)(A⁰ + sΔA) − B⁰A⁰] = s X_ℓ + s² Y_ℓ,
        X_ℓ = (α/r)(ΔB A⁰ + B⁰ ΔA),   Y_ℓ = (α/r) ΔB ΔA,

    not linear in s, so s_g solves ‖ΔW_g(s)‖ = r*·‖W_g(t)‖ exactly (``solve_step_scale``), r* the mean
    over the equalized groups of the optimizer's own merged ratios r_g = ‖ΔW_g(1)‖/‖W_g(t)‖ (or a fixed
    target). Norms come from r×r Gram products (O(d r²) per layer, plus one O(d² r) inner product
    ⟨W₀, BA⟩ for ‖W_g‖), all in float64, never a d×d matrix. ``free`` groups keep the optimizer's step
    and stay out of the mean, as in ``depthfast.optim.EqualStep``, whose interface this follows
    (step, zero_grad, ratios_before, ratios_after, scales, target_ratio); the optimizer's state is
    left as the optimizer wrote it. ratios_after is measured on the weights as stored after the step.
    """

    def __init__(self, optimizer, named_groups, model: nn.Module, tied_embeddings: str = "head",
                 target: str | float = "mean", control: str = "none", free=()) -> None:
        self.optimizer, self.target, self.control = optimizer, target, control
        self.names = [name for name, _ in named_groups]
        self.allowed = [i not in set(free) for i in range(len(named_groups))]
        layer_of = {}  # id(A) or id(B) → its LoRA layer
        for layer in lora_layers(model).values():
            a, b, _ = _factors(layer)
            layer_of[id(a)] = layer_of[id(b)] = layer
        params = dict(model.named_parameters())
        full = dict(structural_groups(model, tied_embeddings))
        adapted = lora_layers(model)
        self.groups = []  # per group: (LoRA layers, other trainable tensors, frozen tensors, frozen ‖·‖² in float64)
        for name, ps in named_groups:
            layers = list({id(layer_of[id(p)]): layer_of[id(p)] for p in ps if id(p) in layer_of}.values())
            trainable = {id(p) for p in ps}
            others = [p for p in ps if id(p) not in layer_of]
            frozen = [params[n] for n in full.get(name, []) if id(params[n]) not in trainable and n not in adapted]
            self.groups.append((layers, others, frozen))
        self._frozen_sq = [sum(float(p.detach().double().square().sum()) for p in frozen)
                           for _, _, frozen in self.groups]
        self._base_sq = {id(layer): float(layer.base_layer.weight.detach().double().square().sum())
                         for layers, _, _ in self.groups for layer in layers}
        g = len(self.groups)
        self.ratios_before = torch.zeros(g, dtype=torch.float64)
        self.ratios_after = torch.zeros(g, dtype=torch.float64)
        self.scales = torch.ones(g, dtype=torch.float64)
        self.target_ratio = 0.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _weight_sq(self, index: int, snapshot: dict) -> float:
        """‖W_g‖² of the merged group at the snapshot (before the step)."""
        layers, others, _ = self.groups[index]
        total = self._frozen_sq[index] + sum(float(snapshot[id(p)].square().sum()) for p in others)
        for layer in layers:
            a, b, scale = _factors(layer)
            a0, b0 = snapshot[id(a)], snapshot[id(b)]
            w0 = layer.base_layer.weight.detach().double()
            w0 = w0.T if layer.fan_in_fan_out else w0  # (d_out, d_in), as B·A
            total += self._base_sq[id(layer)] + 2 * scale * float(((b0.T @ w0) * a0).sum())
            total += scale * scale * _gram_inner(b0, a0, b0, a0)
        return total

    def _step_terms(self, index: int, snapshot: dict) -> tuple[float, float, float]:
        """(a, b, c) of ‖ΔW_g(s)‖² = s²a + 2s³b + s⁴c for the step from the snapshot to the current weights."""
        layers, others, _ = self.groups[index]
        a_sum = sum(float((p.detach().double() - snapshot[id(p)]).square().sum()) for p in others)
        b_sum = c_sum = 0.0
        for layer in layers:
            a, b, scale = _factors(layer)
            a0, b0 = snapshot[id(a)], snapshot[id(b)]
            da, db = a.detach().double() - a0, b.detach().double() - b0
            u, v = torch.cat([db, b0], dim=1), torch.cat([a0, da], dim=0)  # X/scale = ΔB A⁰ + B⁰ ΔA = U V
            a_sum += scale * scale * _gram_inner(u, v, u, v)
            b_sum += scale * scale * _gram_inner(u, v, db, da)
            c_sum += scale * scale * _gram_inner(db, da, db, da)
        return a_sum, b_sum, c_sum

    def _trainable(self, index: int) -> list[torch.Tensor]:
        layers, others, _ = self.groups[index]
        return [t for layer in layers for t in _factors(layer)[:2]] + others

    def _ratios(self, snapshot: dict, weight_sq: list[float]) -> torch.Tensor:
        """r_g of the merged step (the rule of depthfast.optim: 0 for no step, +inf for a zero W_g)."""
        delta_sq = [max(sum(t * w for t, w in zip(self._step_terms(i, snapshot), (1, 2, 1))), 0.0)
                    for i in range(len(weight_sq))]
        return ratios_from_sums(torch.tensor(delta_sq, dtype=torch.float64),
                                torch.tensor(weight_sq, dtype=torch.float64))

    @torch.no_grad()
    def step(self, closure=None):
        snapshot = {id(t): t.detach().double().clone() for i in range(len(self.groups)) for t in self._trainable(i)}
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        weight_sq = [self._weight_sq(i, snapshot) for i in range(len(self.groups))]
        self.ratios_before = self._ratios(snapshot, weight_sq)
        allowed = torch.tensor(self.allowed)
        ok = rescalable(self.ratios_before, allowed).tolist()
        self.target_ratio = target_of(self.ratios_before, self.target, allowed)
        self.scales = torch.ones(len(self.groups), dtype=torch.float64)
        if self.control != "equal-step":
            self.ratios_after = self.ratios_before.clone()
            return loss
        for i, good in enumerate(ok):
            if not good:
                continue
            a, b, c = self._step_terms(i, snapshot)
            s = solve_step_scale(a, b, c, self.target_ratio ** 2 * weight_sq[i])
            self.scales[i] = s
            for t in self._trainable(i):
                t0 = snapshot[id(t)]
                t.copy_(t.detach().double().sub_(t0).mul_(s).add_(t0))  # rounded once to the tensor's dtype
        self.ratios_after = self._ratios(snapshot, weight_sq)
        return loss
