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
