"""Background delivery of usage events, so the request path never waits on the billing service.

Events are queued (bounded) and, every ``flush_interval``, coalesced: the events of one
(customer, feature) go up as one track call with their summed quantity. A batch's idempotency key
is fixed when the batch is formed (the event's own key for a batch of one, a hash of its events'
keys otherwise) and reused on every retry; a batch is never re-formed after a failure whose
outcome is unknown. Transient failures are retried with backoff and jitter, honouring
``Retry-After``; a definitive refusal splits the batch so that its valid events still count.
Nothing is dropped silently: what cannot be recorded is logged, counted and passed to
``on_rejected``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from cachetools import TTLCache

from ._exceptions import (
    AuthenticationError,
    BillingOSError,
    InvalidResponseError,
    NetworkError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
)
from .backend import BillingBackend
from .cache import EntitlementCache

__all__ = ["Batch", "Tracker", "TrackerStats", "UsageEvent", "form_batches"]

logger = logging.getLogger("billingos_asgi")

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_CONCURRENCY = 4
RETRY_BASE = 0.5
RETRY_MAX = 30.0
#: Upstream forgets idempotency keys after 24 h; resending older events could count them twice.
IDEMPOTENCY_HORIZON = 24 * 3600 - 300
_REPORT_INTERVAL = 1.0
_TRANSIENT = (NetworkError, ServerError, RateLimitError, InvalidResponseError, AuthenticationError)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """The usage of one successful metered request; its key is stamped once, here, for every retry."""

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


def form_batches(events: Iterable[UsageEvent]) -> list[Batch]:
    """Group events by (customer, feature), keeping their order."""
    groups: dict[tuple[str, str], list[UsageEvent]] = {}
    for event in events:
        groups.setdefault((event.customer_id, event.feature_key), []).append(event)
    return [Batch.of(tuple(group)) for group in groups.values()]


RejectedCallback = Callable[[UsageEvent, str], None]


@dataclass(slots=True)
class TrackerStats:
    """Counters since start-up, in events unless named otherwise (per process)."""

    queued: int = 0
    sent: int = 0  # recorded upstream
    rejected: int = 0  # refused by billing (quota, validation): never retried
    dead_lettered: int = 0  # older than upstream's idempotency window: not resent blindly
    dropped: int = 0  # queue full, or unsent when the shutdown deadline passed
    duplicates: int = 0  # a trusted request id seen twice: counted once
    retried: int = 0  # track calls retried after a transient failure
    upstream_calls: int = 0  # track calls made
    coalesced: int = 0  # events that rode in a batch with others
    in_flight: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Tracker:
    """Delivers :class:`UsageEvent` s in the background (with a lifespan) or right away (without)."""

    def __init__(
        self,
        backend: BillingBackend,
        cache: EntitlementCache,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        on_rejected: RejectedCallback | None = None,
        deduplicate: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if flush_interval < 0 or max_queue < 1 or drain_timeout < 0 or max_concurrency < 1:
            raise ValueError(
                "tracker: need flush_interval >= 0, max_queue >= 1, drain_timeout >= 0 and max_concurrency >= 1"
            )
        self._backend = backend
        self._cache = cache
        self._flush_interval = flush_interval
        self._max_queue = max_queue
        self._drain_timeout = drain_timeout
        self._max_concurrency = max_concurrency
        self._on_rejected = on_rejected
        self._clock = clock
        # Only trusted (client-supplied) request ids can repeat; remember them for upstream's 24 h.
        self._seen: TTLCache[str, bool] | None = TTLCache(100_000, IDEMPOTENCY_HORIZON) if deduplicate else None
        self._pending: deque[UsageEvent] = deque()  # waiting for the flush window
        self._ready: deque[Batch] = deque()  # formed, waiting for a sender
        self._in_flight: set[Batch] = set()
        self._queued_events = 0  # in _pending and _ready
        self._idle: list[anyio.Event] = []  # one per sender waiting for work
        self._window: anyio.Event | None = None  # set when the first event of a window arrives
        self._closing_event: anyio.Event | None = None
        self._flushed = False
        self._done: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self.stats = TrackerStats()
        self._last_report = -_REPORT_INTERVAL
        self._unreported = 0

    @property
    def running(self) -> bool:
        return self._done is not None and self._closing_event is not None and not self._closing_event.is_set()

    def submit(self, event: UsageEvent) -> bool:
        """Queue ``event`` without waiting; False when no worker runs (the caller sends it itself)."""
        if not self.running:
            return False
        if self._seen is not None:
            if event.idempotency_key in self._seen:
                self.stats.duplicates += 1
                self._cache.reject(event.customer_id, event.feature_key, event.quantity, None)
                return True
            self._seen[event.idempotency_key] = True
        if self._queued_events >= self._max_queue:
            self._give_up((event,), "dropped", "queue full")
            return True
        self._pending.append(event)
        self._queued_events += 1
        self.stats.queued += 1
        if self._window is not None:
            self._window.set()
            self._window = None
        return True

    # -- lifecycle --

    def start(self, task_group: TaskGroup) -> None:
        self._closing_event = anyio.Event()
        self._flushed = False
        self._done = anyio.Event()
        self._scope = anyio.CancelScope()
        task_group.start_soon(self._work, self._done, self._scope, self._closing_event)

    async def stop(self) -> None:
        """Stop taking events; flush and deliver what is queued within the drain deadline."""
        done, closing, scope = self._done, self._closing_event, self._scope
        if done is None or closing is None or scope is None or closing.is_set():
            return
        closing.set()
        if self._window is not None:
            self._window.set()
        with anyio.move_on_after(self._drain_timeout):
            await done.wait()
        if not done.is_set():
            left = self._queued_events + sum(len(batch.events) for batch in self._in_flight)
            logger.error("usage drain deadline (%.1fs) passed with %d events unsent", self._drain_timeout, left)
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()
        self._done = None

    async def _work(self, done: anyio.Event, scope: anyio.CancelScope, closing: anyio.Event) -> None:
        try:
            with scope:
                async with anyio.create_task_group() as workers:
                    workers.start_soon(self._flusher, closing)
                    for _ in range(self._max_concurrency):
                        workers.start_soon(self._sender)
        finally:
            # Whatever the deadline cut off is reported, never silently lost.
            for batch in list(self._in_flight):
                self._give_up(batch.events, "dropped", "shutdown deadline passed (outcome unknown)")
            self._in_flight.clear()
            while self._ready:
                self._give_up(self._ready.popleft().events, "dropped", "shutdown deadline passed")
            if self._pending:
                self._give_up(tuple(self._pending), "dropped", "shutdown deadline passed")
                self._pending.clear()
            self._queued_events = 0
            done.set()

    async def _flusher(self, closing: anyio.Event) -> None:
        while True:
            if not self._pending:
                if closing.is_set():
                    break
                self._window = anyio.Event()
                await self._window.wait()
                continue
            if not closing.is_set():
                with anyio.move_on_after(self._flush_interval):
                    await closing.wait()  # a shutdown flushes at once
            self._flush()
        self._flushed = True
        self._wake_senders()

    def _flush(self) -> None:
        events = tuple(self._pending)
        self._pending.clear()
        batches = form_batches(events)
        self.stats.coalesced += len(events) - len(batches)
        self._ready.extend(batches)
        self._wake_senders()

    def _wake_senders(self) -> None:
        while self._idle:
            self._idle.pop().set()

    async def _sender(self) -> None:
        while True:
            if self._ready:
                batch = self._ready.popleft()
                self._queued_events -= len(batch.events)
                self._in_flight.add(batch)
                await self._deliver(batch, retry=True)
                self._in_flight.discard(batch)  # not on cancellation: _work reports what was cut off
                continue
            if self._flushed:
                return
            wakeup = anyio.Event()
            self._idle.append(wakeup)
            await wakeup.wait()

    # -- delivery --

    async def send(self, event: UsageEvent) -> None:
        """Deliver one event now, one attempt (the backend's own retries aside): for apps without a lifespan."""
        await self._deliver(Batch.of((event,)), retry=False)

    async def _deliver(self, batch: Batch, *, retry: bool) -> None:
        """Record ``batch`` upstream; outcomes are counted and fed back into the cache, never raised."""
        attempt = 0
        first_attempt = self._clock()
        while True:
            if self._clock() - first_attempt > IDEMPOTENCY_HORIZON:
                self._give_up(batch.events, "dead_lettered", "first attempted more than 24 h ago: not resent blindly")
                return
            self.stats.in_flight += len(batch.events)
            self.stats.upstream_calls += 1
            metadata = batch.events[0].metadata if len(batch.events) == 1 else None
            try:
                result = await self._backend.track_usage(
                    batch.customer_id, batch.feature_key, batch.quantity, batch.idempotency_key, metadata
                )
            except Exception as exc:
                error = exc
            else:
                self.stats.sent += len(batch.events)
                self._cache.confirm(batch.customer_id, batch.feature_key, batch.quantity, result)
                return
            finally:
                self.stats.in_flight -= len(batch.events)
            if not isinstance(error, BillingOSError) or isinstance(error, _TRANSIENT):
                if not retry:
                    self._give_up(batch.events, "dropped", f"billing unreachable ({type(error).__name__})", error)
                    return
                delay = min(RETRY_MAX, random.uniform(0, RETRY_BASE * 2**attempt))
                if isinstance(error, BillingOSError) and error.retry_after is not None:
                    delay = max(delay, error.retry_after)
                self.stats.retried += 1
                self._log(
                    logging.WARNING, "track of %d events failed (%r); retry in %.1fs", len(batch.events), error, delay
                )
                attempt += 1
                await anyio.sleep(delay)
                continue
            if len(batch.events) > 1:
                # A definitive refusal recorded nothing: send the events one by one, so the valid ones count.
                for event in batch.events:
                    await self._deliver(Batch.of((event,)), retry=retry)
                return
            reason = "quota_exceeded" if isinstance(error, QuotaExceededError) else error.message
            self._give_up(batch.events, "rejected", reason, error)
            return

    # -- reporting --

    def _give_up(
        self, events: tuple[UsageEvent, ...], outcome: str, reason: str, error: Exception | None = None
    ) -> None:
        """Count, log and report events that will not be recorded; stop counting their units locally."""
        for event in events:
            self._cache.reject(event.customer_id, event.feature_key, event.quantity, error)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            category = f"{outcome}: {reason if error is None else type(error).__name__}"  # bounded set of keys
            self.stats.reasons[category] = self.stats.reasons.get(category, 0) + 1
            self._log(
                logging.ERROR,
                "usage event %s (%s %s x%g) %s: %s",
                event.idempotency_key,
                event.customer_id,
                event.feature_key,
                event.quantity,
                outcome,
                reason,
            )
            if self._on_rejected is not None:
                try:
                    self._on_rejected(event, reason)
                except Exception:
                    logger.exception("on_rejected callback failed")

    def _log(self, level: int, message: str, *args: object) -> None:
        """Log, summarising storms: at most one line per second, with the count of lines held back."""
        now = time.monotonic()
        if now - self._last_report < _REPORT_INTERVAL:
            self._unreported += 1
            return
        if self._unreported:
            message += f" ({self._unreported} similar lines held back)"
        self._last_report, self._unreported = now, 0
        logger.log(level, message, *args)
