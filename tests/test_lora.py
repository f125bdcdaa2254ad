"""LoRA fine-tuning (--lora-r): what the run measures is the merged model W₀ + (α/r)·B·A.

The end-to-end runs are checked against computations that do not go through depthfast.lora: the
adapter model merged by peft's own ``merge()`` and unloaded into plain modules, its weight change
per role group (groups of the plain model), and measure_probe between plain θ₀ and the merged model.
"""

import copy
import csv
import json
import math
import os
import sys

import pytest
import torch

import tiny_models
from depthfast.run import main

peft = pytest.importorskip("peft")

FAST = ["--steps", "3", "--batch-size", "8", "--max-length", "32", "--probe-size", "24", "--probe-batch-size", "12",
        "--warmup-steps", "1", "--lr", "1e-2", "--quiet"]


def merge_and_unload(model):
    """A copy with every LoRA layer merged by peft (W ← W + (α/r)·B·A) and replaced by its base layer."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    return merged


@torch.no_grad()
def relative_changes(plain0, merged):
    """‖W_g − W₀,g‖/‖W₀,g‖ per role group of the plain (un-adapted) model, float64."""
    from depthfast.layers import discover_layers

    for p in plain0.parameters():
        p.requires_grad_(True)  # every weight in a group, as in full fine-tuning
    name_of = {id(p): n for n, p in plain0.named_parameters()}
    tuned = dict(merged.named_parameters())
    out = {}
    for group, ps in discover_layers(plain0).param_groups():
        delta = sum(float((tuned[name_of[id(p)]].double() - p.double()).square().sum()) for p in ps)
        norm = sum(float(p.double().square().sum()) for p in ps)
        out[group] = math.sqrt(delta / norm)
    return out


@pytest.mark.parametrize("family,extra", [
    ("gpt2", []),  # defaults: every linear layer of the blocks (Conv1D), α = r
    # scale α/r = 2, two targets, the control on the merged weights
    ("bert", ["--lora-alpha", "8", "--lora-targets", "query,value", "--control", "equal-step"]),
])
def test_lora_run_measures_the_merged_model(checkpoints, tmp_path, monkeypatch, family, extra):
    import depthfast.lora
    from depthfast.config import RunConfig
    from depthfast.layers import discover_layers
    from depthfast.models import load_tokenizer
    from depthfast.probe import measure_probe
    from depthfast.run import task_and_probe

    seen = {}
    real = depthfast.lora.lora_weight_changes

    def spy(base, tuned, tied):  # the real function; the test keeps the run's two models
        seen.update(base=base, tuned=tuned)
        return real(base, tuned, tied)

    monkeypatch.setattr(depthfast.lora, "lora_weight_changes", spy)
    out = str(tmp_path / "run")
    args = ["--model", checkpoints(family), "--objective", "cls", "--lora-r", "4", "--out", out, *FAST, *extra]
    assert main(args) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    lora = results["lora"]
    base, tuned = seen["base"], seen["tuned"]
    assert lora["r"] == 4 and lora["alpha"] == (8.0 if extra else 4.0) and lora["scaling"] == (2.0 if extra else 1.0)
    assert lora["targets"] == (["query", "value"] if extra else ["c_attn", "c_fc", "c_proj"])
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    assert lora["trainable_parameters"] == trainable == sum(g["elements"] for g in results["param_groups"])
    assert [g["name"] for g in results["param_groups"]] == ["block.1", "block.2", "block.3", "head"]

    # Base weights frozen: everything but the adapters and the fresh cls head is still θ₀, bit for bit.
    adapters = {n for n, _ in tuned.named_parameters() if ".lora_" in n}
    base_params = dict(base.named_parameters())
    for name, p in tuned.named_parameters():
        if name in adapters or name.startswith("classifier."):
            assert not torch.equal(p, base_params[name]), name  # trained
        else:
            assert torch.equal(p, base_params[name]), name

    # peft's merge: W₀ + (α/r)·B·A; spot-check one layer against the formula written out.
    merged, plain0 = merge_and_unload(tuned), merge_and_unload(base)  # base has B = 0: plain θ₀
    layer = tuned.get_submodule("backbone.encoder.layer.0.attention.self.query" if extra
                                else "backbone.h.0.attn.c_attn")
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * lora["scaling"]
    w = layer.base_layer.weight + (delta if extra else delta.T)  # GPT-2's Conv1D stores (d_in, d_out)
    name = "backbone.encoder.layer.0.attention.self.query.weight" if extra else "backbone.h.0.attn.c_attn.weight"
    torch.testing.assert_close(dict(merged.named_parameters())[name], w, rtol=0, atol=1e-6)

    expected = relative_changes(plain0, merged)
    assert set(results["group_weight_change"]) == set(expected)  # the plain model's groups, embeddings included
    for group, value in expected.items():
        assert results["group_weight_change"][group] == pytest.approx(value, rel=1e-5, abs=1e-9), group
    assert results["group_weight_change"]["embeddings"] == 0.0  # frozen
    assert all(results["group_weight_change"][f"block.{i}"] > 0 for i in (1, 2, 3))

    # The profile: measure_probe between plain θ₀ and the merged model gives the run's CKA.
    cfg = RunConfig.from_dict({**json.load(open(os.path.join(out, "config.json")))})
    tokenizer = load_tokenizer(cfg.model, cfg.objective)
    _, probe = task_and_probe(cfg, tokenizer)
    independent = measure_probe(plain0, merged, discover_layers(plain0), discover_layers(merged), probe,
                                torch.device("cpu"), cfg.pooling, cfg.estimator, progress=False)
    assert [r["cka"] for r in results["layers"]] == pytest.approx(independent.cka, abs=1e-6)
    assert results["layers"][-1]["change"] > 0

    with open(os.path.join(out, "train_log.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # the head is free; the blocks' merged steps are equal up to fp32 storage (cf. test_run)
        assert float(row["ratio_after:head"]) == pytest.approx(float(row["ratio_before:head"]), rel=1e-9)
        after = [float(row[f"ratio_after:block.{i}"]) for i in (1, 2, 3)]
        before = [float(row[f"ratio_before:block.{i}"]) for i in (1, 2, 3)]
        if extra:
            assert max(before) / min(before) > 1.01 and max(after) / min(after) - 1 < 1e-4
        else:
            assert after == before


@pytest.mark.parametrize("control", ["none", "equal-step"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])  # Conv1D (fan_in_fan_out) and nn.Linear
def test_control_on_merged_weights_float64(family, control):
    """LoraEqualStep in float64, three AdamW steps from B = 0: its ratios are the merged weights'
    ‖W_g(t+1) − W_g(t)‖/‖W_g(t)‖ of peft's merge (whole blocks, frozen weights included), and under
    equal-step every block's merged step has the target ratio r* = mean of the optimizer's, to 1e-9."""
    from depthfast.config import RunConfig
    from depthfast.layers import discover_layers
    from depthfast.lora import LoraEqualStep, apply_lora

    model, _ = tiny_models.build(family)
    model.double()
    apply_lora(model, RunConfig(lora_r=4, lora_alpha=8.0).validate())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    groups = discover_layers(model).param_groups()
    optimizer = torch.optim.AdamW([p for _, ps in groups for p in ps], lr=1e-2)
    control = LoraEqualStep(optimizer, groups, model, control=control)
    ids = torch.randint(1, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        before = merge_and_unload(model)
        model(input_ids=ids, labels=ids).loss.backward()
        control.step()
        control.zero_grad()
        independent = relative_changes(before, merge_and_unload(model))
        measured = [independent[name] for name, _ in groups]
        assert control.ratios_after.tolist() == pytest.approx(measured, rel=1e-9)
        if control.control == "none":
            assert control.ratios_before.tolist() == pytest.approx(measured, rel=1e-9)
        else:
            assert max(control.ratios_before) / min(control.ratios_before) > 1.001  # unequal before …
            target = float(control.ratios_before.mean())
            assert control.target_ratio == pytest.approx(target, rel=1e-12)
            assert measured == pytest.approx([target] * len(groups), rel=1e-9)  # … equal after


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_default_targets_are_live_adapters_inside_the_blocks(family):
    """Every family: the default targets sit in the blocks (groups block.1..L only), the adapter model
    equals the plain one at θ₀ (B = 0), and every adapter factor gets a gradient once B ≠ 0: no
    adapter on a layer whose weight the forward reads directly (Mamba's dt_proj, for one)."""
    from depthfast.config import RunConfig
    from depthfast.layers import discover_layers
    from depthfast.lora import apply_lora

    model, _ = tiny_models.build(family)
    model.eval()
    ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    info = apply_lora(model, RunConfig(lora_r=2).validate())
    assert info["adapted_modules"] >= discover_layers(model).num_blocks and info["trainable_head"] is None
    assert [n for n, _ in discover_layers(model).param_groups()] == ["block.1", "block.2", "block.3"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model(input_ids=ids, use_cache=False).logits.square().mean().backward()  # RWKV's cached state is in-place
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad, name


@pytest.mark.slow
def test_lora_resumes_bit_for_bit(checkpoints, tmp_path, monkeypatch):
    import depthfast.train

    common = ["--model", checkpoints("gpt_neox"), "--objective", "cls", "--lora-r", "2", "--checkpoint-every", "2",
              *FAST[:-1], "--steps", "4", "--quiet"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert main([*common, "--out", whole]) == 0
    real_save = depthfast.train.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(depthfast.train, "save_checkpoint", save_then_die)
    assert main([*common, "--out", killed]) == 130
    monkeypatch.setattr(depthfast.train, "save_checkpoint", real_save)
    assert main([*common, "--out", killed, "--resume"]) == 0
    runs = [json.load(open(os.path.join(d, "results.json"))) for d in (whole, killed)]
    assert runs[1]["resumed_from_step"] == 2
    for key in ("layers", "group_weight_change", "lora"):
        assert runs[0][key] == runs[1][key], key


@pytest.mark.parametrize("args,message", [
    (["--lora-r", "4", "--parallel", "fsdp"], "--lora-r runs with one process or --parallel ddp, not fsdp"),
    (["--lora-r", "4", "--parallel", "hsdp"], "not hsdp"),
    (["--lora-r", "4", "--theta0-offload"], "--theta0-offload does not combine with --lora-r"),
    (["--lora-alpha", "16"], "need --lora-r R"),
    (["--lora-r", "-1"], "lora r must be ≥ 0"),
    (["--lora-r", "4", "--lora-targets", "query,nonesuch"], "'nonesuch' matches no linear layer of the blocks"),
    (["--lora-r", "4", "--lora-targets", "dt_proj", "--model", "MAMBA"], "reads that layer's weight directly"),
    (["--lora-r", "4", "--model", "NOPEFT"], "--lora-r needs the peft package (pip install peft)"),
])
def test_refusals_are_one_line(checkpoints, tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    if "NOPEFT" in args:
        monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: `import peft` raises ImportError
    model = checkpoints("mamba") if "MAMBA" in args else checkpoints("bert")
    args = [a for a in args if a not in ("MAMBA", "NOPEFT")]
    if "--model" in args:
        args.remove("--model")
    # --overwrite: a finished run in --out is otherwise refused first (depthfast.rundir); the LoRA check
    # must still come before anything of the earlier run is touched
    assert main(["--model", model, "--objective", "cls", "--out", str(out), "--overwrite", *FAST, *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("depthfast: error:")]
    assert len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(out)) == ["results.json"]
    assert (out / "results.json").read_text() == '{"earlier": true}\n'


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.slow
@pytest.mark.distributed
def test_lora_under_ddp_equals_one_process(checkpoints, tmp_path):
    """Two DDP processes over gloo (frozen base weights, adapters and head replicated) give the
    single-process run, the control on the merged weights included."""
    import subprocess

    common = ["--model", checkpoints("gpt_neox"), "--objective", "cls", "--lora-r", "2", "--control", "equal-step",
              *FAST[:-1], "--steps", "3", "--quiet"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main([*common, "--out", one]) == 0
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "depthfast.run", *common, "--out", two],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.load(open(os.path.join(d, "results.json"))) for d in (one, two))
    assert b["num_processes"] == 2 and a["lora"] == b["lora"]
    assert [r["cka"] for r in a["layers"]] == pytest.approx([r["cka"] for r in b["layers"]], abs=1e-6)
    assert a["group_weight_change"] == pytest.approx(b["group_weight_change"], rel=1e-4)
    assert a["train"]["final_loss"] == pytest.approx(b["train"]["final_loss"], rel=1e-4)


def test_solve_step_scale_returns_the_smallest_positive_root():
    """Issue 18: ΔW(s) = sX + s²Y with Y = −X/1.5, target 1.05× the group's own ratio. ‖ΔW(s)‖ =
    ‖X‖·|s − s²/1.5| reaches 1.05/3·‖X‖ at s = 0.75(1 ± sqrt(1 − 1.4/1.5)) = 0.556, 0.944 (the optimizer's
    direction) and at 1.79 (past the turning point: ΔW = −0.35X, a reversed step); the first one is the answer.
    Then fresh random quartics: the root is a root to float64 resolution and F < 0 on a fine grid before it."""
    from depthfast.lora import solve_step_scale
    x_sq = 2.7
    a, b, c = x_sq, -x_sq / 1.5, x_sq / 1.5 ** 2
    own_sq = a + 2 * b + c  # ‖ΔW(1)‖²
    s = solve_step_scale(a, b, c, 1.05 ** 2 * own_sq)
    assert s == pytest.approx(0.75 * (1 - math.sqrt(1 - 1.4 / 1.5)), rel=1e-12) and round(s, 3) == 0.556
    assert s - s * s / 1.5 > 0  # the merged step keeps the optimizer's direction
    assert solve_step_scale(a, 0.0, 0.0, 4 * a) == pytest.approx(2.0, rel=1e-14)  # linear: s = ratio
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        x, y = torch.randn(2, 7, generator=gen, dtype=torch.float64)
        y = y * 10 ** torch.empty(1).uniform_(-2, 1, generator=gen).item()
        a, b, c = x.dot(x).item(), x.dot(y).item(), y.dot(y).item()
        target = (a + 2 * b + c) * torch.empty(1).uniform_(0.01, 4.0, generator=gen).item()
        s = solve_step_scale(a, b, c, target)
        value = lambda v: v * v * (a + v * (2 * b + v * c))  # noqa: E731
        assert value(s) == pytest.approx(target, rel=1e-9)
        grid = torch.linspace(0, s, 20_001, dtype=torch.float64)[:-200]
        assert (value(grid) < target).all()  # no earlier crossing
