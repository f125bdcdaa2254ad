"""How far the fine-tuning objective is from a pretraining-style one, measured at θ₀ without training.

    gradient-alignment distance = 1 − cos(∇θ L_pretrain(θ₀; B), ∇θ L_finetune(θ₀; B))

over the backbone parameters θ the two objectives share, on the same batch B of training texts:
L_pretrain is masked LM for encoders and causal LM for decoders. It is 0 when the fine-tuning
objective is the pretraining-style one. (The other objective distances, the chance-normalized
initial loss and the kernel-target alignment, come from the probe set: see run.py.)
"""

from __future__ import annotations

import torch

from depthfast.batches import make_batch
from depthfast.layers import family_of
from depthfast.metrics import gradient_alignment_distance


def pretraining_objective(config) -> str:
    return "mlm" if family_of(config)[0] == "encoder" else "clm"


def gradient_alignment_at_init(model: torch.nn.Module, cfg, task, tokenizer, device: torch.device) -> float | None:
    """1 − cos of the two objectives' gradients at θ₀ (None when undefined, e.g. no mask token)."""
    from depthfast.models import load_model

    pre_objective = pretraining_objective(model.config)
    if pre_objective == cfg.objective:
        return 0.0  # the same loss on the same batch
    if pre_objective == "mlm" and tokenizer.mask_token is None:
        return None
    texts = task.train_texts[:cfg.batch_size]
    labels = task.train_labels[:cfg.batch_size] if task.train_labels is not None else None
    generator = torch.Generator().manual_seed(cfg.seed)
    finetune_batch = make_batch(cfg.objective, tokenizer, texts, labels, cfg.max_length, cfg.mlm_probability,
                                generator)
    pretrain_batch = make_batch(pre_objective, tokenizer, texts, None, cfg.max_length, cfg.mlm_probability,
                                generator)
    finetune_batch = {k: v.to(device) for k, v in finetune_batch.items()}
    pretrain_batch = {k: v.to(device) for k, v in pretrain_batch.items()}
    # The pretraining-style model around the *same* backbone (a fresh LM head where none ships).
    backbone = getattr(model, "backbone", None) or getattr(model, model.base_model_prefix)
    pretrain = load_model(cfg.model, pre_objective)
    setattr(pretrain, pretrain.base_model_prefix, backbone)
    pretrain.to(device)
    was_training, use_cache = model.training, getattr(backbone.config, "use_cache", None)
    model.eval()  # no dropout: both gradients at the same θ₀ and the same activations
    pretrain.eval()
    backbone.config.use_cache = False  # eval-mode caches (RWKV's state) are updated in place: no gradient
    try:
        return gradient_alignment_distance(list(backbone.parameters()), lambda: pretrain(**pretrain_batch).loss,
                                           lambda: model(**finetune_batch).loss)
    finally:
        model.train(was_training)
        backbone.config.use_cache = use_cache
