"""The one exception type the CLI turns into a one-line message instead of a traceback, and the exit
status every subcommand returns: 0 done, 2 bad input (one line ``depthfast: error: …``), 130 interrupted."""

from __future__ import annotations

import errno
import sys
from typing import Callable


class DepthfastError(Exception):
    """A problem with the user's input or environment, stated in words the user can act on."""


# What the running command says when Ctrl-C stops it: set by exit_status, printed by the hard exit of
# depthfast.rundir.interrupt_exits_130 as well as by the KeyboardInterrupt branch below.
INTERRUPTED_LINE = {"text": "interrupted"}


def exit_status(work: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run ``work`` (a subcommand's body) and return its exit status: its own (0 if None), 2 after one
    line for a DepthfastError or a write refused for want of space or permission (ENOSPC, EACCES,
    EROFS: os_error_line says what to do), 130 after one line for Ctrl-C
    (``interrupted`` says what survives)."""
    INTERRUPTED_LINE["text"] = interrupted
    try:
        return work() or 0
    except DepthfastError as exc:
        print(f"depthfast: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        line = os_error_line(exc)
        if line is None:
            raise
        print(f"depthfast: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"depthfast: {interrupted}", file=sys.stderr)
        return 130


def os_error_line(exc: OSError, path: str | None = None) -> str | None:
    """One line for a write that failed for want of space or permission, saying what to do; None for
    other errors."""
    where = path or exc.filename or "the output directory"
    advice = {errno.ENOSPC: "no space left on the device: free some space or choose --out on another disk",
              errno.EDQUOT: "disk quota exceeded: free some space or choose --out on another disk",
              errno.EACCES: "permission denied: choose a directory you can write to as --out",
              errno.EPERM: "operation not permitted: choose a directory you can write to as --out",
              errno.EROFS: "read-only file system: choose --out on a writable disk"}
    if exc.errno not in advice:
        return None
    return f"cannot write {where}: {advice[exc.errno]}"
