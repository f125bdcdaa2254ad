"""Kill and resume: a run interrupted after a checkpoint finishes exactly as an uninterrupted one."""

import csv
import json
import os

import pytest

import depthfast.train
from depthfast.run import main

ARGS = ["--steps", "6", "--batch-size", "4", "--max-length", "24", "--probe-size", "16", "--probe-batch-size", "8",
        "--warmup-steps", "1", "--checkpoint-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint_dir(checkpoints):
    return checkpoints("gpt_neox")


def outcome(out):
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "train_log.csv")) as f:
        log = list(csv.reader(f))
    return [r["cka"] for r in results["layers"]], results["group_weight_change"], log, results["trajectory"]


@pytest.mark.parametrize("family,objective,control", [
    ("gpt_neox", "cls", "none"), ("gpt_neox", "cls", "equal-step"),
    ("bert", "cls", "none"),  # dropout 0.1: the dropout draws must resume where they stopped
    ("bert", "mlm", "equal-step"),  # dropout and masking
])
@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(checkpoints, tmp_path, monkeypatch, family, objective, control):
    common = ["--model", checkpoints(family), "--objective", objective, "--control", control, "--measure-at", "0,3",
              *ARGS]
    whole = str(tmp_path / "whole")
    assert main([*common, "--out", whole]) == 0
    assert not os.path.exists(os.path.join(whole, "checkpoint.json"))  # removed after success

    real_save = depthfast.train.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        if step == 4:
            raise KeyboardInterrupt  # as if killed right after the step-4 checkpoint

    killed = str(tmp_path / "killed")
    monkeypatch.setattr(depthfast.train, "save_checkpoint", save_then_die)
    assert main([*common, "--out", killed]) == 130
    assert not os.path.exists(os.path.join(killed, "results.json"))
    assert json.load(open(os.path.join(killed, "checkpoint.json")))["step"] == 4
    monkeypatch.setattr(depthfast.train, "save_checkpoint", real_save)
    assert main([*common, "--out", killed, "--resume"]) == 0
    assert outcome(killed) == outcome(whole)
    assert json.load(open(os.path.join(killed, "results.json")))["resumed_from_step"] == 4


def test_resume_refuses_a_checkpoint_from_another_config(checkpoint_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real_save = depthfast.train.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(depthfast.train, "save_checkpoint", save_then_die)
    assert main(["--model", checkpoint_dir, "--objective", "cls", "--out", out, *ARGS]) == 130
    monkeypatch.setattr(depthfast.train, "save_checkpoint", real_save)
    assert main(["--model", checkpoint_dir, "--objective", "cls", "--out", out, "--lr", "1e-3", "--resume", *ARGS]) == 2
    assert "comes from another config" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "checkpoint.json"))  # still there for the right config


def test_resume_without_checkpoint_starts_fresh(checkpoint_dir, tmp_path):
    out = str(tmp_path / "fresh")
    assert main(["--model", checkpoint_dir, "--objective", "cls", "--out", out, "--resume", *ARGS]) == 0
    assert json.load(open(os.path.join(out, "results.json")))["resumed_from_step"] is None
