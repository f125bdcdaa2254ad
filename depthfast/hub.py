"""Is the model hub reachable? Offline, loaders use the local cache only and fail at once, clearly,
instead of retrying for half a minute."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection (without it, loading by id uses the local cache only)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def go_offline_if_unreachable() -> None:
    """Make huggingface_hub and datasets use their caches only when the hub cannot be reached."""
    if hub_reachable():
        return
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass
