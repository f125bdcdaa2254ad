"""The probe pass (depthfast.probe: measure_probe, weight_changes) and the arithmetic around it: the locality
gradient, results written without NaN, and the objective distance's pretraining head on the shared backbone."""

import json
import math

import pytest
import torch

from depthfast.probe import weight_changes
from depthfast.metrics import locality_gradient
from depthfast.results import atomic_write_json


def test_locality_gradient_by_hand():
    assert locality_gradient([1 / 3, 2 / 3, 1.0], [0.1, 0.2, 0.3]) == pytest.approx(0.3)
    assert locality_gradient([0.25, 0.5, 0.75, 1.0], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(-0.4)
    assert locality_gradient([0.5, 1.0], [0.2, 0.2]) == 0.0  # flat profile
    assert locality_gradient([1.0], [0.3]) is None  # one block: no slope, not NaN
    # OLS against numpy's least squares on an irregular profile
    x, y = [0.2, 0.4, 0.6, 0.8, 1.0], [0.01, 0.05, 0.02, 0.09, 0.2]
    slope = torch.linalg.lstsq(torch.tensor([[xi, 1.0] for xi in x], dtype=torch.float64),
                               torch.tensor(y, dtype=torch.float64).unsqueeze(1)).solution[0, 0]
    assert locality_gradient(x, y) == pytest.approx(float(slope), rel=1e-12)


def test_weight_changes_float64_and_zero_group():
    base = [("a", [torch.ones(3, 4), torch.zeros(2)]), ("zero", [torch.zeros(5)]), ("still", [torch.zeros(5)])]
    tuned = [("a", [torch.ones(3, 4) * 1.5, torch.ones(2)]), ("zero", [torch.ones(5)]), ("still", [torch.zeros(5)])]
    changes = weight_changes(base, tuned)
    assert changes["a"] == pytest.approx(math.sqrt((12 * 0.25 + 2) / 12))
    assert changes["zero"] is None  # moved from W₀ = 0: no relative change, never a 0 that reads "unchanged"
    assert changes["still"] == 0.0  # did not move: 0, whatever ‖W₀‖


def test_json_never_holds_nan(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(str(path), {"slope": float("nan"), "rows": [1.0, float("inf")]})
    assert json.loads(path.read_text()) == {"slope": None, "rows": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def _perturbed_twin(model, seed=1, scale=0.05):
    import copy

    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return twin


PROBE_TEXTS = ["def f(x):\n    return x + 1", "Lists are mutable sequences of items.", "The with statement.",
               "x = [1, 2, 3] and y = {4: 5}", "Exceptions are raised by raise.", "import os, sys"]


def test_mlm_probe_compares_clean_inputs_and_scores_the_masked_copy(monkeypatch):
    """For mlm the activations fed to the CKA accumulator are those of the clean probe texts (a masked
    input would make the two objectives' profiles measure different input distributions); the
    probe loss is the masked-LM loss on the masked copy, which is drawn once from the seed."""
    import tiny_models
    from depthfast.batches import probe_batches, tokenize
    from depthfast.cka import StreamingCKA
    from depthfast.layers import BlockCapture, discover_layers
    from depthfast.probe import measure_probe

    model, tokenizer = tiny_models.build("bert")
    model.eval()
    twin = _perturbed_twin(model).eval()
    fed = []
    real_update = StreamingCKA.update

    def spy(self, base_acts, tuned_acts, mask):
        fed.append(([a.clone() for a in base_acts], [a.clone() for a in tuned_acts], mask.clone()))
        return real_update(self, base_acts, tuned_acts, mask)

    monkeypatch.setattr(StreamingCKA, "update", spy)
    batches = probe_batches("mlm", tokenizer, PROBE_TEXTS, None, 3, 32, 0.3, seed=0)
    again = probe_batches("mlm", tokenizer, PROBE_TEXTS, None, 3, 32, 0.3, seed=0)
    result = measure_probe(model, twin, discover_layers(model), discover_layers(twin), batches,
                           torch.device("cpu"), "token", "exact", progress=False)
    assert len(fed) == 2
    weighted = {"base": [], "tuned": []}
    for i, (base_acts, tuned_acts, mask) in enumerate(fed):
        batch, texts = batches[i], PROBE_TEXTS[3 * i:3 * i + 3]
        clean = tokenize(tokenizer, texts, 32)
        assert torch.equal(mask, clean["attention_mask"])
        for net, acts, key in ((model, base_acts, "base"), (twin, tuned_acts, "tuned")):
            with torch.no_grad(), BlockCapture(discover_layers(net)) as capture:
                net(**clean)
            for got, want in zip(acts, capture.activations):
                assert torch.equal(got, want)
            with torch.no_grad():
                loss = net(input_ids=batch["masked_input_ids"], attention_mask=clean["attention_mask"],
                           labels=batch["labels"]).loss
            weighted[key].append((float(loss), int((batch["labels"] != -100).sum())))
        assert torch.equal(batch["masked_input_ids"], again[i]["masked_input_ids"])  # drawn once from the seed
        changed = batch["masked_input_ids"] != clean["input_ids"]  # only at targets (80 % [MASK], 10 % random)
        assert changed.any() and not (changed & (batch["labels"] == -100)).any()
    for key, got in (("base", result.loss_base), ("tuned", result.loss_tuned)):
        pairs = weighted[key]
        assert got == pytest.approx(sum(v * w for v, w in pairs) / sum(w for _, w in pairs), rel=1e-6)


@pytest.mark.parametrize("family,objective", [("bert", "cls"), ("gpt2", "clm")])
def test_cls_and_clm_probes_are_the_plain_batches(family, objective):
    """cls and clm probes are unchanged: one forward per model on the batch as built, its loss."""
    import tiny_models
    from depthfast.batches import make_batch, probe_batches
    from depthfast.layers import discover_layers
    from depthfast.probe import measure_probe

    model, tokenizer = tiny_models.build(family)
    if objective == "cls":
        from depthfast.models import SequenceClassifier

        torch.manual_seed(0)
        model = SequenceClassifier(model.bert, 2, pooling="mean")
    model.eval()
    twin = _perturbed_twin(model).eval()
    labels = [0, 1, 0, 1, 1, 0] if objective == "cls" else None
    batches = probe_batches(objective, tokenizer, PROBE_TEXTS, labels, 6, 32, 0.15, seed=0)
    plain = make_batch(objective, tokenizer, PROBE_TEXTS, labels, 32, 0.15, torch.Generator())
    assert batches[0].keys() == plain.keys() and all(torch.equal(batches[0][k], plain[k]) for k in plain)
    result = measure_probe(model, twin, discover_layers(model), discover_layers(twin), batches,
                           torch.device("cpu"), "token", "exact", progress=False)
    with torch.no_grad():
        assert result.loss_tuned == pytest.approx(float(twin(**plain).loss), rel=1e-6)


@pytest.mark.parametrize("family,objective", [("bert", "mlm"), ("gpt2", "clm")])
def test_pretraining_head_is_tied_to_the_shared_backbone(tmp_path, family, objective):
    """The distance's pretraining model shares the fine-tuning model's backbone, and a head tied to the
    input embeddings (BERT's decoder, GPT-2's LM head) is tied to *that* backbone's embeddings: its
    loss's gradient on them holds the output term, as in the checkpoint's own tied model."""
    import tiny_models
    from depthfast.batches import make_batch
    from depthfast.objective_distance import pretraining_model
    from depthfast.models import load_model, load_tokenizer

    path = tiny_models.save(family, str(tmp_path / family))
    model, tokenizer = load_model(path, "cls", num_labels=2), load_tokenizer(path, "cls")
    pretrain = pretraining_model(model, path, objective, seed=0)
    embedding = model.backbone.get_input_embeddings().weight
    assert pretrain.get_output_embeddings().weight is embedding
    reference = load_model(path, objective)  # loaded whole: tied by from_pretrained
    assert reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    batch = make_batch(objective, tokenizer, PROBE_TEXTS, None, 32, 0.3, torch.Generator().manual_seed(0))
    pretrain.eval()
    reference.eval()
    (grad,) = torch.autograd.grad(pretrain(**batch).loss, embedding)
    (want,) = torch.autograd.grad(reference(**batch).loss, reference.get_input_embeddings().weight)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)  # fp32, the same computation
