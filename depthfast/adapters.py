"""PEFT adapters (LoRA) as the tuned side of ``depthfast compare``: applied on the base model and merged.

An adapter directory holds ``adapter_config.json`` (and ``adapter_model.safetensors``), as
``PeftModel.save_pretrained`` writes it. ``load_adapter`` applies it on a freshly loaded copy of the
base model and merges it: W = W₀ + (α/r)·B·A for every LoRA module, so the tuned model is an ordinary
model of the base's class, with the base's parameter names, and its weight change per group is that
of its merged weights. ``peft`` is an optional dependency: only adapters need it.
"""

from __future__ import annotations

import json
import os
import warnings

from torch import nn

from depthfast.errors import DepthfastError

ADAPTER_CONFIG = "adapter_config.json"
PEFT_HINT = "pip install peft"


def is_adapter_dir(path: str) -> bool:
    """Whether ``path`` is a local PEFT adapter directory (it has adapter_config.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def require_peft(needed_by: str = f"a PEFT adapter (a directory with {ADAPTER_CONFIG})"):
    """The ``peft`` module (an optional dependency: LoRA runs, adapter directories), or one clear error
    saying what needs it and the install command."""
    try:
        import peft  # optional: only LoRA runs and adapter checkpoints need it
    except ImportError:
        raise DepthfastError(f"{needed_by} needs the peft package ({PEFT_HINT})") from None
    return peft


def adapter_config(path: str) -> dict:
    """The adapter's adapter_config.json as a dict (base_model_name_or_path, peft_type, target_modules, …)."""
    try:
        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DepthfastError(f"adapter {path!r}: cannot read {ADAPTER_CONFIG}: {exc}") from None
    if not isinstance(data, dict):
        raise DepthfastError(f"adapter {path!r}: {ADAPTER_CONFIG} is not a JSON object")
    return data


def adapter_base(path: str) -> str:
    """The base model the adapter was made on (its base_model_name_or_path; '' when it does not say)."""
    return str(adapter_config(path).get("base_model_name_or_path") or "")


def saved_keys(path: str) -> list[str]:
    """Names of the adapter's saved tensors, as PEFT stores them ("base_model.model.<module>.lora_A.weight")."""
    require_peft()
    from peft.utils import load_peft_weights  # optional (require_peft said so above)

    try:
        return sorted(load_peft_weights(path, device="cpu"))
    except Exception as exc:  # a missing or corrupt weights file: safetensors and torch raise various types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DepthfastError(f"adapter {path!r}: cannot read its weights ({text})") from None


def load_adapter(model: nn.Module, path: str, base_name: str) -> nn.Module:
    """Apply the adapter in ``path`` on ``model`` (a fresh copy of the base; it is modified) and merge it.

    Returns the merged model (the base's class). Every saved adapter tensor must land on a module of
    ``model`` with its shape: PEFT itself only warns about adapter weights it did not find, which would
    leave those modules at their initialization (LoRA B = 0: no change at all) and measure nothing.
    ``base_name`` names the base in messages.
    """
    peft = require_peft()
    config = adapter_config(path)
    kind = config.get("peft_type")
    if kind not in (None, "LORA"):
        raise DepthfastError(f"adapter {path!r} is a {kind} adapter; compare merges LoRA adapters only")
    expected = saved_keys(path)
    # PEFT freezes the base's parameters; the merged model gets the flags it had (depthfast's parameter
    # groups hold the trainable parameters only, so a frozen copy would have no groups to compare).
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing or unexpected keys are checked below, with one clear line
        try:
            wrapped = peft.PeftModel.from_pretrained(model, path, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch, target modules not found, …
            text = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise DepthfastError(f"adapter {path!r} does not fit the base model {base_name!r}: {text}") from None
    loaded = set(peft.get_peft_model_state_dict(wrapped))
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise DepthfastError(f"adapter {path!r} does not fit the base model {base_name!r}: {len(missing)} of its "
                             f"{len(expected)} tensors name modules the base does not have (first: {missing[0]})")
    merged = wrapped.merge_and_unload()
    for name, p in merged.named_parameters():
        p.requires_grad_(trainable.get(name, True))
    return merged
