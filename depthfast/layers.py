"""The depth axis of a Hugging Face model: its ordered blocks, its parameter groups, hooks on both.

Blocks are found by module structure, not by name: the ``nn.ModuleList`` of same-class modules
holding the most parameters (``bert.encoder.layer``, ``transformer.h``, ``model.decoder.layers``,
``gpt_neox.layers``, ``backbone.layers``, ``rwkv.blocks`` ...). Activations are captured with hooks
on those blocks rather than ``output_hidden_states``, whose last entry is final-normed in most
decoder families and which has no embedding entry for Mamba and RWKV.

Layer ℓ = 0 is the input of the first block (the embedding output); layer ℓ = 1..L is the output
of block ℓ. Its normalized depth is ℓ / L.

Parameter groups are assigned by role (input side, block ℓ, output side), with a tied input/output
matrix detected as one tensor and placed by one policy (``--tied-embeddings``): see
``ModelLayers.param_groups``. The weight-decay rule is ``decays``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from depthfast.constants import TIED_EMBEDDINGS
from depthfast.errors import DepthfastError

# model_type → (architecture, block type). The block type is what the equal-step result hinges on:
# sequential (attention then MLP), parallel (attention and MLP read the same input), ssm, rnn.
FAMILIES: dict[str, tuple[str, str]] = {
    "bert": ("encoder", "sequential"),
    "roberta": ("encoder", "sequential"),
    "xlm-roberta": ("encoder", "sequential"),
    "distilbert": ("encoder", "sequential"),
    "electra": ("encoder", "sequential"),
    "deberta": ("encoder", "sequential"),
    "deberta-v2": ("encoder", "sequential"),
    "mpnet": ("encoder", "sequential"),
    "gpt2": ("decoder", "sequential"),
    "opt": ("decoder", "sequential"),
    "gpt_neox": ("decoder", "parallel"),
    "codegen": ("decoder", "parallel"),
    "gptj": ("decoder", "parallel"),
    "llama": ("decoder", "sequential"),
    "mistral": ("decoder", "sequential"),
    "qwen2": ("decoder", "sequential"),
    "mamba": ("decoder", "ssm"),
    "mamba2": ("decoder", "ssm"),
    "rwkv": ("decoder", "rnn"),
}


def family_of(config) -> tuple[str, str]:
    """(architecture "encoder"|"decoder", block type) for a transformers config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise DepthfastError(f"model type {model_type!r} is not supported; supported model types: {known}")
    architecture, block_type = FAMILIES[model_type]
    if model_type == "gpt_neox" and not getattr(config, "use_parallel_residual", True):
        block_type = "sequential"
    return architecture, block_type


@dataclass
class ModelLayers:
    """Blocks and parameter groups of one model.

    blocks[i] is block i+1 in depth order; block_names are their qualified module names.
    """

    model: nn.Module
    model_type: str
    architecture: str
    block_type: str
    block_names: list[str]
    blocks: list[nn.Module] = field(repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def layer_names(self) -> list[str]:
        """Names of the measured layers: "embeddings" (input of block 1), then "block.1" … "block.L"."""
        return ["embeddings"] + [f"block.{i + 1}" for i in range(self.num_blocks)]

    @property
    def normalized_depths(self) -> list[float]:
        return [i / self.num_blocks for i in range(self.num_blocks + 1)]

    def _pretrained(self) -> nn.Module | None:
        """The transformers model that owns the input embedding: the model, or our classifier's backbone."""
        if hasattr(self.model, "get_input_embeddings"):
            return self.model
        return getattr(self.model, "backbone", None)

    def input_embedding(self) -> nn.Module | None:
        """The token-embedding module (``get_input_embeddings()``), or None where the model has none."""
        owner = self._pretrained()
        try:
            return owner.get_input_embeddings() if owner is not None else None
        except (NotImplementedError, AttributeError):
            return None

    def output_projection(self) -> nn.Module | None:
        """The LM head / MLM decoder (``get_output_embeddings()``); None for a base model or our
        SequenceClassifier, whose fresh classifier projects to labels, not to the vocabulary."""
        if not hasattr(self.model, "get_output_embeddings"):
            return None  # SequenceClassifier: a backbone (AutoModel, no LM head) and a classifier
        try:
            return self.model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            return None

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output projection's weight *is* the input embedding's weight (one tensor)."""
        inp, out = self.input_embedding(), self.output_projection()
        weight = getattr(inp, "weight", None)
        return weight is not None and out is not None and getattr(out, "weight", None) is weight

    def tied_group(self, tied_embeddings: str = "head") -> str | None:
        """The group that owns the tied input/output matrix under the policy, or None when nothing is tied."""
        check_tied_policy(tied_embeddings)
        return tied_embeddings if self.tied_embeddings else None

    def param_groups(self, tied_embeddings: str = "head") -> list[tuple[str, list[nn.Parameter]]]:
        """Disjoint groups covering every trainable parameter once, assigned by role:
        ("embeddings", …), ("block.1", …) … ("block.L", …), ("head", …). Empty groups are left out.

        - block ℓ: every parameter of the ℓ-th block found by structure (``find_blocks``);
        - the tied input/output matrix (LM head or MLM decoder whose weight *is* the token embedding):
          the group named by ``tied_embeddings`` ("head": treated as the output projection, the
          default; "embeddings": as the input embedding). See README, "tied input/output matrix";
        - head: the rest of the output projection module (e.g. an MLM decoder bias), and everything
          not on the input side: final norm, MLM transform, pooler, classifier, OPT's project_out;
        - embeddings (the input side): the token embedding (``get_input_embeddings()``), any other
          nn.Embedding (positions, token types), any module on a path with a segment containing
          "embedding" (BERT's embedding LayerNorm, ELECTRA's embeddings_project, Mamba's
          backbone.embeddings) and OPT's project_in.

        So a tied model under "head" may have an embeddings group of position embeddings only
        (GPT-2, OPT) or none at all (Mamba).
        """
        check_tied_policy(tied_embeddings)
        block_of = {}
        for index, block in enumerate(self.blocks):
            for p in block.parameters():
                block_of[id(p)] = index
        tied = {id(self.input_embedding().weight)} if self.tied_embeddings else set()
        output_side = set()
        projection = self.output_projection()
        if projection is not None:
            output_side.update(id(p) for p in projection.parameters())
        input_side = set()
        token_embedding = self.input_embedding()
        if token_embedding is not None:
            input_side.update(id(p) for p in token_embedding.parameters())
        for name, module in self.model.named_modules():
            segments = name.split(".")
            if isinstance(module, nn.Embedding) or any("embedding" in s or s == "project_in" for s in segments):
                input_side.update(id(p) for p in module.parameters(recurse=True))
        embeddings, heads = [], []
        per_block: list[list[nn.Parameter]] = [[] for _ in self.blocks]
        for _, p in self.model.named_parameters():  # named_parameters yields a tied tensor once
            if not p.requires_grad:
                continue
            if id(p) in block_of:
                per_block[block_of[id(p)]].append(p)
            elif id(p) in tied:
                (heads if tied_embeddings == "head" else embeddings).append(p)
            elif id(p) in output_side or id(p) not in input_side:
                heads.append(p)
            else:
                embeddings.append(p)
        groups = [("embeddings", embeddings)]
        groups += [(f"block.{i + 1}", ps) for i, ps in enumerate(per_block)]
        groups.append(("head", heads))
        return [(name, ps) for name, ps in groups if ps]

    def no_weight_decay(self) -> set[int]:
        """ids of the parameters exempt from weight decay (the rule is ``decays``)."""
        exempt = set()
        for _, module in self.model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not decays(self.model_type, name, p, module):
                    exempt.add(id(p))
        return exempt


def check_tied_policy(policy: str) -> None:
    if policy not in TIED_EMBEDDINGS:
        raise DepthfastError(f"tied embeddings must be one of {TIED_EMBEDDINGS}; got {policy!r}")


# Parameters that the architecture's authors keep out of weight decay, by their own name: Mamba's
# A_log and D (mamba_ssm marks them ``_no_weight_decay``; transformers' port does not carry the mark),
# Mamba-2's dt_bias, and RWKV's time_decay, time_first and time_mix_* (RWKV-LM decays only ".weight"
# matrices). Decaying them pulls A_log (the log decay rates) and the time mixes toward 0, which is a
# change of the recurrence itself, not a regulariser.
NO_DECAY_NAMES: dict[str, tuple[str, ...]] = {
    "mamba": ("A_log", "D"),
    "mamba2": ("A_log", "D", "dt_bias"),
}
NO_DECAY_PREFIXES: dict[str, tuple[str, ...]] = {"rwkv": ("time_",)}


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm, BatchNorm and the families' own norms (MambaRMSNorm, …)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()


def decays(model_type: str, name: str, p: torch.Tensor, module: nn.Module) -> bool:
    """The weight-decay rule: decay a parameter unless it is

    - 1-D or a scalar (biases, norm scales, Mamba's D, RWKV's time_decay/time_first), or
    - a parameter of a normalization module (``is_norm``), or
    - marked ``_no_weight_decay = True`` (the mamba_ssm convention), or
    - named in NO_DECAY_NAMES / NO_DECAY_PREFIXES for its model type (Mamba A_log, D; RWKV time_*).

    Embedding matrices and LM heads (tied or not) and classifier weights decay: as in BERT's and
    GPT-2's fine-tuning recipes, and so that decay never depends on whether a matrix is tied.
    ``name`` is the parameter's own name in ``module`` (no dots).
    """
    if p.dim() < 2 or is_norm(module) or getattr(p, "_no_weight_decay", False):
        return False
    if name in NO_DECAY_NAMES.get(model_type, ()):
        return False
    return not name.startswith(NO_DECAY_PREFIXES.get(model_type, ()))


def find_blocks(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    """The ModuleList of same-class children holding the most parameters, as (names, modules)."""
    best, best_size, best_name = None, -1, ""
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size, best_name = module, size, name
    if best is None or best_size == 0:
        raise DepthfastError(f"{type(model).__name__}: found no list of blocks (nn.ModuleList of same-class layers)")
    prefix = f"{best_name}." if best_name else ""
    return [f"{prefix}{i}" for i in range(len(best))], list(best)


def discover_layers(model: nn.Module) -> ModelLayers:
    """Blocks, architecture and block type of a transformers model (any head on top)."""
    config = getattr(model, "config", None)
    if config is None:
        raise DepthfastError(f"{type(model).__name__} has no transformers config; cannot tell its family")
    architecture, block_type = family_of(config)
    names, blocks = find_blocks(model)
    return ModelLayers(model, config.model_type, architecture, block_type, names, blocks)


def prepare_for_measurement(model: nn.Module) -> None:
    """Turn off model behaviour that would make weights differ between train and eval mode.

    RWKV with ``rescale_every > 0`` divides some block weights by 2^(block // rescale_every) in
    place on its first forward in eval mode (an fp16 overflow guard). That would corrupt ‖W‖ and
    ΔW, and change block-output scale between modes; turning it off keeps one consistent model
    (CKA is scale-invariant, so the profile is unaffected).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "rwkv" and getattr(config, "rescale_every", 0):
        if getattr(getattr(model, "rwkv", model), "layers_are_rescaled", False):
            raise DepthfastError("RWKV weights are already rescaled in place; load the model again before measuring")
        config.rescale_every = 0


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise DepthfastError(f"block returned {type(value).__name__}; cannot find its hidden states")


class BlockCapture:
    """Context manager: hooks that keep the layer activations of the most recent forward.

    After a forward, ``activations`` is a list of L+1 tensors (batch, seq, d): the input of block 1
    (embedding output), then each block's output. With ``detach`` they carry no graph.
    """

    def __init__(self, layers: ModelLayers, detach: bool = True) -> None:
        self.layers = layers
        self.detach = detach
        self._handles: list = []
        self._acts: list[torch.Tensor | None] = [None] * (layers.num_blocks + 1)

    def _keep(self, index: int, value) -> None:
        tensor = _first_tensor(value)
        self._acts[index] = tensor.detach() if self.detach else tensor

    def __enter__(self) -> "BlockCapture":
        def pre_hook(module, args, kwargs):
            self._keep(0, args[0] if args else kwargs["hidden_states"])

        self._handles.append(self.layers.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for index, block in enumerate(self.layers.blocks, start=1):
            self._handles.append(block.register_forward_hook(lambda m, a, out, i=index: self._keep(i, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def activations(self) -> list[torch.Tensor]:
        if any(a is None for a in self._acts):
            raise DepthfastError("no forward pass was captured (did the model run inside the capture?)")
        return list(self._acts)  # type: ignore[arg-type]

    def clear(self) -> None:
        self._acts = [None] * (self.layers.num_blocks + 1)
