"""Several processes (DDP, FSDP2 and HSDP over gloo, launched by torchrun) and gradient
accumulation give the single-process result.

The tiny GPT-NeoX has no dropout, and classification averages per-sequence losses over equal
shards, so the runs differ only by the order of floating-point reductions: CKA agrees to 1e-6
absolute (changes here are 1e-6 … 1e-3), weight change and losses to 1e-4 relative. The other
families run with their dropout set to 0 (each process draws its own dropout masks); causal LM
averages per-process token means, exact here because every training text fills --max-length.
"""

import json
import os
import subprocess
import sys

import pytest

import tiny_models
from depthfast.run import main

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

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


def save_without_dropout(family, directory):
    tiny_models.save(family, directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update({k: 0.0 for k, v in config.items()
                   if ("dropout" in k or "pdrop" in k) and isinstance(v, float)})
    with open(path, "w") as f:
        json.dump(config, f)
    return directory


# The family's objective in these tests: BERT's pooler gets no gradient under mean-pooled cls (the
# parameter DDP used to crash on); GPT-2 ties its LM head to the input embedding.
FAMILY_OBJECTIVE = {"bert": "cls", "gpt2": "clm"}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """(model path, single-process results) per family, made once."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            model = save_without_dropout(family, str(root / "model"))
            out = str(root / "single")
            assert main(["--model", model, "--out", out, *ARGS, "--objective", FAMILY_OBJECTIVE[family]]) == 0
            made[family] = model, results(out)
        return made[family]

    return get


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("family", list(FAMILY_OBJECTIVE))
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "hsdp"])
def test_families_two_processes_equal_one(family_runs, tmp_path, family, parallel):
    """BERT cls and tied GPT-2 clm under each mode (GPT-NeoX: the tests above). HSDP runs as 2
    replicas × shard groups of 1, so the replicate all-reduce of a parameter without gradient is
    covered at two processes' cost. A parameter the loss does not reach keeps grad None on every
    process, as in one process (DDP then runs with find_unused_parameters): same profile, same
    weight change (the pooler in the head group, ΔW = 0), same list of unused parameters."""
    model, one = family_runs(family)
    out = str(tmp_path / "two")
    torchrun("--model", model, "--out", out, *ARGS, "--objective", FAMILY_OBJECTIVE[family], "--parallel", parallel,
             "--shard-size", "1")
    two = results(out)
    assert two["num_processes"] == 2
    assert_same_run(two, one)
    unused = one["train"]["unused_parameters"]
    assert two["train"]["unused_parameters"] == unused
    if family == "bert":
        assert unused == ["backbone.pooler.dense.weight", "backbone.pooler.dense.bias"]
        assert two["group_weight_change"]["head"] > 0  # the classifier moved, the pooler did not
    else:
        assert unused == []


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


@pytest.mark.parametrize("family,objective,want", [
    ("bert", "cls", ["backbone.pooler.dense.weight", "backbone.pooler.dense.bias"]),
    ("bert", "mlm", []), ("gpt2", "clm", []), ("gpt2", "cls", [])])
def test_unreached_parameters_of_each_objective(tmp_path, family, objective, want):
    """The check that decides DDP's find_unused_parameters: BERT's pooler is bypassed by mean-pooled
    cls (and absent from the MLM model); the tied GPT-2 LM head reaches the embedding. One forward, no
    gradients left behind, the RNG untouched (the same dropout draws follow)."""
    import torch

    from depthfast.batches import make_batch
    from depthfast.config import RunConfig
    from depthfast.models import load_model, load_tokenizer
    from depthfast.train import unreached_parameters

    path = tiny_models.save(family, str(tmp_path / family))
    model = load_model(path, objective, num_labels=3).eval()
    texts = ["def f(x): return x", "a plain sentence of English words", "import os"]
    batch = make_batch(objective, load_tokenizer(path, objective), texts, [0, 1, 2], 16, 0.5,
                       torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    assert unreached_parameters(model, batch, RunConfig(objective=objective), torch.device("cpu")) == want
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not model.training and all(p.grad is None for p in model.parameters())


PROCESS_GROUP_SCRIPT = """
import sys
import torch.distributed as dist
from depthfast.config import RunConfig
from depthfast.train import end_process_group, make_accelerator
own = sys.argv[1] == "own"
if not own:  # the caller's group, made before depthfast's accelerator
    dist.init_process_group("gloo")
accelerator = make_accelerator(RunConfig(device="cpu"))
assert dist.is_initialized() and accelerator.num_processes == 2
accelerator.wait_for_everyone()
end_process_group()
assert dist.is_initialized() != own, dist.is_initialized()
if not own:
    dist.destroy_process_group()
print("ok", flush=True)
"""


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("owner", ["own", "caller"])
def test_process_group_is_destroyed_by_whoever_made_it(tmp_path, owner):
    """main() ends with end_process_group: the group accelerate made for depthfast is destroyed before
    interpreter teardown (where its native threads made 2 in 44 CUDA-torch runs abort), a group the
    caller made is left to the caller."""
    script = tmp_path / "pg.py"
    script.write_text(PROCESS_GROUP_SCRIPT)
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", str(script), owner], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.count("ok") == 2, proc.stderr[-3000:]


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
