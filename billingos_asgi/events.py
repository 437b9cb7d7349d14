"""Usage events and the batches that carry them upstream under one fixed idempotency key."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Batch", "UsageEvent"]


class UsageEvent(NamedTuple):
    """The usage of one successful metered request; its key is stamped once, here, for every retry.

    Immutable; a named tuple rather than a frozen dataclass because one is made per request.
    """

    customer_id: str
    feature_key: str
    quantity: float
    idempotency_key: str
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one (customer, feature) sent as one track call under one fixed key."""

    customer_id: str
    feature_key: str
    events: tuple[UsageEvent, ...]
    idempotency_key: str

    @classmethod
    def of(cls, events: tuple[UsageEvent, ...]) -> Batch:
        first = events[0]
        if len(events) == 1:
            key = first.idempotency_key
        else:  # deterministic: the same events always make the same key
            digest = hashlib.sha256("\n".join(sorted(e.idempotency_key for e in events)).encode()).hexdigest()
            key = f"batch-{digest[:40]}"
        return cls(first.customer_id, first.feature_key, events, key)

    @property
    def quantity(self) -> float:
        return round(sum(event.quantity for event in self.events), 6)

    @property
    def metadata(self) -> Mapping[str, Any] | None:
        """A lone event's metadata goes up with it; a batch's events have no single one."""
        return self.events[0].metadata if len(self.events) == 1 else None
