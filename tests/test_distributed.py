"""Several processes (DDP, FSDP2 and HSDP over gloo, launched by torchrun) and gradient
accumulation give the single-process result.

The tiny GPT-NeoX has no dropout, and classification averages per-sequence losses over equal
shards, so the runs differ only by the order of floating-point reductions: CKA agrees to 1e-6
absolute (changes here are 1e-6 … 1e-3), weight change and losses to 1e-4 relative.
"""

import json
import os
import subprocess
import sys

import pytest

import tiny_models
from depthfast.run import main

ARGS = ["--objective", "cls", "--steps", "4", "--batch-size", "8", "--max-length", "32", "--probe-size", "24",
        "--probe-batch-size", "12", "--warmup-steps", "1", "--quiet", "--control", "equal-step", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    return tiny_models.save("gpt_neox", str(tmp_path_factory.mktemp("dist") / "neox"))


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def assert_same_run(a, b):
    assert [r["cka"] for r in a["layers"]] == pytest.approx([r["cka"] for r in b["layers"]], abs=1e-6)
    assert a["group_weight_change"] == pytest.approx(b["group_weight_change"], rel=1e-4)
    assert a["train"]["final_loss"] == pytest.approx(b["train"]["final_loss"], rel=1e-4)


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def torchrun(*args, processes=2):
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", str(processes), "-m", "depthfast.run", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def single_process(neox, tmp_path_factory):
    """The reference: the same run in one process, per control."""
    made = {}

    def get(control):
        if control not in made:
            out = str(tmp_path_factory.mktemp("single") / control)
            assert main(["--model", neox, "--out", out, *ARGS, "--control", control]) == 0
            made[control] = results(out)
        return made[control]

    return get


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("parallel,control", [("ddp", "equal-step"), ("fsdp", "none"), ("fsdp", "equal-step")])
def test_two_processes_equal_one(neox, tmp_path, single_process, parallel, control):
    out = str(tmp_path / "two")
    torchrun("--model", neox, "--out", out, *ARGS, "--parallel", parallel, "--control", control)
    two = results(out)
    assert two["num_processes"] == 2
    assert_same_run(two, single_process(control))


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("parallel,processes", [("fsdp", 2), ("hsdp", 4)])
def test_sharded_checkpoint_resumes(neox, tmp_path, single_process, parallel, processes):
    """FSDP2 and HSDP (2 replicas × shard groups of 2) gather full state dicts into the checkpoint;
    the whole run and a run resumed from its step-2 checkpoint both end where one process does."""
    out = str(tmp_path / parallel)
    common = ["--model", neox, "--out", out, *ARGS, "--parallel", parallel, "--shard-size", "2",
              "--checkpoint-every", "2"]
    torchrun(*common, "--keep-checkpoints", processes=processes)  # leaves the step-2 checkpoint behind
    whole = results(out)
    assert whole["num_processes"] == processes
    assert_same_run(whole, single_process("equal-step"))
    os.remove(os.path.join(out, "results.json"))
    torchrun(*common, "--resume", processes=processes)
    resumed = results(out)
    assert resumed["resumed_from_step"] == 2
    assert_same_run(resumed, single_process("equal-step"))


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_theta0_offload_is_refused_when_sharded(neox, tmp_path):
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "depthfast.run", "--model", neox, "--out",
                           str(tmp_path / "x"), *ARGS, "--parallel", "fsdp", "--theta0-offload"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "--theta0-offload runs with one process or --parallel ddp" in proc.stderr


def test_hsdp_shard_size_must_divide_the_processes():
    import torch

    from depthfast.distributed import shard_mesh
    from depthfast.errors import DepthfastError

    with pytest.raises(DepthfastError, match="4 processes do not split into shard groups of 3"):
        shard_mesh("hsdp", 3, 4, torch.device("cpu"))


def test_gradient_accumulation_equals_one_big_batch(neox, tmp_path):
    whole, accumulated = str(tmp_path / "whole"), str(tmp_path / "accum")
    assert main(["--model", neox, "--out", whole, *ARGS]) == 0
    assert main(["--model", neox, "--out", accumulated, "--grad-accum", "4", *ARGS]) == 0
    assert_same_run(results(accumulated), results(whole))


def test_batch_not_divisible_is_a_clear_error(neox, tmp_path, capsys):
    assert main(["--model", neox, "--out", str(tmp_path / "x"), *ARGS, "--grad-accum", "3"]) == 2
    assert "must be divisible by processes × grad accum = 1 × 3" in capsys.readouterr().err
