"""depthfast sweep: grid parsing, expansion and naming, the resume decision, --dry-run, --slurm, and a
real two-run sweep on a tiny saved model (one run succeeds, one fails; a second invocation skips the
finished run and re-runs the failed one)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from depthfast import sweep as sw
from depthfast.config import RunConfig
from depthfast.errors import DepthfastError

FAST = {"steps": 2, "batch_size": 8, "max_length": 32, "probe_size": 24, "probe_batch_size": 12, "warmup_steps": 1}


def _grid(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_expand_and_names():
    grid = sw.parse_grid({"out": "o", "base": {"steps": 30},
                          "grid": {"model": ["sentence-transformers/all-MiniLM-L6-v2"], "objective": ["cls", "mlm"],
                                   "control": ["none", "equal-step"], "seed": [0, 1], "lr": [5e-5]}})
    runs = sw.build_runs(grid, "out")
    assert len(runs) == 8
    names = [r.name for r in runs]
    assert names[0] == "all-minilm-l6-v2__cls__none__seed0__lr5e-05"
    assert "all-minilm-l6-v2__mlm__equal-step__seed1__lr5e-05" in names
    assert len(set(names)) == 8
    assert all(r.config.steps == 30 and r.config.out == os.path.join("out", r.name) for r in runs)
    assert [r.name for r in sw.build_runs(grid, "out")] == names  # deterministic


def test_other_grid_keys_and_collisions():
    grid = sw.parse_grid({"grid": {"model": ["/a/tiny", "/b/tiny"], "pooling": ["token", "mean"],
                                   "batch_size": [8]}})
    names = [r.name for r in sw.build_runs(grid, "o")]
    assert len(set(names)) == 4
    assert all(n.split("__")[-1] != "" for n in names)
    assert names[0].startswith("tiny__cls__none__seed0__pooling-token__batch-size8__")  # + config hash
    assert names[0] != names[2]
    with pytest.raises(DepthfastError, match="identical runs"):
        sw.build_runs(sw.parse_grid({"grid": {"seed": [1, 1]}}), "o")


@pytest.mark.parametrize("data, message", [
    ({"base": {}, "grid": {}, "gird": {}}, "unknown top-level key"),
    ({"grid": {"learning_rate": [1e-3]}}, "unknown grid key"),
    ({"base": {"stepz": 3}}, "unknown base key"),
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"grid": {"seed": 3}}, "non-empty list"),
    ({"base": {"out": "x"}}, "'out' cannot be set"),
    ({"base": {"seed": 1}, "grid": {"seed": [1, 2]}}, "both base and grid"),
    ([1, 2], "must be a mapping"),
])
def test_bad_grids_fail_loudly(data, message):
    with pytest.raises(DepthfastError, match=message):
        sw.parse_grid(data)


def test_invalid_values_fail_before_anything_runs():
    with pytest.raises(DepthfastError, match="objective must be one of"):
        sw.build_runs(sw.parse_grid({"grid": {"objective": ["cls", "regression"]}}), "o")
    with pytest.raises(DepthfastError, match="needs a int"):
        sw.build_runs(sw.parse_grid({"grid": {"steps": ["many"]}}), "o")


def test_cli_unknown_grid_key_is_one_line(tmp_path):
    path = _grid(tmp_path, "out: x\ngrid:\n  learning_rate: [0.001]\n")
    proc = subprocess.run([sys.executable, "-m", "depthfast.cli", "sweep", path], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("depthfast: error:") and "learning_rate" in lines[0]


def _finish(run, config=None, results='{"layers": []}'):
    os.makedirs(run.directory, exist_ok=True)
    with open(os.path.join(run.directory, "config.json"), "w") as f:
        json.dump(config if config is not None else run.config.to_dict(), f)
    if results is not None:
        with open(os.path.join(run.directory, "results.json"), "w") as f:
            f.write(results)


def test_plan_decides_skip_and_resume(tmp_path):
    runs = sw.build_runs(sw.parse_grid({"grid": {"seed": [0, 1, 2, 3, 4, 5]}}), str(tmp_path))
    _finish(runs[1])                                                    # finished → skip
    moved = runs[2].config.to_dict() | {"out": "/elsewhere"}
    _finish(runs[2], config=moved)                                      # finished, sweep moved → still skip
    _finish(runs[3], results=None)                                      # interrupted → run with --resume
    _finish(runs[4], config=runs[4].config.to_dict() | {"steps": 999})  # other config → run fresh
    _finish(runs[5], results="{broken")                                 # unreadable results → run
    sw.plan(runs)
    assert [r.action for r in runs] == ["run", "skip", "skip", "run", "run", "run"]
    assert [r.reason for r in runs] == ["new", "finished", "finished", "unfinished", "config changed",
                                        "unreadable results.json"]
    assert [r.resume for r in runs] == [False, False, False, True, False, True]
    assert "--resume" in sw.command(runs[3]) and "--resume" not in sw.command(runs[4])
    sw.prepare(runs[4])  # re-running removes the stale results.json and writes the expanded config
    assert not os.path.exists(os.path.join(runs[4].directory, "results.json"))
    assert RunConfig.from_json_file(os.path.join(runs[4].directory, "config.json")).steps == 60


def test_dry_run_and_slurm(tmp_path):
    out = tmp_path / "sweep"
    path = _grid(tmp_path, f"out: {out}\nbase: {{steps: 2}}\ngrid:\n  control: [none, equal-step]\n  seed: [0, 1]\n")
    lines = []
    assert sw.sweep(path, dry_run=True, echo=lines.append) == 0
    assert not out.exists() and "4 runs: 4 to run" in lines[-1]
    runs = sw.build_runs(sw.load_grid(path), str(out))
    _finish(runs[0])
    assert sw.sweep(path, slurm=True, slurm_options=["--partition=gpu", "--time=01:00:00", "--gres=gpu:a100:1"],
                    echo=lines.append) == 0
    jobs = (out / "jobs.txt").read_text().strip().splitlines()
    assert len(jobs) == 3 and all("-m depthfast.run --config" in j and "run.log" in j for j in jobs)
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gres=gpu:a100:1" in script and "--gres=gpu:1" not in script
    assert all((out / r.name / "config.json").exists() for r in runs)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    import tiny_models

    return tiny_models.save("gpt2", str(tmp_path_factory.mktemp("ckpt") / "gpt2"))


def test_real_sweep_resumes(tiny_gpt2, tmp_path):
    out = tmp_path / "sweep"
    base = "\n".join(f"  {k}: {v}" for k, v in {**FAST, "model": tiny_gpt2}.items())
    # mlm on a decoder is refused by depthfast.run: one run succeeds, one fails, the sweep goes on
    path = _grid(tmp_path, f"out: {out}\nbase:\n{base}\ngrid:\n  objective: [cls, mlm]\n")
    lines = []
    assert sw.sweep(path, workers=2, echo=lines.append) == 1
    ok, bad = out / "gpt2__cls__none__seed0", out / "gpt2__mlm__none__seed0"
    assert (ok / "results.json").exists() and (ok / "run.log").exists()
    assert not (bad / "results.json").exists()
    assert "depthfast: error:" in (bad / "run.log").read_text()
    assert "1 ok, 1 failed, 0 skipped" in lines[-1]
    with open(out / "sweep_summary.csv") as f:
        assert {r["run"]: r["status"] for r in csv.DictReader(f)} == {ok.name: "ok", bad.name: "failed"}
    saved = RunConfig.from_json_file(str(ok / "config.json"))
    assert saved.steps == 2 and saved.objective == "cls"
    metrics = json.loads((ok / "results.json").read_text())["metrics"]
    assert metrics["slope_estimator"] == "exact/token"  # the run names its headline slope's estimator
    mtime = (ok / "results.json").stat().st_mtime_ns

    lines.clear()
    assert sw.sweep(path, echo=lines.append) == 1  # finished run skipped, failed run tried again
    assert "0 ok, 1 failed, 1 skipped" in lines[-1]
    assert (ok / "results.json").stat().st_mtime_ns == mtime
    assert (bad / "run.log").read_text().count("=== depthfast sweep") == 2

    (ok / "results.json").unlink()  # a run whose results.json is missing is run again
    plan = {r.name: r for r in sw.plan(sw.build_runs(sw.load_grid(path), str(out)))}
    assert plan[ok.name].action == "run" and plan[ok.name].reason == "unfinished"


def test_cli_run_forwards_to_depthfast_run(capsys):
    from depthfast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0 and "--objective" in capsys.readouterr().out


# --- study grids: models:, per_objective:, memory without a download ------------------------------

STUDY = os.path.join(os.path.dirname(__file__), "..", "examples", "study_grid.yaml")


def test_study_grid_expands_to_the_published_design():
    from depthfast.layers import family_of
    from depthfast.registry import STUDY_MODELS

    grid = sw.load_grid(STUDY)
    runs = sw.build_runs(grid, "o")
    assert len(runs) == len(STUDY_MODELS) * 2 * 2 * 4 == 272
    assert {r.config.model for r in runs} == {s.hf_id for s in STUDY_MODELS}
    for spec in STUDY_MODELS:
        mine = [r.config for r in runs if r.config.model == spec.hf_id]
        encoder = family_of(spec.config())[0] == "encoder"
        assert sorted({c.objective for c in mine}) == (["cls", "mlm"] if encoder else ["clm", "cls"])
        assert {(c.control, c.seed) for c in mine} == {(k, s) for k in ("none", "equal-step") for s in range(4)}
    by = {(r.config.model, r.config.objective): r.config for r in runs}
    assert (by["gpt2", "cls"].dataset, by["gpt2", "cls"].dataset_config) == ("nyu-mll/glue", "sst2")
    assert (by["gpt2", "clm"].dataset, by["gpt2", "clm"].dataset_config) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    big = by["EleutherAI/pythia-6.9b", "clm"]
    assert big.precision == "bf16" and big.gradient_checkpointing and big.theta0_offload and big.lr == 1e-5
    assert by["gpt2", "cls"].precision == "fp32" and by["gpt2", "cls"].steps == 500
    assert len({r.name for r in runs}) == 272


def test_models_entries_precedence():
    grid = sw.parse_grid({"base": {"steps": 5, "lr": 1e-3, "dataset": "b"},
                          "per_objective": {"mlm": {"dataset": "wiki", "lr": 2e-3}},
                          "models": [{"model": "bert-base-uncased", "objectives": ["cls", "mlm"], "lr": 3e-3},
                                     {"model": "/x/tiny"}],
                          "grid": {"seed": [0, 1]}})
    values = sw.expand(grid)
    assert len(values) == 6
    cls, mlm, tiny = values[0], values[2], values[4]
    assert cls == {"steps": 5, "lr": 3e-3, "dataset": "b", "model": "bert-base-uncased", "objective": "cls", "seed": 0}
    assert mlm["dataset"] == "wiki" and mlm["lr"] == 3e-3  # per_objective over base, the model's own over both
    assert tiny["model"] == "/x/tiny" and "objective" not in tiny and tiny["lr"] == 1e-3


@pytest.mark.parametrize("data, message", [
    ({"models": []}, "non-empty list"),
    ({"models": [{"objectives": ["cls"]}]}, "with 'model: ID'"),
    ({"models": [{"model": "gpt2", "objectives": ["mlm"]}]}, r"models\[0\] \(gpt2\): objective 'mlm' needs"),
    ({"models": [{"model": "bert-base-uncased", "objectives": ["clm"]}]}, "objective 'clm' needs a causal decoder"),
    ({"models": [{"model": "gpt2", "objectives": ["cls", "cls"]}]}, "without repeats"),
    ({"models": [{"model": "gpt2", "objectives": ["regress"]}]}, "unknown objective"),
    ({"models": [{"model": "gpt2", "objective": "cls"}]}, "use 'objectives"),
    ({"models": [{"model": "gpt2", "learning_rate": 1}]}, r"unknown key\(s\) learning_rate in models\[0\]"),
    ({"models": [{"model": "gpt2", "out": "x"}]}, "'out' cannot be set"),
    ({"models": [{"model": "gpt2", "seed": 1}], "grid": {"seed": [0, 1]}}, "in both models"),
    ({"models": [{"model": "gpt2", "objectives": ["cls"]}], "grid": {"objective": ["cls"]}}, "keep one"),
    ({"models": [{"model": "gpt2"}], "base": {"model": "gpt2"}}, "'model' is in base"),
    ({"per_objective": {"regress": {}}}, "unknown objective 'regress' in per_objective"),
    ({"per_objective": {"cls": {"stepz": 1}}}, r"unknown key\(s\) stepz in per_objective.cls"),
    ({"per_objective": {"cls": {"lr": 1e-3}}, "grid": {"lr": [1e-4]}}, "in both per_objective.cls and grid"),
    ({"per_objective": {"cls": {"objective": "mlm"}}}, "'objective' cannot be set"),
])
def test_bad_study_grids_fail_loudly(data, message):
    with pytest.raises(DepthfastError, match=message):
        sw.parse_grid(data)


def test_meta_estimate_equals_the_loaded_model(tiny_gpt2):
    """The dry-run's meta-device estimate is estimate_run_memory of the real model (same parameters)."""
    from depthfast.layers import discover_layers
    from depthfast.memory import estimate_run_memory
    from depthfast.models import load_model

    for objective in ("cls", "clm"):
        cfg = RunConfig(model=tiny_gpt2, objective=objective, precision="bf16", batch_size=4)
        model = load_model(tiny_gpt2, objective, num_labels=2)
        real = estimate_run_memory(model, cfg, discover_layers(model).num_blocks, fused_control=True)
        meta = sw.estimate_memory(cfg)
        assert meta.parts == real.parts and next(sw.meta_model(tiny_gpt2, objective)[0].parameters()).is_meta
    assert sw.estimate_memory(RunConfig(model="someone/unknown-model")) is None


def test_dry_run_lists_memory_and_fit(tmp_path):
    path = _grid(tmp_path, f"""out: {tmp_path / 'o'}
models:
  - {{model: gpt2, objectives: [cls]}}
  - {{model: EleutherAI/pythia-6.9b, objectives: [clm], precision: bf16, gradient_checkpointing: true,
     theta0_offload: true, probe_batch_size: 16}}
  - {{model: EleutherAI/pythia-6.9b, objectives: [cls], steps: 7}}
  - {{model: someone/unknown-model}}
""")
    lines = []
    assert sw.sweep(path, dry_run=True, echo=lines.append) == 0
    table = {line.split()[0]: line for line in lines[0].splitlines()[2:]}
    assert "1× H100 80GB" in table["gpt2__cls__none__seed0"] and "GiB" in table["gpt2__cls__none__seed0"]
    offload = [v for k, v in table.items() if k.startswith("pythia-6.9b__clm")][0]
    assert "1× H200 141GB" in offload and "or fsdp ×" in offload and "theta0_offload false there" in offload
    fp32 = [v for k, v in table.items() if k.startswith("pythia-6.9b__cls")][0]  # 6.9B in fp32, θ₀ on the GPU
    assert " no " in fp32 and "fsdp ×" in fp32.split("GiB", 1)[1] and "per process" in fp32
    assert "unknown" in table["unknown-model__cls__none__seed0"]
    assert "1× H100 80GB: 1 runs (gpt2)" in "\n".join(lines) and "4 runs: 4 to run" in lines[-1]
    assert not (tmp_path / "o").exists()
