"""How far the fine-tuning objective is from a pretraining-style one, measured at θ₀ without training.

Three training-free distances, all at θ₀ (before the first step), stored under results["metrics"]
(``OBJECTIVE_DISTANCE_KEYS``):

    initial loss / chance level            L₀ / ln K   (K = number of labels, or vocabulary size)
                                                       (chance_normalized_loss; L₀ on the probe set)
    gradient-alignment distance            1 − cos(∇θ L_pretrain(θ₀; B), ∇θ L_finetune(θ₀; B))
                                                       (gradient_alignment_distance; measured by
                                                       gradient_alignment_at_init)
    kernel-target alignment (centered)     linear CKA(features, one-hot labels)
                                                       (kernel_target_alignment; θ₀'s probe features)

The gradient alignment is over the backbone parameters θ the two objectives share, on the same batch
B of training texts: L_pretrain is masked LM for encoders and causal LM for decoders. It is 0 when the
fine-tuning objective is the pretraining-style one. The other two come from the probe pass (run.py).

The measurement leaves the run as it found it: the pretraining head is loaded with every random
number generator saved and restored around it (its fresh weights, where the checkpoint ships none,
come from a private seed), the models run in eval mode (no dropout), and nothing is written to
``.grad``. Training is the same with and without it (``--no-objective-distance``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from depthfast import models  # models.load_model read at call time (tests count the loads)
from depthfast.artifacts import finite_or_none
from depthfast.batches import make_batch
from depthfast.checkpoint import rng_state, set_rng_state
from depthfast.cka import linear_cka
from depthfast.errors import DepthfastError
from depthfast.layers import family_of

# Keys that run.py stores under results["metrics"] for the objective distance (read by the report).
OBJECTIVE_DISTANCE_KEYS = ("initial_loss_normalized", "gradient_alignment_distance", "kernel_target_alignment")
HEAD_SEED_OFFSET = 7_919  # the fresh pretraining head's own seed: seed + this


def chance_normalized_loss(loss: float, num_classes: int) -> float | None:
    """Initial task loss over its chance level: L₀ / ln K.

    K = number of labels (cls) or vocabulary size (mlm, clm): ln K is the cross-entropy of the uniform
    prediction, so 1 ≈ "as good as guessing", < 1 the pretrained model already helps. None if K < 2
    or the loss is not finite.
    """
    if num_classes is None or num_classes < 2:
        return None
    return finite_or_none(float(loss) / math.log(num_classes))


def gradient_alignment_distance(shared_params: Sequence[torch.nn.Parameter],
                                loss_pretrain_fn: Callable[[], torch.Tensor],
                                loss_finetune_fn: Callable[[], torch.Tensor]) -> float | None:
    """1 − cos(∇θ L_pretrain, ∇θ L_finetune) at the current θ, over ``shared_params`` (∈ [0, 2]).

    The callables take no arguments and return a scalar loss with a graph to ``shared_params`` (for
    instance causal-LM or masked-LM loss and the fine-tuning loss on the same batch). Gradients come
    from torch.autograd.grad (nothing is written to .grad, no optimizer state is touched); a parameter a
    loss does not reach has gradient 0. In float64, summed per parameter:
        cos = Σ_p ⟨g₁,p, g₂,p⟩ / (sqrt(Σ_p ‖g₁,p‖²) · sqrt(Σ_p ‖g₂,p‖²)).
    0: same direction; 1: orthogonal; 2: opposite. None if a gradient is zero or not finite.
    Call it with the model in eval mode so dropout does not make the two losses see different networks.
    """
    params = [p for p in shared_params if p.requires_grad]
    if not params:
        raise ValueError("gradient_alignment_distance needs at least one parameter that requires grad")

    def grads(fn):
        loss = fn()
        if loss.dim() != 0:
            raise ValueError(f"the loss callables must return a scalar; got shape {tuple(loss.shape)}")
        return torch.autograd.grad(loss, params, allow_unused=True)

    g1 = grads(loss_pretrain_fn)
    g2 = grads(loss_finetune_fn)
    dot = n1 = n2 = 0.0
    for a, b in zip(g1, g2):
        if a is None and b is None:
            continue
        if a is not None:
            a64 = a.detach().to(torch.float64)
            n1 += float((a64 * a64).sum())
        if b is not None:
            b64 = b.detach().to(torch.float64)
            n2 += float((b64 * b64).sum())
        if a is not None and b is not None:
            dot += float((a64 * b64).sum())
    if not (math.isfinite(dot) and math.isfinite(n1) and math.isfinite(n2)) or n1 <= 0 or n2 <= 0:
        return None
    cos = max(-1.0, min(1.0, dot / math.sqrt(n1 * n2)))
    return 1.0 - cos


def kernel_target_alignment(features: torch.Tensor, labels: torch.Tensor | Sequence[int], num_labels: int) -> float | None:
    """Centered kernel-target alignment of features (n, d) with class labels (n,) in [0, num_labels).

    With Y the one-hot labels (n, num_labels), K = Fc Fcᵀ and L = Yc Ycᵀ (columns centered):
        KTA = ⟨K, L⟩_F / (‖K‖_F ‖L‖_F) = ‖Ycᵀ Fc‖²_F / (‖Fcᵀ Fc‖_F ‖Ycᵀ Yc‖_F) = linear CKA(F, Y),
    in [0, 1]; higher = the pretrained features already separate the classes. Features are typically
    the last block's output mean-pooled per text. None if undefined (< 2 samples, one class only, or
    constant features).
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be (n, d) with n = len(labels); got {tuple(features.shape)} and {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}); got range [{int(labels.min())}, {int(labels.max())}]")
    if labels.numel() < 2:
        return None
    onehot = torch.nn.functional.one_hot(labels, num_labels).to(torch.float64)
    try:
        return finite_or_none(linear_cka(features.detach().to(torch.float64), onehot))
    except DepthfastError:
        return None


# --------------------------------------------------------------------------------------------
# The gradient alignment at θ₀: the pretraining-style model around the run's own backbone
# --------------------------------------------------------------------------------------------

def pretraining_objective(config) -> str:
    return "mlm" if family_of(config)[0] == "encoder" else "clm"


@contextlib.contextmanager
def rng_preserved():
    """Every global generator (Python, NumPy, torch CPU and CUDA) as it was on entry, on exit."""
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
    with rng_preserved():
        torch.manual_seed(seed + HEAD_SEED_OFFSET)
        pretrain = models.load_model(name_or_path, objective)
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
