"""The same checks on each of the seven families (issue #12, item 9), tied and untied LM heads alike.

For every family (BERT; GPT-2, OPT, GPT-NeoX, CodeGen, Mamba, RWKV) and both ways its LM head can
relate to its input embedding (tied: the very same matrix; untied: a copy of its own):

a. parameter groups follow roles: every trainable parameter in exactly one group; block ℓ's in
   "block.ℓ"; the input embeddings (token, position, type embeddings, embedding norm, OPT's
   project_in) in "embeddings"; final norm, LM head, pooler, classifier, OPT's project_out in
   "head"; a tied matrix in the group the policy names (default "head"). The expected role of
   each parameter comes from a per-family table of module names below, not from depthfast.layers.
b. the control acts on those roles: the EqualStep of a real run frees exactly the head-role
   parameters, and after each equal-step step every other group with a non-zero update has the
   same ratio ‖ΔW‖/‖W‖ while the head keeps the optimizer's own.
c. CKA sees clean probe inputs: the activations StreamingCKA.update receives are θ₀'s and θ_T's
   on the tokenized probe texts (for mlm, not on the masked copy the probe loss uses).
d. results.json holds the profile rows of layers 0…L and finite numbers wherever a number is
   documented (kernel-target alignment is null outside cls).
e. one in-process CLI run per family × admissible objective × control: exit 0, results.json with
   the family's model type, block type and tie fields.

The 28 runs (plus one with the tied-matrix policy "embeddings" and one with --equal-step-head) are
shared by b–e: each runs once,
with spies on the run's EqualStep, layers, task and StreamingCKA.update.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os

import pytest
import torch

import tiny_models
from depthfast.layers import BlockCapture, discover_layers, prepare_for_measurement
from depthfast.models import SequenceClassifier

L = tiny_models.LAYERS
GROUP_ORDER = ["embeddings"] + [f"block.{i}" for i in range(1, L + 1)] + ["head"]

# family → (block type, prefixes of the input-embedding parameters, prefix of the blocks), names
# relative to the family's base model (the AutoModel: BertModel, GPT2Model, OPTModel …). Anything
# else (final norm, OPT's project_out, pooler, and whatever sits outside the base model: LM head,
# BERT's MLM transform, our classifier) is the head.
ROLES = {
    "bert": ("sequential", ("embeddings.",), "encoder.layer."),
    "gpt2": ("sequential", ("wte.", "wpe."), "h."),
    "opt": ("sequential", ("decoder.embed_tokens.", "decoder.embed_positions.", "decoder.project_in."),
            "decoder.layers."),
    "gpt_neox": ("parallel", ("embed_in.",), "layers."),
    "codegen": ("parallel", ("wte.",), "h."),
    "mamba": ("ssm", ("embeddings.",), "layers."),
    "rwkv": ("rnn", ("embeddings.",), "blocks."),  # block 1 holds RWKV's pre_ln: a block parameter
}
LM_OBJECTIVE = {family: "mlm" if family == "bert" else "clm" for family in tiny_models.FAMILIES}
VARIANTS = [(family, tied) for family in tiny_models.FAMILIES for tied in (True, False)]
VARIANT_IDS = [f"{family}-{'tied' if tied else 'untied'}" for family, tied in VARIANTS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these width-32 models: they gain nothing from two, and on a busy 2-core
    machine two threads spin-wait for each other (a tiny backward measured 0.3–3.5 s with two
    threads under load against 0.013 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Expected roles
# --------------------------------------------------------------------------------------------

def base_model(model):
    return model.backbone if isinstance(model, SequenceClassifier) else model.base_model


def input_embedding(model):
    return base_model(model).get_input_embeddings().weight


def output_projection(model):
    """The LM head's weight (None for our classifier, which has no LM head)."""
    if isinstance(model, SequenceClassifier):
        return None
    return model.get_output_embeddings().weight


def truly_tied(model) -> bool:
    out = output_projection(model)
    return out is not None and out is input_embedding(model)


def expected_roles(model, family: str, policy: str = "head") -> dict[int, tuple[str, str]]:
    """id(parameter) → (its name, the group its role puts it in), over the trainable parameters."""
    _, embedding_prefixes, block_prefix = ROLES[family]
    relative = {id(p): name for name, p in base_model(model).named_parameters()}
    tied = truly_tied(model)
    roles = {}
    for name, p in model.named_parameters():  # a tied matrix once
        if not p.requires_grad:
            continue
        rel = relative.get(id(p))
        if tied and p is input_embedding(model):
            role = policy
        elif rel is None:
            role = "head"
        elif rel.startswith(block_prefix):
            role = f"block.{int(rel[len(block_prefix):].split('.')[0]) + 1}"
        elif rel.startswith(embedding_prefixes):
            role = "embeddings"
        else:
            role = "head"
        roles[id(p)] = (name, role)
    return roles


def check_groups_follow_roles(model, groups, family: str, policy: str = "head") -> None:
    roles = expected_roles(model, family, policy)
    seen = {}
    for name, params in groups:
        for p in params:
            assert id(p) not in seen, f"{roles.get(id(p), ('?',))[0]} is in {seen[id(p)]} and {name}"
            seen[id(p)] = name
    assert set(seen) == set(roles), "the groups do not cover exactly the trainable parameters"
    wrong = [f"{pname}: in {seen[i]}, role {role}" for i, (pname, role) in roles.items() if seen[i] != role]
    assert not wrong, "\n".join(wrong)
    present = {role for _, role in roles.values()}  # a group with no parameter is left out (EqualStep refuses it)
    assert [name for name, _ in groups] == [g for g in GROUP_ORDER if g in present], "groups out of order"


# --------------------------------------------------------------------------------------------
# a. groups by role (in memory: no run needed)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=VARIANTS, ids=VARIANT_IDS)
def lm_model(request):
    """(family, tied, the family's LM (masked for BERT, causal otherwise) with that tie)."""
    family, tied = request.param
    model, _ = tiny_models.build(family, tied=tied)
    prepare_for_measurement(model)
    return family, tied, model


@pytest.fixture(scope="module", params=tiny_models.FAMILIES)
def classifier(request):
    """(family, our SequenceClassifier around the family's base model)."""
    import transformers as T

    family = request.param
    torch.manual_seed(0)
    backbone = T.AutoModel.from_config(tiny_models.CONFIGS[family](tiny_models.VOCAB))
    pooling = "mean" if family == "bert" else "last"
    return family, SequenceClassifier(backbone, 3, pooling=pooling)


def test_tiny_models_tie_by_default():
    """The tie of each tiny model is what TIED_BY_DEFAULT states (``tied=`` either way: test_tied_embeddings_flag)."""
    for family in tiny_models.FAMILIES:
        assert truly_tied(tiny_models.build(family)[0]) is tiny_models.TIED_BY_DEFAULT[family], family


def test_groups_by_role(lm_model):
    family, _, model = lm_model
    layers = discover_layers(model)
    groups = layers.param_groups()
    check_groups_follow_roles(model, groups, family)
    heads = {id(p) for p in dict(groups)["head"]}
    assert id(output_projection(model)) in heads, "the LM head's weight must be in 'head' (default policy)"


def test_tied_embeddings_flag(lm_model):
    _, tied, model = lm_model
    assert truly_tied(model) is tied  # tiny_models.build(tied=…) does tie or untie
    assert discover_layers(model).tied_embeddings is tied


def test_tied_policy_embeddings(lm_model):
    """--tied-embeddings embeddings: a tied matrix counts as an input embedding; untied twins are unaffected."""
    family, tied, model = lm_model
    layers = discover_layers(model)
    groups = layers.param_groups(tied_embeddings="embeddings")
    check_groups_follow_roles(model, groups, family, policy="embeddings")
    embeddings = {id(p) for p in dict(groups)["embeddings"]}
    assert id(input_embedding(model)) in embeddings
    assert (id(output_projection(model)) in embeddings) is tied
    if not tied:
        assert [(n, [id(p) for p in ps]) for n, ps in groups] == \
            [(n, [id(p) for p in ps]) for n, ps in layers.param_groups(tied_embeddings="head")]


def test_classifier_groups_by_role(classifier):
    family, model = classifier
    layers = discover_layers(model)
    check_groups_follow_roles(model, layers.param_groups(), family)
    heads = {id(p) for p in dict(layers.param_groups())["head"]}
    assert {id(model.classifier.weight), id(model.classifier.bias)} <= heads


def test_classifier_is_never_tied(classifier):
    _, model = classifier
    assert discover_layers(model).tied_embeddings is False  # no LM head at all


# --------------------------------------------------------------------------------------------
# The runs: every family × admissible objective × control, once each, spied on
# --------------------------------------------------------------------------------------------

# Every control runs both twins: cls none on the tied twin, cls equal-step on the untied one, and
# the LM objective the other way round (the tied matrix is the LM head there).
RUNS = [(family, objective, control, tied)
        for family in tiny_models.FAMILIES
        for objective in ("cls", LM_OBJECTIVE[family])
        for control, tied in ((("none", True), ("equal-step", False)) if objective == "cls"
                              else (("none", False), ("equal-step", True)))]
RUN_IDS = [f"{f}-{o}-{c}-{'tied' if t else 'untied'}" for f, o, c, t in RUNS]
POLICY_RUN = ("mamba", "clm", "equal-step", True, "embeddings")  # Mamba's tied matrix is its only embedding

MAX_LENGTH, PROBE_BATCH = 32, 4
FAST = ["--steps", "2", "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--probe-size", "8",
        "--min-probe-size", "4", "--probe-batch-size", str(PROBE_BATCH), "--warmup-steps", "1", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(family, tied) → directory of a tiny saved checkpoint, created on first use."""
    root = tmp_path_factory.mktemp("family_checkpoints")
    made = {}

    def get(family, tied):
        if (family, tied) not in made:
            made[family, tied] = tiny_models.save(family, str(root / f"{family}-{tied}"), tied=tied)
        return made[family, tied]

    return get


class Record:
    """What one run did: exit code, results, train log, and what the spies saw."""

    def __init__(self, rc, out, model_path, objective, policy):
        self.rc, self.out, self.model_path, self.objective, self.policy = rc, out, model_path, objective, policy
        self.results = self.train_log = None
        if os.path.exists(os.path.join(out, "results.json")):
            with open(os.path.join(out, "results.json")) as f:
                self.results = json.load(f)
            with open(os.path.join(out, "train_log.csv")) as f:
                self.train_log = list(csv.DictReader(f))
        self.layers = []  # every ModelLayers the run discovered (trained_model picks the trained one)
        self.controls = []  # the EqualStep instances the run built
        self.steps = []  # (ratios_before, ratios_after, scales, target ratio) after each control step
        self.tasks = []
        self.updates = []  # (base activations, tuned activations, attention mask) per StreamingCKA.update


@pytest.fixture(scope="module")
def run_once(checkpoint, tmp_path_factory):
    """(family, objective, control, tied[, policy, equal_step_head]) → the Record of that CLI run (run on first use)."""
    import depthfast.cka
    import depthfast.data
    import depthfast.layers
    import depthfast.optim
    import depthfast.train
    from depthfast.run import main

    root = tmp_path_factory.mktemp("family_runs")
    records = {}

    def get(family, objective, control, tied, policy=None, equal_step_head=False):
        key = (family, objective, control, tied, policy, equal_step_head)
        if key in records:
            return records[key]
        spied = Record(0, "", "", objective, policy or "head")  # filled by the spies, then copied over
        original_discover = depthfast.layers.discover_layers
        original_load_task = depthfast.data.load_task
        original_update = depthfast.cka.StreamingCKA.update
        update_signature = inspect.signature(original_update)

        class SpyEqualStep(depthfast.optim.EqualStep):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                spied.controls.append(self)

            def step(self, *args, **kwargs):
                loss = super().step(*args, **kwargs)
                spied.steps.append((self.ratios_before.detach().cpu().clone(),
                                    self.ratios_after.detach().cpu().clone(),
                                    self.scales.detach().cpu().clone(), self.target_ratio))
                return loss

        def discover(*args, **kwargs):
            layers = original_discover(*args, **kwargs)
            spied.layers.append(layers)
            return layers

        def load_task(*args, **kwargs):
            task = original_load_task(*args, **kwargs)
            spied.tasks.append(task)
            return task

        def update(self, *args, **kwargs):
            bound = update_signature.bind(self, *args, **kwargs).arguments
            base, tuned = list(bound["base_acts"]), list(bound["tuned_acts"])
            spied.updates.append(([a.detach().cpu().clone() for a in base], [a.detach().cpu().clone() for a in tuned],
                                  None if bound.get("attention_mask") is None else bound["attention_mask"].cpu()))
            return original_update(self, *args, **kwargs)

        out = str(root / "-".join(str(k) for k in key))
        path = checkpoint(family, tied)
        argv = ["--model", path, "--objective", objective, "--control", control, "--out", out, *FAST]
        if policy is not None:
            argv += ["--tied-embeddings", policy]
        if equal_step_head:
            argv += ["--equal-step-head"]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(depthfast.optim, "EqualStep", SpyEqualStep)
            mp.setattr(depthfast.train, "EqualStep", SpyEqualStep, raising=False)
            mp.setattr(depthfast.layers, "discover_layers", discover)
            mp.setattr(depthfast.data, "load_task", load_task)
            mp.setattr(depthfast.cka.StreamingCKA, "update", update)
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse: an unknown flag
                rc = exc.code
        record = Record(rc, out, path, objective, policy or "head")
        for name in ("layers", "controls", "steps", "tasks", "updates"):
            setattr(record, name, getattr(spied, name))
        records[key] = record
        return record

    return get


@pytest.fixture(params=RUNS, ids=RUN_IDS)
def run(request, run_once):
    family, objective, control, tied = request.param
    record = run_once(family, objective, control, tied)
    assert record.rc == 0 and record.results is not None, f"the run failed (exit {record.rc})"
    return family, objective, control, tied, record


# --------------------------------------------------------------------------------------------
# e. one CLI run each
# --------------------------------------------------------------------------------------------

def test_cli_run(run):
    family, objective, control, _, record = run
    results = record.results
    assert (results["model_type"], results["block_type"]) == (family, ROLES[family][0])
    assert results["architecture"] == ("encoder" if family == "bert" else "decoder")
    assert (results["num_blocks"], results["objective"], results["control"]) == (L, objective, control)
    assert len(record.train_log) == 2


def test_cli_run_reports_tie(run):
    """results.json states whether the run's model was tied (our classifier never is) and where the tied matrix went."""
    _, objective, _, tied, record = run
    truth = truly_tied(trained_model(record))
    assert truth is (tied and objective != "cls")  # the saved tie survived loading by path
    assert record.results["tied_embeddings"] is truth
    assert record.results["tied_embeddings_group"] == ("head" if truth else None)


# --------------------------------------------------------------------------------------------
# b. the control acts on the same roles
# --------------------------------------------------------------------------------------------

def trained_model(record):
    """The model the run trained: the one whose parameters its EqualStep steps."""
    (control,) = record.controls
    first = control.groups[0][0]
    (layers,) = [lay for lay in record.layers if any(p is first for p in lay.model.parameters())]
    return layers.model


def check_free_set_is_head_role(family, record):
    (control,) = record.controls
    model = trained_model(record)
    roles = expected_roles(model, family, record.policy)
    free = {id(p) for i in control.free for p in control.groups[i]}
    head_role = {i for i, (_, role) in roles.items() if role == "head"}
    assert free == head_role, (sorted(roles[i][0] for i in free ^ head_role), "differ between free and head")
    assert {id(p) for g in control.groups for p in g} == set(roles)


def test_control_frees_exactly_the_head_role(run):
    family, _, _, _, record = run
    check_free_set_is_head_role(family, record)


def check_step_ratios(record, control_name):
    """After each step: the head's ratio as the optimizer made it; under equal-step, every other group
    that moved at the same ratio.

    Two checks of "the same": the control's own decision, s_g · r_g = r* in float64 (rtol 1e-9), and
    the ratios measured on the stored fp32 weights afterwards. Rounding each weight to fp32 moves it
    by ≤ 2⁻²⁴|w|, so ‖ΔW‖ by ≤ 2⁻²⁴‖W‖ and r_g by ≤ 2⁻²⁴ absolutely: relative to r* ≈ 5e-4 that is
    up to ~2e-4 at both ends (observed up to ~1e-5 on these models, so rtol 1e-6 does not hold).
    AdamW's first steps move same-shaped blocks almost equally (each element by ≈ lr), so the
    optimizer's own spread may be below that bound: the float64 decision is the sharp check.
    """
    (control,) = record.controls
    assert len(record.steps) == 2
    free = set(control.free)
    for before, after, scales, target in record.steps:
        for g in free:  # the head keeps the optimizer's own step
            assert scales[g].item() == 1.0
            assert after[g].item() == pytest.approx(before[g].item(), rel=1e-12)
        if control_name == "none":
            assert torch.equal(before, after)
            continue
        moved = [g for g in range(len(control.groups)) if g not in free and before[g] > 0]
        assert len(moved) >= L  # at least every block
        decided = [(scales[g] * before[g]).item() for g in moved]
        assert decided == pytest.approx([target] * len(moved), rel=1e-9)
        measured = [after[g].item() for g in moved]
        rounding = 2.0 * 2.0 ** -24 / min(measured)  # both ends' worst case, relative
        assert max(measured) / min(measured) - 1 <= rounding, measured
        own = [before[g].item() for g in moved]
        assert max(own) / min(own) - 1 > 1e-6, own  # the optimizer alone moved them unequally
    # The train log holds the same numbers under the groups' names.
    for row, (_, after, _, _) in zip(record.train_log, record.steps):
        logged = [float(v) for k, v in row.items() if k.startswith("ratio_after:")]
        assert logged == pytest.approx(after.tolist(), rel=1e-12)


def test_control_equalizes_the_other_groups(run):
    _, _, control, _, record = run
    check_step_ratios(record, control)


def test_tied_policy_embeddings_run(run_once):
    """--tied-embeddings embeddings: the tied matrix is equalized with the layers, reported as such."""
    family, objective, control, tied, policy = POLICY_RUN
    record = run_once(*POLICY_RUN)
    assert record.rc == 0 and record.results is not None
    assert record.results["tied_embeddings"] is True
    assert record.results["tied_embeddings_group"] == "embeddings"
    check_free_set_is_head_role(family, record)
    (control_step,) = record.controls
    tied_matrix = input_embedding(trained_model(record))
    (index,) = [i for i, g in enumerate(control_step.groups) if any(p is tied_matrix for p in g)]
    assert index not in control_step.free
    check_step_ratios(record, control)
    assert "embeddings" in record.results["group_weight_change"]


def test_equal_step_head_frees_nothing(run_once):
    """--equal-step-head: no group is free, and the head (here holding GPT-2's tied matrix) is equalized too."""
    record = run_once("gpt2", "clm", "equal-step", True, equal_step_head=True)
    assert record.rc == 0 and record.results is not None
    (control,) = record.controls
    assert control.free == ()
    check_step_ratios(record, "equal-step")
    roles = expected_roles(trained_model(record), "gpt2")
    (head,) = [i for i, g in enumerate(control.groups) if all(roles[id(p)][1] == "head" for p in g)]
    for before, after, scales, target in record.steps:
        assert scales[head].item() != 1.0 and (scales[head] * before[head]).item() == pytest.approx(target, rel=1e-9)


# --------------------------------------------------------------------------------------------
# c. clean probe inputs
# --------------------------------------------------------------------------------------------

def real_tokens(activations, mask):
    """Per layer, the rows of the real (non-padding) tokens of a batch: (tokens, d)."""
    if mask is None or activations[0].dim() == 2:
        return list(activations)
    keep = mask.bool()
    return [a[keep] for a in activations]


@torch.no_grad()
def clean_activations(model, tokenizer, texts, max_length, batch_size):
    """The layer activations (real tokens of every probe text, in order) of ``model`` on the tokenized texts."""
    layers = discover_layers(model)
    model.eval()
    per_layer = [[] for _ in range(layers.num_blocks + 1)]
    with BlockCapture(layers) as capture:
        for begin in range(0, len(texts), batch_size):
            enc = tokenizer(texts[begin:begin + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            for i, rows in enumerate(real_tokens(capture.activations, enc["attention_mask"])):
                per_layer[i].append(rows)
    return [torch.cat(rows) for rows in per_layer]


def test_cka_sees_clean_probe_inputs(run):
    from depthfast.models import load_model, load_tokenizer

    family, objective, _, _, record = run
    (task,) = record.tasks
    assert record.updates, "StreamingCKA.update was never called"
    seen = {"base": [[] for _ in range(L + 1)], "tuned": [[] for _ in range(L + 1)]}
    for base, tuned, mask in record.updates:
        for key, acts in (("base", base), ("tuned", tuned)):
            for i, rows in enumerate(real_tokens(acts, mask)):
                seen[key][i].append(rows)
    tokenizer = load_tokenizer(record.model_path, objective)
    theta0 = load_model(record.model_path, objective, num_labels=task.num_labels)
    prepare_for_measurement(theta0)
    expected = {"base": clean_activations(theta0, tokenizer, task.probe_texts, MAX_LENGTH, PROBE_BATCH),
                "tuned": clean_activations(trained_model(record), tokenizer, task.probe_texts, MAX_LENGTH, PROBE_BATCH)}
    for key in ("base", "tuned"):
        for i in range(L + 1):
            got = torch.cat(seen[key][i])
            assert got.shape == expected[key][i].shape, (key, i)
            torch.testing.assert_close(got.double(), expected[key][i].double(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{key} layer {i}: {m}")


# --------------------------------------------------------------------------------------------
# d. metrics present and finite
# --------------------------------------------------------------------------------------------

# Documented in depthfast.metrics.profile_metrics and depthfast.run.run_metrics; on these runs
# every one is a finite number except kernel_target_alignment, which is cls-only (null otherwise).
METRICS = ["num_blocks", "mean_change", "max_change", "peak_depth", "locality_gradient",
           "relative_locality_gradient", "steepness", "top_mean_change", "bottom_mean_change", "quarter_blocks",
           "width_blocks", "width_fraction", "depth_centroid", "depth_spread", "slope_per_text", "slope_ci_low",
           "slope_ci_high", "slope_ci_std", "slope_ci_confidence", "slope_ci_texts", "slope_ci_resamples",
           "initial_loss_normalized", "gradient_alignment_distance", "kernel_target_alignment"]


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_metrics_present_and_finite(run):
    _, objective, _, _, record = run
    results = record.results
    rows = results["layers"]
    assert [r["layer"] for r in rows] == GROUP_ORDER[:-1]
    assert [r["depth"] for r in rows] == pytest.approx([i / L for i in range(L + 1)])
    for row in rows:
        assert finite(row["cka"]) and finite(row["change"]), row
        assert row["change"] == pytest.approx(1.0 - row["cka"], abs=1e-12)
        # CKA ≤ 1 exactly, but the compiled engine may pass it by roundoff (seen: 1 + 3.8e-8 on a
        # near-unchanged embedding layer); 1e-5 is its documented tolerance to the float64 reference.
        assert -1e-5 <= row["change"] <= 1.0 + 1e-5
        group_change = results["group_weight_change"].get(row["layer"])
        assert row["weight_change"] == group_change  # null only where the layer has no group (a tied head's embeddings)
        assert group_change is None or (finite(group_change) and group_change > 0)
    assert all(finite(v) and v > 0 for v in results["group_weight_change"].values())
    assert finite(results["locality_gradient"])
    metrics = results["metrics"]
    missing = [k for k in METRICS if k not in metrics]
    assert not missing, f"metrics lack {missing}"
    for key in METRICS:
        if key == "kernel_target_alignment" and objective != "cls":
            assert metrics[key] is None
        else:
            assert finite(metrics[key]), (key, metrics[key])
    assert metrics["locality_gradient"] == pytest.approx(results["locality_gradient"])
    assert metrics["num_blocks"] == L
    probe, train = results["probe"], results["train"]
    assert all(finite(probe[k]) for k in ("loss_base", "loss_tuned"))
    assert all(finite(train[k]) for k in ("first_loss", "final_loss"))
    accuracies = (probe["accuracy_base"], probe["accuracy_tuned"])
    if objective == "cls":
        assert all(finite(a) and 0 <= a <= 1 for a in accuracies)
    else:
        assert accuracies == (None, None)
