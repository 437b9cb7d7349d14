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


class _Kind:
    """One kind of line's state: when it was last logged, and what was held back since."""

    __slots__ = ("held", "last", "level")

    def __init__(self) -> None:
        self.last = -INTERVAL
        self.held = 0
        self.level = logging.NOTSET  # the highest level held back


class Throttled:
    """At most one line a second of each kind (its message template), which says how many lines of
    that kind it held back since the last: a storm of one kind never hides a line of another."""

    __slots__ = ("_kinds",)

    def __init__(self) -> None:
        self._kinds: dict[str, _Kind] = {}  # by template: a literal of our code, so a handful of them

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        kind = self._kinds.get(message) or self._kinds.setdefault(message, _Kind())
        if now - kind.last < INTERVAL:
            kind.held += 1
            kind.level = max(kind.level, level)
            return
        if kind.held:
            message += f" ({kind.held} similar lines held back)"
        kind.last, kind.held, kind.level = now, 0, logging.NOTSET
        logger.log(level, message, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Say how many lines of each kind are held back, where no later line will (at shutdown)."""
        for message, kind in self._kinds.items():
            if kind.held:
                logger.log(kind.level, "%d similar lines held back since the last one (%r)", kind.held, message)
                kind.held, kind.level = 0, logging.NOTSET


def without_message(exc: BaseException) -> str:
    """``exc`` as its type and where it was raised, its message left out unless it is one of ours
    that never quotes a value: a customer resolver's error may quote the credential it was given
    (``KEYS[key]`` raises ``KeyError(key)``)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    if isinstance(exc, ValidationError | NotACustomerId):
        return f"{type(exc).__name__}: {exc}\n{frames}".rstrip()
    return f"{type(exc).__name__} (its message left out: it may quote a credential)\n{frames}".rstrip()
