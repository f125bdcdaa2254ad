"""``python -m depthfast …`` is the ``depthfast`` command (run, sweep, report, compare)."""

import sys

from depthfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
