"""Usage events and the batches that carry them upstream under one fixed idempotency key."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, NamedTuple

from ._validation import MAX_ID_LENGTH

__all__ = ["Batch", "UsageEvent", "event_key", "part_key"]


def event_key(request_id: str, feature: str) -> str:
    """The idempotency key of a request's usage of ``feature``: ``request_id:feature``, one per
    request and feature. A trusted id's ``:`` and ``%`` are percent-encoded (ours have neither), so
    that the first ``:`` ends the id ("r1" on "gpu:hours" is not "r1:gpu" on "hours"). Where that
    would be longer than upstream takes, the feature's digest stands for it, and the id's for a long
    id ("%%" starts no encoded id), so that the event is still recorded."""
    if ":" in request_id or "%" in request_id:
        request_id = request_id.replace("%", "%25").replace(":", "%3A")
    key = f"{request_id}:{feature}"
    if len(key) <= MAX_ID_LENGTH:
        return key
    if len(request_id) + 33 > MAX_ID_LENGTH:
        request_id = f"%%{hashlib.sha256(request_id.encode()).hexdigest()[:40]}"
    return f"{request_id}:{hashlib.sha256(feature.encode()).hexdigest()[:32]}"


class UsageEvent(NamedTuple):
    """The usage of one successful metered request; its key is stamped once, here, for every retry.

    Immutable; a named tuple rather than a frozen dataclass because one is made per request.
    """

    customer_id: str
    feature_key: str
    quantity: float
    idempotency_key: str
    metadata: Mapping[str, Any] | None = None


# Read in C over a batch's events (a flush of a busy window holds thousands of them).
_key_of = attrgetter("idempotency_key")
_quantity_of = attrgetter("quantity")


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one (customer, feature) sent as one track call under one fixed key."""

    customer_id: str
    feature_key: str
    events: tuple[UsageEvent, ...]
    idempotency_key: str
    quantity: float

    @classmethod
    def of(cls, events: tuple[UsageEvent, ...], key: str | None = None) -> Batch:
        """The batch of ``events`` (in their order), keyed by them: the same events, the same key.

        Linear in the events (no sort), as a flush of a busy window may hold thousands of them.
        ``key``: the key it was stamped with before (a batch replayed from the outbox).
        """
        first = events[0]
        if key is None and len(events) == 1:
            key = first.idempotency_key
        elif key is None:
            digest = hashlib.sha256("\n".join(map(_key_of, events)).encode()).hexdigest()
            key = f"batch-{digest[:40]}"
        quantity = round(math.fsum(map(_quantity_of, events)), 6)
        return cls(first.customer_id, first.feature_key, events, key, quantity)

    @property
    def metadata(self) -> Mapping[str, Any] | None:
        """A lone event's metadata goes up with it; a batch's events have no single one."""
        return self.events[0].metadata if len(self.events) == 1 else None


def part_key(event: UsageEvent) -> str:
    """The key of the part of ``event`` that fits what is left of a quota: derived from the event's
    key and its quantity when split, so that a replay of this split resends the part under the same
    key, and a later split of what was left (a smaller quantity) gets a key of its own."""
    digest = hashlib.sha256(f"{event.idempotency_key}\n{event.quantity!r}".encode()).hexdigest()
    return f"part-{digest[:40]}"
