"""Estimate the memory of a run before it starts, and refuse one that cannot fit.

Per process (DDP replicates the model), in bytes, with P the trainable parameters, b their element
size, t = tokens per micro-batch, h the hidden size, L blocks, a heads, s the sequence length:

    weights            Σ numel · element size over all parameters
    gradients          P · b
    optimizer states   k P · b                        AdamW: k = 2 (exp_avg, exp_avg_sq); SGD: k = 1 with momentum
    control snapshot   P · b                          the reference EqualStep copies the weights each step
    θ₀ copy            = weights                      the pretrained model, kept to measure against (main process);
                                                      0 on the device with --theta0-offload (host memory instead)
    activations        L · t · (18 h + 2.5 a s) · e   saved for backward (Korthikanti et al. 2022's count for a
                                                      transformer block, e = 2 under bf16 autocast, else 4;
                                                      the a·s score term only for eager attention);
                       with gradient checkpointing: L · t · h · e + one block's full set
    logits             3 · t · V · 4                  LM heads: fp32 logits, softmax, gradient
    measurement        CKA statistics + captured activations + the larger of one CKA update's and one
                       per-text HSIC batch's staging (``cka_statistics_bytes``, ``cka_update_bytes``,
                       ``per_text_hsic_bytes``), t_probe = probe batch size × max length, e = 4

It is an estimate (allocator fragmentation and framework workspaces come on top); the check refuses
only when the estimate alone exceeds the device's memory.

The objective distance at θ₀ (depthfast.objective_distance) runs before training, alone: its own peak
(objective_distance_peak) enters as the line "objective distance (excess)", what it needs beyond
all the parts above, so that the total is the larger of the two phases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from depthfast.cka import engine as cka_engine
from depthfast.constants import PER_TEXT_GRAM_BYTES
from depthfast.errors import DepthfastError

GiB = 1024**3


@dataclass
class MemoryEstimate:
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def table(self) -> str:
        width = max(len(k) for k in self.parts)
        lines = [f"{name:<{width}}  {human_bytes(size):>10}" for name, size in self.parts.items()]
        lines.append(f"{'total':<{width}}  {human_bytes(self.total):>10}")
        return "\n".join(lines)


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def estimate_run_memory(model: torch.nn.Module, cfg, num_blocks: int, num_processes: int = 1,
                        fused_control: bool = False, shards: int = 1, theta0_on_device: bool = True) -> MemoryEstimate:
    """Per-process estimate; sharded over ``shards`` processes (FSDP2: all of them; HSDP: one shard
    group), weights, gradients, optimizer states, the control's snapshot and the θ₀ copy are divided
    over them."""
    config = model.config
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    b = trainable[0].element_size() if trainable else 4
    num_trainable = sum(p.numel() for p in trainable)
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 0) or 0
    seq = cfg.max_length
    tokens = cfg.batch_size // max(1, num_processes * cfg.grad_accum) * seq
    e = 2 if cfg.precision == "bf16" else 4
    # Attention scores (a·s per token) are kept for backward by eager attention only; SDPA's fused
    # kernels recompute them.
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    per_block = tokens * (18 * hidden + (2.5 * heads * seq if eager else 0)) * e
    activations = num_blocks * tokens * hidden * e + per_block if cfg.gradient_checkpointing else num_blocks * per_block
    vocab = getattr(config, "vocab_size", 0) if cfg.objective in ("mlm", "clm") else 0
    probe_tokens = cfg.probe_batch_size * seq
    weights = sum(p.numel() * p.element_size() for p in params)
    parts = {
        "weights": weights,
        "gradients": num_trainable * b,
        "optimizer states": optimizer_states(cfg) * num_trainable * b,
        "control snapshot": 0 if fused_control else num_trainable * b,
        "θ₀ copy": weights if theta0_on_device else 0,
        "activations": int(activations),
        "logits": 3 * tokens * vocab * 4,
        "measurement": measurement_bytes(num_blocks + 1, probe_tokens, hidden, cfg.estimator,
                                         cfg.probe_batch_size, seq),
    }
    if shards > 1:
        for name in ("weights", "gradients", "optimizer states", "control snapshot", "θ₀ copy"):
            parts[name] //= shards
    return MemoryEstimate(parts)


def measurement_bytes(layers: int, tokens: int, width: int, estimator: str, texts: int, seq: int,
                      element_size: int = 4) -> int:
    """The measurement line: statistics + the base and tuned models' captured activations
    2·layers·t·d·e + max(one CKA update's staging, one per-text HSIC batch's staging). Block outputs
    are counted at e = 4: under bf16 autocast most residual streams stay fp32."""
    return (cka_statistics_bytes(layers, width, estimator) + 2 * layers * tokens * width * element_size
            + max(cka_update_bytes(layers, tokens, width, estimator, element_size),
                  per_text_hsic_bytes(texts, seq, width, element_size)))


def cka_statistics_bytes(layers: int, width: int, estimator: str) -> int:
    """StreamingCKA's state, all layers of width d, as depthfast.cka.engine allocates it. exact: Sxx,
    Syy, Syx in the engine's ``_GRAM_ACCUM_DTYPE`` (3 d² · 8 for float64; the upper blocks only are
    filled, the buffers are full), float64 sx, sy, vx, vy (6 d · 8), fp32 shifts (2 d · 4), sc (5 · 8).
    unbiased: three floats per layer (0 here)."""
    if estimator != "exact":
        return 0
    gram = cka_engine._GRAM_ACCUM_DTYPE.itemsize
    return layers * (3 * width * width * gram + 6 * width * 8 + 2 * width * 4 + 5 * 8)


def cka_update_bytes(layers: int, tokens: int, width: int, estimator: str, element_size: int = 4) -> int:
    """Peak memory staged by one engine update (csrc/cka.cpp) of G layers × t rows (padding
    included) × width d, input element size e; operands op = round(x − c) are e bytes for 16-bit
    inputs, else 4 (e_op), and live for the whole call, for X and Y:
        base        2·G·t·d·e_op (X', Y') + 2·G·t·8 (row norms k, l) + t·4 (the fp32 row mask)
        exact       + max(G·d²·4                     the fp32 product Y'ᵀX' before it is added into
                                                     the float64 statistics (block products are smaller),
                          G·t·(48 + 8·e_op) + 48·G·d)  the split weights of Σ k_i x'_i: (G, 2, t) float64
                                                     stack, scaled copy and remainder, hi/lo and their
                                                     (G, 4, t) concatenation in e_op, (G, 4, d) fp32 → f64
        unbiased    + max(2·G·t·d·e − G·t·d·e_op      the minibatch mean of Y: stacked and masked copies
                                                     (G, t, d)·e while X' is alive
                          8·G·d²)                    fp32 feature-space block products and their squares
                                                     (fp32 operands; 16-bit operands reduce in the kernel)
    The first batch also takes each layer's float64 mean (2·t·d·8, one layer at a time), before the
    operands exist; the result is the larger of the two."""
    g, t, d, e = layers, tokens, width, element_size
    e_op = e if e == 2 else 4
    base = 2 * g * t * d * e_op + 2 * g * t * 8 + t * 4
    if estimator == "exact":
        extra = max(g * d * d * 4, g * t * (48 + 8 * e_op) + 48 * g * d)
    else:
        extra = max(2 * g * t * d * e - g * t * d * e_op, 8 * g * d * d)
    return max(base + extra, 2 * t * d * 8)


def per_text_hsic_bytes(texts: int, seq: int, width: int, element_size: int = 4) -> int:
    """Peak of ``metrics.per_text_hsic_batch`` (layers one after another, texts in chunks of
    c = min(B, PER_TEXT_GRAM_BYTES / (16 s²)) on a GPU, where the Grams are fp32): K̃ (c, s, s)·4 is kept
    while Y's masked copy (c, s, d)·e and centered fp32 rows (c, s, d)·4 and L̃ are formed, then one
    (c, s, s) product: c·(2·s²·4 + max(s·d·(e + 4), s²·4)). On the CPU (float64) the same bound holds."""
    s, d, e = seq, width, element_size
    c = min(texts, max(1, PER_TEXT_GRAM_BYTES // (16 * s * s)))
    return c * (2 * s * s * 4 + max(s * d * (e + 4), s * s * 4))


def optimizer_states(cfg) -> int:
    """Tensors of parameter size that the optimizer keeps: AdamW 2 (exp_avg, exp_avg_sq), SGD 1 with
    momentum (momentum_buffer), 0 without."""
    if cfg.optimizer == "sgd":
        return 1 if cfg.momentum else 0
    return 2


def objective_distance_peak(model: torch.nn.Module, backbone: torch.nn.Module, cfg, num_blocks: int,
                            head_parameters: int) -> int:
    """Device bytes while the gradient-alignment distance runs (depthfast.objective_distance; main process,
    before training, before sharding, fp32, eval mode, no gradient checkpointing), with
    B = batch_size · max_length tokens (the whole batch, on one process) and P_b the backbone's
    parameters:

        weights + 4 · head + 2 · P_b · 4 + L · B · (18 h + 2.5 a s) · 4 + 3 · B · V · 4

    (the model, the pretraining head's own parameters, the two losses' gradients of the backbone
    held together, one forward's activations, the pretraining loss's logits). θ₀'s device copy is
    made after it, and no optimizer state exists yet.
    """
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    backbone_params = sum(p.numel() for p in {id(p): p for p in backbone.parameters()}.values() if p.requires_grad)
    hidden, heads, seq = config.hidden_size, getattr(config, "num_attention_heads", 0) or 0, cfg.max_length
    tokens = cfg.batch_size * seq
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    activations = num_blocks * tokens * (18 * hidden + (2.5 * heads * seq if eager else 0)) * 4
    logits = 3 * tokens * getattr(config, "vocab_size", 0) * 4
    return int(weights + 4 * head_parameters + 2 * backbone_params * 4 + activations + logits)


def add_objective_distance(estimate: MemoryEstimate, peak: int) -> MemoryEstimate:
    """Add the distance's line: what its ``peak`` (objective_distance_peak) needs beyond the rest of
    the estimate, so that the total is the larger of the two phases (they never overlap)."""
    estimate.parts["objective distance (excess)"] = max(0, peak - estimate.total)
    return estimate


def device_memory(device: torch.device) -> int:
    """Total memory of a GPU, or the memory available to this process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(estimate: MemoryEstimate, device: torch.device) -> None:
    available = device_memory(device)
    if estimate.total > available:
        raise DepthfastError(
            f"estimated memory {estimate.total / GiB:.1f} GiB exceeds the {available / GiB:.1f} GiB of {device}: "
            "use --gradient-checkpointing, --precision bf16, --theta0-offload, a smaller --batch-size or --max-length, more "
            "processes, or --no-memory-check to try anyway"
        )
