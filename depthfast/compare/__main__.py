"""``python -m depthfast.compare BASE TUNED``, the same as ``depthfast compare BASE TUNED``."""

import sys

from depthfast.compare import main

sys.exit(main())
