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
    """At most one line a second of each kind (its message template), which says how many lines of
    that kind it held back since the last: a storm of one kind never hides a line of another."""

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        # template -> [when last logged, lines held back since, the highest level held]; a template
        # is a literal of our code, so there are a handful of them.
        self._lines: dict[str, list[float]] = {}

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        line = self._lines.setdefault(message, [-INTERVAL, 0, logging.NOTSET])
        if now - line[0] < INTERVAL:
            line[1] += 1
            line[2] = max(line[2], level)
            return
        held = int(line[1])
        line[:] = [now, 0, logging.NOTSET]
        if held:
            message += f" ({held} similar lines held back)"
        logger.log(level, message, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Say how many lines of each kind are held back, where no later line will (at shutdown)."""
        for message, line in self._lines.items():
            if line[1]:
                logger.log(int(line[2]), "%d similar lines held back since the last one (%r)", line[1], message)
                line[1:] = [0, logging.NOTSET]


def without_message(exc: BaseException) -> str:
    """``exc`` as its type and where it was raised, its message left out unless it is one of ours
    that never quotes a value: a customer resolver's error may quote the credential it was given
    (``KEYS[key]`` raises ``KeyError(key)``)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    if isinstance(exc, ValidationError | NotACustomerId):
        return f"{type(exc).__name__}: {exc}\n{frames}".rstrip()
    return f"{type(exc).__name__} (its message left out: it may quote a credential)\n{frames}".rstrip()
