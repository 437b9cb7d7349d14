"""Background delivery of usage events, so the request path never waits on the billing service.

Events are queued (bounded) and, every ``flush_interval``, handed to the senders grouped by
(customer, feature). A sender waits for the upstream budget (and the circuit breaker) before it
takes a group, so while calls are scarce the groups keep growing: the slower upstream lets us
call, the more events each call carries. A group becomes a :class:`Batch` under a key fixed
before its first attempt and reused on every retry; a batch is never re-formed after a failure
whose outcome is unknown. Transient failures are retried with backoff and jitter, honouring
``Retry-After``; a batch refused for quota is halved until what fits is recorded and the rest
is rejected. Nothing is dropped silently: what cannot be recorded is logged, counted and passed
to ``on_rejected``. With an :class:`~billingos_asgi.outbox.Outbox`, events are on disk from the
moment they are queued until upstream confirms them, and a restart resends what a crash left.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat

import anyio
from anyio.abc import TaskGroup
from cachetools import TTLCache

from ._exceptions import NotFoundError, QuotaExceededError, ValidationError
from ._logging import Throttled
from ._validation import QUANTITY_BOUND, QUANTITY_DECIMALS
from .cache import EntitlementCache
from .events import Batch, Group, UsageEvent, new_event, part_key
from .outbox import Outbox
from .upstream import CHECK_TIMEOUT, MAX_PAUSE, Upstream

__all__ = ["Tracker", "TrackerStats"]

logger = logging.getLogger("billingos_asgi")

DEFAULT_MAX_QUEUE = 100_000  # about 15 MB of events at most
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_CONCURRENCY = 4
RETRY_BASE = 0.5
RETRY_MAX = 30.0
#: How long a batch waits for its stamp in a failing outbox before it goes up without.
STAMP_HOLD = 60.0
#: After a check found a quota used up, events refused for it are rejected without asking again for this long.
FULL_FOR = 10.0
#: Without a worker (no lifespan), how long a request's task may go on delivering usage after its response.
INLINE_DEADLINE = 30.0
#: Said of an event given up while a call for it may have reached upstream: a new key could count it twice.
#: Its call may have been recorded, under the key of the batch or part it went up in (not its own):
#: resent under any key, it could count twice.
IN_DOUBT = "it may be recorded upstream: see upstream's usage before billing it again"
#: Upstream forgets idempotency keys after 24 h; resending older events could count them twice.
IDEMPOTENCY_HORIZON = 24 * 3600 - 300
#: Definitive refusals (nothing was recorded): never retried. Anything else may pass later.
_PERMANENT = (ValidationError, NotFoundError, QuotaExceededError)

Key = tuple[str, str]
RejectedCallback = Callable[[UsageEvent, str], None]


def _pair(event: UsageEvent) -> Key:
    """(customer, idempotency key): an event's identity upstream, and in the outbox."""
    return event.customer_id, event.idempotency_key


@dataclass(slots=True)
class TrackerStats:
    """Counters since start-up, in events unless named otherwise (per process).

    Every event handed over (``queued``), found in the outbox (``replayed``) or cut in two by a quota
    refusal (``split``: its parts count apart) is, at any moment, under one outcome (sent, rejected,
    dead-lettered, dropped, in doubt, deferred), in the tracker's backlog, or in flight.
    """

    queued: int = 0  # handed to the tracker (a trusted duplicate aside), dropped on a full queue or not
    sent: int = 0  # recorded upstream
    rejected: int = 0  # refused by billing (quota, validation): never retried
    dead_lettered: int = 0  # older than upstream's idempotency window: not resent blindly
    dropped: int = 0  # never sent: queue full, or the shutdown deadline passed without an outbox
    in_doubt: int = 0  # given up while its track call was under way, with no outbox to keep it: maybe recorded
    deferred: int = 0  # unsent at shutdown, kept in the outbox for the next start
    replayed: int = 0  # found in the outbox at start-up
    duplicates: int = 0  # a trusted request id seen twice: counted once
    retried: int = 0  # track calls retried after a transient failure
    coalesced: int = 0  # track calls saved by coalescing: n - 1 for a batch of n events
    split: int = 0  # events cut in two by a quota refusal: the part that fits, and the rest rejected
    in_flight: int = 0  # in a track call right now
    not_durable: int = 0  # kept in memory only: the outbox failed to write them (a crash would lose them)
    reasons: dict[str, int] = field(default_factory=dict)  # "outcome: reason" of events not recorded


class Tracker:
    """Delivers :class:`UsageEvent` s in the background (with a lifespan) or right away (without)."""

    def __init__(
        self,
        upstream: Upstream,
        cache: EntitlementCache,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        on_rejected: RejectedCallback | None = None,
        deduplicate: bool = False,
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if flush_interval < 0 or max_queue < 1 or drain_timeout < 0 or max_concurrency < 1:
            raise ValueError(
                "tracker: need flush_interval >= 0, max_queue >= 1, drain_timeout >= 0 and max_concurrency >= 1"
            )
        self._upstream = upstream
        self._cache = cache
        self._flush_interval = flush_interval
        self._max_queue = max_queue
        self._drain_timeout = drain_timeout
        self._max_concurrency = max_concurrency
        self._on_rejected = on_rejected
        self._outbox = outbox
        self._outbox_unused_said = False  # warned that without a lifespan it is not used
        self._clock = clock  # first attempts are stamped on it (a replay after a restart reads them)
        self._monotonic = monotonic  # and upstream's 24 h measured on it too, within the process
        # Only trusted (client-supplied) request ids can repeat; remember them for upstream's 24 h.
        # (customer, key): upstream's idempotency is per customer, and so is this filter.
        self._seen: TTLCache[tuple[str, str], bool] | None = (
            TTLCache(100_000, IDEMPOTENCY_HORIZON) if deduplicate else None
        )
        self._unwritten: list[UsageEvent] = []  # accepted, on their way into the outbox
        self._pending: dict[Key, Group] = {}  # in the current flush window, grouped as they come
        self._due: dict[Key, Group] = {}  # window closed, waiting for a sender and a token
        # From the outbox of a previous run: resent as they were (first attempt time, if any).
        self._fixed: deque[tuple[Batch, float | None]] = deque()
        # Events handed to a delivery and not yet settled (recorded, or given up): what a deadline
        # cuts off is exactly these. By lot (the batch a sender took, as a rule settled at once),
        # and by identity for the lots settled in parts (a split batch may be part recorded already).
        self._unsettled: dict[int, Batch] = {}
        self._loose: dict[int, UsageEvent] = {}
        # Of those (by the same identities), the ones upstream refused in full, not in a call since: not
        # recorded, whatever cuts them off (a deadline while what fits of them is found).
        self._unrecorded: set[int] = set()
        self._unsettled_events = 0
        self._inline: dict[int, UsageEvent] = {}  # the same, for the sends of request tasks (no worker)
        self._volatile: dict[int, UsageEvent] = {}  # queued, unsettled, and not in the outbox: its write failed
        # Checked: nothing left of the quota until the period's end (Unix time; inf: none said).
        self._full: TTLCache[Key, float] = TTLCache(10_000, FULL_FOR)
        self._riders: dict[Key, list[UsageEvent]] = {}  # without a worker: events waiting for a send running
        self._confirmed: list[tuple[str, str]] = []  # (customer, key) of events to remove from the outbox
        self._queued_events = 0  # unwritten, pending, due and fixed
        self._room = max_queue  # for queued events: max_queue less those the senders hold (unsettled)
        self._idle: list[anyio.Event] = []  # one per sender waiting for work
        self._window: anyio.Event | None = None  # set when the first event of a window arrives
        self._holding: anyio.CancelScope | None = None  # the flusher's wait for the window to close
        self._disk: anyio.Event | None = None  # set when the outbox writer has work
        self._writing = False
        self._senders_done = False
        self._closing_event: anyio.Event | None = None
        self._flushed = False
        self._done: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._paying: anyio.Lock | None = None  # one sender at a time waits for the call budget
        self.running = False  # taking events: from start() to the last window that stop() flushes
        self.stats = TrackerStats()
        self._throttled = Throttled()  # storms summarised: one line a second, with the count held back
        self._callback_throttled = Throttled()
        self._log = self._throttled.log
        self._log_callback = self._callback_throttled.log

    @property
    def outbox(self) -> Outbox | None:
        return self._outbox

    @property
    def backlog(self) -> int:
        """Events accepted and not yet in a track call: queued, riding along with an inline send, or
        taken for delivery and waiting (to retry, for a token, for what is left of a quota)."""
        riders = sum(len(riders) for riders in self._riders.values())
        return self._queued_events + riders + self._unsettled_events + len(self._inline) - self.stats.in_flight

    @property
    def upstream(self) -> Upstream:
        return self._upstream

    def add(self, customer_id: str, feature_key: str, quantity: float, key: str) -> bool:
        """:meth:`submit` a request's usage (no metadata) by its fields: the event object is made only
        where one is needed, not in the common case (its window's group open, no outbox, no trusted
        request ids, room in the queue), where they go straight into the group's columns."""
        if not self.running:
            return False
        group = self._pending.get((customer_id, feature_key))
        if group is None or self._seen is not None or self._outbox is not None or self._queued_events >= self._room:
            return self.submit(new_event((customer_id, feature_key, quantity, key, None)))
        self.stats.queued += 1
        self._queued_events += 1
        group.add(key, quantity)
        return True

    def submit(self, event: UsageEvent) -> bool:
        """Queue ``event`` without waiting; False when no worker runs (the caller sends it itself)."""
        if not self.running:
            return False
        if self._seen is not None and self._is_duplicate(event):
            return True
        self.stats.queued += 1
        if self._queued_events >= self._room:
            self._give_up((event,), "dropped", "queue full")
            return True
        if self._seen is not None:
            self._see(event)
        self._queued_events += 1
        if self._outbox is None:
            group = self._pending.get((event.customer_id, event.feature_key))
            if group is not None:  # its key's group in this window (the common case, inline: a call less)
                group.add(event.idempotency_key, event.quantity, event.metadata)
            else:
                self._enqueue(event)
        else:  # durable first: it joins the window once its row is written
            self._unwritten.append(event)
            self._wake_writer()
        return True

    def _see(self, event: UsageEvent) -> None:
        """Remember a trusted request id once its event is accepted (a dropped one may be retried)."""
        if self._seen is not None:
            self._seen[event.customer_id, event.idempotency_key] = True

    def _is_duplicate(self, event: UsageEvent) -> bool:
        """A trusted request id seen before for this customer: counted once (its units released)."""
        if self._seen is None or (event.customer_id, event.idempotency_key) not in self._seen:
            return False
        self.stats.duplicates += 1
        self._cache.reject(event.customer_id, event.feature_key, event.quantity, None)
        return True

    def _enqueue(self, event: UsageEvent) -> None:
        key = (event.customer_id, event.feature_key)
        group = self._pending.get(key)
        if group is None:
            group = self._pending[key] = Group(*key)
            if self._window is not None:  # the first event of a window wakes the flusher
                self._window.set()
                self._window = None
        if self._volatile and id(event) in self._volatile:
            group.keep(event)  # (tracked by identity: its batch holds it)
        else:
            group.add(event.idempotency_key, event.quantity, event.metadata)

    # -- lifecycle --

    async def start(self, task_group: TaskGroup) -> None:
        """Open the outbox (replaying what it holds) and start the workers in ``task_group``."""
        if self._outbox is not None:
            stored = await anyio.to_thread.run_sync(self._outbox.open)
            if stored:
                logger.warning("resending %d usage events left unconfirmed in %s", len(stored), self._outbox.path)
            self._fixed.extend(stored.batches)
            groups: dict[Key, list[UsageEvent]] = {}
            for event in stored.events:
                groups.setdefault((event.customer_id, event.feature_key), []).append(event)
            self._fixed.extend((Batch.of(tuple(group)), None) for group in groups.values())
            self._queued_events += len(stored)
            self.stats.replayed += len(stored) + len(stored.refused)
            for event in chain((e for batch, _ in stored.batches for e in batch.events), stored.events):
                # Pending until recorded, as in the process that queued them.
                self._cache.count_pending(event.customer_id, event.feature_key, event.quantity)
                self._see(event)  # a trusted request id retried after the restart: a duplicate still
            for event, refusal in stored.refused:  # its report may not have been made: made again
                self._cache.count_pending(event.customer_id, event.feature_key, event.quantity)  # let go by the report
                outcome, _, reason = refusal.partition(": ")
                self._give_up((event,), outcome, f"{reason} (refused before a restart)", kind="before a restart")
        self._closing_event = anyio.Event()
        self._flushed = self._senders_done = self._upstream.draining = False
        self._done = anyio.Event()
        self._scope = anyio.CancelScope()
        self._paying = anyio.Lock(fast_acquire=True)  # no extra turn of the loop for each batch
        task_group.start_soon(self._work, self._done, self._scope, self._closing_event)
        self.running = True

    async def stop(self) -> None:
        """Flush and deliver what is queued within the drain deadline. Events are still taken (the
        outbox first) until the drain is over: a request the server lets finish meanwhile."""
        done, closing, scope = self._done, self._closing_event, self._scope
        if done is None or closing is None or scope is None or closing.is_set():
            return
        closing.set()
        self._upstream.draining = True
        if self._window is not None:
            self._window.set()
        if self._holding is not None:
            self._holding.cancel()
        try:
            with anyio.move_on_after(self._drain_timeout) as deadline:
                await done.wait()
        finally:  # cancelled too (a server's own shutdown timeout): the outbox is not left locked
            if not done.is_set():
                left = self._queued_events + self._unsettled_events
                by = f"its deadline ({self._drain_timeout:.1f}s)" if deadline.cancelled_caught else "a cancellation"
                logger.error("usage drain cut off by %s with %d events unsent", by, left)
                scope.cancel()
                with anyio.CancelScope(shield=True):
                    await done.wait()
            self._done = None
            if self._outbox is not None:
                self._outbox.close()
            self._throttled.flush()  # the last storm's count: no later line will carry it
            self._callback_throttled.flush()

    async def _work(self, done: anyio.Event, scope: anyio.CancelScope, closing: anyio.Event) -> None:
        try:
            with scope:
                async with anyio.create_task_group() as outer:
                    if self._outbox is not None:
                        outer.start_soon(self._writer)
                    async with anyio.create_task_group() as workers:
                        workers.start_soon(self._flusher, closing)
                        for _ in range(self._max_concurrency):
                            workers.start_soon(self._sender)
                    self._senders_done = True
                    self._wake_writer()  # let the writer forget the last confirmed events, and return
        finally:
            self.running = False
            self._account_for_cut_off()
            done.set()

    def _account_for_cut_off(self) -> None:
        """Report what the deadline cut off: kept in the outbox for the next start, or given up."""
        attempted = [event for lot in self._unsettled.values() for event in lot.events]
        attempted += [event for at, event in self._loose.items() if at not in self._unrecorded]
        waiting = [event for at, event in self._loose.items() if at in self._unrecorded]
        waiting += [event for batch, _ in self._fixed for event in batch.events]
        waiting += [event for group in self._due.values() for event in group.events()]
        waiting += [event for group in self._pending.values() for event in group.events()]
        if self._volatile:  # not on disk, whatever the outbox would say at the next start
            volatile = self._volatile
            self._unwritten += [event for event in waiting if id(event) in volatile]  # a last try
            waiting = [event for event in waiting if id(event) not in volatile]
            # One sent already may be recorded upstream: written now, unstamped, it could count twice.
            lost = tuple(event for event in attempted if id(event) in volatile)
            attempted = [event for event in attempted if id(event) not in volatile]
            reason = f"shutdown deadline passed during its delivery ({IN_DOUBT}; outbox write failed)"
            self._give_up(lost, "in_doubt", reason)
            volatile.clear()
        unsent = attempted + waiting
        self._unsettled.clear()
        self._loose.clear()
        self._unrecorded.clear()
        self._unsettled_events = 0
        self._room = self._max_queue
        self._fixed.clear()
        self._due.clear()
        self._pending.clear()
        if self._outbox is not None and self._confirmed:
            try:  # kept, they would be resent at the next start (a refused one could be recorded then)
                self._outbox.remove(self._confirmed)
            except Exception:
                logger.exception("the usage outbox %s failed to forget confirmed events", self._outbox.path)
            self._confirmed.clear()
        if self._outbox is not None and self._unwritten:
            try:  # a last write, on the loop: the process is shutting down anyway
                written = self._outbox.add(self._unwritten)
            except Exception:
                logger.exception("could not write %d usage events to the outbox", len(self._unwritten))
                written = 0
            unsent += self._unwritten[:written]
            self._give_up(tuple(self._unwritten[written:]), "dropped", "shutdown deadline passed (not in the outbox)")
        self._unwritten.clear()
        self._queued_events = 0
        if self._outbox is not None and not self._outbox.is_in_place:
            logger.error("the usage outbox %s was deleted or replaced while in use", self._outbox.path)
            reason = "shutdown deadline passed (the outbox file was deleted or replaced"
            self._give_up(tuple(attempted), "in_doubt", f"{reason}; {IN_DOUBT})")
            self._give_up(tuple(unsent[len(attempted) :]), "dropped", reason + ")")
        elif self._outbox is not None:
            self.stats.deferred += len(unsent)
            if unsent:
                logger.warning("%d usage events stay in %s for the next start", len(unsent), self._outbox.path)
            for event in unsent:  # the next start holds them again as it replays them: held, they would count twice
                self._cache.reject(event.customer_id, event.feature_key, event.quantity, None)
        else:
            self._give_up(tuple(attempted), "in_doubt", f"shutdown deadline passed during its delivery ({IN_DOUBT})")
            self._give_up(tuple(waiting), "dropped", "shutdown deadline passed")

    async def _writer(self) -> None:
        """Write accepted events to the outbox (then queue them) and forget confirmed ones, in batches."""
        outbox = self._outbox
        assert outbox is not None  # noqa: S101 - only started with an outbox
        while True:
            if self._unwritten or self._confirmed:
                events, self._unwritten = self._unwritten, []
                confirmed, self._confirmed = self._confirmed, []
                retry = False
                self._writing = True
                try:
                    try:  # first: the rows confirmed count against the outbox's bound until they go
                        if confirmed:
                            await anyio.to_thread.run_sync(outbox.remove, confirmed)
                    except Exception:
                        # Left, they would be resent after a restart (a refused one could be recorded then).
                        logger.exception("the usage outbox %s failed to forget confirmed events", outbox.path)
                        retry = True
                        self._keep_to_forget(confirmed)
                    except BaseException:  # cut off by the drain deadline: forgotten at the deadline instead
                        self._confirmed[:0] = confirmed
                        self._unwritten[:0] = events  # (the last write takes them)
                        raise
                    await self._persist(outbox, events)
                finally:
                    self._writing = False
                    self._drain_moved()
                if retry:
                    if self._senders_done:
                        return  # the drain's end tries once more
                    await anyio.sleep(1.0)
                continue
            if self._senders_done:
                return
            self._disk = anyio.Event()
            await self._disk.wait()

    def _keep_to_forget(self, confirmed: list[tuple[str, str]]) -> None:
        """Keep ``confirmed`` to forget later, within the queue's bound while the disk keeps failing:
        rows not forgotten are resent after a restart, under the keys that upstream has seen."""
        self._confirmed[:0] = confirmed
        excess = len(self._confirmed) - self._max_queue
        if excess > 0:
            del self._confirmed[:excess]
            self._log(logging.ERROR, "%d confirmed usage events may be resent after a restart", excess)

    async def _persist(self, outbox: Outbox, events: list[UsageEvent]) -> None:
        if not events:
            return
        try:
            written = await anyio.to_thread.run_sync(outbox.add, events)
        except Exception:
            self._log(
                logging.ERROR,
                "could not write %d usage events to the outbox %s; queued in memory only (a crash would lose them):"
                " check its disk",
                len(events),
                outbox.path,
                exc_info=True,
            )
            self.stats.not_durable += len(events)
            written = len(events)
            self._volatile.update((id(event), event) for event in events)
        except BaseException:  # cut off by the drain deadline before the write: the last write takes them
            self._unwritten[:0] = events
            raise
        for event in events[:written]:
            self._enqueue(event)
        if written < len(events):
            self._queued_events -= len(events) - written
            self._give_up(tuple(events[written:]), "dropped", "outbox full")

    def _wake_writer(self) -> None:
        if self._disk is not None:
            self._disk.set()
            self._disk = None

    async def _flusher(self, closing: anyio.Event) -> None:
        while True:
            if not self._pending:
                # Closing, the drain is over once every event taken is settled (written first, with an outbox):
                # until then a request finishing meanwhile has its event delivered (or kept) with the others.
                if closing.is_set() and not (self._queued_events or self._unsettled_events or self._writing):
                    self.running = False  # later ones are sent by their requests' tasks
                    break
                self._window = anyio.Event()
                with anyio.move_on_after(0.05 if closing.is_set() else None):  # (closing: woken as the drain moves)
                    await self._window.wait()
                continue
            if self._flush_interval and not closing.is_set():
                # A sleep that stop() cuts short, a shutdown flushing at once: no deadline to expire,
                # whose cancellation would format the task's repr for its message at every window.
                with anyio.CancelScope() as self._holding:
                    await anyio.sleep(self._flush_interval)
                self._holding = None
            self._flush()
        self._flushed = True
        self._wake_senders()

    def _flush(self) -> None:
        """Close the window: its events join the groups waiting for a sender (merging with them)."""
        due = self._due
        for key, events in self._pending.items():
            waiting = due.get(key)
            if waiting is None:
                due[key] = events
            else:
                waiting.extend(events)
        self._pending = {}
        self._wake_senders()

    def _wake_senders(self) -> None:
        """Wake a sender for each group waiting (one done takes the next itself), or every one once
        the flusher is done: woken for no work, each would queue on the budget's lock for nothing."""
        idle = self._idle
        wanted = len(idle) if self._flushed else len(self._fixed) + len(self._due)
        for _ in range(min(wanted, len(idle))):
            idle.pop().set()

    async def _sender(self) -> None:
        while True:
            if not (self._fixed or self._due):
                if self._flushed:
                    return
                wakeup = anyio.Event()
                self._idle.append(wakeup)
                await wakeup.wait()
                continue
            assert self._paying is not None  # noqa: S101 - set by start()
            async with self._paying:  # the others wait here, not on the budget: no token taken for nothing
                if not (self._fixed or self._due):
                    continue  # the previous payer took the last work
                # Meanwhile the groups keep growing; a shutdown may use the checks' reserve too.
                await self._ready()
                if self._fixed:
                    batch, stamped = self._fixed.popleft()
                else:
                    batch, stamped = self._due.pop(next(iter(self._due))).batch(), None
                    self.stats.coalesced += len(batch) - 1
            self._queued_events -= len(batch)
            self._unsettled[id(batch)] = batch
            self._unsettled_events += len(batch)
            self._room = self._max_queue - self._unsettled_events  # held while retried: the queue's bound counts them
            first_attempt = self._clock() if stamped is None else stamped
            await self._deliver(batch, first_attempt, fix=stamped is None)
            self._drain_moved()

    def _drain_moved(self) -> None:
        """Closing, wake the flusher: the drain may be over (it checks at once, not at its next poll)."""
        if self._window is not None and self._closing_event is not None and self._closing_event.is_set():
            self._window.set()
            self._window = None

    # -- delivery --

    async def _ready(self) -> None:
        """Wait for a track's turn; a shutdown drain may use the checks' reserve of the budget too
        (:attr:`Upstream.draining`, also for the tracks already waiting when it starts)."""
        await self._upstream.ready_to_track()

    async def send(self, event: UsageEvent) -> None:
        """Deliver ``event`` from its request's task, its response complete: for apps without a lifespan.

        Events of one (customer, feature) that finish while a send for it runs ride along with
        its next call, so a burst costs a few calls, not one each. The sending task waits for the
        call budget and retries as the worker does, shielded from cancellation, for at most
        :data:`INLINE_DEADLINE` a call; what is unsettled then is reported as in doubt.
        """
        if self._is_duplicate(event):
            return
        if self._outbox is not None and not self._outbox_unused_said:
            self._outbox_unused_said = True
            if self._closing_event is None:
                logger.warning(
                    "the usage outbox %s is not used: without the ASGI lifespan (Daphne, uvicorn --lifespan off)"
                    " usage is sent from each request's task, not written first, and what it holds is not replayed",
                    self._outbox.path,
                )
            else:
                logger.warning(
                    "a request finished after the usage drain at shutdown: its usage is sent from its task,"
                    " not written to the outbox %s first (let requests finish before the lifespan ends)",
                    self._outbox.path,
                )
        self.stats.queued += 1
        key = (event.customer_id, event.feature_key)
        riders = self._riders.get(key)
        if riders is not None:
            if len(riders) >= self._max_queue:
                self._give_up((event,), "dropped", "queue full")
            else:
                self._see(event)
                riders.append(event)
            return
        self._see(event)
        riders = self._riders[key] = [event]
        sending: tuple[UsageEvent, ...] = ()
        attempted = False
        try:
            while riders:
                sending = tuple(riders)
                riders.clear()
                self.stats.coalesced += len(sending) - 1
                self._inline.update((id(e), e) for e in sending)
                attempted = False
                with anyio.CancelScope(shield=True, deadline=anyio.current_time() + INLINE_DEADLINE) as scope:
                    await self._ready()
                    attempted = True
                    await self._deliver(Batch.of(sending), self._clock(), fix=False)
                if scope.cancelled_caught:
                    cut_off = self._cut_off(sending, f"{INLINE_DEADLINE:g} s passed")
                    if attempted:
                        reason = f"not confirmed within {INLINE_DEADLINE:g} s without a lifespan ({IN_DOUBT})"
                        self._give_up(cut_off, "in_doubt", reason)
                    else:  # never sent: more keys than the call budget serves in that time, or billing down
                        reason = f"no upstream call allowed within {INLINE_DEADLINE:g} s without a lifespan"
                        self._give_up(cut_off, "dropped", f"{reason} (never sent; a lifespan's queue waits)")
                self._settled(sending)
        except BaseException:
            # Cancelled natively (asyncio's task.cancel() goes through anyio's shield), or a fault:
            # what this call was to deliver is reported, and its units no longer held.
            cut_off = self._cut_off(sending, "the request's task stopped")
            unsent = tuple(riders)
            if attempted:
                self._give_up(cut_off, "in_doubt", f"the request's task stopped while delivering it ({IN_DOUBT})")
            else:
                unsent = cut_off + unsent
            self._give_up(unsent, "dropped", "the request's task stopped before delivering it")
            raise
        finally:
            del self._riders[key]

    def _cut_off(self, sending: tuple[UsageEvent, ...], why: str) -> tuple[UsageEvent, ...]:
        """The events of an inline send still unsettled when ``why`` cut it off, but those upstream
        refused in full (not recorded: dropped here, as finding what fits of them was cut off too)."""
        unsettled = [event for event in sending if id(event) in self._inline]
        refused = tuple(event for event in unsettled if id(event) in self._unrecorded)
        others = tuple(event for event in unsettled if id(event) not in self._unrecorded)
        self._give_up(refused, "dropped", f"refused upstream, and {why} before what fits of it was found")
        return others

    async def _deliver(self, batch: Batch, first_attempt: float, *, fix: bool, part: bool = False) -> None:
        """Record ``batch`` upstream (the budget token for its first attempt is taken), retrying
        transient failures; outcomes are counted and fed back into the cache, never raised.

        ``fix``: stamp the batch in the outbox before its first attempt. ``part``: what was found to
        fit of a refused batch or event (refused again, it is not fitted once more).
        """
        if len(batch) > 1 and batch.quantity >= QUANTITY_BOUND:  # valid events no single call can carry
            self._loosen(batch)
            await self._halve(batch)
            return
        error = await self._attempt(batch, first_attempt, fix=fix)
        if error is None:
            return
        self._loosen(batch)  # from here, settled in parts (what fits, what is refused)
        if isinstance(error, QuotaExceededError) and len(batch) > 1:
            if part:  # events thought to fit, refused after all (the quota moved): no second guess
                await self._fit_by_halves(batch.events, error)
            else:
                await self._record_what_fits_of(batch, error)
            return
        if isinstance(error, QuotaExceededError) and not part:
            await self._record_what_fits(batch.events[0], error)
            return
        reason = "quota_exceeded" if isinstance(error, QuotaExceededError) else str(error)
        await self._refuse(batch.events, "rejected", reason, error)

    async def _attempt(self, batch: Batch, first_attempt: float, *, fix: bool) -> Exception | None:
        """Record ``batch`` as it is, retrying transient failures: None once it is settled (recorded,
        or dead-lettered), else the definitive refusal (nothing of it recorded, nothing settled)."""
        # (An inline send's events are not on disk: nothing to stamp, and no disk to wait for.)
        if fix and self._outbox is not None and self._outbox.is_open:
            if not (self._inline and id(batch.events[0]) in self._inline):
                await self._stamp(self._outbox, batch, first_attempt)
        attempt = 0
        n = len(batch)
        horizon_at: float | None = None  # upstream's 24 h on the monotonic clock, from the first try here
        # Checks answered after the first attempt are not older than its answer (a retry's is the first's).
        renewals = self._cache.renewals
        while True:
            elapsed, now = self._clock() - first_attempt, self._monotonic()
            if horizon_at is None:  # (a wall clock set back meanwhile, by NTP or a VM's fix, must not stretch them)
                horizon_at = now + IDEMPOTENCY_HORIZON - max(0.0, elapsed)
            if elapsed > IDEMPOTENCY_HORIZON or now > horizon_at:
                reason = "first attempted more than 24 h ago: not resent blindly"
                self._loosen(batch)
                await self._refuse(batch.events, "dead_lettered", reason)
                return None
            if self._unrecorded:  # carried by a call again: maybe recorded from here
                self._unrecorded.difference_update(map(id, batch.events))
            self.stats.in_flight += n
            try:
                result = await self._upstream.track_usage(
                    batch.customer_id,
                    batch.feature_key,
                    batch.quantity,
                    batch.idempotency_key,
                    batch.metadata,
                )
            except Exception as exc:
                error = exc
            else:
                self.stats.sent += n
                self._cache.confirm(batch.customer_id, batch.feature_key, batch.quantity, result, renewals)
                self._settled_batch(batch)
                self._forget(zip(repeat(batch.customer_id), batch.keys))
                return None
            finally:
                self.stats.in_flight -= n
            if isinstance(error, _PERMANENT):
                self._unrecorded.update(map(id, batch.events))  # (nothing of it recorded)
                return error
            # (The exponent is capped: an outage of hours runs to thousands of attempts.)
            delay = min(RETRY_MAX, random.uniform(0, RETRY_BASE * 2 ** min(attempt, 16)))
            retry_after = getattr(error, "retry_after", None)
            if retry_after is not None:  # honoured as the budget honours it (none may be configured)
                delay = max(delay, min(retry_after, MAX_PAUSE))
            self.stats.retried += 1
            self._log(
                logging.WARNING,
                "track of %d usage events of %s's %s failed (%r); retry in %.1fs",
                n,
                batch.customer_id,
                batch.feature_key,
                error,
                delay,
            )
            attempt += 1
            await anyio.sleep(delay)
            await self._ready()

    async def _stamp(self, outbox: Outbox, batch: Batch, first_attempt: float) -> None:
        """Stamp ``batch`` on its rows before its first attempt: replayed unstamped, its events could
        form another batch under another key, and be counted twice. A failing disk holds it for
        :data:`STAMP_HOLD` at most, then billing goes on without (and says so)."""
        give_up_at = anyio.current_time() + STAMP_HOLD  # not the wall clock: set back, it would hold for as long
        delay = RETRY_BASE
        while True:
            try:
                await anyio.to_thread.run_sync(outbox.fix, batch, first_attempt)
                return
            except Exception as exc:
                if not outbox.is_open:  # closed meanwhile (a drain's end): its rows stay as they were
                    return
                if anyio.current_time() >= give_up_at:
                    logger.error(
                        "could not stamp batch %s in the outbox %s for %g s (%r): sent unstamped, its events "
                        "could be counted twice if the process dies before they are confirmed",
                        batch.idempotency_key,
                        outbox.path,
                        STAMP_HOLD,
                        exc,
                    )
                    return
                self._log(logging.ERROR, "could not stamp batch %s (%r); holding it", batch.idempotency_key, exc)
                await anyio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)

    async def _left(self, customer_id: str, feature_key: str) -> tuple[float, float] | None:
        """What is left of a quota that refused a track, and when its period ends (Unix time; inf: not
        said), or None: not known. One check per refusal, not per event: a quota found used up is
        remembered for :data:`FULL_FOR` seconds, within its period."""
        key = (customer_id, feature_key)
        full_until = self._full.get(key)
        if full_until is not None and full_until > self._clock():
            return 0.0, full_until
        if self._cache.known_full(*key):
            return 0.0, math.inf  # (nothing of it taken: not remembered here)
        try:
            entitlement = await self._upstream.check_entitlement(*key, wait=RETRY_MAX, answer_within=CHECK_TIMEOUT)
        except (ValidationError, NotFoundError) as exc:  # for good (the customer is gone): nothing fits
            self._log(logging.WARNING, "what is left of %s's %s quota: none (%r)", *key, exc)
            return 0.0, math.inf
        except Exception as exc:
            self._log(logging.WARNING, "could not learn what is left of %s's %s quota: %r", *key, exc)
            return None
        if entitlement.remaining is not None:
            left = round(max(entitlement.remaining, 0.0), QUANTITY_DECIMALS)
        else:  # not counted: unlimited now (an upgrade since the refusal), or no longer granted
            left = math.inf if entitlement.has_access else 0.0
        ends = entitlement.resets_at.timestamp() if entitlement.resets_at is not None else math.inf
        if left <= 0:
            self._full[key] = ends
        return left, ends

    async def _known_left(self, customer_id: str, feature_key: str) -> tuple[float, float]:
        """:meth:`_left`, asked again (backing off) until it is known: taken for 0 while billing was
        unreachable, the part of an event that fits was rejected with the rest. A deadline bounds it."""
        attempt = 0
        while (known := await self._left(customer_id, feature_key)) is None:
            await anyio.sleep(min(RETRY_MAX, random.uniform(0, RETRY_BASE * 2 ** min(attempt, 16))))
            attempt += 1
        return known

    async def _record_what_fits_of(self, batch: Batch, error: Exception) -> None:
        """A batch refused for quota (nothing of it recorded): its first events that fit what is left
        go up as a batch of their own, the next one is split, the others are rejected; a few calls
        whatever its size. Where what is left is not known, it is halved until its first events that fit are found."""
        known = await self._left(batch.customer_id, batch.feature_key)
        if known is None:
            await self._fit_by_halves(batch.events, error)
            return
        left = known[0]
        events, taken, fitting = batch.events, 0.0, 0
        while fitting < len(events) and round(taken + events[fitting].quantity, QUANTITY_DECIMALS) <= left:
            taken += events[fitting].quantity
            fitting += 1
        if fitting:
            await self._ready()
            await self._deliver(Batch.of(events[:fitting]), self._clock(), fix=True, part=True)
        if fitting < len(events):
            await self._record_what_fits(events[fitting], error)  # what is left now is its, if any
            await self._refuse(events[fitting + 1 :], "rejected", "quota_exceeded", error)

    async def _record_what_fits(self, event: UsageEvent, error: Exception) -> None:
        """One event refused for quota: record the part of it that is left in the quota, under a
        key derived from its own (a replay records it once), and reject the rest."""
        left, ends = await self._known_left(event.customer_id, event.feature_key)
        fit = min(left, event.quantity)
        rest = event
        if fit > 0:
            self._unrecorded.discard(id(event))  # its part may be recorded from here
            part = event._replace(quantity=fit, idempotency_key=part_key(event))
            # A replay resends the part, not the event. (An inline send's event is not on disk, nor one
            # whose write failed: its part goes from memory too, or it would be resent at the next
            # start after the event was reported in doubt at a cut-off.)
            on_disk = id(event) not in self._inline and id(event) not in self._volatile
            if self._outbox is not None and self._outbox.is_open and on_disk:
                try:
                    await anyio.to_thread.run_sync(self._outbox.split, event, part, self._clock())
                except Exception:
                    self._log(
                        logging.ERROR,
                        "could not write the split of usage event %s to the outbox %s (should the process die,"
                        " the whole event is resent: its part could count twice): check its disk",
                        event.idempotency_key,
                        self._outbox.path,
                        exc_info=True,
                    )
            await self._ready()
            await self._deliver(Batch.of((part,)), self._clock(), fix=False, part=True)
            if fit >= left:  # what was left is this part's now
                self._full[event.customer_id, event.feature_key] = ends
            rest = event._replace(quantity=round(event.quantity - fit, QUANTITY_DECIMALS))
            if rest.quantity > 0:  # the part is counted under its outcome, the rest is about to be
                self.stats.split += 1
                if id(event) in self._loose:  # cut off from here, only the rest is deferred (and released)
                    self._loose[id(event)] = rest
                    self._unrecorded.add(id(event))
                    if id(event) in self._volatile:
                        self._volatile[id(rest)] = rest
        if rest.quantity > 0:
            await self._refuse((rest,), "rejected", "quota_exceeded", error)
        else:
            self._forget((_pair(rest),))
        self._settled((event,))

    async def _fit_by_halves(self, events: tuple[UsageEvent, ...], error: Exception) -> None:
        """``events`` were refused together for quota, and what is left is not known: their first half
        goes up as a batch of its own; refused too, the second half is rejected and the first is halved
        again; recorded, what is left is less than the second half, which is halved in turn. One track
        per halving, about log2 of the events (halving every half, each asking what is left, took
        2n - 1 tracks and as many checks), and as when what is left is known, the events after the
        first that does not fit are rejected."""
        # The second halves refused are reported after the last event's part that fits is recorded:
        # reported first, their refusal marks the quota full, and what is left is never asked.
        refused_halves: list[tuple[tuple[UsageEvent, ...], Exception]] = []
        while len(events) > 1:
            half = len(events) // 2
            await self._ready()
            refused = await self._attempt(Batch.of(events[:half]), self._clock(), fix=True)
            if isinstance(refused, QuotaExceededError):
                refused_halves.append((events[half:], error))
                events, error = events[:half], refused
                continue
            if refused is not None:
                await self._refuse(events[:half], "rejected", str(refused), refused)
            events = events[half:]
        await self._record_what_fits(events[0], error)
        for rest, cause in reversed(refused_halves):  # (in the events' order)
            await self._refuse(rest, "rejected", "quota_exceeded", cause)

    async def _halve(self, batch: Batch) -> None:
        """Deliver ``batch`` as two, each under its own key (the token for the first is taken)."""
        half = len(batch) // 2
        await self._deliver(Batch.of(batch.events[:half]), self._clock(), fix=True)
        await self._ready()
        await self._deliver(Batch.of(batch.events[half:]), self._clock(), fix=True)

    # -- reporting --

    def _loosen(self, batch: Batch) -> None:
        """``batch``, if a lot a sender took, is about to be settled in parts: its events are kept one by one."""
        if self._unsettled.pop(id(batch), None) is not None:
            loose = self._loose
            before = len(loose)
            loose.update((id(event), event) for event in batch.events)
            self._unsettled_events -= len(batch) - (len(loose) - before)  # one object twice in it: held once

    def _settled_batch(self, batch: Batch) -> None:
        """``batch`` is recorded: a lot, whole (an id is of a live object), or events settled one by one."""
        if self._unsettled.pop(id(batch), None) is None:
            self._settled(batch.events)
            return
        self._unsettled_events -= len(batch)
        self._room = self._max_queue - self._unsettled_events
        if self._volatile:  # (a failing disk: kept as themselves, see Group.keep, so found by identity)
            self._unmark(batch.events)

    def _settled(self, events: tuple[UsageEvent, ...]) -> None:
        """``events``, not a lot, are recorded or given up: a deadline no longer cuts them off."""
        if self._unrecorded:
            self._unrecorded.difference_update(map(id, events))
        if self._loose:
            loose = self._loose
            before = len(loose)
            for event in events:
                loose.pop(id(event), None)
            self._unsettled_events -= before - len(loose)
        self._room = self._max_queue - self._unsettled_events
        self._unmark(events)

    def _unmark(self, events: tuple[UsageEvent, ...]) -> None:
        """``events`` settled: no longer an inline send's, nor in memory only."""
        for kept in (self._inline, self._volatile):
            if kept:
                for event in events:
                    kept.pop(id(event), None)

    def _forget(self, events: Iterable[Key]) -> None:
        """Done with ``events`` (customer, key) for good: their outbox rows can go (none while it is
        closed: events sent without a worker are never written to it)."""
        if self._outbox is not None and self._outbox.is_open:
            self._confirmed.extend(events)
            self._wake_writer()

    async def _refuse(
        self, events: tuple[UsageEvent, ...], outcome: str, reason: str, error: Exception | None = None
    ) -> None:
        """Give up ``events`` for good (rejected, dead-lettered), marked so in the outbox first: a
        crash before their rows are deleted leaves them to be reported again, never to be sent."""
        outbox = self._outbox
        if events and outbox is not None and outbox.is_open:
            keys = list(map(_pair, events))
            try:
                await anyio.to_thread.run_sync(outbox.refuse, keys, f"{outcome}: {reason}")
            except Exception:
                self._log(
                    logging.ERROR,
                    "could not mark %d refused usage events in the outbox %s (should the process die before"
                    " they are deleted, they are resent): check its disk",
                    len(events),
                    outbox.path,
                    exc_info=True,
                )
        self._give_up(events, outcome, reason, error)

    def _give_up(
        self,
        events: tuple[UsageEvent, ...],
        outcome: str,
        reason: str,
        error: Exception | None = None,
        *,
        kind: str | None = None,
    ) -> None:
        """Count, log and report events that will not be recorded, and stop counting their units."""
        self._settled(events)
        if outcome not in ("dropped", "in_doubt"):  # (such events are not in the outbox)
            self._forget(map(_pair, events))
        elif self._seen is not None:  # a request retried with the same trusted id is billed
            for event in events:
                self._seen.pop(_pair(event), None)
        for event in events:
            if outcome == "in_doubt":  # maybe recorded: still counted, never taken again by another request
                self._cache.doubt(event.customer_id, event.feature_key, event.quantity)
            else:
                self._cache.reject(event.customer_id, event.feature_key, event.quantity, error)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            category = f"{outcome}: {kind or (reason if error is None else type(error).__name__)}"  # bounded keys
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
                    result = self._on_rejected(event, reason)
                    if inspect.iscoroutine(result):  # async work started and never awaited: say so
                        result.close()
                        raise TypeError("on_rejected returned a coroutine, which nothing awaits: it must be sync")
                except Exception:  # failing alike for every event of a refused batch: one line a second
                    self._log_callback(logging.ERROR, "on_rejected callback failed", exc_info=True)
