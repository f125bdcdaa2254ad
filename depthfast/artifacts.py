"""A run's files on disk, the leaf every writer uses (imports nothing from depthfast): atomic writes (a
temporary file, then a rename over), JSON without NaN (``json_safe``, ``finite_or_none``), reading it back
(``read_json``), and the publishing hooks of an open run directory (``depthfast.rundir.RunDir`` registers
itself in ``_ACTIVE``; ``before_write`` / ``after_write`` retract the older run and are fault points)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile

RESULTS = "results.json"
# What a run, a compare or the Trainer callback writes besides results.json; an older run's copies are
# removed when a new run publishes (so `--overwrite` replaces a run whole), and the manifest lists them.
ARTIFACTS = ("config.json", "profile.csv", "profile.png", "train_log.csv", "trajectory.csv", "all_pairs.csv",
             "all_pairs.png", "model")
FAULT_ENV = "DEPTHFAST_FAULT_KILL_AT"

_ACTIVE: dict = {}  # absolute path → the open depthfast.rundir.RunDir of this process
_fault_count = [0]


def fault_point() -> None:
    """One point of the publishing window; under DEPTHFAST_FAULT_KILL_AT=n the n-th ends the process as
    kill -9 would (no cleanup, exit 137)."""
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    _fault_count[0] += 1
    if _fault_count[0] == int(target):
        os._exit(137)


def file_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or directory (0777) gets under the process's umask (0644/0755 under 022):
    temporary files from tempfile are 0600, and results are meant to be read by teammates."""
    umask = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if umask is None:  # not Linux: read it by setting it (not thread-safe, hence the /proc way first)
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def active(path: str) -> "depthfast.rundir.RunDir | None":
    """The open run directory that ``path`` (a file or model/ directly inside it) belongs to, if any."""
    return _ACTIVE.get(os.path.dirname(os.path.abspath(path)))


def before_write(path: str) -> None:
    """Called by every atomic writer before it writes ``path``: an artifact of an open RunDir starts the
    publishing (retracting the older run) and is a fault point."""
    owner = active(path)
    if owner is not None and os.path.basename(path) in ARTIFACTS + (RESULTS,):
        owner.begin_publish()
        fault_point()


def after_write(path: str) -> None:
    owner = active(path)
    if owner is not None and os.path.basename(path) in ARTIFACTS + (RESULTS,):
        fault_point()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The file gets the mode the umask gives a new file (0644 under 022; tempfile alone would leave 0600).
    Inside an open run directory (depthfast.rundir) an artifact's first write retracts the older run.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    before_write(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    after_write(path)


def finite_or_none(value):
    """A number for JSON or a table, or None where it is not finite: the one rule for "undefined".

    NaN and ±inf become None (JSON has no NaN, and a NaN must never pass as a number); other floats,
    and numpy or one-element torch scalars (as floats), are kept; None, bools, ints, strings and
    containers are returned as they are.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if not isinstance(value, float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return value
    return value if math.isfinite(value) else None


def json_safe(value):
    """``value`` with every non-finite float, in dicts, lists and tuples too, replaced by None (tuples
    become lists): JSON has no NaN, and a NaN must never pass as a number."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return finite_or_none(value)


def read_json(path: str):
    """(value, problem): the parsed JSON of ``path`` and "", or None and a short reason: "missing",
    or "unreadable (<error type>: <first 80 characters of the message>)"."""
    try:
        with open(path) as f:
            return json.load(f), ""
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})"


def atomic_write_json(path: str, data) -> None:
    atomic_write_bytes(path, (json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n").encode())


def atomic_write_csv(path: str, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
