"""The one rule for "undefined" in the metrics: None, never NaN (results.json has no NaN)."""

from __future__ import annotations

import math


def _finite(value) -> float | None:
    """A Python float if finite, else None (JSON has no NaN, and NaN must never pass as a number)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
