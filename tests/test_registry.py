"""The study's model table: shapes of the real architectures (parameter counts as published)."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from depthfast.layers import discover_layers, family_of
from depthfast.registry import STUDY_MODELS, lookup

PUBLISHED_PARAMS = {  # millions, from the model cards / papers
    "bert-base-uncased": 110, "gpt2": 124, "facebook/opt-125m": 125, "EleutherAI/pythia-160m": 162,
    "EleutherAI/pythia-410m": 405, "EleutherAI/pythia-1.4b": 1415, "EleutherAI/pythia-6.9b": 6857,
    "state-spaces/mamba-130m-hf": 129, "RWKV/rwkv-4-169m-pile": 169,
}


@pytest.mark.parametrize("spec", STUDY_MODELS, ids=lambda s: s.hf_id)
def test_registry_shapes_build_and_agree_with_discovery(spec):
    config = spec.config()
    assert family_of(config)[1] == spec.block_type
    with torch.device("meta"):  # the real shape, no memory
        # published counts are of the pretraining model: with the (untied) LM head for decoders
        model = (AutoModel if spec.model_type == "bert" else AutoModelForCausalLM).from_config(config)
    layers = discover_layers(model)
    assert layers.num_blocks == spec.num_layers
    assert config.hidden_size == spec.hidden_size
    if spec.model_type != "bert":  # the LM head's tie, as the registry's quirks state it (BERT: AutoModel, no LM head)
        tied = [q for q in spec.quirks if q.startswith("LM head tied")]
        untied = [q for q in spec.quirks if q.startswith("separate (untied)")]
        assert len(tied) + len(untied) == 1, "the registry states the LM head's tie once"
        assert layers.tied_embeddings is bool(tied)
    if spec.hf_id in PUBLISHED_PARAMS:
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        assert millions == pytest.approx(PUBLISHED_PARAMS[spec.hf_id], rel=0.01)


def test_lookup():
    assert lookup("eleutherai/PYTHIA-6.9b").num_layers == 32
    assert lookup("nobody/nothing") is None
    assert len(STUDY_MODELS) >= 16
