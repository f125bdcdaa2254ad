"""The one exception type the CLI turns into a one-line message instead of a traceback, and the exit
status every subcommand returns: 0 done, 2 bad input (one line ``depthfast: error: …``), 130 interrupted."""

from __future__ import annotations

import sys
from typing import Callable


class DepthfastError(Exception):
    """A problem with the user's input or environment, stated in words the user can act on."""


def exit_status(work: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run ``work`` (a subcommand's body) and return its exit status: its own (0 if None), 2 after one
    line for a DepthfastError or a write refused for want of space or permission (ENOSPC, EACCES,
    EROFS: depthfast.rundir.os_error_line says what to do), 130 after one line for Ctrl-C
    (``interrupted`` says what survives)."""
    try:
        return work() or 0
    except DepthfastError as exc:
        print(f"depthfast: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from depthfast.rundir import os_error_line

        line = os_error_line(exc)
        if line is None:
            raise
        print(f"depthfast: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"depthfast: {interrupted}", file=sys.stderr)
        return 130
