"""The command line entry points: ``python -m depthfast`` is the ``depthfast`` command."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "depthfast", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_python_m_depthfast_is_the_depthfast_command():
    done = _module("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: depthfast ")
    for command in ("run", "sweep", "report"):
        assert command in done.stdout


def test_python_m_depthfast_bad_input_is_one_line(tmp_path):
    done = _module("report", str(tmp_path / "no-such-dir"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("depthfast: error: ")


def test_cli_reference_is_generated_from_the_config_fields():
    """docs/cli.md's flag table is flag_reference(RunConfig) verbatim: each flag's help has one source, its
    field (depthfast.config.flag). Regenerate the block between the markers after changing a field."""
    import dataclasses
    import pathlib

    from depthfast.config import RunConfig, flag_reference

    assert all("help" in f.metadata for f in dataclasses.fields(RunConfig)), "every RunConfig field needs flag(…, help)"
    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    block = doc.split("<!-- flags:", 1)[1].split("-->\n", 1)[1].split("<!-- /flags -->", 1)[0]
    assert block == flag_reference(RunConfig)
