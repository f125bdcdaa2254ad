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


def test_family_quirks_reach_results_json_and_the_table(tmp_path):
    """A study model's quirks (OPT-350m: post-LN blocks, projected widths) are written to results.json as
    family_quirks and printed under the run's table; a model outside the registry records []."""
    import io
    import json

    import tiny_models
    from depthfast.config import RunConfig
    from depthfast.data import Task
    from depthfast.probe import ProbeResult
    from depthfast.registry import family_quirks
    from depthfast.results import print_table, write_results
    from depthfast.train import TrainLog

    quirks = family_quirks("FACEBOOK/opt-350m")
    assert any(q.startswith("post-LN blocks") for q in quirks) and any(q.startswith("LM head tied") for q in quirks)
    assert family_quirks(str(tmp_path)) == []
    model, _ = tiny_models.build("opt")
    layers = discover_layers(model)
    n = layers.num_blocks + 1
    measured = ProbeResult(change=[0.1] * n, num_samples=4, loss_base=1.0, loss_tuned=0.9, accuracy_base=None,
                           accuracy_tuned=None)
    task = Task("test", ["a b c"], ["d e f"])
    written = {}
    for model_id in ("facebook/opt-350m", str(tmp_path / "local")):
        cfg = RunConfig(model=model_id, objective="clm", out=str(tmp_path / f"out{len(written)}"))
        write_results(cfg, layers, task, TrainLog(group_names=[]), measured, {}, None, {},
                      wall_seconds=1.0, torch_version=torch.__version__)
        with open(tmp_path / cfg.out / "results.json") as f:
            written[model_id] = json.load(f)
    assert written["facebook/opt-350m"]["family_quirks"] == quirks
    assert written[str(tmp_path / "local")]["family_quirks"] == []
    out = io.StringIO()
    print_table(written["facebook/opt-350m"], file=out)
    assert [l for l in out.getvalue().splitlines() if l.startswith("family quirk: ")] == [
        f"family quirk: {q}" for q in quirks]
