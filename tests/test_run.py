"""The runner end to end on tiny models saved to disk and loaded back by path, and its bad inputs."""

import copy
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_models
from depthfast.config import RunConfig
from depthfast.errors import DepthfastError
from depthfast.run import main

FAST = ["--steps", "3", "--batch-size", "8", "--max-length", "32", "--probe-size", "24", "--probe-batch-size", "12",
        "--warmup-steps", "1", "--quiet"]


def read_results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def read_log(out):
    with open(os.path.join(out, "train_log.csv")) as f:
        return list(csv.reader(f))


ADMISSIBLE = [("bert", "cls"), ("bert", "mlm")] + [
    (family, objective) for family in tiny_models.FAMILIES if family != "bert" for objective in ("cls", "clm")]


@pytest.mark.parametrize("family,objective", ADMISSIBLE)
@pytest.mark.slow
def test_end_to_end_on_saved_tiny_model(checkpoints, tmp_path, family, objective):
    out = str(tmp_path / "run")
    assert main(["--model", checkpoints(family), "--objective", objective, "--out", out, *FAST]) == 0
    results = read_results(out)
    assert {"config.json", "results.json", "profile.csv", "profile.png", "train_log.csv"} <= set(os.listdir(out))
    assert results["num_blocks"] == tiny_models.LAYERS
    assert [r["layer"] for r in results["layers"]] == ["embeddings", "block.1", "block.2", "block.3"]
    tied = objective != "cls" and family in ("bert", "gpt2", "opt", "mamba")  # LM head is the token embedding
    assert (results["tied_embeddings"], results["tied_embeddings_group"]) == (tied, "head" if tied else None)
    groups = [g["name"] for g in results["param_groups"]]
    for row in results["layers"]:
        assert 0.0 <= row["cka"] <= 1.0 + 1e-9 and row["change"] == pytest.approx(1.0 - row["cka"])
        if row["layer"] in groups:
            assert row["weight_change"] > 0  # three AdamW steps move every group
        else:  # tied Mamba: its only input-side matrix is the LM head (--tied-embeddings head)
            assert (family, objective, row["layer"], row["weight_change"]) == ("mamba", "clm", "embeddings", None)
    assert isinstance(results["locality_gradient"], float)
    with open(os.path.join(out, "config.json")) as f:
        saved = RunConfig.from_dict(json.load(f))
    assert saved.model == checkpoints(family) and saved.objective == objective and saved.steps == 3
    with open(os.path.join(out, "profile.csv")) as f:
        assert len(list(csv.reader(f))) == tiny_models.LAYERS + 2  # header + embeddings + blocks
    with open(os.path.join(out, "profile.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("optimizer", [[], ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9"]],
                         ids=["adamw", "sgd"])
def test_equal_step_run_equalizes_every_step(checkpoints, tmp_path, optimizer):
    out = str(tmp_path / "eq")
    assert main(["--model", checkpoints("gpt2"), "--objective", "clm", "--control", "equal-step", "--out", out,
                 *FAST, *optimizer]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["optimizer"] == ("sgd" if optimizer else "adamw")
    with open(os.path.join(out, "train_log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        # The head is free (it keeps the optimizer's update); the profile's layers are equalized.
        assert float(row["ratio_after:head"]) == pytest.approx(float(row["ratio_before:head"]), rel=1e-9)
        after = [float(v) for k, v in row.items() if k.startswith("ratio_after:") and k != "ratio_after:head"]
        before = [float(v) for k, v in row.items() if k.startswith("ratio_before:") and k != "ratio_before:head"]
        assert max(before) / min(before) > 1.01  # the optimizer alone moves groups unequally …
        # … the control makes them equal, up to fp32 storage: rounding each weight (≤ 2⁻²⁴|w|) perturbs a
        # step of relative size r ≈ 1e-3 by ≲ 6e-5 per element, less over a group (the float64 bound is in
        # test_optim); 1e-4 is well below the 1e-2 spread the optimizer alone gives.
        assert max(after) / min(after) - 1 < 1e-4


@pytest.mark.parametrize("family,objective", [("gpt_neox", "cls"), ("bert", "cls"), ("bert", "mlm")])
@pytest.mark.slow
def test_same_seed_same_profile(checkpoints, tmp_path, family, objective):
    """Same seed, same run: tiny BERT has dropout 0.1, and mlm adds the masking draws."""
    runs = []
    for name in ("a", "b", "other-seed") if objective == "mlm" else ("a", "b"):
        out = str(tmp_path / name)
        seed = ["--seed", "1"] if name == "other-seed" else []
        assert main(["--model", checkpoints(family), "--objective", objective, "--out", out, *FAST, *seed]) == 0
        runs.append(([r["cka"] for r in read_results(out)["layers"]], read_log(out)))
    assert runs[0] == runs[1]
    if len(runs) == 3:
        assert runs[0][1] != runs[2][1]  # the seed matters: the comparison could fail


def test_identical_models_have_no_change():
    """θ_T = θ₀ gives CKA = 1 on every layer (the measurement's zero)."""
    from depthfast.batches import probe_batches
    from depthfast.layers import discover_layers
    from depthfast.probe import measure_probe

    model, tokenizer = tiny_models.build("gpt2")
    twin = copy.deepcopy(model)
    texts = ["def f(x):\n    return x + 1", "Lists are mutable sequences.", "The with statement.", "x = [1, 2]"]
    batches = probe_batches("clm", tokenizer, texts, None, 2, 32, 0.15, seed=0)
    result = measure_probe(model, twin, discover_layers(model), discover_layers(twin), batches,
                           torch.device("cpu"), "token", "exact", progress=False)
    assert result.cka == pytest.approx([1.0] * (tiny_models.LAYERS + 1), abs=1e-12)
    assert result.loss_base == result.loss_tuned


def test_local_dataset_files(checkpoints, tmp_path):
    from pydoc_data.topics import topics

    names = sorted(topics)[:2]
    jsonl = tmp_path / "cls.jsonl"
    with open(jsonl, "w") as f:
        for label in names:
            for paragraph in topics[label].split("\n\n"):
                if len(paragraph.strip()) > 40:
                    f.write(json.dumps({"text": paragraph.strip(), "topic": label}) + "\n")
    out = str(tmp_path / "cls")
    assert main(["--model", checkpoints("bert"), "--dataset", str(jsonl), "--label-column", "topic",
                 "--out", out, *FAST]) == 0
    assert read_results(out)["probe"]["accuracy_base"] is not None
    txt = tmp_path / "lm.txt"
    txt.write_text("\n".join(p.replace("\n", " ") for p in topics["compound"].split("\n\n") if p.strip()))
    assert main(["--model", checkpoints("mamba"), "--objective", "clm", "--dataset", str(txt),
                 "--out", str(tmp_path / "lm"), *FAST]) == 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "depthfast.run", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--model", "./no/such/model"], "is not a directory"),
    (["--model", "EleutherAI/pythia-6.9b"], "cannot load model 'EleutherAI/pythia-6.9b'"),
    (["--objective", "clm"], "objective 'clm' needs a causal decoder"),
    (["--dataset", "./missing.jsonl"], "does not exist"),
    (["--dataset", "TINY", "--objective", "mlm"], "probe set too small"),
    (["--lr", "1e30", "--steps", "3"], "loss is"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("\n".join(f"line number {i} of a dataset far too small to probe" for i in range(20)))
    args = [str(tiny) if a == "TINY" else a for a in args]
    # --overwrite: the earlier results would be refused first; with it, bad input still leaves them as they were
    proc = run_cli(*args, "--out", str(out), "--quiet", "--max-length", "32", "--overwrite")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("depthfast: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr
    assert (out / "results.json").read_text() == '{"earlier": true}\n'  # nothing already written is lost
    assert sorted(os.listdir(out)) == ["results.json"]


def test_mlm_on_decoder_is_refused(checkpoints, tmp_path, capsys):
    assert main(["--model", checkpoints("gpt2"), "--objective", "mlm", "--out", str(tmp_path), *FAST]) == 2
    assert "objective 'mlm' needs a bidirectional encoder; 'gpt2' is decoder-only" in capsys.readouterr().err


def test_config_file_unknown_key_fails_loudly(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"steps": 2, "learning_rate": 1e-3}))
    assert main(["--config", str(path)]) == 2
    assert "unknown config key(s): learning_rate" in capsys.readouterr().err


def test_config_round_trip_and_validation():
    cfg = RunConfig(steps=7, control="equal-step")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DepthfastError, match="objective must be one of"):
        RunConfig(objective="seq2seq").validate()
    with pytest.raises(DepthfastError, match="needs a int"):
        RunConfig.from_dict({"steps": "many"})
    with pytest.raises(DepthfastError, match="probe batch size must be ≥ 1"):  # a run checks what a compare does
        RunConfig(probe_batch_size=0).validate()


def test_trajectory_reuses_base_statistics_exactly(checkpoints, tmp_path):
    """Profiles measured during training (θ₀'s statistics reused): zero at step 0, the final one equal
    to the run's profile, which equals a run that measured only at the end."""
    traj, plain = str(tmp_path / "traj"), str(tmp_path / "plain")
    assert main(["--model", checkpoints("gpt_neox"), "--objective", "cls", "--measure-at", "0,2", "--out", traj,
                 *FAST]) == 0
    assert main(["--model", checkpoints("gpt_neox"), "--objective", "cls", "--out", plain, *FAST]) == 0
    results = read_results(traj)
    assert [t["step"] for t in results["trajectory"]] == [0, 2, 3]
    assert [r["change"] for r in results["trajectory"][0]["layers"]] == pytest.approx([0.0] * 4, abs=1e-12)
    final = [r["cka"] for r in results["trajectory"][-1]["layers"]]
    assert final == [r["cka"] for r in results["layers"]]
    assert final == pytest.approx([r["cka"] for r in read_results(plain)["layers"]], abs=1e-12)


@pytest.mark.parametrize("pooling,estimator", [("mean", "exact"), ("token", "unbiased"), ("mean", "unbiased")])
def test_other_poolings_and_estimators(checkpoints, tmp_path, pooling, estimator):
    out = str(tmp_path / "run")
    assert main(["--model", checkpoints("bert"), "--objective", "mlm", "--pooling", pooling, "--estimator", estimator,
                 "--out", out, *FAST]) == 0
    results = read_results(out)
    assert (results["pooling"], results["estimator"]) == (pooling, estimator)
    samples = results["probe"]["samples"]
    assert samples == results["probe"]["texts"] if pooling == "mean" else samples > results["probe"]["texts"]
    assert all(r["cka"] <= 1.0 + 1e-9 for r in results["layers"])  # unbiased CKA may dip below 0, not above 1


def test_unsupported_family_is_one_clear_line(tmp_path, capsys):
    import transformers as T

    path = str(tmp_path / "t5")
    T.T5Model(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64)).save_pretrained(path)
    capsys.readouterr()  # the save's own progress output
    assert main(["--model", path, "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [e for e in err if e.startswith("depthfast: error:")] and len(err) == 1
    assert "model type 't5' is not supported" in err[0]


def test_bf16_run_measures_in_its_own_precision(checkpoints, tmp_path):
    """Under --precision bf16 both models are measured under the same autocast: θ₀ against itself is
    exactly unchanged, and training still registers as change."""
    out = str(tmp_path / "bf16")
    assert main(["--model", checkpoints("gpt_neox"), "--objective", "cls", "--precision", "bf16",
                 "--measure-at", "0", "--out", out, *FAST]) == 0
    results = read_results(out)
    assert [r["change"] for r in results["trajectory"][0]["layers"]] == [0.0] * 4
    assert all(r["change"] > 0 for r in results["layers"][1:])


@pytest.mark.parametrize("family,objective", [("gpt_neox", "cls"), ("gpt2", "clm"), ("bert", "mlm")])
@pytest.mark.slow
def test_theta0_offload_gives_the_same_results(checkpoints, tmp_path, family, objective, monkeypatch):
    """θ₀ in host memory, run through accelerate's offload hooks (here host and device are both the CPU,
    so what is checked is the plumbing: hooks, captured activations, weight change against host
    tensors, trajectory reuse; GPT-2's LM head is tied to its embeddings; mlm's clean pass runs the
    offloaded base model without its LM head)."""
    import depthfast.distributed as distributed

    offloaded = []

    def offload_and_check(model, device):
        distributed_offload(model, device)
        assert all(p.device.type == "meta" for p in model.parameters())  # weights only in the hooks' host map
        offloaded.append(model)

    distributed_offload = distributed.offload_to_host
    monkeypatch.setattr(distributed, "offload_to_host", offload_and_check)
    runs = {}
    for name, extra in (("device", []), ("host", ["--theta0-offload"])):
        out = str(tmp_path / name)
        assert main(["--model", checkpoints(family), "--objective", objective, "--measure-at", "0,2", "--out", out,
                     *FAST, *extra]) == 0
        runs[name] = read_results(out)
        assert len(offloaded) == (name == "host")
    for key in ("cka", "weight_change"):
        assert [r[key] for r in runs["host"]["layers"]] == [r[key] for r in runs["device"]["layers"]], key
    assert runs["host"]["trajectory"] == runs["device"]["trajectory"]
    assert runs["host"]["group_weight_change"] == runs["device"]["group_weight_change"]


@pytest.fixture(scope="module")
def headless_bert(tmp_path_factory):
    """A tiny BERT saved without its MLM head, as all-MiniLM-L6-v2 ships: the objective distance then
    loads a fresh head. Dropout 0.1 (BertConfig's default), so training draws random numbers."""
    model, tokenizer = tiny_models.build("bert")
    assert model.config.hidden_dropout_prob == 0.1
    path = str(tmp_path_factory.mktemp("headless") / "bert")
    model.bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_objective_distance_does_not_change_training(headless_bert, tmp_path):
    """Loading the pretraining head for the distance must not consume the training's random numbers:
    the same losses, step by step, and the same profile with and without --no-objective-distance."""
    runs = {}
    for name, extra in (("with", []), ("without", ["--no-objective-distance"])):
        out = str(tmp_path / name)
        assert main(["--model", headless_bert, "--objective", "cls", "--out", out, *FAST, *extra]) == 0
        runs[name] = (read_log(out), [r["cka"] for r in read_results(out)["layers"]], read_results(out))
    assert runs["with"][0] == runs["without"][0]
    assert runs["with"][1] == runs["without"][1]
    assert runs["with"][2]["metrics"]["gradient_alignment_distance"] is not None
    assert runs["without"][2]["metrics"]["gradient_alignment_distance"] is None


def test_memory_refusal_comes_before_the_distance_loads_a_model(headless_bert, tmp_path, monkeypatch, capsys):
    """A run whose estimate exceeds the device is refused with one line before anything is loaded
    beyond the model itself (no θ₀ copy, no pretraining head); the estimate counts the distance."""
    import depthfast.memory as memory
    import depthfast.models as models
    from depthfast.objective_distance import distance_is_trivial, pretraining_head_parameters
    from depthfast.layers import discover_layers
    from depthfast.memory import estimate_run_memory, objective_distance_peak
    from depthfast.models import load_model, load_tokenizer

    cfg = RunConfig(model=headless_bert, objective="cls", steps=3, batch_size=8, max_length=32, probe_size=24,
                    probe_batch_size=12, device="cpu")
    model, tokenizer = load_model(headless_bert, "cls", num_labels=8), load_tokenizer(headless_bert, "cls")
    blocks = discover_layers(model).num_blocks
    rest = estimate_run_memory(model, cfg, blocks).total
    assert not distance_is_trivial(model.config, cfg, tokenizer)
    peak = objective_distance_peak(model, model.backbone, cfg, blocks,
                                   pretraining_head_parameters(model.config, "mlm"))
    assert peak > rest  # the fresh MLM head's logits over a 30522-token vocabulary: the distance is the peak
    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    monkeypatch.setattr(memory, "device_memory", lambda device: (rest + peak) // 2)  # fits without the distance
    args = ["--model", headless_bert, "--objective", "cls", "--device", "cpu", *FAST]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("depthfast: error: estimated memory"), err
    assert loads == ["cls"]  # the model itself only: the distance's pretraining model was never loaded
    assert main([*args, "--out", str(tmp_path / "fits"), "--no-objective-distance"]) == 0


def test_probe_texts_empty_after_tokenization_is_one_line(checkpoints, tmp_path, capsys):
    """Validation texts of control characters survive the data's blank-text filter but WordPiece drops
    them: nothing to compare, one line and exit 2, before any model is loaded."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(json.dumps({"text": f"training sentence number {i}"})
                                                for i in range(40)))
    (data / "validation.jsonl").write_text("\n".join(json.dumps({"text": "\x01" * (i + 1)}) for i in range(20)))
    out, model = tmp_path / "out", checkpoints("bert")
    capsys.readouterr()  # the checkpoint's own saving output
    assert main(["--model", model, "--objective", "mlm", "--dataset", str(data), "--out", str(out),
                 *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("depthfast: error: all 20 probe texts are empty after tokenization")
    assert not out.exists()
