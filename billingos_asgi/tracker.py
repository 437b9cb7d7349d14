"""Background delivery of usage events, so the request path never waits on the billing service.

Events go into a bounded in-memory queue; a worker started in the ASGI lifespan sends them
through the backend with their idempotency keys and drains the queue on shutdown within a
deadline. Nothing is dropped silently: what cannot be queued or sent is logged, counted and
handed to the ``on_rejected`` callback.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._exceptions import BillingOSError, QuotaExceededError
from .backend import BillingBackend
from .cache import EntitlementCache

__all__ = ["Tracker", "TrackerStats", "UsageEvent"]

logger = logging.getLogger("billingos_asgi")

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_MAX_CONCURRENCY = 8
_REPORT_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """The usage of one successful metered request; its key is stamped once, here, for every retry."""

    customer_id: str
    feature_key: str
    quantity: float
    idempotency_key: str
    metadata: Mapping[str, Any] | None = None


RejectedCallback = Callable[[UsageEvent, str], None]


@dataclass(slots=True)
class TrackerStats:
    """Counters since start-up (per process)."""

    queued: int = 0
    sent: int = 0
    rejected: int = 0  # refused by billing (quota, validation): never retried
    failed: int = 0  # billing unreachable after the backend's retries
    dropped: int = 0  # queue full, or left over when the drain deadline passed
    in_flight: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Tracker:
    """Sends :class:`UsageEvent` s in the background (with a lifespan) or right away (without)."""

    def __init__(
        self,
        backend: BillingBackend,
        cache: EntitlementCache,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        on_rejected: RejectedCallback | None = None,
    ) -> None:
        if max_queue < 1 or drain_timeout < 0 or max_concurrency < 1:
            raise ValueError("tracker: need max_queue >= 1, drain_timeout >= 0 and max_concurrency >= 1")
        self._backend = backend
        self._cache = cache
        self._max_queue = max_queue
        self._drain_timeout = drain_timeout
        self._max_concurrency = max_concurrency
        self._on_rejected = on_rejected
        self._queue: deque[UsageEvent] = deque()
        self._idle: list[anyio.Event] = []  # one per sender waiting for work
        self._closing = False
        self._done: anyio.Event | None = None
        self.stats = TrackerStats()
        self._last_report = -_REPORT_INTERVAL
        self._unreported = 0

    @property
    def running(self) -> bool:
        return self._done is not None and not self._closing

    def submit(self, event: UsageEvent) -> bool:
        """Queue ``event`` without waiting; False when no worker runs (the caller sends it itself)."""
        if not self.running:
            return False
        if len(self._queue) >= self._max_queue:
            self._give_up(event, "dropped", "queue full")
            return True
        self._queue.append(event)
        self.stats.queued += 1
        if self._idle:
            self._idle.pop().set()  # wake one sender, not all of them
        return True

    def start(self, task_group: TaskGroup) -> None:
        self._closing = False
        self._done = anyio.Event()
        task_group.start_soon(self._work, self._done)

    async def stop(self) -> None:
        """Stop taking events and send the queued ones, within the drain deadline."""
        done = self._done
        if done is None or self._closing:
            return
        self._closing = True
        while self._idle:
            self._idle.pop().set()
        with anyio.move_on_after(self._drain_timeout):
            await done.wait()
        if not done.is_set():
            logger.error(
                "usage drain deadline (%.1fs) passed with %d events unsent", self._drain_timeout, len(self._queue)
            )
        while self._queue:
            self._give_up(self._queue.popleft(), "dropped", "shutdown deadline passed")
        self._done = None

    async def _work(self, done: anyio.Event) -> None:
        """``max_concurrency`` long-lived senders share the queue: no task per event."""
        try:
            async with anyio.create_task_group() as senders:
                for _ in range(self._max_concurrency):
                    senders.start_soon(self._sender)
        finally:
            done.set()

    async def _sender(self) -> None:
        queue = self._queue
        while True:
            if queue:
                await self.send(queue.popleft())
                continue
            if self._closing:
                return
            wakeup = anyio.Event()
            self._idle.append(wakeup)
            await wakeup.wait()

    async def send(self, event: UsageEvent) -> None:
        """Deliver one event now; outcomes are counted and fed back into the cache, never raised."""
        self.stats.in_flight += 1
        try:
            result = await self._backend.track_usage(
                event.customer_id, event.feature_key, event.quantity, event.idempotency_key, event.metadata
            )
        except QuotaExceededError as exc:
            self._give_up(event, "rejected", "quota_exceeded", exc)
        except BillingOSError as exc:
            transient = exc.status is None or exc.status >= 500 or exc.status == 429
            self._give_up(event, "failed" if transient else "rejected", exc.message, exc)
        except Exception as exc:
            self._give_up(event, "failed", f"{type(exc).__name__}: {exc}", exc)
        else:
            self.stats.sent += 1
            self._cache.confirm(event.customer_id, event.feature_key, event.quantity, result)
        finally:
            self.stats.in_flight -= 1

    def _give_up(self, event: UsageEvent, outcome: str, reason: str, error: Exception | None = None) -> None:
        """Count, log and report an event that will not be recorded; stop counting its units locally."""
        self._cache.reject(event.customer_id, event.feature_key, event.quantity, error)
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        category = f"{outcome}: {reason if error is None else type(error).__name__}"  # bounded set of keys
        self.stats.reasons[category] = self.stats.reasons.get(category, 0) + 1
        now = time.monotonic()
        if now - self._last_report < _REPORT_INTERVAL:
            self._unreported += 1  # a storm of failures is summarised, not logged line by line
        else:
            more = f" ({self._unreported} more lost events since the last report)" if self._unreported else ""
            self._last_report, self._unreported = now, 0
            logger.error(
                "usage event %s (%s %s x%g) %s: %s%s",
                event.idempotency_key,
                event.customer_id,
                event.feature_key,
                event.quantity,
                outcome,
                reason,
                more,
            )
        if self._on_rejected is not None:
            try:
                self._on_rejected(event, reason)
            except Exception:
                logger.exception("on_rejected callback failed")
