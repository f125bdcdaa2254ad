"""Layer discovery, parameter groups and block hooks on tiny random models of all seven families."""

import functools
import math

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


@pytest.mark.parametrize("policy", ["head", "embeddings"])
def test_param_groups_partition_trainable_parameters(family_model, policy):
    _, model, _ = family_model
    layers = discover_layers(model)
    groups = layers.param_groups(policy)
    names = [name for name, _ in groups]
    blocks = [f"block.{i}" for i in range(1, tiny_models.LAYERS + 1)]
    assert names == ["embeddings", *blocks, "head"] or names == [*blocks, "head"]  # Mamba under "head": none
    ids = [id(p) for _, ps in groups for p in ps]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    token_embedding = model.get_input_embeddings().weight
    owner = next(name for name, ps in groups if any(p is token_embedding for p in ps))
    assert owner == ("head" if layers.tied_embeddings and policy == "head" else "embeddings")


# Outside the blocks, by qualified name: (tied?, embeddings group, head group) under the default policy "head".
ROLES = {
    "bert": (True, ["bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight",
                    "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"],
             ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias", "cls.predictions.transform.dense.weight",
              "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
              "cls.predictions.transform.LayerNorm.bias"]),
    "gpt2": (True, ["transformer.wpe.weight"], ["transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]),
    "opt": (True, ["model.decoder.embed_positions.weight", "model.decoder.project_in.weight"],
            ["model.decoder.embed_tokens.weight", "model.decoder.project_out.weight",
             "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"]),
    "gpt_neox": (False, ["gpt_neox.embed_in.weight"],
                 ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "lm_head.weight"]),
    "codegen": (False, ["transformer.wte.weight"],
                ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight", "lm_head.bias"]),
    "mamba": (True, [], ["backbone.embeddings.weight", "backbone.norm_f.weight"]),
    "rwkv": (False, ["rwkv.embeddings.weight"], ["rwkv.ln_out.weight", "rwkv.ln_out.bias", "head.weight"]),
}


def named_groups(model, groups) -> dict[str, list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {group: [names[id(p)] for p in ps] for group, ps in groups}


def test_roles_outside_the_blocks(family_model):
    """Each family's input side, output side and tied matrix, under both policies (BERT with its MLM
    head, OPT with project_in/project_out, Mamba with no embeddings group under "head")."""
    family, model, _ = family_model
    layers = discover_layers(model)
    tied, embeddings, head = ROLES[family]
    assert layers.tied_embeddings is tied
    assert layers.tied_group("head") == ("head" if tied else None)
    assert layers.tied_group("embeddings") == ("embeddings" if tied else None)
    by_name = named_groups(model, layers.param_groups())
    assert by_name.get("embeddings", []) == embeddings
    assert by_name["head"] == head
    # The other policy moves exactly the tied matrix (the first name it appears under) and nothing else.
    other = named_groups(model, layers.param_groups("embeddings"))
    moved = [model.get_input_embeddings().weight] if tied else []
    moved_names = [n for n, p in model.named_parameters() if any(p is m for m in moved)]
    assert sorted(other.get("embeddings", [])) == sorted(embeddings + moved_names)
    assert other["head"] == [n for n in head if n not in moved_names]


def test_classifier_wrapper_ties_nothing_and_keeps_its_groups():
    """Our SequenceClassifier has no LM head: nothing is tied, the token embedding is on the input side,
    and the groups are the pre-role ones (so the default run's profile reproduces)."""
    import transformers as T

    from depthfast.models import SequenceClassifier

    for family in ("bert", "gpt2", "mamba"):
        backbone = T.AutoModel.from_config(tiny_models.CONFIGS[family](128))
        model = SequenceClassifier(backbone, 3, pooling="mean")
        layers = discover_layers(model)
        assert not layers.tied_embeddings and layers.output_projection() is None
        assert layers.param_groups("head") == layers.param_groups("embeddings")
        groups = named_groups(model, layers.param_groups())
        assert groups["head"][-2:] == ["classifier.weight", "classifier.bias"]
        expected = {"bert": ["backbone.embeddings.word_embeddings.weight", "backbone.embeddings.position_embeddings.weight",
                             "backbone.embeddings.token_type_embeddings.weight", "backbone.embeddings.LayerNorm.weight",
                             "backbone.embeddings.LayerNorm.bias"],
                    "gpt2": ["backbone.wte.weight", "backbone.wpe.weight"],
                    "mamba": ["backbone.embeddings.weight"]}[family]
        assert groups["embeddings"] == expected
        if family == "bert":
            assert groups["head"][:2] == ["backbone.pooler.dense.weight", "backbone.pooler.dense.bias"]


def test_tied_policy_is_validated():
    model, _ = tiny_models.build("gpt2")
    with pytest.raises(DepthfastError, match="tied embeddings must be one of"):
        discover_layers(model).param_groups("lm_head")
    from depthfast.config import RunConfig

    with pytest.raises(DepthfastError, match="tied embeddings must be one of"):
        RunConfig(tied_embeddings="both").validate()


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


# ---- the control and the weight-change measure on tied and untied twins -------------------------------

def twin(family: str, tied: bool):
    """The same tiny causal LM (same seed) with its LM head tied to the token embedding or separate (a fresh copy)."""
    import copy

    return copy.deepcopy(_twin(family, tied))  # deepcopy keeps the tie


@functools.lru_cache(maxsize=None)
def _twin(family: str, tied: bool):
    import transformers as T

    config = tiny_models.CONFIGS[family](tiny_models.VOCAB)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, steps are deterministic
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    return model


def clm_batch():
    ids = torch.randint(1, tiny_models.VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def equal_step_run(model, policy: str, steps: int = 2, fused: bool | None = None, control: str = "equal-step"):
    """``steps`` optimizer steps through the runner's own optimizer and control; per step, the ratios
    before/after the control of the group holding the output projection, and the weights after step 1."""
    from depthfast.config import RunConfig
    from depthfast.train import build_control, build_optimizer, free_groups

    cfg = RunConfig(control=control, tied_embeddings=policy, warmup_steps=1, lr=1e-3).validate()
    layers = discover_layers(model)
    groups = layers.param_groups(cfg.tied_embeddings)
    optimizer, _ = build_optimizer(groups, cfg, layers.no_weight_decay())
    control_ = build_control(optimizer, groups, cfg, fused=fused)
    out = model.get_output_embeddings().weight
    index = next(i for i, (_, ps) in enumerate(groups) if any(p is out for p in ps))
    ratios, after_first = [], None
    for step in range(steps):
        model(**clm_batch()).loss.backward()
        control_.step()
        control_.zero_grad(set_to_none=True)
        ratios.append((float(control_.ratios_before[index]), float(control_.ratios_after[index]),
                       control_.target_ratio))
        if step == 0:
            after_first = out.detach().clone()
    return groups[index][0], index in free_groups(groups, cfg), ratios, after_first


@pytest.mark.parametrize("family,fused", [("gpt2", False), ("gpt_neox", False), ("gpt2", True)],
                         ids=["gpt2-reference", "gpt_neox-reference", "gpt2-fused"])
def test_output_projection_is_free_whether_tied_or_not(family, fused):
    """Default policy: the control treats the LM head the same in tied and untied twins (group "head",
    free: its update is the optimizer's own); --tied-embeddings embeddings equalizes it in the tied twin only."""
    for tied in (True,) if fused else (False, True):  # the fused path gets the same groups: its tied case suffices
        plain = equal_step_run(twin(family, tied), "head", steps=1, fused=fused, control="none")[3]
        group, free, ratios, after_first = equal_step_run(twin(family, tied), "head", fused=fused)
        assert (group, free) == ("head", True), tied
        for before, after, target in ratios:
            assert after == before and target > 0 and abs(before / target - 1) > 1e-3
        torch.testing.assert_close(after_first, plain, rtol=0, atol=0)  # step 1 bit for bit the optimizer's
        group, free, ratios, after_first = equal_step_run(twin(family, tied), "embeddings", fused=fused)
        if not tied:  # the policy only places a tied matrix
            assert (group, free) == ("head", True)
            continue
        assert (group, free) == ("embeddings", False)
        for before, after, target in ratios:
            assert after == pytest.approx(target, rel=1e-6) and abs(after / before - 1) > 1e-3
        assert not torch.equal(after_first, plain)


@pytest.mark.parametrize("family", ["gpt2", "mamba"])
def test_layer0_weight_change_excludes_or_includes_the_tied_matrix(family):
    """Moving only the tied matrix: layer 0's weight change ignores it under "head" and measures it
    under "embeddings"; Mamba (no position embeddings) has no embeddings group at all under "head"."""
    import copy

    from depthfast.probe import weight_changes

    base = tiny_models.build(family)[0]
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_input_embeddings().weight.mul_(1.5)
    tied = tuned.get_input_embeddings().weight
    assert tuned.get_output_embeddings().weight is tied
    for policy in ("head", "embeddings"):
        b, t = discover_layers(base).param_groups(policy), discover_layers(tuned).param_groups(policy)
        changes = weight_changes([(n, [p.detach() for p in ps]) for n, ps in b],
                                 [(n, [p.detach() for p in ps]) for n, ps in t])
        assert all(changes[f"block.{i}"] == 0.0 for i in range(1, tiny_models.LAYERS + 1))
        head = dict(t)["head"]
        if policy == "head":
            assert changes.get("embeddings", 0.0) == 0.0 and changes["head"] > 0
            assert ("embeddings" in changes) is (family == "gpt2")  # GPT-2 keeps wpe, Mamba has nothing else
            assert any(p is tied for p in head)
        else:
            pairs = [(p.detach().double(), q.detach().double()) for p, q in zip(dict(b)["embeddings"], dict(t)["embeddings"])]
            expected = math.sqrt(sum(float((q - p).square().sum()) for p, q in pairs)
                                 / sum(float(p.square().sum()) for p, _ in pairs))
            assert changes["embeddings"] == pytest.approx(expected, rel=1e-6) and expected > 0.1
            assert changes["head"] == 0.0 and not any(p is tied for p in head)


def test_weight_decay_rule_on_mamba_and_rwkv():
    """No decay on 1-D parameters, norms, Mamba's A_log and D, RWKV's time_* (3-D time_mix too);
    decay on every other matrix, embeddings and LM heads included."""
    from depthfast.config import RunConfig
    from depthfast.train import build_optimizer

    for family, exempt_2d in (("mamba", {"A_log"}), ("rwkv", {"time_mix_key", "time_mix_value", "time_mix_receptance"})):
        model = tiny_models.build(family)[0]
        layers = discover_layers(model)
        groups = layers.param_groups()
        optimizer, _ = build_optimizer(groups, RunConfig(weight_decay=0.1), layers.no_weight_decay())
        decay = {id(p) for p in optimizer.param_groups[0]["params"]}
        assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
        assert len(decay) + len(optimizer.param_groups[1]["params"]) == sum(len(ps) for _, ps in groups)
        for name, p in model.named_parameters():
            own = name.rsplit(".", 1)[-1]
            exempt = p.dim() < 2 or own in exempt_2d or own in {"D", "time_decay", "time_first"}
            assert (id(p) not in decay) is exempt, name
        assert id(model.get_input_embeddings().weight) in decay
        if family == "mamba":
            assert model.backbone.layers[0].mixer.A_log.dim() == 2  # the old dim ≥ 2 rule decayed it
        else:
            assert model.rwkv.blocks[0].attention.time_mix_key.dim() == 3  # … and RWKV's time mixes


def test_no_weight_decay_mark_is_honoured():
    """A parameter marked ``_no_weight_decay`` (mamba_ssm's convention) is exempt in any family."""
    model = tiny_models.build("gpt2")[0]
    layers = discover_layers(model)
    marked = model.transformer.h[0].mlp.c_fc.weight
    assert id(marked) not in layers.no_weight_decay()
    marked._no_weight_decay = True
    assert id(marked) in layers.no_weight_decay()


def test_table_names_missing_and_undefined_weight_changes():
    """The terminal table says "no group" for a layer without parameters (tied Mamba's embeddings),
    "n/a" for a group moved from W₀ = 0, and where the tied matrix went."""
    import io

    from depthfast.results import print_table

    rows = [{"layer": "embeddings", "depth": 0.0, "cka": 1.0, "change": 0.0, "weight_change": None},
            {"layer": "block.1", "depth": 1.0, "cka": 0.9, "change": 0.1, "weight_change": None}]
    results = {"model": "m", "model_type": "mamba", "block_type": "ssm", "objective": "clm", "control": "none",
               "tied_embeddings": True, "tied_embeddings_group": "head",
               "param_groups": [{"name": "block.1", "tensors": 1, "elements": 1}, {"name": "head", "tensors": 2, "elements": 2}],
               "layers": rows, "locality_gradient": None, "metrics": {}, "wall_seconds": 1.0,
               "probe": {"texts": 4, "samples": 4, "loss_base": 1.0, "loss_tuned": 1.0, "accuracy_base": None},
               "train": {"steps": 1, "tokens": 1, "seconds": 1.0}}
    out = io.StringIO()
    print_table(results, file=out)
    lines = out.getvalue().splitlines()
    assert next(l for l in lines if l.startswith("embeddings")).endswith("no group")
    assert next(l for l in lines if l.startswith("block.1")).endswith("n/a")
    assert any(l.startswith("tied input/output matrix: in group head") for l in lines)
    assert any(l.startswith("no embeddings group") for l in lines)
