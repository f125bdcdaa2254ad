"""The two sides of ``depthfast compare``: loading BASE and TUNED (a checkpoint, or a PEFT adapter merged on
BASE) as the family's LM class, and the checks that make them comparable: one architecture, the same
block count, tokenizers that split the probe alike, complete backbones, and LM heads where the
objective scores them. Every refusal is a DepthfastError that names the side and the model."""

from __future__ import annotations

import os

from depthfast.adapters import adapter_base, is_adapter_dir, load_adapter, require_peft, saved_keys
from depthfast.artifacts import read_json
from depthfast.batches import probe_batches
from depthfast.errors import DepthfastError
from depthfast.layers import discover_layers, family_of, prepare_for_measurement
from depthfast.models import (damaged_weights_line, first_line, load_config, load_kwargs, load_tokenizer,
                              resolve_model_path, weights_error)
from depthfast.rundir import verify_manifest


def lm_class(architecture: str):
    """The family's LM class: every checkpoint loads through it, so both sides have the same names."""
    import transformers

    return transformers.AutoModelForMaskedLM if architecture == "encoder" else transformers.AutoModelForCausalLM


def from_pretrained(name: str, architecture: str):
    """(model, missing checkpoint keys) of ``name`` loaded as the family's LM class, on the host, fp32."""
    import torch

    path = resolve_model_path(name)
    try:
        model, info = lm_class(architecture).from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                             **load_kwargs(path))
    except (OSError, ValueError) as exc:
        raise DepthfastError(f"cannot load the weights of {name!r}: {first_line(exc)}") from None
    except Exception as exc:
        if weights_error(exc):
            raise DepthfastError(damaged_weights_line(name, exc)) from None
        raise
    return model, sorted(info.get("missing_keys") or [])


def backbone_module():
    """The class BackboneOnly (defined on first use, so importing this module does not import torch)."""
    import torch
    from torch import nn

    class BackboneOnly(nn.Module):
        """A checkpoint's backbone (blocks, embeddings, final norm; no LM head) for ``--objective none``.

        forward(input_ids, attention_mask, labels) runs the backbone and scores nothing: the probe's
        labels are all −100, so measure_probe records no loss (null in results.json).
        """

        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone  # the attribute ModelLayers looks for (as on SequenceClassifier)
            self.config = backbone.config

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None):
            self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            return None

    return BackboneOnly


def same_model(a: str, b: str) -> bool:
    """Whether two model names denote the same model (the same string, or the same resolved directory)."""
    if a == b:
        return True
    try:
        ra, rb = resolve_model_path(a), resolve_model_path(b)
    except DepthfastError:
        return False
    return os.path.isdir(ra) and os.path.isdir(rb) and os.path.realpath(ra) == os.path.realpath(rb)


def resolve_adapter(cfg) -> str | None:
    """TUNED's adapter directory (its recorded base checked against BASE), or None for a checkpoint."""
    adapter = cfg.tuned if is_adapter_dir(cfg.tuned) else None
    if adapter is not None:
        require_peft()
        recorded = adapter_base(adapter)
        if recorded and not same_model(recorded, cfg.base):
            raise DepthfastError(f"adapter {cfg.tuned!r} was made on {recorded!r}, not on BASE {cfg.base!r}")
    elif cfg.tuned.startswith((".", "/", "~")) and not os.path.exists(cfg.tuned):
        raise DepthfastError(f"TUNED {cfg.tuned!r} does not exist")
    return adapter


def check_run_manifests(cfg) -> None:
    """BASE or TUNED that is a run's ``model/`` (``--save-model``) must be the model of the results beside it:
    refused when the run directory does not match its results.json manifest (a mix of two runs)."""
    for which, name in (("BASE", cfg.base), ("TUNED", cfg.tuned)):
        if not os.path.isdir(name) or os.path.basename(os.path.normpath(name)) != "model":
            continue
        run_dir = os.path.dirname(os.path.abspath(name))
        results, _ = read_json(os.path.join(run_dir, "results.json"))
        problem = verify_manifest(run_dir, results) if isinstance(results, dict) else ""
        if problem:
            raise DepthfastError(f"{which} {name!r} does not match its run's results.json ({problem}); rerun that "
                                 "run (with --overwrite) or compare another checkpoint")


def block_count(config) -> int | None:
    value = getattr(config, "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


def check_architectures(cfg, adapter: str | None):
    """(BASE's HF config, its architecture "encoder"/"decoder"), from the configs alone (no weights):
    BASE and TUNED must share model_type and, where the configs say it, the number of blocks."""
    base_config = load_config(cfg.base)
    tuned_config = base_config if adapter is not None else load_config(cfg.tuned)
    if base_config.model_type != tuned_config.model_type:
        raise DepthfastError(f"BASE {cfg.base!r} is a {base_config.model_type!r} model and TUNED {cfg.tuned!r} a "
                             f"{tuned_config.model_type!r} one: compare needs one architecture")
    architecture, _ = family_of(base_config)
    counts = block_count(base_config), block_count(tuned_config)
    if None not in counts and counts[0] != counts[1]:
        raise DepthfastError(f"BASE {cfg.base!r} has {counts[0]} blocks and TUNED {cfg.tuned!r} {counts[1]}: "
                             "compare needs the same depth")
    return base_config, architecture


def compare_probe(cfg, objective: str, tokenizer, texts: list[str]):
    """The probe batches of a run with this objective; under ``none`` clm's batches with every label −100."""
    batches = probe_batches("clm" if objective == "none" else objective, tokenizer, texts, None,
                            cfg.probe_batch_size, cfg.max_length, cfg.mlm_probability, cfg.seed)
    if objective == "none":
        for batch in batches:
            batch["labels"] = batch["labels"].new_full(batch["labels"].shape, -100)
    return batches


def check_tokenizer(cfg, batches: list[dict], texts: list[str]) -> None:
    """TUNED's own tokenizer, if it ships one, must give the token ids of BASE's ``batches``."""
    try:
        tuned_tokenizer = load_tokenizer(cfg.tuned, "clm")
    except DepthfastError:
        return  # TUNED ships no tokenizer (e.g. weights only): BASE's is the one it was tuned with
    theirs = compare_probe(cfg, "clm", tuned_tokenizer, texts)
    same = len(theirs) == len(batches) and all(
        a["input_ids"].shape == b["input_ids"].shape and bool((a["input_ids"] == b["input_ids"]).all())
        for a, b in zip(batches, theirs))
    if not same:
        raise DepthfastError(f"the tokenizers of BASE {cfg.base!r} and TUNED {cfg.tuned!r} split the probe texts "
                             "differently; compare feeds both models the same token ids")


def head_missing(missing: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """(missing head keys, missing backbone keys) of a checkpoint loaded as its LM class."""
    backbone = [k for k in missing if k.startswith(prefix + ".")]
    return [k for k in missing if k not in backbone], backbone


def load_side(name: str, architecture: str, adapter: str | None, base_name: str):
    """(model as the LM class, missing keys): the checkpoint ``name``, or BASE with the adapter merged."""
    model, missing = from_pretrained(name, architecture)
    if adapter is None:
        return model, missing
    prefix = model.base_model_prefix
    # An adapter made on the LM class names its modules under the backbone's prefix
    # ("base_model.model.transformer.h.0…"); one made on the bare backbone (AutoModel) does not.
    on_lm = any(k.startswith(f"base_model.model.{prefix}.") for k in saved_keys(adapter))
    if on_lm:
        return load_adapter(model, adapter, base_name), missing
    load_adapter(model.base_model, adapter, base_name)  # merged in place inside ``model``
    return model, missing


def load_sides(cfg, architecture: str, adapter: str | None):
    """(base, tuned, missing head keys per side "BASE"/"TUNED"), both as the LM class on the host; a side
    that lacks backbone weights is refused (not a complete checkpoint)."""
    base, base_missing = load_side(cfg.base, architecture, None, cfg.base)
    tuned, tuned_missing = load_side(cfg.base if adapter else cfg.tuned, architecture, adapter, cfg.base)
    prefix = base.base_model_prefix
    heads = {}
    for which, name, missing in (("BASE", cfg.base, base_missing), ("TUNED", cfg.tuned, tuned_missing)):
        head, backbone = head_missing(missing, prefix)
        if backbone:
            raise DepthfastError(f"{which} {name!r} lacks weights of its backbone ({len(backbone)} tensors, first: "
                                 f"{backbone[0]}): not a complete checkpoint")
        heads[which] = head
    return base, tuned, heads


def resolve_objective(cfg, architecture: str, tokenizer, heads: dict[str, list[str]]) -> str:
    """The objective compare scores: ``auto`` → clm for decoders, mlm for encoders whose checkpoints both
    carry their MLM head (and a tokenizer with a mask token), else none; clm/mlm refused without heads."""
    objective = cfg.objective
    lm_kind = "mlm" if architecture == "encoder" else "clm"
    if objective == "auto":
        scorable = not heads["BASE"] and not heads["TUNED"] and (lm_kind == "clm" or tokenizer.mask_token is not None)
        objective = lm_kind if scorable else "none"
    elif objective == lm_kind:
        for which, name in (("BASE", cfg.base), ("TUNED", cfg.tuned)):
            if heads[which]:
                raise DepthfastError(f"objective {objective!r} scores the checkpoints' own LM heads, and {which} "
                                     f"{name!r} has none ({heads[which][0]} missing); use --objective none")
    return objective


def layers_or_error(model, which: str, name: str):
    prepare_for_measurement(model)
    try:
        return discover_layers(model)
    except DepthfastError as exc:
        raise DepthfastError(f"{which} {name!r}: {exc}") from None


def discover_both(cfg, base, tuned):
    """The ModelLayers of both sides, which must have the same number of blocks."""
    base_layers = layers_or_error(base, "BASE", cfg.base)
    tuned_layers = layers_or_error(tuned, "TUNED", cfg.tuned)
    if base_layers.num_blocks != tuned_layers.num_blocks:
        raise DepthfastError(f"BASE {cfg.base!r} has {base_layers.num_blocks} blocks and TUNED {cfg.tuned!r} "
                             f"{tuned_layers.num_blocks}: compare needs the same depth")
    return base_layers, tuned_layers


def param_shapes(model) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def mismatch_note(base: dict, tuned: dict) -> str:
    """Why the weight change is not measured: the first parameter whose name or shape differs."""
    only = sorted(set(base) ^ set(tuned))
    shaped = sorted(n for n in set(base) & set(tuned) if base[n] != tuned[n])
    what = (f"parameter {shaped[0]} is {base[shaped[0]]} in BASE and {tuned[shaped[0]]} in TUNED" if shaped
            else f"parameter {only[0]} is in only one of them")
    return (f"BASE and TUNED do not share parameter names and shapes ({what}): weight change not measured, "
            "representational change only")
