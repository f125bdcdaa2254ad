"""Layer discovery, parameter groups and block hooks on tiny random models of all seven families."""

import pytest
import torch

import tiny_models
from depthfast.errors import DepthfastError
from depthfast.layers import BlockCapture, discover_layers, family_of, prepare_for_measurement

EXPECTED = {  # family → (architecture, block type, qualified name of the first block)
    "bert": ("encoder", "sequential", "bert.encoder.layer.0"),
    "gpt2": ("decoder", "sequential", "transformer.h.0"),
    "opt": ("decoder", "sequential", "model.decoder.layers.0"),
    "gpt_neox": ("decoder", "parallel", "gpt_neox.layers.0"),
    "codegen": ("decoder", "parallel", "transformer.h.0"),
    "mamba": ("decoder", "ssm", "backbone.layers.0"),
    "rwkv": ("decoder", "rnn", "rwkv.blocks.0"),
}


@pytest.fixture(scope="module", params=tiny_models.FAMILIES)
def family_model(request):
    model, tokenizer = tiny_models.build(request.param)
    prepare_for_measurement(model)
    return request.param, model.eval(), tokenizer


def test_blocks_found_by_structure(family_model):
    family, model, _ = family_model
    layers = discover_layers(model)
    architecture, block_type, first = EXPECTED[family]
    assert (layers.architecture, layers.block_type) == (architecture, block_type)
    assert layers.num_blocks == tiny_models.LAYERS
    assert layers.block_names[0] == first
    assert layers.layer_names == ["embeddings", "block.1", "block.2", "block.3"]
    assert layers.normalized_depths == [0.0, 1 / 3, 2 / 3, 1.0]


def test_param_groups_partition_trainable_parameters(family_model):
    _, model, _ = family_model
    groups = discover_layers(model).param_groups()
    names = [name for name, _ in groups]
    assert names[0] == "embeddings"
    assert names[1:1 + tiny_models.LAYERS] == [f"block.{i}" for i in range(1, tiny_models.LAYERS + 1)]
    ids = [id(p) for _, ps in groups for p in ps]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    embeddings = dict(groups)["embeddings"]
    assert any(p.dim() == 2 and p.shape[0] == model.config.vocab_size for p in embeddings)


def test_capture_matches_hidden_states(family_model):
    """Hooks see exactly the hidden states the model passes between blocks."""
    family, model, tokenizer = family_model
    layers = discover_layers(model)
    batch = tokenizer(["def f(x): return x", "The quick brown fox jumps over the lazy dog."],
                      padding=True, return_tensors="pt")
    with torch.no_grad(), BlockCapture(layers) as capture:
        out = model(**batch, output_hidden_states=True)
    acts = capture.activations
    assert len(acts) == tiny_models.LAYERS + 1
    assert all(a.shape == (2, batch["input_ids"].shape[1], tiny_models.HIDDEN) for a in acts)
    hidden = out.hidden_states
    if family in ("mamba", "rwkv"):  # no embedding entry: hidden_states[i] is the output of block i+1 …
        pairs = [(acts[i + 1], hidden[i]) for i in range(tiny_models.LAYERS - 1)]
    elif family == "bert":  # … BERT: every entry is a block output, no final norm
        pairs = list(zip(acts, hidden))
    else:  # decoders: the last entry is final-normed, the rest are block inputs
        pairs = list(zip(acts[:-1], hidden[:-1]))
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if family not in ("bert", "mamba", "rwkv"):
        # final-normed (and for OPT-350m-style models projected to word_embed_proj_dim)
        assert acts[-1].shape != hidden[-1].shape or not torch.allclose(acts[-1], hidden[-1])


def test_capture_without_forward_is_a_clear_error():
    model, _ = tiny_models.build("gpt2")
    with BlockCapture(discover_layers(model)) as capture, pytest.raises(DepthfastError, match="no forward"):
        capture.activations


def test_rwkv_weights_identical_across_modes():
    """RWKV's in-place eval-mode rescale is switched off, so ‖W‖ is the same in train and eval."""
    model, tokenizer = tiny_models.build("rwkv")
    model.config.rescale_every = 1  # make the quirk bite in a 3-block model
    prepare_for_measurement(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = tokenizer(["x = 1"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**batch)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)


def test_unsupported_family_is_a_clear_error():
    config = type("Config", (), {"model_type": "t5"})()
    with pytest.raises(DepthfastError, match="'t5' is not supported"):
        family_of(config)


def test_gpt_neox_sequential_variant():
    config = tiny_models.CONFIGS["gpt_neox"](64)
    config.use_parallel_residual = False
    assert family_of(config) == ("decoder", "sequential")


def test_opt_350m_style_post_ln_with_projection():
    """OPT-350m: post-LN blocks of width 32 between projected width-16 embeddings; no final norm."""
    import transformers as T

    from depthfast.models import SequenceClassifier

    config = tiny_models.CONFIGS["opt"](128)
    config.do_layer_norm_before = False
    torch.manual_seed(0)
    backbone = T.AutoModel.from_config(config).eval()
    layers = discover_layers(backbone)
    ids = torch.randint(1, 128, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad(), BlockCapture(layers) as capture:
        out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    acts = capture.activations
    assert all(a.shape[-1] == 32 for a in acts)  # blocks are measured at their own width …
    assert out.last_hidden_state.shape[-1] == 16  # … the model's output is projected down
    for ours, theirs in zip(acts[:-1], out.hidden_states[:-1]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    embedding_ids = {id(p) for p in dict(layers.param_groups())["embeddings"]}
    assert id(backbone.decoder.project_in.weight) in embedding_ids
    assert id(backbone.decoder.project_out.weight) in {id(p) for p in dict(layers.param_groups())["head"]}
    logits = SequenceClassifier(backbone, 3, pooling="last")(ids, mask).logits
    assert logits.shape == (2, 3)
