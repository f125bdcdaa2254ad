"""depthfast compare: the profile between two checkpoints, on the shipped MiniLM and tiny saved models.

Everything loads through the real from_pretrained path: local directories, a Hugging Face cache
(HF_HOME, offline) for hub ids, and PEFT for LoRA adapters.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import tiny_models
from depthfast.compare import CompareConfig, compare, main
from depthfast.errors import DepthfastError
from depthfast.run import main as run_main

PROBE = dict(probe_size=24, probe_batch_size=12, max_length=32)
PROBE_FLAGS = ["--probe-size", "24", "--probe-batch-size", "12", "--max-length", "32", "--quiet"]
RUN_FLAGS = ["--steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--no-objective-distance", *PROBE_FLAGS]


def read(out, name="results.json"):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name → directory: tiny GPT-2 and BERT checkpoints, and a 3-step GPT-2 clm run saved with --save-model."""
    root = tmp_path_factory.mktemp("compare_models")
    made = {"gpt2": tiny_models.save("gpt2", str(root / "gpt2")), "bert": tiny_models.save("bert", str(root / "bert"))}
    run_out = str(root / "run")
    assert run_main(["--model", made["gpt2"], "--objective", "clm", "--save-model", "--out", run_out, *RUN_FLAGS]) == 0
    made["run"], made["tuned"] = run_out, os.path.join(run_out, "model")
    return made


def test_minilm_against_itself_is_exactly_zero(tmp_path):
    """The shipped all-MiniLM-L6-v2 against itself: change and weight change exactly 0 on every layer.

    Exact, not approximately: both forwards run the same weights on the same inputs with the same CPU
    kernels, so X == Y bit for bit; the CPU engine's Syx then has the bits of Sxx and Syy (at d = 384 one
    fp32 product each; measured exact too at d = 2048 and 4096, where Sxx and Syy are upper blocks of 512,
    and for the unbiased estimator), so CKA = ‖YcᵀXc‖²/(‖XcᵀXc‖·‖YcᵀYc‖) = a²/(a·a) = 1 in floating
    point (a² and a·a round alike). Not checked on a GPU, where cuBLAS could sum the blocks in another order."""
    out = str(tmp_path / "self")
    path = str(tiny_models.minilm_path())
    results = compare(CompareConfig(base=path, tuned=path, out=out, **PROBE), progress=False)
    assert results == read(out)
    assert results["source"] == "compare" and results["objective"] == "none"  # MiniLM ships no MLM head
    assert [r["change"] for r in results["layers"]] == [0.0] * 7
    assert [r["cka"] for r in results["layers"]] == [1.0] * 7
    assert [r["weight_change"] for r in results["layers"]] == [0.0] * 7
    assert results["locality_gradient"] == 0.0 and results["weight_change_measured"] is True
    assert results["train"] is None and results["control"] is None and results["trajectory"] is None
    assert results["probe"]["texts"] == 24 and results["probe"]["loss_base"] is None  # none scores no loss
    assert {"config.json", "results.json", "profile.csv", "profile.png"} == set(os.listdir(out))
    assert CompareConfig.from_dict(read(out, "config.json")) == CompareConfig(base=path, tuned=path, out=out,
                                                                             objective="none", **PROBE)


def test_compare_against_a_run_gives_its_profile(models, tmp_path):
    """A run saved with --save-model, compared against its base: the run's numbers, on the run's probe."""
    out = str(tmp_path / "cmp")
    assert main([models["gpt2"], models["tuned"], "--out", out, *PROBE_FLAGS]) == 0
    ran, got = read(models["run"]), read(out)
    assert got["objective"] == "clm"  # auto: a decoder is scored with its own LM head
    for key in ("cka", "change", "weight_change"):
        assert [r[key] for r in got["layers"]] == [r[key] for r in ran["layers"]], key
    assert all(r["change"] > 0 for r in got["layers"][1:])  # a real change: the equality could fail
    assert got["locality_gradient"] == ran["locality_gradient"]
    assert got["group_weight_change"] == ran["group_weight_change"]
    assert got["probe"] == ran["probe"]
    for key in ("slope_per_text", "steepness", "width_fraction", "initial_loss_normalized"):
        assert got["metrics"][key] == ran["metrics"][key], key
    assert (got["tied_embeddings"], got["param_groups"]) == (ran["tied_embeddings"], ran["param_groups"])


def _to_hub_cache(hf_home, repo_id: str, directory: str) -> None:
    """Place a saved checkpoint in the Hugging Face cache layout (refs/main → snapshots/<commit>/files)."""
    commit = "0123456789abcdef0123456789abcdef%08x" % (abs(hash(repo_id)) % 2**32)
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(directory, os.path.join(repo, "snapshots", commit))


def test_hub_ids_resolve_through_the_cache(models, tmp_path):
    """BASE and TUNED as hub ids "org/name", offline, from a Hugging Face cache under HF_HOME: the same
    profile as the same checkpoints by path (a fresh process, so huggingface_hub reads this HF_HOME)."""
    hf_home = str(tmp_path / "hf")
    _to_hub_cache(hf_home, "depthfast-test/tiny-gpt2", models["gpt2"])
    _to_hub_cache(hf_home, "depthfast-test/tiny-gpt2-tuned", models["tuned"])
    out = str(tmp_path / "hub")
    env = {**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "depthfast.cli", "compare", "depthfast-test/tiny-gpt2",
                           "depthfast-test/tiny-gpt2-tuned", "--out", out, *PROBE_FLAGS],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, ran = read(out), read(models["run"])
    assert (got["base_model"], got["tuned_model"]) == ("depthfast-test/tiny-gpt2", "depthfast-test/tiny-gpt2-tuned")
    assert [r["cka"] for r in got["layers"]] == [r["cka"] for r in ran["layers"]]
    assert [r["weight_change"] for r in got["layers"]] == [r["weight_change"] for r in ran["layers"]]


def _lora(model, seed: int):
    import peft

    torch.manual_seed(seed)  # init_lora_weights=False: A and B random, so the adapter changes the model
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                      init_lora_weights=False))


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """A LoRA adapter on the tiny GPT-2 (made on its LM class), the same adapter made on the bare
    backbone (GPT2Model: other module names), and the merged model saved as a checkpoint."""
    import transformers as T

    root = tmp_path_factory.mktemp("adapters")
    lm = _lora(T.AutoModelForCausalLM.from_pretrained(models["gpt2"]), seed=5)
    lm.save_pretrained(str(root / "lm"))
    bare = _lora(T.AutoModel.from_pretrained(models["gpt2"]), seed=5)
    bare.save_pretrained(str(root / "bare"))
    merged = lm.merge_and_unload()
    merged.save_pretrained(str(root / "merged"))
    T.AutoTokenizer.from_pretrained(models["gpt2"]).save_pretrained(str(root / "merged"))
    return {"lm": str(root / "lm"), "bare": str(root / "bare"), "merged": str(root / "merged")}


@pytest.mark.parametrize("made_on", ["lm", "bare"])
def test_lora_adapter_equals_its_merged_checkpoint(models, adapters, tmp_path, made_on):
    got = compare(CompareConfig(base=models["gpt2"], tuned=adapters[made_on], out=str(tmp_path / "a"), **PROBE),
                  progress=False)
    want = compare(CompareConfig(base=models["gpt2"], tuned=adapters["merged"], out=str(tmp_path / "m"), **PROBE),
                   progress=False)
    assert got["tuned_kind"] == "peft adapter, merged" and got["adapter"]["peft_type"] == "LORA"
    for key in ("cka", "weight_change"):
        assert [r[key] for r in got["layers"]] == [r[key] for r in want["layers"]], key
    assert got["probe"] == want["probe"]
    weights = {r["layer"]: r["weight_change"] for r in got["layers"]}
    assert weights["embeddings"] == 0.0 and all(weights[f"block.{i}"] > 0 for i in (1, 2, 3))  # LoRA on c_attn only


def test_report_aggregates_compares_with_runs(models, tmp_path):
    from depthfast.report import collect, report, seed_groups, table

    root = tmp_path / "study"
    shutil.copytree(models["run"], root / "run", ignore=shutil.ignore_patterns("model"))
    assert main([models["gpt2"], models["tuned"], "--out", str(root / "compare"), *PROBE_FLAGS]) == 0
    records = collect(str(root))
    assert [r.status for r in records] == ["ok", "ok"]
    header, rows = table(records)
    by_run = {row["run"]: row for row in rows}
    assert (by_run["compare"]["source"], by_run["run"]["source"]) == ("compare", "run")
    assert by_run["compare"]["tuned"] == models["tuned"] and by_run["compare"]["control"] == "compare"
    assert by_run["compare"]["steps"] is None  # no RunConfig default is filled in for a compare
    assert by_run["compare"]["locality_gradient"] == by_run["run"]["locality_gradient"]
    assert len(seed_groups(records)) == 2  # a compare never pools with a run
    assert report(str(root), echo=lambda *a: None) == 0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("depthfast: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, models):
    """A 2-block GPT-2, a LoRA adapter made for a wider GPT-2 but naming the tiny one as its base."""
    import transformers as T

    root = tmp_path_factory.mktemp("odd")
    model, tokenizer = tiny_models.build("gpt2")
    shallow = T.GPT2LMHeadModel(T.GPT2Config(**{**model.config.to_dict(), "n_layer": 2}))
    shallow.save_pretrained(str(root / "shallow"))
    tokenizer.save_pretrained(str(root / "shallow"))
    wide = T.GPT2LMHeadModel(T.GPT2Config(**{**model.config.to_dict(), "n_embd": 48}))
    _lora(wide, seed=1).save_pretrained(str(root / "wide_adapter"))
    config_path = root / "wide_adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = models["gpt2"]  # claims the tiny GPT-2: only the shapes tell
    config_path.write_text(json.dumps(config))
    other = _lora(T.AutoModelForCausalLM.from_pretrained(models["gpt2"]), seed=2)
    other.peft_config["default"].base_model_name_or_path = "someone/else"
    other.save_pretrained(str(root / "other_adapter"))
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": f"training sentence {i}"}) for i in range(40)))
    (data / "validation.jsonl").write_text("\n".join(json.dumps({"text": "\x01" * (i + 1)}) for i in range(20)))
    return {"shallow": str(root / "shallow"), "wide_adapter": str(root / "wide_adapter"),
            "other_adapter": str(root / "other_adapter"), "control_chars": str(data)}


BAD = [
    ("gpt2", "bert", [], "is a 'gpt2' model and TUNED"),
    ("gpt2", "shallow", [], "has 3 blocks and TUNED"),
    ("gpt2", "wide_adapter", [], "does not fit the base model"),
    ("gpt2", "other_adapter", [], "was made on 'someone/else'"),
    ("gpt2", "/no/such/checkpoint", [], "does not exist"),
    ("gpt2", "gpt2", ["--objective", "mlm"], "objective 'mlm' needs a bidirectional encoder"),
    ("gpt2", "gpt2", ["--objective", "cls"], "objective 'cls' needs a trained classification head"),
    ("minilm", "minilm", ["--objective", "mlm"], "scores the checkpoints' own LM heads, and BASE"),
    ("minilm", "minilm", ["--dataset", "control_chars"], "probe texts are empty after tokenization"),
    ("minilm", "minilm", ["--probe-size", "500", "--min-probe-size", "400"], "probe set too small"),
]


@pytest.mark.parametrize("base,tuned,extra,message", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_input_is_one_line_and_out_untouched(models, odd_models, tmp_path, capsys, base, tuned, extra, message):
    names = {**models, **odd_models, "minilm": str(tiny_models.minilm_path())}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier\n")
    extra = [names.get(a, a) for a in extra]
    capsys.readouterr()
    assert main([names.get(base, base), names.get(tuned, tuned), "--out", str(out), *PROBE_FLAGS, *extra]) == 2
    assert message in _error_line(capsys)
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier\n"


def test_missing_peft_is_one_line(models, adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, as when not installed
    assert main([models["gpt2"], adapters["lm"], "--out", str(tmp_path / "out"), *PROBE_FLAGS]) == 2
    assert "pip install peft" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_out_holding_a_run_is_refused(models, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(models["run"], out, ignore=shutil.ignore_patterns("model"))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert main([models["gpt2"], models["tuned"], "--out", str(out), *PROBE_FLAGS]) == 2
    assert "already holds results that are not a compare's" in _error_line(capsys)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_config_unknown_key_and_offload(models, tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"probe_size": 24, "steps": 3}))
    assert main([models["gpt2"], models["tuned"], "--config", str(path)]) == 2
    assert "unknown compare config key(s): steps" in _error_line(capsys)
    with pytest.raises(DepthfastError, match="offload must be one of"):
        CompareConfig(tuned="x", offload="both").validate()


@pytest.fixture(scope="module")
def perturbed(models, tmp_path_factory):
    """Tiny BERT (with its MLM head) with block 2's weights moved, and tiny GPT-2 with a resized vocabulary."""
    import transformers as T

    root = tmp_path_factory.mktemp("perturbed")
    bert = T.AutoModelForMaskedLM.from_pretrained(models["bert"])
    with torch.no_grad():
        for p in bert.bert.encoder.layer[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    bert.save_pretrained(str(root / "bert"))
    T.AutoTokenizer.from_pretrained(models["bert"]).save_pretrained(str(root / "bert"))
    gpt2 = T.AutoModelForCausalLM.from_pretrained(models["gpt2"])
    gpt2.resize_token_embeddings(gpt2.config.vocab_size + 8)
    gpt2.save_pretrained(str(root / "gpt2_vocab"))
    T.AutoTokenizer.from_pretrained(models["gpt2"]).save_pretrained(str(root / "gpt2_vocab"))
    return {"bert": str(root / "bert"), "gpt2_vocab": str(root / "gpt2_vocab")}


def test_mlm_profile_is_local_and_offload_changes_nothing(models, perturbed, tmp_path):
    """Only block 2 moved: the layers below it are bit-identical (change exactly 0), block 2 and above
    change; the same numbers with either model kept in host memory (accelerate's offload hooks)."""
    runs = {}
    for offload in ("none", "base", "tuned"):
        runs[offload] = compare(CompareConfig(base=models["bert"], tuned=perturbed["bert"], offload=offload,
                                              out=str(tmp_path / offload), **PROBE), progress=False)
    got = runs["none"]
    assert got["objective"] == "mlm" and got["probe"]["loss_base"] != got["probe"]["loss_tuned"]
    changes = {r["layer"]: r["change"] for r in got["layers"]}
    weights = {r["layer"]: r["weight_change"] for r in got["layers"]}
    assert changes["embeddings"] == changes["block.1"] == 0.0 and changes["block.2"] > 0 and changes["block.3"] > 0
    assert weights["block.2"] > 0 and all(weights[k] == 0.0 for k in ("embeddings", "block.1", "block.3"))
    for offload in ("base", "tuned"):
        for key in ("cka", "weight_change"):
            assert [r[key] for r in runs[offload]["layers"]] == [r[key] for r in got["layers"]], (offload, key)
        assert runs[offload]["probe"] == got["probe"]


def test_other_shapes_give_representational_change_only(models, perturbed, tmp_path, capsys):
    """A resized vocabulary: same family and depth, parameters of other shapes: no weight change, said once."""
    out = str(tmp_path / "vocab")
    capsys.readouterr()
    assert main([models["gpt2"], perturbed["gpt2_vocab"], "--out", out, *PROBE_FLAGS]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "weight change not measured" in line]
    assert len(notes) == 1 and "transformer.wte.weight" in notes[0]
    got = read(out)
    assert got["weight_change_measured"] is False and got["group_weight_change"] is None
    assert "weight change not measured" in got["weight_change_note"]
    assert all(r["weight_change"] is None for r in got["layers"])
    assert [r["change"] for r in got["layers"]] == [0.0] * 4  # the probe never reaches the 8 new tokens


def test_cls_run_saves_its_backbone_and_compare_gives_its_block_profile(models, tmp_path):
    """--save-model under cls saves the backbone (the fresh classifier head has no from_pretrained class):
    compare (auto → none: the saved backbone has no MLM head) gives the run's 1 − CKA and the weight change
    of every group the backbone has. A dataset with a validation split, so that the run's stratified
    probe and compare's unlabelled one are the same texts."""
    from pydoc_data.topics import topics

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": p.strip(), "label": name} for name in ("compound", "specialnames")
            for p in topics[name].split("\n\n") if len(p.strip()) >= 80]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::2]))
    (data / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[1::2]))
    run_out = str(tmp_path / "run")
    assert run_main(["--model", models["bert"], "--objective", "cls", "--dataset", str(data), "--save-model",
                     "--out", run_out, *RUN_FLAGS]) == 0
    out = str(tmp_path / "cmp")
    assert main([models["bert"], os.path.join(run_out, "model"), "--dataset", str(data), "--out", out,
                 *PROBE_FLAGS]) == 0
    ran, got = read(run_out), read(out)
    assert got["objective"] == "none"
    assert [r["cka"] for r in got["layers"]] == [r["cka"] for r in ran["layers"]]
    assert all(r["change"] > 0 for r in got["layers"][1:])
    assert [r["weight_change"] for r in got["layers"]] == [r["weight_change"] for r in ran["layers"]]
    assert "head" in ran["group_weight_change"] and "head" not in got["group_weight_change"]  # classifier, pooler


def test_all_pairs_of_a_compare(models, perturbed, tmp_path):
    """--all-pairs on a compare: all_pairs.csv holds every (BASE layer, TUNED layer) CKA; its diagonal
    is the profile under --estimator unbiased (same batches, same estimator); the layers below the
    perturbed block 2 are bit-identical, so their diagonal cells are 1; results.json names the files."""
    import csv

    out = str(tmp_path / "pairs")
    got = compare(CompareConfig(base=models["bert"], tuned=perturbed["bert"], estimator="unbiased", all_pairs=True,
                                out=out, **PROBE), progress=False)
    with open(os.path.join(out, "all_pairs.csv")) as f:
        rows = list(csv.reader(f))
    names = [r["layer"] for r in got["layers"]]
    assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names
    matrix = [[float(v) for v in r[1:]] for r in rows[1:]]
    diagonal = [matrix[i][i] for i in range(len(names))]
    assert diagonal == pytest.approx([r["cka"] for r in got["layers"]], abs=2e-5)  # compiled engine vs float64 pairs
    assert diagonal[0] == pytest.approx(1.0, abs=1e-12) and diagonal[1] == pytest.approx(1.0, abs=1e-12)
    assert diagonal[2] < 1.0 - 1e-6
    assert got["all_pairs"]["csv"] == "all_pairs.csv" and got["all_pairs"]["diagonal_is_profile"] is True
    assert os.path.getsize(os.path.join(out, "all_pairs.png")) > 0
    assert read(out)["all_pairs"] == got["all_pairs"]
