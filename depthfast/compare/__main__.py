"""``python -m depthfast.compare BASE TUNED``, the same as ``depthfast compare BASE TUNED``."""

import sys

from depthfast.rundir import interrupt_exits_130

interrupt_exits_130()  # before the heavy imports: Ctrl-C is one line, exit 130

from depthfast.compare import main  # noqa: E402

sys.exit(main())
