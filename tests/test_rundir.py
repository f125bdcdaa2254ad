"""Fault injection on the run directory (depthfast.rundir) and the boundaries of issue 19: every row of its
table as a test. Kills in the publishing window over an older run never leave a mix; a bad, busy or
finished --out is refused before a model loads; OS, weights, checkpoint and dataset errors are one line."""

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import depthfast.artifacts
import depthfast.models
import depthfast.results
import depthfast.train
import tiny_models
from depthfast.compare import main as compare_main
from depthfast.rundir import LOCK, verify_manifest
from depthfast.run import main

FLAGS = ["--objective", "clm", "--steps", "2", "--batch-size", "4", "--max-length", "16", "--probe-size", "16",
         "--probe-batch-size", "8", "--warmup-steps", "1", "--quiet", "--no-objective-distance",
         "--checkpoint-every", "0"]
PROBE = ["--max-length", "16", "--probe-size", "16", "--probe-batch-size", "8", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs; and forked children must not inherit a busy OpenMP pool
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("gpt_neox")


def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("depthfast: error:")]


def one_error(capsys, *fragments):
    lines = error_lines(capsys)
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory):
    """{relative path: bytes} of every file under ``directory``."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = open(path, "rb").read()
    return found


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the directory was refused")

    monkeypatch.setattr(depthfast.models, "load_model", refuse)
    monkeypatch.setattr(depthfast.models, "load_tokenizer", refuse)


# ---- --out itself -----------------------------------------------------------------------------------

def test_out_that_is_a_file_is_refused_before_any_model_loads(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "file"
    out.write_text("not a directory\n")
    no_model_loads(monkeypatch)
    started = time.perf_counter()
    assert main(["--model", model, "--out", str(out), *FLAGS]) == 2
    assert time.perf_counter() - started < 5
    one_error(capsys, "is a file, not a directory")
    assert out.read_text() == "not a directory\n"


@pytest.mark.parametrize("code,words", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")])
def test_unwritable_out_is_refused_before_any_model_loads(model, tmp_path, monkeypatch, capsys, code, words):
    import depthfast.rundir

    def fail(path, *args, **kwargs):  # as on a read-only mount or a directory of someone else's (we run as root)
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(depthfast.rundir, "open", fail, raising=False)
    no_model_loads(monkeypatch)
    assert main(["--model", model, "--out", str(tmp_path / "out"), *FLAGS]) == 2
    one_error(capsys, words, "--out")


def test_out_without_the_space_the_checkpoints_need_is_refused(model, tmp_path, monkeypatch, capsys):
    import depthfast.rundir

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(depthfast.rundir.shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    monkeypatch.setattr(depthfast.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["--model", model, "--out", str(tmp_path / "out"), *FLAGS, "--checkpoint-every", "1"]) == 2
    one_error(capsys, "free", "--checkpoint-every 0")


# ---- a finished run ---------------------------------------------------------------------------------

def test_finished_run_is_refused_and_overwrite_replaces_it_whole(model, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["--model", model, "--out", out, *FLAGS, "--seed", "1", "--save-model", "--all-pairs"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["--model", model, "--out", out, *FLAGS]) == 2
    one_error(capsys, "holds a finished run", "--overwrite")
    assert snapshot(out) == before and LOCK not in os.listdir(out)
    assert main(["--model", model, "--out", out, *FLAGS, "--overwrite"]) == 0
    assert not {"model", "all_pairs.csv", "all_pairs.png"} & set(os.listdir(out))  # the old run's, gone
    results = json.load(open(os.path.join(out, "results.json")))
    assert json.load(open(os.path.join(out, "config.json")))["seed"] == 0
    assert set(results["manifest"]) == {"config.json", "profile.csv", "profile.png", "train_log.csv"}
    assert verify_manifest(out, results) == ""


def test_kills_in_the_write_window_never_leave_a_mix(model, tmp_path):
    """20 kills (os._exit(137), as kill -9) at random points of the publishing window of a run over an
    older one: either the old run whole, or no results.json, or the new run whole."""
    old = str(tmp_path / "old")
    common = ["--model", model, *FLAGS, "--save-model", "--all-pairs"]
    assert main([*common, "--seed", "1", "--out", old]) == 0
    pristine = snapshot(old)
    # 2 points around the retraction + 2 per artifact (model, all_pairs ×2, config, profile ×2, train_log,
    # results.json): 18 points; 19 lets the run finish.
    rng = random.Random(19)
    trials = [1, 2, 18, 19] + [rng.randint(1, 19) for _ in range(16)]
    seen = set()
    for n in trials:
        out = str(tmp_path / f"kill{n}")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(old, out)
        pid = os.fork()
        if pid == 0:  # the child: the run, killed at its n-th fault point
            code = 1
            try:
                os.environ["DEPTHFAST_FAULT_KILL_AT"] = str(n)
                code = main([*common, "--out", out, "--overwrite"])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == (0 if n == 19 else 137), n
        now = snapshot(out)
        results = now.get("results.json")
        if results is None:
            seen.add("retracted")
            assert not [k for k in now if k.endswith("results.json")]
        else:
            results = json.loads(results)
            assert verify_manifest(out, results) == "", n
            if {k: v for k, v in now.items() if not k.startswith(".")} == pristine:
                seen.add("old")
            else:
                seen.add("new")
                assert json.loads(now["config.json"])["seed"] == 0
        shutil.rmtree(out)
    assert seen == {"old", "retracted", "new"}


# ---- two runs on one directory ----------------------------------------------------------------------

def test_second_run_on_a_locked_out_is_refused_naming_the_holder(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    os.write(holder, b"pid 4242 on elsewhere, started 2026-12-02 10:00:00")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: as another process's
    no_model_loads(monkeypatch)
    try:
        assert main(["--model", model, "--out", str(out), *FLAGS]) == 2
        one_error(capsys, "in use by another run (pid 4242 on elsewhere")
        assert compare_main([model, model, "--out", str(out), *PROBE]) == 2
        one_error(capsys, "in use by another run (pid 4242")
    finally:
        os.close(holder)


def test_stale_lock_of_a_killed_run_is_taken_over(model, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / LOCK).write_text("pid 99999 on here, started 2026-12-01 00:00:00")  # no flock: its holder is dead
    assert main(["--model", model, "--out", str(out), *FLAGS]) == 0
    assert (out / "results.json").exists() and not (out / LOCK).exists()


# ---- OS errors on writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"),
                                        (errno.EROFS, "read-only file system")])
def test_failed_artifact_write_is_one_line(model, tmp_path, monkeypatch, capsys, code, words):
    out = str(tmp_path / "out")
    real = depthfast.artifacts.tempfile.mkstemp

    def failing(*args, dir=None, **kwargs):
        if dir and os.path.abspath(dir) == os.path.abspath(out):
            raise OSError(code, os.strerror(code), os.path.join(dir, "profile.csv"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(depthfast.artifacts.tempfile, "mkstemp", failing)
    assert main(["--model", model, "--out", out, *FLAGS]) == 2
    one_error(capsys, words)
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_full_disk_at_a_checkpoint_is_a_warning_and_the_run_finishes(model, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    out = str(tmp_path / "out")
    assert main(["--model", model, "--out", out, *FLAGS, "--checkpoint-every", "1"]) == 0
    err = capsys.readouterr().err
    assert "depthfast: warning: checkpoint at step 1 not written" in err and "Traceback" not in err
    assert os.path.exists(os.path.join(out, "results.json"))
    assert not [n for n in os.listdir(out) if "checkpoint" in n]


# ---- damaged weights --------------------------------------------------------------------------------

def truncated_copy(source, target):
    shutil.copytree(source, target)
    weights = os.path.join(target, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    return str(target)


def test_truncated_model_weights_are_one_line(model, tmp_path, capsys):
    broken = truncated_copy(model, tmp_path / "broken")
    assert main(["--model", broken, "--out", str(tmp_path / "out"), *FLAGS]) == 2
    one_error(capsys, "damaged or truncated", broken)
    assert compare_main([model, broken, "--out", str(tmp_path / "cmp"), *PROBE]) == 2  # compare's TUNED
    one_error(capsys, "damaged or truncated", broken)


def killed_after_checkpoint(model, out, monkeypatch, extra=()):
    real = depthfast.train.save_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(depthfast.train, "save_checkpoint", save_then_die)
    assert main(["--model", model, "--out", out, *FLAGS, "--checkpoint-every", "1", *extra]) == 130
    monkeypatch.setattr(depthfast.train, "save_checkpoint", real)
    return json.load(open(os.path.join(out, "checkpoint.json")))


def test_damaged_checkpoints_say_what_is_wrong_and_how_to_start_fresh(model, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    resume = ["--model", model, "--out", out, *FLAGS, "--checkpoint-every", "1", "--resume"]
    pointer = killed_after_checkpoint(model, out, monkeypatch)
    directory = os.path.join(out, pointer["dir"])
    weights = os.path.join(directory, "model.safetensors")
    intact = open(weights, "rb").read()
    open(weights, "wb").write(intact[:100])  # truncated resume checkpoint
    capsys.readouterr()
    assert main(resume) == 2
    one_error(capsys, "is damaged", "without --resume")
    shutil.rmtree(directory)  # the checkpoint directory deleted
    assert main(resume) == 2
    one_error(capsys, "is missing (deleted?)", "without --resume")
    with open(os.path.join(out, "checkpoint.json"), "w") as f:
        json.dump({"step": 1, "dir": pointer["dir"]}, f)  # a pointer without its fingerprint
    assert main(resume) == 2
    one_error(capsys, "no 'fingerprint'", "--overwrite")
    assert main(["--model", model, "--out", out, *FLAGS]) == 0  # and without --resume it starts fresh


def test_resume_refusal_names_the_settings_that_differ(model, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    killed_after_checkpoint(model, out, monkeypatch)
    capsys.readouterr()
    assert main(["--model", model, "--out", out, *FLAGS, "--checkpoint-every", "1", "--resume", "--lr", "0.001"]) == 2
    one_error(capsys, "lr 5e-05 → 0.001")


# ---- position limits --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_position_limit_per_family(family):
    config = tiny_models.CONFIGS[family](tiny_models.VOCAB)
    if family in ("mamba", "rwkv"):
        assert depthfast.models.position_limit(config) is None
        depthfast.models.check_positions(config, 10_000, family)  # no positions: no limit
    else:
        assert depthfast.models.position_limit(config) == 256
        depthfast.models.check_positions(config, 256, family)
        with pytest.raises(depthfast.models.DepthfastError, match="--max-length 300 exceeds the 256 positions"):
            depthfast.models.check_positions(config, 300, family)


def test_max_length_beyond_positions_is_one_line_before_any_model_loads(checkpoints, tmp_path, monkeypatch, capsys):
    gpt2 = checkpoints("gpt2")
    no_model_loads(monkeypatch)
    args = [a if a != "16" else "300" for a in FLAGS]
    assert main(["--model", gpt2, "--out", str(tmp_path / "out"), *args]) == 2
    one_error(capsys, "--max-length 300 exceeds the 256 positions")
    assert compare_main([gpt2, gpt2, "--out", str(tmp_path / "cmp"), "--max-length", "300", "--quiet"]) == 2
    one_error(capsys, "--max-length 300 exceeds the 256 positions")


# ---- datasets ---------------------------------------------------------------------------------------

def test_dataset_errors_give_the_real_cause(model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"row {i} of a small local dataset"}) + "\n" if i != 49
                           else '{"text": "cut short\n' for i in range(60)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, words in ((bad, "line 50: not valid JSON"), (empty, "is empty")):
        assert main(["--model", model, "--dataset", str(path), "--out", str(tmp_path / "out"), *FLAGS]) == 2
        line = one_error(capsys, str(path), words)
        assert "hub" not in line


# ---- modes, interrupts, sweep, manifest -------------------------------------------------------------

def test_files_follow_the_umask(model, tmp_path):
    previous = os.umask(0o022)
    try:
        out = str(tmp_path / "out")
        assert main(["--model", model, "--out", out, *FLAGS, "--save-model", "--all-pairs"]) == 0
    finally:
        os.umask(previous)
    for root, dirs, files in os.walk(out):
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o755, name
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o644, name
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_ctrl_c_is_one_line_and_130(model, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(depthfast.models, "load_config", interrupt)
    out = tmp_path / "out"
    assert main(["--model", model, "--out", str(out), *FLAGS]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("depthfast:")]) == 1
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.5, 3.0])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path, delay):
    """At any moment of start-up: importing torch (where a KeyboardInterrupt raised inside a pybind11 call
    aborted with exit −6), transformers, loading the model."""
    proc = subprocess.Popen([sys.executable, "-m", "depthfast.run", "--out", str(tmp_path / "out")],
                            stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("depthfast: interrupted"), err


def test_interrupted_sweep_run_says_interrupted(tmp_path, monkeypatch):
    import depthfast.sweep.pool as pool
    from depthfast.config import RunConfig
    from depthfast.sweep.runs import Run

    directory = tmp_path / "r"
    directory.mkdir()
    run = Run(name="r", config=RunConfig(out=str(directory)), directory=str(directory))
    monkeypatch.setattr(pool, "prepare", lambda run: None)
    monkeypatch.setattr(pool, "command", lambda run: [sys.executable, "-c",
                                                      "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    echoed = []
    pool.Pool([None], None, echoed.append)._run_one(run, None)
    assert run.status == "interrupted" and "exit -15" not in run.note and "interrupted" in echoed[0]


def test_report_and_compare_flag_a_mix(model, tmp_path, capsys):
    from depthfast.report.records import load_run

    out = str(tmp_path / "run")
    assert main(["--model", model, "--out", out, *FLAGS, "--save-model"]) == 0
    assert load_run(out, str(tmp_path)).status == "ok"
    with open(os.path.join(out, "model", "config.json"), "a") as f:
        f.write("\n")  # another run's model beside these results
    record = load_run(out, str(tmp_path))
    assert record.status == "mixed artifacts" and "model/config.json" in record.problem
    capsys.readouterr()
    assert compare_main([model, os.path.join(out, "model"), "--out", str(tmp_path / "cmp"), *PROBE]) == 2
    one_error(capsys, "does not match its run's results.json")
