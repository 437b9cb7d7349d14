"""Logging that a storm cannot flood: upstream down, or a flood of bad keys, fails every request alike."""

from __future__ import annotations

import logging
import time
import traceback

from ._exceptions import ValidationError
from ._validation import NotACustomerId

__all__ = ["Throttled", "without_message"]

logger = logging.getLogger("billingos_asgi")

INTERVAL = 1.0


class Throttled:
    """At most one line a second, which says how many similar lines it held back since the last."""

    __slots__ = ("_held", "_held_level", "_last")

    def __init__(self) -> None:
        self._last = -INTERVAL
        self._held = 0
        self._held_level = logging.NOTSET

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last < INTERVAL:
            self._held += 1
            self._held_level = max(self._held_level, level)
            return
        if self._held:
            message += f" ({self._held} similar lines held back)"
        self._last, self._held, self._held_level = now, 0, logging.NOTSET
        logger.log(level, message, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Say how many lines are held back, where no later line will (at shutdown)."""
        if self._held:
            logger.log(self._held_level, "%d similar lines held back since the last one", self._held)
            self._held, self._held_level = 0, logging.NOTSET


def without_message(exc: BaseException) -> str:
    """``exc`` as its type and where it was raised, its message left out unless it is one of ours
    that never quotes a value: a customer resolver's error may quote the credential it was given
    (``KEYS[key]`` raises ``KeyError(key)``)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    if isinstance(exc, ValidationError | NotACustomerId):
        return f"{type(exc).__name__}: {exc}\n{frames}".rstrip()
    return f"{type(exc).__name__} (its message left out: it may quote a credential)\n{frames}".rstrip()
