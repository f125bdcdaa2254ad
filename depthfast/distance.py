"""How far the fine-tuning objective is from a pretraining-style one, measured at θ₀ without training.

    gradient-alignment distance = 1 − cos(∇θ L_pretrain(θ₀; B), ∇θ L_finetune(θ₀; B))

over the backbone parameters θ the two objectives share, on the same batch B of training texts:
L_pretrain is masked LM for encoders and causal LM for decoders. It is 0 when the fine-tuning
objective is the pretraining-style one. (The other objective distances, the chance-normalized
initial loss and the kernel-target alignment, come from the probe set: see run.py.)

The measurement leaves the run as it found it: the pretraining head is loaded with every random
number generator saved and restored around it (its fresh weights, where the checkpoint ships none,
come from a private seed), the models run in eval mode (no dropout), and nothing is written to
``.grad``. Training is the same with and without it (``--no-objective-distance``).
"""

from __future__ import annotations

import contextlib

import torch

from depthfast.batches import make_batch
from depthfast.layers import family_of
from depthfast.metrics import gradient_alignment_distance

HEAD_SEED_OFFSET = 7_919  # the fresh pretraining head's own seed: seed + this


def pretraining_objective(config) -> str:
    return "mlm" if family_of(config)[0] == "encoder" else "clm"


@contextlib.contextmanager
def rng_preserved():
    """Every global generator (Python, NumPy, torch CPU and CUDA) as it was on entry, on exit."""
    from depthfast.checkpoint import rng_state, set_rng_state

    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "backbone", None) or getattr(model, model.base_model_prefix)


def pretraining_model(model: torch.nn.Module, name_or_path: str, objective: str, seed: int) -> torch.nn.Module:
    """The ``objective`` ("mlm" or "clm") model of ``name_or_path`` around ``model``'s own backbone.

    Its head comes from the checkpoint (fresh where none ships, from ``seed``); the backbone it was
    loaded with is dropped, and a head tied to the input embeddings (BERT's decoder, GPT-2's LM head)
    is tied again to the shared backbone's, so that ∇ of its loss holds the output term.
    """
    from depthfast.models import load_model

    with rng_preserved():
        torch.manual_seed(seed + HEAD_SEED_OFFSET)
        pretrain = load_model(name_or_path, objective)
    setattr(pretrain, pretrain.base_model_prefix, backbone_of(model))
    pretrain.tie_weights()
    return pretrain


def pretraining_head_parameters(config, objective: str) -> int:
    """Parameters of the ``objective`` head outside the backbone (tied weights not counted), from a
    model built on the meta device: what the distance adds to the device's weights."""
    import transformers

    loader = {"mlm": transformers.AutoModelForMaskedLM, "clm": transformers.AutoModelForCausalLM}[objective]
    try:
        with torch.device("meta"):
            full = loader.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture without that head: the distance returns None anyway
        return config.vocab_size * config.hidden_size
    inner = {id(p) for p in getattr(full, full.base_model_prefix).parameters()}
    return sum(p.numel() for p in {id(p): p for p in full.parameters()}.values() if id(p) not in inner)


def distance_is_trivial(model_config, cfg, tokenizer) -> bool:
    """True when no pretraining head is loaded: the objective is the pretraining one (distance 0), or
    masked LM without a mask token (undefined)."""
    pre_objective = pretraining_objective(model_config)
    return pre_objective == cfg.objective or (pre_objective == "mlm" and tokenizer.mask_token is None)


def gradient_alignment_at_init(model: torch.nn.Module, cfg, task, tokenizer, device: torch.device) -> float | None:
    """1 − cos of the two objectives' gradients at θ₀ (None when undefined, e.g. no mask token)."""
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
    backbone = backbone_of(model)
    pretrain = pretraining_model(model, cfg.model, pre_objective, cfg.seed)
    pretrain.to(device)  # the head only: the backbone is there already
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
