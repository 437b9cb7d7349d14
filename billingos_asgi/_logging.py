"""Logging that a storm cannot flood: upstream down, or a flood of bad keys, fails every request alike."""

from __future__ import annotations

import logging
import time

__all__ = ["Throttled"]

logger = logging.getLogger("billingos_asgi")

INTERVAL = 1.0


class Throttled:
    """At most one line a second, which says how many similar lines it held back since the last."""

    __slots__ = ("_held", "_last")

    def __init__(self) -> None:
        self._last = -INTERVAL
        self._held = 0

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < INTERVAL:
            self._held += 1
            return
        if self._held:
            message += f" ({self._held} similar lines held back)"
        self._last, self._held = now, 0
        logger.log(level, message, *args, exc_info=exc_info)
