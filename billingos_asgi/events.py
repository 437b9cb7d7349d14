"""Usage events and the batches that carry them upstream under one fixed idempotency key."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._validation import MAX_ID_LENGTH

__all__ = ["Batch", "Group", "UsageEvent", "event_key", "part_key"]


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

    Immutable; a named tuple rather than a frozen dataclass, cheap to make: one per request where
    the tracker cannot take its fields alone (an outbox, no worker), thousands when a batch is taken apart.
    """

    customer_id: str
    feature_key: str
    quantity: float
    idempotency_key: str
    metadata: Mapping[str, Any] | None = None


#: A usage event without the named tuple's Python-level ``__new__``.
new_event = functools.partial(tuple.__new__, UsageEvent)


class Group:
    """The events of one (customer, feature) in a flush window, held as columns of their fields:
    thousands of events a second alive for a window would each be an object for the garbage
    collector to scan (and its full collections to pause the app for); a few lists are not."""

    __slots__ = ("customer_id", "feature_key", "keys", "kept", "metadata", "quantities")

    def __init__(self, customer_id: str, feature_key: str) -> None:
        self.customer_id = customer_id
        self.feature_key = feature_key
        self.keys: list[str] = []
        self.quantities: list[float] = []
        self.metadata: list[Mapping[str, Any] | None] | None = None  # None while none has any
        self.kept: dict[int, UsageEvent] | None = None  # by position: events added as themselves (see keep)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, quantity: float, metadata: Mapping[str, Any] | None = None) -> None:
        """Add an event of this customer and feature, by its fields."""
        self.keys.append(key)
        self.quantities.append(quantity)
        if metadata is not None or self.metadata is not None:
            if self.metadata is None:
                self.metadata = [None] * (len(self.keys) - 1)
            self.metadata.append(metadata)

    def keep(self, event: UsageEvent) -> None:
        """Add ``event`` as itself: its batch holds this very object, for a caller that tracks it by
        identity (an event whose outbox write failed); the others are made anew when needed."""
        if self.kept is None:
            self.kept = {}
        self.kept[len(self.keys)] = event
        self.add(event.idempotency_key, event.quantity, event.metadata)

    def extend(self, other: Group) -> None:
        """Take ``other``'s events (of the same customer and feature) after these."""
        if other.metadata is not None or self.metadata is not None:
            self.metadata = (self.metadata or [None] * len(self.keys)) + (other.metadata or [None] * len(other))
        if other.kept:
            self.kept = self.kept or {}
            self.kept.update((len(self.keys) + at, event) for at, event in other.kept.items())
        self.keys += other.keys
        self.quantities += other.quantities

    def events(self) -> tuple[UsageEvent, ...]:
        """Its events: the kept ones as themselves, the others made anew at each call."""
        made = _events(self.customer_id, self.feature_key, self.keys, self.quantities, self.metadata)
        if not self.kept:
            return made
        kept = self.kept
        return tuple(kept.get(at, event) for at, event in enumerate(made))

    def batch(self) -> Batch:
        """These events as a batch (see :meth:`Batch.of`: the same events, the same key)."""
        if self.kept:
            return Batch.of(self.events())
        keys, quantities = tuple(self.keys), tuple(self.quantities)
        metadata = None if self.metadata is None else tuple(self.metadata)
        return Batch(self.customer_id, self.feature_key, keys, quantities, metadata, _key(keys), _sum(quantities))


def _events(
    customer_id: str,
    feature_key: str,
    keys: Sequence[str],
    quantities: Sequence[float],
    metadata: Sequence[Mapping[str, Any] | None] | None,
) -> tuple[UsageEvent, ...]:
    each = [None] * len(keys) if metadata is None else metadata
    rows = zip(keys, quantities, each, strict=True)
    return tuple(new_event((customer_id, feature_key, quantity, key, meta)) for key, quantity, meta in rows)


def _key(keys: Sequence[str]) -> str:
    """A batch's key: its lone event's, or a digest of its events' keys (linear: no sort)."""
    if len(keys) == 1:
        return keys[0]
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    return f"batch-{digest[:40]}"


def _sum(quantities: Iterable[float]) -> float:
    return round(math.fsum(quantities), 6)


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one (customer, feature) sent as one track call under one fixed key.

    Its events are held as columns (see :class:`Group`): :attr:`events` makes them on demand, for
    the rare paths that take a batch apart (a quota refusal, a shutdown's cut-off), once.
    """

    customer_id: str
    feature_key: str
    keys: tuple[str, ...]
    quantities: tuple[float, ...]
    metadata_of: tuple[Mapping[str, Any] | None, ...] | None  # each event's; None: none has any
    idempotency_key: str
    quantity: float
    _made: tuple[UsageEvent, ...] | None = field(default=None, init=False, compare=False, repr=False)

    @classmethod
    def of(cls, events: tuple[UsageEvent, ...], key: str | None = None) -> Batch:
        """The batch of ``events`` (in their order), keyed by them: the same events, the same key.

        Linear in the events (no sort), as a flush of a busy window may hold thousands of them.
        ``key``: the key it was stamped with before (a batch replayed from the outbox).
        """
        first = events[0]
        keys = tuple(event.idempotency_key for event in events)
        quantities = tuple(event.quantity for event in events)
        metadata = None if all(e.metadata is None for e in events) else tuple(e.metadata for e in events)
        key = _key(keys) if key is None else key
        batch = cls(first.customer_id, first.feature_key, keys, quantities, metadata, key, _sum(quantities))
        object.__setattr__(batch, "_made", events)  # (its events are these very objects)
        return batch

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def events(self) -> tuple[UsageEvent, ...]:
        """Its events, the same objects every time (tracked by identity once taken apart): those it
        was made of (:meth:`of`), or made from its columns at the first call."""
        made = self._made
        if made is None:
            made = _events(self.customer_id, self.feature_key, self.keys, self.quantities, self.metadata_of)
            object.__setattr__(self, "_made", made)  # (frozen: its fields, not this cache of them)
        return made

    @property
    def metadata(self) -> Mapping[str, Any] | None:
        """A lone event's metadata goes up with it; a batch's events have no single one."""
        return self.metadata_of[0] if len(self.keys) == 1 and self.metadata_of is not None else None


def part_key(event: UsageEvent) -> str:
    """The key of the part of ``event`` that fits what is left of a quota: derived from the event's
    key and its quantity when split, so that a replay of this split resends the part under the same
    key, and a later split of what was left (a smaller quantity) gets a key of its own."""
    digest = hashlib.sha256(f"{event.idempotency_key}\n{event.quantity!r}".encode()).hexdigest()
    return f"part-{digest[:40]}"
