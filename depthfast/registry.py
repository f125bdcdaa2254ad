"""The study's models: hub id → family, depth, width, block type and known quirks.

Each entry also carries the config of the real architecture, so benchmarks and memory estimates can
build a model of the exact shape with random weights, without a download. Any other model of the
supported families works by hub id or path; this table is not a gate.

The quirks (how a model differs from its family's usual layout: tied LM head, post-LN blocks, widths
projected between embeddings and blocks, weights rescaled in eval mode) are recorded in each run's
results.json as ``family_quirks`` and printed under its table (``family_quirks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    hf_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    block_type: str  # sequential | parallel | ssm | rnn
    config_kwargs: dict = field(default_factory=dict, hash=False)
    quirks: tuple[str, ...] = ()

    def config(self):
        """A transformers config of this architecture (for random-weight models of the real shape)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self.config_kwargs)


TIED = ("LM head tied to the token embedding (one matrix): with --tied-embeddings head (default) it is in "
         "the head group, free under the control and outside layer 0's weight change")
UNTIED = ("separate (untied) LM head: the token embedding is in the embeddings group whatever --tied-embeddings says",)


def _bert(hf_id, layers, hidden, heads):
    return ModelSpec(hf_id, "bert", layers, hidden, "sequential",
                     dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=4 * hidden, vocab_size=30522))


def _gpt2(hf_id, layers, hidden, heads):
    return ModelSpec(hf_id, "gpt2", layers, hidden, "sequential",
                     dict(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=50257), (TIED,))


def _opt(hf_id, layers, hidden, heads, proj, pre_ln=True, quirks=()):
    return ModelSpec(hf_id, "opt", layers, hidden, "sequential",
                     dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
                          vocab_size=50272, word_embed_proj_dim=proj, do_layer_norm_before=pre_ln,
                          max_position_embeddings=2048), (TIED, *quirks))


def _pythia(hf_id, layers, hidden, heads, vocab=50304):
    return ModelSpec(hf_id, "gpt_neox", layers, hidden, "parallel",
                     dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=4 * hidden, vocab_size=vocab, rotary_pct=0.25,
                          use_parallel_residual=True, max_position_embeddings=2048), UNTIED)


def _mamba(hf_id, layers, hidden):
    return ModelSpec(hf_id, "mamba", layers, hidden, "ssm",
                     dict(hidden_size=hidden, num_hidden_layers=layers, vocab_size=50280, state_size=16, expand=2),
                     (TIED + "; no position embeddings either, so under it Mamba has no embeddings group (layer 0 "
                      "has no weight change)",))


def _rwkv(hf_id, layers, hidden):
    return ModelSpec(hf_id, "rwkv", layers, hidden, "rnn",
                     dict(hidden_size=hidden, num_hidden_layers=layers, vocab_size=50277, context_length=1024,
                          attention_hidden_size=hidden, intermediate_size=4 * hidden),
                     ("in eval mode, rescales block weights in place by 2^(block // 6): turned off "
                      "(depthfast.layers.prepare_for_measurement) so ‖W‖ and ΔW are measured in one mode", *UNTIED))


STUDY_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("sentence-transformers/all-MiniLM-L6-v2", "bert", 6, 384, "sequential",
              dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                   vocab_size=30522)),
    _bert("bert-base-uncased", 12, 768, 12),
    _bert("bert-large-uncased", 24, 1024, 16),
    _gpt2("gpt2", 12, 768, 12),
    _gpt2("gpt2-medium", 24, 1024, 16),
    _opt("facebook/opt-125m", 12, 768, 12, 768),
    _opt("facebook/opt-350m", 24, 1024, 16, 512, pre_ln=False,
         quirks=("post-LN blocks; project_in/project_out between width 512 embeddings and width 1024 blocks: "
                 "blocks are measured at 1024, the classification head reads the projected 512",)),
    _opt("facebook/opt-1.3b", 24, 2048, 32, 2048),
    _pythia("EleutherAI/pythia-160m", 12, 768, 12),
    _pythia("EleutherAI/pythia-410m", 24, 1024, 16),
    _pythia("EleutherAI/pythia-1.4b", 24, 2048, 16),
    _pythia("EleutherAI/pythia-6.9b", 32, 4096, 32, vocab=50432),
    ModelSpec("Salesforce/codegen-350M-mono", "codegen", 20, 1024, "parallel",
              dict(n_embd=1024, n_layer=20, n_head=16, rotary_dim=32, vocab_size=51200, n_positions=2048), UNTIED),
    _mamba("state-spaces/mamba-130m-hf", 24, 768),
    _mamba("state-spaces/mamba-370m-hf", 48, 1024),
    _rwkv("RWKV/rwkv-4-169m-pile", 12, 768),
    _rwkv("RWKV/rwkv-4-430m-pile", 24, 1024),
)

def lookup(hf_id: str) -> ModelSpec | None:
    """The registry entry of a hub id (case-insensitive), or None."""
    lowered = hf_id.lower()
    return next((spec for spec in STUDY_MODELS if spec.hf_id.lower() == lowered), None)


def family_quirks(name_or_path: str) -> list[str]:
    """The registry's quirks of a study model (by hub id, as ``lookup``); [] for any other model."""
    spec = lookup(name_or_path)
    return list(spec.quirks) if spec is not None else []
