"""``python -m depthfast …`` is the ``depthfast`` command (run, sweep, report, compare)."""

import sys

from depthfast.rundir import interrupt_exits_130

interrupt_exits_130()  # before the heavy imports: Ctrl-C is one line, exit 130

from depthfast.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
