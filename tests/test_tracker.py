"""The tracker: coalescing under fixed keys, retries that never count twice, refusals split, nothing lost silently."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import billingos_asgi.tracker as tracker_module
from billingos_asgi import LocalBilling, NetworkError, QuotaExceededError, RateLimitError, TrackUsageResult, UsageEvent
from billingos_asgi.cache import EntitlementCache
from billingos_asgi.events import Batch, Group, event_key, part_key
from billingos_asgi.outbox import Outbox
from billingos_asgi.tracker import IN_DOUBT, Tracker
from billingos_asgi.upstream import Budget, CircuitBreaker, Upstream

PLANS: dict[str, Any] = {
    "features": {
        "api_calls": {"type": "usage_quota"},
        "tokens": {"type": "usage_quota"},
        "seats": {"type": "numeric_limit"},
    },
    "plans": {
        "small": {"features": {"api_calls": 10, "tokens": "unlimited", "seats": 3}},
        "big": {"features": {"api_calls": 100}},
    },
    "customers": {f"c{i}": "small" for i in range(10)},
}


def event(key: str, customer: str = "c0", feature: str = "api_calls", quantity: float = 1, **kw: Any) -> UsageEvent:
    return UsageEvent(customer, feature, quantity, key, **kw)


class Around:
    """Fault injection around a real LocalBilling: what a subclass does not override, it does."""

    def __init__(self, billing: LocalBilling) -> None:
        self.billing = billing

    def __getattr__(self, name: str) -> Any:
        return getattr(self.billing, name)


class FlakyAfterForwarding(Around):
    """Records the track, then reports a network error."""

    def __init__(self, billing: LocalBilling, failures: int) -> None:
        super().__init__(billing)
        self.failures = failures
        self.keys: list[str | None] = []

    async def track_usage(
        self,
        customer_id: str,
        feature_key: str,
        quantity: float,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TrackUsageResult:
        self.keys.append(idempotency_key)
        result = await self.billing.track_usage(customer_id, feature_key, quantity, idempotency_key, metadata)
        if self.failures:
            self.failures -= 1
            raise NetworkError("connection reset after the request was sent")
        return result


@pytest.fixture
async def billing(tmp_path: Path) -> AsyncIterator[LocalBilling]:
    async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db") as billing:
        yield billing


def tracker_for(backend: Any, **kwargs: Any) -> Tracker:
    """A tracker and a cache sharing one (unbudgeted) upstream, as the middleware builds them."""
    upstream = Upstream(backend)
    return Tracker(upstream, EntitlementCache(upstream), **kwargs)


async def run_tracker(tracker: Tracker, events: list[UsageEvent]) -> None:
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for item in events:
            assert tracker.submit(item)
        await tracker.stop()


def test_batch_keys_are_deterministic_and_single_events_keep_theirs() -> None:
    a, b, c = event("k-a"), event("k-b"), event("k-c")
    assert Batch.of((a,)).idempotency_key == "k-a"
    assert Batch.of((a, b, c)).idempotency_key == Batch.of((a, b, c)).idempotency_key  # not random
    assert Batch.of((a, b)).idempotency_key != Batch.of((a, c)).idempotency_key
    assert Batch.of((event("f1", quantity=0.1), event("f2", quantity=0.2))).quantity == 0.3


def test_a_window_group_is_the_batch_of_its_events_metadata_and_all() -> None:
    """A flush window holds its events as columns: its batch is the one its events make, key included."""
    plain = [event(f"k{i}", quantity=0.1 * i) for i in range(1, 5)]
    tagged = [event("t1", metadata={"model": "a"}), event("t2")]
    for first, second in ((plain, tagged), (tagged, plain), (plain[:2], plain[2:]), (tagged[:1], tagged[1:])):
        group, other = Group("c0", "api_calls"), Group("c0", "api_calls")
        for item in first:
            group.add(item.idempotency_key, item.quantity, item.metadata)
        for item in second:
            other.add(item.idempotency_key, item.quantity, item.metadata)
        group.extend(other)
        batch, expected = group.batch(), Batch.of((*first, *second))
        assert batch == expected and batch.idempotency_key == expected.idempotency_key
        assert batch.events == (*first, *second) and batch.events is batch.events  # made once
        assert len(batch) == len(first) + len(second) and batch.metadata is None
    lone = Group("c0", "api_calls")
    lone.add("t1", 1, {"model": "a"})
    assert lone.batch().metadata == {"model": "a"} and lone.batch().idempotency_key == "t1"
    kept, later = Group("c0", "api_calls"), Group("c0", "api_calls")  # events added as themselves stay themselves
    kept.add("k1", 1)
    kept.keep(plain[1])
    later.keep(tagged[0])
    later.add("k9", 2)
    kept.extend(later)
    batch = kept.batch()
    assert batch.events[1] is plain[1] and batch.events[2] is tagged[0] and batch.events[0] == event("k1")
    assert batch == Batch.of((event("k1"), plain[1], tagged[0], event("k9", quantity=2)))


async def test_a_lone_events_metadata_goes_up_with_it(billing: LocalBilling) -> None:
    sent: list[tuple[str | None, Mapping[str, Any] | None]] = []

    class Recording(Around):
        async def track_usage(self, *args: Any) -> TrackUsageResult:
            sent.append((args[3], args[4]))
            return await self.billing.track_usage(*args)

    await run_tracker(tracker_for(Recording(billing)), [event("alone", metadata={"model": "a"})])
    await run_tracker(tracker_for(Recording(billing)), [event("t1", metadata={"model": "a"}), event("t2")])
    pair = Batch.of((event("t1"), event("t2"))).idempotency_key
    assert sent == [("alone", {"model": "a"}), (pair, None)]
    assert await billing.recorded_units("c0", "api_calls") == 3


async def test_queued_events_leave_the_garbage_collector_nothing_to_scan(billing: LocalBilling) -> None:
    """A busy window holds thousands of events for a second: as objects, each would be scanned by
    the collector, promoted, and scanned again by the full collections it triggers (pauses of tens
    of ms under load). Held as columns, they add a few lists whatever their number."""
    tracker = tracker_for(billing, flush_interval=3600)
    keys = [f"k{i}" for i in range(5_000)]
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        gc.collect()
        before = len(gc.get_objects())
        for key in keys[:2_500]:  # events made and handed over one by one, as requests end
            assert tracker.submit(event(key, "c0", "tokens"))
        for key in keys[2_500:]:  # and by their fields, as the middleware hands them over
            assert tracker.add("c1", "tokens", 1, key)
        queued = len(gc.get_objects()) - before
        await tracker.stop()
    assert queued < 50, f"{queued} objects for the collector to scan, for 5,000 events queued"
    assert tracker.stats.sent == 5_000 and await billing.recorded_units("c0", "tokens") == 2_500


def test_event_keys_fit_upstream_whatever_the_feature_name() -> None:
    request_id = "r" * 128  # the longest trusted X-Request-ID
    assert event_key("0f" * 16, "api_calls") == f"{'0f' * 16}:api_calls"  # readable where it fits
    long_a, long_b = "a" * 254 + "x", "a" * 254 + "y"  # valid feature names (255 characters)
    keys = {event_key(request_id, long_a), event_key(request_id, long_b), event_key("other", long_a)}
    assert len(keys) == 3 and event_key(request_id, long_a) == event_key(request_id, long_a)
    assert all(len(key) <= 255 for key in keys)


def test_event_keys_of_trusted_ids_are_never_ambiguous() -> None:
    """A trusted id's ":" and "%" are encoded: the first ":" of a key ends its request id."""
    assert event_key("r1", "gpu:hours") != event_key("r1:gpu", "hours")
    assert event_key("r1:gpu", "hours") == "r1%3Agpu:hours"
    assert event_key("r1%3Agpu", "hours") == "r1%253Agpu:hours"  # (not the one above)
    colons, percents = ":" * 128, "%" * 128  # the longest trusted ids, encoded 3 times as long
    keys = {event_key(colons, "f"), event_key(percents, "f"), event_key(colons, "g"), event_key("%%x", "f" * 250)}
    assert len(keys) == 4 and all(len(key) <= 255 for key in keys)
    assert event_key(colons, "f").startswith("%%") and event_key("%%x", "f" * 250).startswith("%25%25x:")


def test_each_split_of_an_event_has_a_key_of_its_own() -> None:
    whole = event("r1:api_calls", quantity=3)
    rest = whole._replace(quantity=2)  # what was left after a first split
    assert part_key(whole) == part_key(event("r1:api_calls", quantity=3))  # a replayed split: the same key
    assert len({part_key(whole), part_key(rest), part_key(event("r2:api_calls", quantity=3))}) == 3


async def test_events_of_one_window_go_up_as_one_call_per_customer_and_feature(billing: LocalBilling) -> None:
    tracker = tracker_for(billing, flush_interval=0.2)
    events = [event(f"k{i}", customer=f"c{i % 3}", quantity=0.5) for i in range(30)]
    await run_tracker(tracker, events)
    stats = tracker.stats
    assert (stats.queued, stats.sent, tracker.upstream.tracks, stats.coalesced) == (30, 30, 3, 27)
    for customer in ("c0", "c1", "c2"):
        assert await billing.recorded_units(customer, "api_calls") == 5


async def test_a_batch_refused_for_quota_is_split_so_what_fits_is_recorded(billing: LocalBilling) -> None:
    rejected: list[tuple[str, str]] = []
    tracker = tracker_for(
        billing,
        flush_interval=0.2,
        on_rejected=lambda e, r: rejected.append((e.idempotency_key, r)),
    )
    await run_tracker(tracker, [event(f"k{i}") for i in range(12)])
    assert await billing.recorded_units("c0", "api_calls") == 10
    assert (tracker.stats.sent, tracker.stats.rejected) == (10, 2)
    assert rejected == [("k10", "quota_exceeded"), ("k11", "quota_exceeded")]


async def test_the_lines_a_storm_held_back_are_counted_at_shutdown(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """Rejections log one line a second; the count held back rode on the next line only, and at
    shutdown there is none: the log showed one rejected event of fifty."""
    tracker = tracker_for(billing, flush_interval=0.2)
    await run_tracker(tracker, [event(f"k{i}") for i in range(60)])
    assert tracker.stats.rejected == 50
    lines = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert sum(" rejected: quota_exceeded" in r.getMessage() for r in lines) >= 1
    shown = sum(" rejected: " in r.getMessage() for r in lines)
    held = sum(int(m.group(1)) for r in lines if (m := re.search(r"(\d+) similar lines held back", r.getMessage())))
    assert shown + held == 50


async def test_a_failing_on_rejected_callback_is_logged_without_a_flood(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    def on_rejected(event: UsageEvent, reason: str) -> None:
        raise RuntimeError("the reconciliation queue is down")

    tracker = tracker_for(billing, flush_interval=0.2, on_rejected=on_rejected)
    await run_tracker(tracker, [event(f"k{i}") for i in range(60)])
    assert (tracker.stats.sent, tracker.stats.rejected) == (10, 50)
    failures = [r for r in caplog.records if r.getMessage().startswith("on_rejected callback failed")]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_an_on_rejected_callback_handing_back_a_coroutine_is_told_not_dropped(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that only starts async work (``lambda e, r: alert(e, r)``) returns a coroutine that
    nothing awaits: its reports were lost without a word (but Python's warning at collection)."""
    reported: list[str] = []

    async def alert(event: UsageEvent, reason: str) -> None:
        reported.append(reason)

    tracker = tracker_for(billing, flush_interval=0.2, on_rejected=lambda e, r: alert(e, r))
    await run_tracker(tracker, [event(f"k{i}") for i in range(12)])
    assert (tracker.stats.sent, tracker.stats.rejected, reported) == (10, 2, [])
    failures = [r for r in caplog.records if r.getMessage().startswith("on_rejected callback failed")]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "returned a coroutine" in str(failures[0].exc_info[1])


async def test_a_retry_after_an_unknown_outcome_reuses_the_key_and_counts_once(billing: LocalBilling) -> None:
    flaky = FlakyAfterForwarding(billing, failures=2)
    tracker = tracker_for(flaky, flush_interval=0.05)
    await run_tracker(tracker, [event(f"k{i}", quantity=2) for i in range(3)])
    assert await billing.recorded_units("c0", "api_calls") == 6
    assert len(flaky.keys) == 3 and len(set(flaky.keys)) == 1  # one batch, one key, three attempts
    assert (tracker.stats.sent, tracker.stats.retried, tracker.upstream.tracks) == (3, 2, 3)


class Unreachable:
    """Fault injection: every track fails with a network error."""

    def __init__(self) -> None:
        self.calls = 0

    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        self.calls += 1
        raise NetworkError("connection refused")


async def test_a_batch_still_failing_a_day_after_its_first_attempt_is_dead_lettered(billing: LocalBilling) -> None:
    rejected: list[str] = []
    start = time.time()
    readings = iter([start, start, start + 25 * 3600])
    backend = Unreachable()
    tracker = tracker_for(
        backend,
        flush_interval=0,
        on_rejected=lambda e, r: rejected.append(r),
        clock=lambda: next(readings),
    )
    await run_tracker(tracker, [event("k1")])
    assert (backend.calls, tracker.stats.retried, tracker.stats.dead_lettered, tracker.stats.sent) == (1, 1, 1, 0)
    assert rejected == ["first attempted more than 24 h ago: not resent blindly"]


async def test_a_wall_clock_set_back_does_not_stretch_upstreams_24_hours(billing: LocalBilling) -> None:
    """Retried through an outage while the wall clock was set back 2 h, a batch was resent 24 h 10 min
    after its first attempt: upstream had forgotten its key, and counted it again."""
    start = time.time()
    wall = [start, start, start - 2 * 3600 + 24 * 3600 + 600]  # first attempt, its check, then a day on (set back)
    real = [0.0, 24 * 3600 + 600]  # the monotonic clock: the day as it passed

    backend = Failing(billing, failures=1, error=NetworkError("connection reset"))
    tracker = tracker_for(
        backend,
        flush_interval=0,
        clock=lambda: wall.pop(0) if len(wall) > 1 else wall[0],
        monotonic=lambda: real.pop(0) if len(real) > 1 else real[0],
    )
    await run_tracker(tracker, [event("k1")])
    assert (tracker.stats.retried, tracker.stats.sent, tracker.stats.dead_lettered) == (1, 0, 1)
    assert await billing.recorded_units("c0", "api_calls") == 0


@pytest.mark.parametrize(("elapsed", "recorded"), [(23 * 3600, 1), (24 * 3600 + 60, 0)], ids=["23 h", "24 h 1 min"])
async def test_a_retry_is_sent_within_upstreams_24_hours_and_never_after(
    billing: LocalBilling, elapsed: float, recorded: float
) -> None:
    """Upstream forgets idempotency keys after 24 h: a retry a minute past that could count twice."""
    start = time.time()
    readings = [start, start]  # the first attempt's time, and its check; every later reading is `elapsed` on

    def clock() -> float:
        return readings.pop(0) if readings else start + elapsed

    backend = Failing(billing, failures=1, error=NetworkError("connection reset"))
    tracker = tracker_for(backend, flush_interval=0, clock=clock)
    await run_tracker(tracker, [event("k1")])
    assert (tracker.stats.retried, tracker.stats.sent, tracker.stats.dead_lettered) == (1, recorded, 1 - recorded)
    assert await billing.recorded_units("c0", "api_calls") == recorded


@pytest.mark.parametrize(
    ("customer", "feature", "reason"),
    [
        ("c3", "api_calls", "No active subscription with this feature"),  # 404
        ("c0", "seats", "Feature is not a usage quota type"),  # 400
        ("ghost", "api_calls", "Customer not found: ghost"),  # 400
    ],
    ids=["404 no subscription", "400 not a quota", "400 unknown customer"],
)
async def test_an_event_refused_as_invalid_is_rejected_at_once(
    billing: LocalBilling, customer: str, feature: str, reason: str
) -> None:
    """A 400 or 404 refusal is definitive (SPEC section 6): reported with its reason, never retried."""
    await billing.cancel_subscription("c3")
    reasons: list[str] = []
    tracker = tracker_for(billing, flush_interval=0, drain_timeout=2, on_rejected=lambda e, r: reasons.append(r))
    await run_tracker(tracker, [event("k1", customer=customer, feature=feature)])
    stats = tracker.stats
    assert (stats.rejected, stats.retried, stats.dropped, tracker.upstream.tracks) == (1, 0, 0, 1)
    assert reasons == [reason]


async def test_a_full_queue_drops_and_counts(billing: LocalBilling) -> None:
    rejected: list[str] = []
    tracker = tracker_for(billing, max_queue=3, on_rejected=lambda e, r: rejected.append(r))
    await run_tracker(tracker, [event(f"k{i}") for i in range(5)])
    # Handed over, all five: the two dropped count among them, as unaccounted() has it.
    assert (tracker.stats.queued, tracker.stats.sent, tracker.stats.dropped) == (5, 3, 2)
    assert rejected == ["queue full", "queue full"] and unaccounted(tracker) == 0


async def test_trusted_duplicate_keys_count_once(billing: LocalBilling) -> None:
    tracker = tracker_for(billing, flush_interval=0.05, deduplicate=True)
    await run_tracker(tracker, [event("same"), event("same"), event("other")])
    assert (tracker.stats.sent, tracker.stats.duplicates) == (2, 1)
    assert await billing.recorded_units("c0", "api_calls") == 2


async def test_a_trusted_key_left_in_the_outbox_is_a_duplicate_after_the_restart(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """A client retrying a trusted request id after a crash: counted once, its replayed row not shared."""
    outbox = Outbox(tmp_path / "outbox.db", max_events=10)
    outbox.open()
    outbox.add([event("stamped"), event("stamped too"), event("fresh")])
    outbox.fix(Batch.of((event("stamped"), event("stamped too"))), time.time())
    outbox.close()  # (a crash: left unconfirmed)
    tracker = tracker_for(
        billing, flush_interval=0.05, deduplicate=True, outbox=Outbox(tmp_path / "outbox.db", max_events=10)
    )
    await run_tracker(tracker, [event("stamped"), event("fresh"), event("new")])
    assert (tracker.stats.replayed, tracker.stats.duplicates, tracker.stats.sent) == (3, 2, 4)
    assert await billing.recorded_units("c0", "api_calls") == 4


async def test_trusted_keys_are_per_customer_as_upstream_idempotency_is(billing: LocalBilling) -> None:
    tracker = tracker_for(billing, flush_interval=0.05, deduplicate=True)
    await run_tracker(tracker, [event("gateway-id", customer="c0"), event("gateway-id", customer="c1")])
    assert (tracker.stats.sent, tracker.stats.duplicates) == (2, 0)
    assert await billing.recorded_units("c1", "api_calls") == 1


async def test_a_trusted_key_dropped_on_a_full_queue_is_not_taken_for_a_duplicate_later(billing: LocalBilling) -> None:
    tracker = tracker_for(billing, flush_interval=0.05, deduplicate=True, max_queue=1)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        assert tracker.submit(event("first"))
        assert tracker.submit(event("retried"))  # dropped: the queue is full
        for _ in range(500):  # until the first is sent (within 5 s): in flight, it still holds its place
            if not tracker.backlog and not tracker.stats.in_flight:
                break
            await anyio.sleep(0.01)
        assert tracker.submit(event("retried"))  # the client's retry, once there is room
        await tracker.stop()
    assert (tracker.stats.dropped, tracker.stats.duplicates, tracker.stats.sent) == (1, 0, 2)


async def test_submit_without_a_worker_asks_the_caller_to_send(billing: LocalBilling) -> None:
    tracker = tracker_for(billing)
    assert tracker.submit(event("k")) is False
    await tracker.send(event("k"))
    assert tracker.stats.sent == 1 and await billing.recorded_units("c0", "api_calls") == 1


@pytest.mark.parametrize(
    "kwargs", [{"flush_interval": -1}, {"max_queue": 0}, {"drain_timeout": -1}, {"max_concurrency": 0}]
)
async def test_bad_settings_are_refused(billing: LocalBilling, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="tracker: need"):
        tracker_for(billing, **kwargs)


async def test_a_shutdown_drain_may_use_the_checks_reserve_of_the_budget(billing: LocalBilling) -> None:
    frozen = Budget(90, 10, clock=lambda: 0.0)  # no refill: only the tokens in the bucket now
    for _ in range(6):
        assert frozen.try_take()  # the checks of the period took six: four left, within the reserve of five
    upstream = Upstream(billing, budget=frozen)
    tracker = Tracker(upstream, EntitlementCache(upstream), flush_interval=60, drain_timeout=2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tracker.start(tg)
            for i in range(4):
                assert tracker.submit(event(f"k{i}", customer=f"c{i}"))
            await tracker.stop()
    assert (tracker.stats.sent, tracker.stats.dropped, upstream.tracks) == (4, 0, 4)
    for i in range(4):
        assert await billing.recorded_units(f"c{i}", "api_calls") == 1


async def test_a_track_already_waiting_beyond_the_reserve_when_the_drain_starts_may_use_it(
    billing: LocalBilling,
) -> None:
    """In a starved budget a sender is waiting (20 s, at 6 calls a minute) when shutdown begins: it
    kept the reserve it started with, and its event was dropped at the deadline with 4 tokens unused."""
    budget = Budget(6, 10)  # a reserve of five for checks
    for _ in range(6):
        assert budget.try_take()  # four left, within the reserve
    upstream = Upstream(billing, budget=budget)
    tracker = Tracker(upstream, EntitlementCache(upstream), flush_interval=0, drain_timeout=2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tracker.start(tg)
            assert tracker.submit(event("k0"))
            await anyio.sleep(0.2)  # its sender waits for a token beyond the reserve
            await tracker.stop()
    assert (tracker.stats.sent, tracker.stats.dropped) == (1, 0)
    assert await billing.recorded_units("c0", "api_calls") == 1


async def test_a_replayed_event_given_up_leaves_the_units_of_running_requests_counted(
    billing: LocalBilling, tmp_path: Path
) -> None:
    left_by_a_crash = Outbox(tmp_path / "outbox.db", max_events=10)
    left_by_a_crash.open()
    left_by_a_crash.add([event("before-the-crash", quantity=11)])  # more than the limit of 10: refused
    left_by_a_crash.close()
    upstream = Upstream(billing)
    cache = EntitlementCache(upstream)
    tracker = Tracker(upstream, cache, outbox=Outbox(tmp_path / "outbox.db", max_events=10), flush_interval=0)
    quota = await cache.fetch("c0", "api_calls")
    assert quota.admit(4) == 0  # four units of requests running now
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        await tracker.stop()
    assert (tracker.stats.replayed, tracker.stats.rejected) == (1, 1)
    assert quota.local == 4  # the replayed event's units were never among them


class Failing(Around):
    """``failures`` errors (nothing recorded), then records."""

    def __init__(self, billing: LocalBilling, failures: int, error: Exception) -> None:
        super().__init__(billing)
        self.failures = failures
        self.error = error

    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        if self.failures:
            self.failures -= 1
            raise self.error
        return await self.billing.track_usage(*args, **kwargs)


async def test_an_outage_of_thousands_of_attempts_keeps_the_tracker_retrying(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("billingos_asgi.tracker.RETRY_MAX", 0.0)  # hours of backoff, compressed
    backend = Failing(billing, failures=1100, error=NetworkError("connection refused"))
    upstream = Upstream(backend, breaker=CircuitBreaker(threshold=10**6))
    tracker = Tracker(upstream, EntitlementCache(upstream), flush_interval=0, drain_timeout=60)
    await run_tracker(tracker, [event("k1")])
    assert (tracker.stats.retried, tracker.stats.sent) == (1100, 1)
    assert await billing.recorded_units("c0", "api_calls") == 1


async def test_a_retry_waits_as_long_as_a_429_asks_without_a_budget(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("billingos_asgi.tracker.RETRY_MAX", 0.01)  # the backoff's own cap, below what is asked
    backend = Failing(billing, failures=1, error=RateLimitError("slow down", status=429, retry_after=0.2))
    tracker = tracker_for(backend, flush_interval=0)
    with caplog.at_level(logging.WARNING, "billingos_asgi"):
        await run_tracker(tracker, [event("k1")])
    assert "retry in 0.2s" in caplog.text and tracker.stats.sent == 1


class Gated(Around):
    """Track calls wait until the test opens the gate."""

    def __init__(self, billing: LocalBilling) -> None:
        super().__init__(billing)
        self.gate = anyio.Event()
        self.calls = 0

    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        self.calls += 1
        await self.gate.wait()
        return await self.billing.track_usage(*args, **kwargs)


async def test_windows_closing_while_their_key_waits_for_a_sender_merge(billing: LocalBilling) -> None:
    """Two windows of c0 close while its first batch is on its way (one sender): the second joins the
    first waiting group, neither replaces it."""
    backend = Gated(billing)
    tracker = tracker_for(backend, flush_interval=0.02, max_concurrency=1)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tracker.submit(event("e0"))
        await anyio.sleep(0.1)  # its window closes: the sender takes it, and waits at the gate
        assert backend.calls == 1
        for keys in (("e1", "e2"), ("e3",)):
            for key in keys:
                assert tracker.submit(event(key))
            await anyio.sleep(0.1)  # its window closes: waiting for the sender
        backend.gate.set()
        await tracker.stop()
    assert await billing.recorded_units("c0", "api_calls") == 4 and tracker.stats.sent == 4


async def test_inline_sends_of_one_key_ride_along_with_the_one_running(billing: LocalBilling) -> None:
    backend = Gated(billing)
    tracker = tracker_for(backend)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tracker.send, event("first"))
        await anyio.sleep(0.05)  # the first is on its way
        for i in range(5):
            await tracker.send(event(f"rider{i}"))  # returns at once: rides with the next call
        tg.start_soon(tracker.send, event("other customer", customer="c1"))  # a key of its own: a call
        await anyio.sleep(0.05)
        backend.gate.set()
    assert (backend.calls, tracker.stats.sent, tracker.stats.coalesced) == (3, 7, 4)
    assert await billing.recorded_units("c0", "api_calls") == 6


async def test_an_inline_send_outlives_the_cancellation_of_its_task(billing: LocalBilling) -> None:
    backend = Gated(billing)
    tracker = tracker_for(backend)

    async def open_later() -> None:
        await anyio.sleep(0.2)
        backend.gate.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_later)
        with anyio.move_on_after(0.05) as request_task:  # the server cancels the request's task
            await tracker.send(event("k"))
    assert request_task.cancel_called
    assert tracker.stats.sent == 1 and await billing.recorded_units("c0", "api_calls") == 1


async def test_an_inline_send_cancelled_natively_reports_what_it_carried(billing: LocalBilling) -> None:
    reported: list[str] = []
    upstream = Upstream(Gated(billing))  # the gate never opens
    cache = EntitlementCache(upstream)
    tracker = Tracker(upstream, cache, on_rejected=lambda e, r: reported.append(r))
    quota = await cache.fetch("c0", "api_calls")
    assert quota is not None and [quota.admit(1) for _ in range(3)] == [0, 0, 0]
    sending = asyncio.create_task(tracker.send(event("r1")))  # asyncio's cancel goes through anyio's shield
    await asyncio.sleep(0.05)
    await tracker.send(event("r2"))  # riders: return at once
    await tracker.send(event("r3"))
    sending.cancel()  # as uvicorn does when its graceful shutdown times out
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert (tracker.stats.in_doubt, tracker.stats.dropped) == (1, 2)
    assert reported == [
        f"the request's task stopped while delivering it ({IN_DOUBT})",  # r1: its call may have been recorded
        *["the request's task stopped before delivering it"] * 2,  # r2 and r3 never went up
    ]
    assert quota.local == 0  # the three requests' units are no longer held


async def test_an_inline_send_cut_off_by_its_deadline_is_reported(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("billingos_asgi.tracker.INLINE_DEADLINE", 0.1)
    rejected: list[str] = []
    tracker = tracker_for(Gated(billing), on_rejected=lambda e, r: rejected.append(r))  # the gate never opens
    await tracker.send(event("k"))
    assert tracker.stats.in_doubt == 1 and rejected == [f"not confirmed within 0.1 s without a lifespan ({IN_DOUBT})"]


class RecordsThenHangs(Around):
    """Upstream records the track; its answer never arrives (a hung connection)."""

    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        await self.billing.track_usage(*args, **kwargs)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_units_in_doubt_are_never_admitted_again_before_a_check(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a lifespan, an inline send cut off by its deadline: its units may be recorded
    upstream, so they stay counted (released, 10 units of a quota of 10 went to the next requests
    while upstream held them all); the next request has the entry checked."""
    monkeypatch.setattr("billingos_asgi.tracker.INLINE_DEADLINE", 0.1)
    upstream = Upstream(RecordsThenHangs(billing))
    cache = EntitlementCache(upstream)
    tracker = Tracker(upstream, cache)  # not started: no lifespan
    quota = await cache.fetch("c0", "api_calls")
    assert quota.admit(10) == 0
    await tracker.send(event("r1", quantity=10))
    assert tracker.stats.in_doubt == 1 and quota.local == 0
    assert quota.admit(1) == 429  # counted as used meanwhile
    assert cache.get("c0", "api_calls") is None  # asked again by the next request
    assert (await cache.fetch("c0", "api_calls")).usage == 10 and upstream.checks == 2


class TwoGates(Around):
    """c1's tracks (the worker's drain) wait on ``drain``; the others' (inline sends) on ``inline``."""

    def __init__(self, billing: LocalBilling) -> None:
        super().__init__(billing)
        self.drain, self.inline = anyio.Event(), anyio.Event()

    async def track_usage(self, customer_id: str, *args: Any, **kwargs: Any) -> TrackUsageResult:
        await (self.drain if customer_id == "c1" else self.inline).wait()
        return await self.billing.track_usage(customer_id, *args, **kwargs)


async def test_an_inline_split_during_the_drain_stamps_no_outbox_rows_it_never_wrote(
    billing: LocalBilling, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events sent from their requests' tasks while the drain still runs (requests finishing as it
    ends) are not written to the outbox; a batch of them refused for quota is split, and was stamped
    in the outbox first: on a failing disk, held past the inline deadline, its events reported in
    doubt instead of recorded."""
    monkeypatch.setattr("billingos_asgi.tracker.INLINE_DEADLINE", 1.0)
    await billing.track_usage("c0", "api_calls", 8)  # 2 of 10 left
    gates = TwoGates(billing)
    outbox = Outbox(tmp_path / "outbox.db", max_events=100)
    tracker = tracker_for(gates, flush_interval=0, outbox=outbox)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tracker.submit(event("w", customer="c1"))  # the drain waits for it
        await anyio.sleep(0.1)
        tg.start_soon(tracker.stop)
        await anyio.sleep(0.01)

        def failing_fix(*args: Any) -> None:  # the outbox's disk fails (full, an I/O error)
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(outbox, "fix", failing_fix)
        tg.start_soon(tracker.send, event("r0"))
        await anyio.sleep(0.05)
        await tracker.send(event("r1"))  # ride with r0's next call
        await tracker.send(event("r2"))
        gates.inline.set()  # r0 recorded (9 of 10); r1 and r2 refused together: r1 fits, r2 does not
        await anyio.sleep(1.5)
        gates.drain.set()
    assert await billing.recorded_units("c0", "api_calls") == 10
    assert (tracker.stats.in_doubt, tracker.stats.rejected) == (0, 1)


class DeadlineAfterPart(Around):
    """Records every track; once a split's part is recorded, the drain deadline passes (as stop()
    makes it pass: the tracker's scope cancelled), at the rest's refusal's outbox write."""

    tracker: Tracker | None = None

    async def track_usage(self, customer_id: str, feature_key: str, quantity: float, *args: Any) -> TrackUsageResult:
        result = await self.billing.track_usage(customer_id, feature_key, quantity, *args)
        if args and isinstance(args[0], str) and args[0].startswith("part-"):
            assert self.tracker is not None and self.tracker._scope is not None
            self.tracker._scope.cancel()
        return result


async def test_a_deadline_after_a_splits_part_is_recorded_defers_and_releases_the_rest_only(
    billing: LocalBilling, tmp_path: Path
) -> None:
    backend = DeadlineAfterPart(billing)
    upstream = Upstream(backend)
    cache = EntitlementCache(upstream)
    tracker = Tracker(upstream, cache, flush_interval=0, outbox=Outbox(tmp_path / "outbox.db", max_events=10))
    backend.tracker = tracker
    quota = await cache.fetch("c0", "api_calls")
    assert quota is not None and quota.admit(1) == 0  # another request, still running, holds 1 unit
    assert quota.admit(5) == 0  # the request whose event this is
    await billing.track_usage("c0", "api_calls", 8)  # another process's: 2 of 10 left
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tracker.submit(event("r1", quantity=5))  # 2 fit, 3 do not
        await anyio.sleep(0.5)
        await tracker.stop()
    stats = tracker.stats
    assert await billing.recorded_units("c0", "api_calls") == 10  # the part went up
    assert quota.local == 1  # the running request's unit still held
    assert (stats.sent, stats.deferred, stats.split) == (1, 1, 1)
    outbox = Outbox(tmp_path / "outbox.db", max_events=10)
    stored = outbox.open()
    outbox.close()
    kept = [e for batch, _ in stored.batches for e in batch.events] + stored.events + [e for e, _ in stored.refused]
    assert [(e.idempotency_key, e.quantity) for e in kept] == [("r1", 3.0)]  # the rest, under the event's key


async def test_valid_events_whose_sum_no_call_can_carry_are_sent_in_parts(tmp_path: Path) -> None:
    plans = {**PLANS, "plans": {"small": {"features": {"api_calls": "unlimited", "tokens": "unlimited"}}}}
    async with LocalBilling.from_dict(plans, tmp_path / "billing.db") as billing:
        tracker = tracker_for(billing, flush_interval=0.05)
        await run_tracker(tracker, [event(f"k{i}", quantity=6e13) for i in range(3)])  # 1.8e14 > 1e14 - 1
        assert (tracker.stats.sent, tracker.stats.rejected) == (3, 0)
        assert await billing.recorded_units("c0", "api_calls") == 1.8e14


async def test_a_refused_event_records_the_part_that_fits_and_reports_the_rest(billing: LocalBilling) -> None:
    rejected: list[tuple[str, float]] = []
    await billing.track_usage("c0", "api_calls", 7.5)  # 2.5 of 10 left
    tracker = tracker_for(
        billing, flush_interval=0, on_rejected=lambda e, r: rejected.append((e.idempotency_key, e.quantity))
    )
    await run_tracker(tracker, [event("big", quantity=4)])
    assert await billing.recorded_units("c0", "api_calls") == 10
    assert rejected == [("big", 1.5)] and (tracker.stats.sent, tracker.stats.rejected) == (1, 1)
    # Replayed (say after a crash before the rest was reported): nothing is left, nothing more recorded.
    again = tracker_for(billing, flush_interval=0)
    await run_tracker(again, [event("big", quantity=4)])
    assert await billing.recorded_units("c0", "api_calls") == 10 and again.stats.rejected == 1


async def test_events_refused_for_a_used_up_quota_cost_one_check_between_them(billing: LocalBilling) -> None:
    await billing.track_usage("c0", "api_calls", 10)
    tracker = tracker_for(billing, flush_interval=0.05)
    await run_tracker(tracker, [event(f"k{i}") for i in range(20)])
    assert tracker.stats.rejected == 20 and tracker.upstream.checks == 1
    assert tracker.upstream.tracks == 1  # the batch refused, then no halving: nothing would fit


async def test_a_part_that_takes_what_was_left_leaves_nothing_to_check_for_the_next_refusal(
    billing: LocalBilling,
) -> None:
    await billing.track_usage("c0", "api_calls", 7.5)
    tracker = tracker_for(billing)
    await tracker.send(event("big", quantity=4))  # 2.5 of it fits
    await tracker.send(event("next"))
    assert (tracker.stats.sent, tracker.stats.rejected, tracker.upstream.checks) == (1, 2, 1)


async def test_a_quota_the_cache_knows_is_used_up_is_not_checked_again(billing: LocalBilling) -> None:
    await billing.track_usage("c0", "api_calls", 10)
    upstream = Upstream(billing)
    cache = EntitlementCache(upstream)
    await cache.fetch("c0", "api_calls")  # a request found it used up (and was answered 429)
    tracker = Tracker(upstream, cache, flush_interval=0.05)
    await run_tracker(tracker, [event("k0"), event("k1")])
    assert tracker.stats.rejected == 2 and upstream.checks == 1  # the request's check only


async def test_a_quota_used_up_in_a_period_since_over_is_checked_again(tmp_path: Path) -> None:
    """The cache's entry says a period that ended was used up: the batch refused in the new one
    (12 units, 10 of them fit) records what fits, not nothing."""
    now = [datetime.now(timezone.utc) - timedelta(days=3)]
    plans = {**PLANS, "plans": {"small": {"interval": "day", "features": {"api_calls": 10}}}}
    async with LocalBilling.from_dict(plans, tmp_path / "billing.db", clock=lambda: now[0]) as billing:
        tracker = tracker_for(billing, flush_interval=0.05)
        await billing.track_usage("c0", "api_calls", 10)
        await tracker._cache.fetch("c0", "api_calls")  # used up, as a request found
        now[0] += timedelta(days=2)  # a new day upstream: 10 left
        await run_tracker(tracker, [event(f"k{i}") for i in range(12)])
        assert (tracker.stats.sent, tracker.stats.rejected) == (10, 2)
        assert await billing.recorded_units("c0", "api_calls") == 20


async def test_a_quota_remembered_used_up_is_checked_again_in_its_next_period(tmp_path: Path) -> None:
    """Found used up, it is remembered (no check per refusal) until its period ends: the batch
    refused in the next one (6 units, of which 4 fit after another worker's 6) records what fits."""
    now = [datetime.now(timezone.utc)]

    def wall() -> float:
        return now[0].timestamp()

    plans = {**PLANS, "plans": {"small": {"interval": "day", "features": {"api_calls": 10}}}}
    async with LocalBilling.from_dict(plans, tmp_path / "billing.db", clock=lambda: now[0]) as billing:
        upstream = Upstream(billing)
        tracker = Tracker(upstream, EntitlementCache(upstream, wall_clock=wall), flush_interval=0.05, clock=wall)
        await billing.track_usage("c0", "api_calls", 10)
        await run_tracker(tracker, [event("late")])
        await run_tracker(tracker, [event("later")])
        assert (tracker.stats.rejected, upstream.checks) == (2, 1)  # the second refusal: remembered
        now[0] += timedelta(days=1, minutes=1)  # a new day upstream: 10 left
        await billing.track_usage("c0", "api_calls", 6)  # taken by another worker of the app
        await run_tracker(tracker, [event(f"k{i}") for i in range(6)])
        assert (tracker.stats.sent, tracker.stats.rejected) == (4, 4)
        assert await billing.recorded_units("c0", "api_calls") == 20


async def test_a_used_up_quota_the_cache_no_longer_holds_fresh_is_checked_again(billing: LocalBilling) -> None:
    """Upgraded since the cache learnt it was used up, a while ago: the refused batch asks what is left."""
    await billing.track_usage("c0", "api_calls", 10)
    clock = [0.0]
    upstream = Upstream(billing)
    cache = EntitlementCache(upstream, clock=lambda: clock[0])
    await cache.fetch("c0", "api_calls")
    await billing.set_plan("c0", "big")  # 100 a month
    clock[0] += 3600  # the entry went stale (no request asked since)
    tracker = Tracker(upstream, cache, flush_interval=0.05)
    await billing.track_usage("c0", "api_calls", 85)  # 5 left: the batch of 8 is refused
    await run_tracker(tracker, [event(f"k{i}") for i in range(8)])
    assert (tracker.stats.sent, tracker.stats.rejected, upstream.checks) == (5, 3, 2)


@pytest.mark.parametrize(("left", "recorded", "rejected"), [(3, 10, 61), (2.5, 10, 62)])
async def test_a_refused_batch_costs_a_few_calls_whatever_its_size(
    billing: LocalBilling, left: float, recorded: float, rejected: int
) -> None:
    await billing.track_usage("c0", "api_calls", 10 - left)
    reports: list[float] = []
    tracker = tracker_for(billing, flush_interval=0.05, on_rejected=lambda e, r: reports.append(e.quantity))
    await run_tracker(tracker, [event(f"k{i}") for i in range(64)])
    assert await billing.recorded_units("c0", "api_calls") == recorded and tracker.stats.rejected == rejected
    assert await billing.recorded_units("c0", "api_calls") - (10 - left) + sum(reports) == 64  # every unit
    assert tracker.upstream.tracks <= 3 and tracker.upstream.checks <= 2  # halving took 2 x 64 - 1 calls


class Unchecked(Around):
    """The first ``failures`` checks fail (upstream unreachable for them), the next are answered;
    tracks are recorded."""

    def __init__(self, billing: LocalBilling, failures: int = 2) -> None:
        super().__init__(billing)
        self.failures = failures

    async def check_entitlement(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise NetworkError("connection refused")
        return await self.billing.check_entitlement(*args, **kwargs)


@pytest.mark.parametrize(("left", "recorded"), [(0, 0), (3, 3)])
async def test_a_refused_batch_costs_a_few_calls_even_when_what_is_left_cannot_be_checked(
    billing: LocalBilling, left: float, recorded: float
) -> None:
    """Halved one track a half: 64 events refused with nothing left took 2 x 64 - 1 tracks and as many
    checks. (The last event's check is asked again until answered: see the next test.)"""
    await billing.track_usage("c0", "api_calls", 10 - left)
    reports: list[float] = []
    tracker = tracker_for(Unchecked(billing), flush_interval=0.05, on_rejected=lambda e, r: reports.append(e.quantity))
    await run_tracker(tracker, [event(f"k{i}") for i in range(64)])
    assert await billing.recorded_units("c0", "api_calls") == 10 - left + recorded
    assert (tracker.stats.sent, tracker.stats.rejected, sum(reports)) == (recorded, 64 - recorded, 64 - recorded)
    assert tracker.upstream.tracks <= 1 + 6 + 1 and tracker.upstream.checks <= 3  # the refusal, log2(64) halves


@pytest.mark.parametrize("quantities", [[5.0], [1.0, 1.0, 1.0, 2.0]])
async def test_what_fits_of_an_event_is_recorded_once_a_failing_check_answers(
    billing: LocalBilling, quantities: list[float]
) -> None:
    """3.5 left: an event refused for quota, what is left not known (a blip, a breaker opened by other
    calls, the budget paused by a 429) was rejected whole: the 3.5 units that fit were never recorded."""
    await billing.track_usage("c0", "api_calls", 6.5)
    reports: list[float] = []
    backend = Unchecked(billing, failures=3)
    tracker = tracker_for(backend, flush_interval=0.05, on_rejected=lambda e, r: reports.append(e.quantity))
    with anyio.fail_after(20):
        await run_tracker(tracker, [event(f"k{i}", quantity=q) for i, q in enumerate(quantities)])
    assert await billing.recorded_units("c0", "api_calls") == 10 and sum(reports) == sum(quantities) - 3.5
    assert backend.failures == 0 and tracker.stats.in_doubt == tracker.stats.dropped == 0


async def test_events_upstream_refused_and_cut_off_while_what_fits_is_found_are_dropped_not_in_doubt(
    billing: LocalBilling,
) -> None:
    """A batch refused for quota (nothing of it recorded: all or nothing), its check hanging when the
    drain deadline passes: its events were reported in doubt (maybe recorded, counted as used)."""
    await billing.track_usage("c0", "api_calls", 8)  # 2 left: a batch of 4 is refused whole
    tracker = tracker_for(Unanswered(billing), flush_interval=0.05, drain_timeout=0.5)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(4):
            assert tracker.submit(event(f"k{i}"))
        with anyio.fail_after(10):
            while tracker.upstream.tracks == 0:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
        await tracker.stop()
    assert await billing.recorded_units("c0", "api_calls") == 8
    assert (tracker.stats.in_doubt, tracker.stats.dropped) == (0, 4)


class CancelledOnRefusal(Around):
    """The customer cancels right as upstream refuses a track for quota; checks fail, or answer."""

    def __init__(self, billing: LocalBilling, *, checked: bool) -> None:
        super().__init__(billing)
        self.checked = checked

    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        try:
            return await self.billing.track_usage(*args, **kwargs)
        except QuotaExceededError:
            await self.billing.cancel_subscription(args[0])
            raise

    async def check_entitlement(self, *args: Any, **kwargs: Any) -> Any:
        if not self.checked:  # a blip: the next one is answered
            self.checked = True
            raise NetworkError("connection refused")
        return await self.billing.check_entitlement(*args, **kwargs)  # no subscription: nothing left


@pytest.mark.parametrize("checked", [False, True])
async def test_the_halves_of_a_refused_batch_refused_for_another_reason_are_reported(
    billing: LocalBilling, checked: bool
) -> None:
    """The customer cancels as the batch is refused: halved (what is left not known), a half refused
    for no subscription is rejected with that reason; checked, nothing is left. Every unit is reported."""
    await billing.track_usage("c0", "api_calls", 8)
    reports: list[float] = []
    backend = CancelledOnRefusal(billing, checked=checked)
    tracker = tracker_for(backend, flush_interval=0.05, on_rejected=lambda e, r: reports.append(e.quantity))
    await run_tracker(tracker, [event(f"k{i}") for i in range(4)])
    assert await billing.recorded_units("c0", "api_calls") == 8
    assert (tracker.stats.sent, tracker.stats.rejected, sum(reports)) == (0, 4, 4)


async def test_the_last_event_of_a_halved_batch_records_the_part_that_fits(billing: LocalBilling) -> None:
    """Halved while what is left could not be checked, the event that does not fit is split as
    when it is known, once a check answers: 12 units refused of 10 left, 10 recorded."""
    reports: list[float] = []
    tracker = tracker_for(
        Unchecked(billing, failures=1), flush_interval=0.05, on_rejected=lambda e, r: reports.append(e.quantity)
    )
    await run_tracker(tracker, [event(f"k{i}", quantity=4) for i in range(3)])
    assert await billing.recorded_units("c0", "api_calls") == 10 and reports == [2.0]


class SecondCheckFails(Around):
    """A request's check is answered; the next one (the tracker's, after a refusal) fails: a blip."""

    checks = 0

    async def check_entitlement(self, *args: Any, **kwargs: Any) -> Any:
        self.checks += 1
        if self.checks == 2:
            raise NetworkError("connection reset")
        return await self.billing.check_entitlement(*args, **kwargs)


async def test_the_part_that_fits_is_recorded_when_the_quota_is_cached_too(billing: LocalBilling) -> None:
    """As the middleware's events are: the halves refused before were reported first, which marked
    the cached quota full, so what was left was never asked: 5 of the 7 units that fit recorded."""
    upstream = Upstream(SecondCheckFails(billing))
    cache = EntitlementCache(upstream)
    quota = await cache.fetch("c0", "api_calls")  # a request's check
    upstream_checks = upstream.checks
    assert all(quota.admit(2.5) == 0 for _ in range(4))
    await billing.track_usage("c0", "api_calls", 3)  # another process's: 7 left of 10
    reports: list[tuple[str, float]] = []
    tracker = Tracker(
        upstream, cache, flush_interval=0.05, on_rejected=lambda e, r: reports.append((e.idempotency_key, e.quantity))
    )
    await run_tracker(tracker, [event(f"k{i}", quantity=2.5) for i in range(4)])
    assert await billing.recorded_units("c0", "api_calls") == 3 + 7
    assert reports == [("k2", 0.5), ("k3", 2.5)] and upstream.checks > upstream_checks
    assert quota.local == 0


@pytest.mark.parametrize("checked", [True, False])
async def test_every_call_for_a_refused_batch_takes_a_token_of_the_budget(billing: LocalBilling, checked: bool) -> None:
    budget = Budget(600, 100, clock=lambda: 0.0)  # no refill: what was taken stays taken
    await billing.track_usage("c0", "api_calls", 7)
    upstream = Upstream(billing if checked else Unchecked(billing), budget=budget)
    tracker = Tracker(upstream, EntitlementCache(upstream), flush_interval=0.05)
    await run_tracker(tracker, [event(f"k{i}") for i in range(5)])
    assert await billing.recorded_units("c0", "api_calls") == 10
    assert budget.tokens == 100 - upstream.tracks - upstream.checks


class Unanswered(Around):
    """The first ``hangs`` checks hang (upstream holds the connection open), the next are answered;
    tracks are recorded."""

    def __init__(self, billing: LocalBilling, hangs: float = math.inf) -> None:
        super().__init__(billing)
        self.hangs = hangs

    async def check_entitlement(self, *args: Any, **kwargs: Any) -> Any:
        if self.hangs > 0:
            self.hangs -= 1
            await anyio.sleep_forever()
        return await self.billing.check_entitlement(*args, **kwargs)


async def test_a_refused_batch_whose_check_hangs_is_halved_once_the_check_times_out(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracker_module, "CHECK_TIMEOUT", 0.1)
    await billing.track_usage("c0", "api_calls", 8)
    tracker = tracker_for(Unanswered(billing, hangs=2), flush_interval=0.05, drain_timeout=5)
    await run_tracker(tracker, [event(f"k{i}") for i in range(4)])
    assert await billing.recorded_units("c0", "api_calls") == 10  # not held past the drain deadline
    assert (tracker.stats.sent, tracker.stats.rejected, tracker.stats.dropped) == (2, 2, 0)


@pytest.mark.parametrize("unit", [1, 0.1])
async def test_events_that_fill_what_is_left_exactly_go_up_together(billing: LocalBilling, unit: float) -> None:
    """3 units left and a refused batch of five: the first three fit to the unit, and go up as
    one batch under their own keys; no event of them is split (nor where 0.1 + 0.2 > 0.3 in floats)."""
    await billing.track_usage("c0", "api_calls", 10 - 3 * unit)
    reports: list[str] = []
    tracker = tracker_for(billing, flush_interval=0.05, on_rejected=lambda e, r: reports.append(e.idempotency_key))
    await run_tracker(tracker, [event(f"k{i}", quantity=unit) for i in range(5)])
    assert await billing.recorded_units("c0", "api_calls") == 10 and reports == ["k3", "k4"]
    assert tracker.upstream.tracks == 2  # the batch refused, then its first three


class TakenMeanwhile(Around):
    """Another process of the customer uses a unit right after each check (while there is one)."""

    taken = 0

    async def check_entitlement(self, *args: Any, **kwargs: Any) -> Any:
        answer = await self.billing.check_entitlement(*args, **kwargs)
        with contextlib.suppress(QuotaExceededError):
            await self.billing.track_usage(args[0], args[1], 1)
            self.taken += 1
        return answer


@pytest.mark.parametrize(("quantities", "checks"), [([4], 1), ([1] * 5, 2)])
async def test_what_was_found_to_fit_and_is_refused_after_all_is_not_fitted_again(
    billing: LocalBilling, quantities: list[float], checks: int
) -> None:
    """The quota shrinks between the check and the track: what was found to fit is refused too,
    and not checked for again (each check would chase a moving quota); every unit is reported."""
    await billing.track_usage("c0", "api_calls", 7)
    backend = TakenMeanwhile(billing)
    reports: list[float] = []
    tracker = tracker_for(backend, flush_interval=0.05, on_rejected=lambda e, r: reports.append(e.quantity))
    await run_tracker(tracker, [event(f"k{i}", quantity=q) for i, q in enumerate(quantities)])
    recorded = await billing.recorded_units("c0", "api_calls") - 7 - backend.taken
    assert recorded + sum(reports) == sum(quantities) and tracker.upstream.checks == checks


class UpgradedOnRefusal(Around):
    """The customer upgrades (to the plan "big") right as upstream refuses a track for quota."""

    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        try:
            return await self.billing.track_usage(*args, **kwargs)
        except QuotaExceededError:
            await self.billing.set_plan(args[0], "big")
            raise


@pytest.mark.parametrize("upgrade", [100, "unlimited"])
async def test_an_event_refused_for_quota_never_records_more_than_its_own_units(
    tmp_path: Path, upgrade: float | str
) -> None:
    """What is left may have grown by the time it is asked (an upgrade, a new period): the part
    recorded of a refused event is at most the event (all of it, upgraded to unlimited)."""
    plans = {**PLANS, "plans": {**PLANS["plans"], "big": {"features": {"api_calls": upgrade}}}}
    async with LocalBilling.from_dict(plans, tmp_path / "billing.db") as billing:
        await billing.track_usage("c0", "api_calls", 9)
        outbox = tmp_path / "outbox.db"
        tracker = tracker_for(
            UpgradedOnRefusal(billing),
            flush_interval=0,
            on_rejected=lambda e, r: pytest.fail(r),
            outbox=Outbox(outbox, max_events=10),
        )
        await run_tracker(tracker, [event("k1", quantity=4)])
        assert await billing.recorded_units("c0", "api_calls") == 9 + 4
        assert (tracker.stats.sent, tracker.stats.rejected) == (1, 0)
        again = tracker_for(billing, outbox=Outbox(outbox, max_events=10))
        await run_tracker(again, [])
        assert again.stats.replayed == 0  # all of it went up as the part: its row is gone


async def test_what_the_drain_deadline_cuts_off_without_an_outbox_is_reported_dropped(billing: LocalBilling) -> None:
    """Nothing is dropped silently, not even at shutdown: each event is counted and reported."""
    reasons: list[tuple[str, str]] = []
    tracker = tracker_for(
        Gated(billing),
        flush_interval=0.05,
        drain_timeout=0.2,
        max_concurrency=1,
        on_rejected=lambda e, r: reasons.append((e.customer_id, r)),
    )
    await run_tracker(tracker, [event("k1"), event("k2", customer="c1")])  # the gate never opens
    assert (tracker.stats.sent, tracker.stats.in_doubt, tracker.stats.dropped) == (0, 1, 1)
    # The one sender's call hangs: that event may be recorded upstream, the other never went up.
    assert sorted(reasons) == [
        ("c0", f"shutdown deadline passed during its delivery ({IN_DOUBT})"),
        ("c1", "shutdown deadline passed"),
    ]


async def test_the_drain_log_says_whether_its_deadline_or_a_cancellation_cut_it_off(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """A server's own shutdown timeout cancels the drain before its deadline: blaming the deadline
    would send the operator to raise ``drain_timeout``, which changes nothing."""
    for drain_timeout, cancel_after in ((0.1, None), (30.0, 0.2)):
        tracker = tracker_for(Gated(billing), flush_interval=0.01, drain_timeout=drain_timeout)
        async with anyio.create_task_group() as tg:
            await tracker.start(tg)
            assert tracker.submit(event("k1"))
            with anyio.move_on_after(cancel_after):
                await tracker.stop()
    cut_off = [r.getMessage() for r in caplog.records if "drain cut off" in r.getMessage()]
    assert cut_off == [
        "usage drain cut off by its deadline (0.1s) with 1 events unsent",
        "usage drain cut off by a cancellation with 1 events unsent",
    ]


class Slow(Around):
    """Track calls take a while."""

    def __init__(self, billing: LocalBilling, seconds: float) -> None:
        super().__init__(billing)
        self.seconds = seconds

    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        await anyio.sleep(self.seconds)
        return await self.billing.track_usage(*args, **kwargs)


async def test_a_steady_stream_of_inline_sends_is_never_cut_off(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline bounds each call of the sending task, not its turn as the sender."""
    monkeypatch.setattr("billingos_asgi.tracker.INLINE_DEADLINE", 0.3)
    tracker = tracker_for(Slow(billing, 0.1), on_rejected=lambda e, r: pytest.fail(f"{e} {r}"))
    async with anyio.create_task_group() as tg:
        for i in range(20):  # for a second: three times the deadline
            tg.start_soon(tracker.send, event(f"k{i}", customer="c0", feature="tokens"))
            await anyio.sleep(0.05)
    assert tracker.stats.sent == 20 and await billing.recorded_units("c0", "tokens") == 20


async def test_inline_sends_of_one_trusted_request_id_count_once(billing: LocalBilling) -> None:
    backend = Gated(billing)
    tracker = tracker_for(backend, deduplicate=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tracker.send, event("first"))
        await anyio.sleep(0.05)
        await tracker.send(event("gateway-id"))
        await tracker.send(event("gateway-id"))  # the client's retry, riding in the same batch
        backend.gate.set()
    assert tracker.stats.duplicates == 1 and await billing.recorded_units("c0", "api_calls") == 2


async def test_an_inline_split_never_waits_for_an_outbox_that_is_not_open(
    billing: LocalBilling, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("billingos_asgi.tracker.INLINE_DEADLINE", 2.0)
    backend = Gated(billing)
    tracker = tracker_for(backend, outbox=Outbox(tmp_path / "outbox.db", max_events=10))  # no lifespan: never opened
    async with anyio.create_task_group() as tg:
        tg.start_soon(tracker.send, event("first", quantity=4))
        await anyio.sleep(0.05)
        for key in ("second", "third"):
            await tracker.send(event(key, quantity=4))  # 12 of 10: refused together, then split
        backend.gate.set()
    assert tracker.stats.dropped == 0 and await billing.recorded_units("c0", "api_calls") == 10


async def test_an_inline_send_during_the_shutdown_drain_is_not_the_workers_to_report(billing: LocalBilling) -> None:
    reported: list[str] = []
    backend = Gated(billing)
    tracker = tracker_for(backend, flush_interval=0.05, on_rejected=lambda e, r: reported.append(r))
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tg.start_soon(tracker.send, event("finished-during-the-drain"))  # no worker takes it any more
        await anyio.sleep(0.05)
        await tracker.stop()
        backend.gate.set()
    assert reported == [] and tracker.stats.dropped == 0
    assert await billing.recorded_units("c0", "api_calls") == 1


async def test_a_trusted_key_dropped_at_its_deadline_is_billed_when_the_client_retries(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given up (reported, maybe recorded): the client's retry with the same request id is not a
    duplicate here, and upstream counts the key once."""
    monkeypatch.setattr("billingos_asgi.tracker.INLINE_DEADLINE", 0.1)
    backend = Gated(billing)
    tracker = tracker_for(backend, deduplicate=True)
    await tracker.send(event("gateway-id"))  # the gate is shut: cut off by the deadline
    assert tracker.stats.in_doubt == 1
    backend.gate.set()
    await tracker.send(event("gateway-id"))
    assert (tracker.stats.duplicates, tracker.stats.sent) == (0, 1)
    assert await billing.recorded_units("c0", "api_calls") == 1


def unaccounted(tracker: Tracker) -> int:
    """Events handed to the tracker (or replayed, or cut in two) not found under an outcome, in the
    backlog or in flight: the identity an operator checks the counters by. Zero at every moment."""
    s = tracker.stats
    handed = s.queued + s.replayed + s.split
    ended = s.sent + s.rejected + s.dead_lettered + s.dropped + s.in_doubt + s.deferred
    return handed - ended - tracker.backlog - s.in_flight


async def test_events_waiting_to_retry_are_in_the_backlog(billing: LocalBilling) -> None:
    """Between two attempts a batch is neither queued nor in a call: the backlog said 0 all through
    an outage, as if nothing were waiting."""
    backend = Failing(billing, failures=10**6, error=NetworkError("connection refused"))
    upstream = Upstream(backend, breaker=CircuitBreaker(threshold=10**6))
    tracker = Tracker(upstream, EntitlementCache(upstream), flush_interval=0, drain_timeout=0)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(5):
            assert tracker.submit(event(f"k{i}"))
        with anyio.fail_after(10):
            while tracker.stats.retried < 2:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
        assert tracker.backlog + tracker.stats.in_flight == 5 and unaccounted(tracker) == 0
        await tracker.stop()
    assert (tracker.stats.in_doubt, tracker.backlog, unaccounted(tracker)) == (5, 0, 0)  # each call was made


async def test_events_a_sender_retries_count_against_max_queue(billing: LocalBilling) -> None:
    """Through an outage each sender holds its batch, retrying: those events left the queue's
    count, and the queue refilled behind them, up to (senders + 1) x max_queue events in memory."""
    backend = Failing(billing, failures=10**6, error=NetworkError("connection refused"))
    upstream = Upstream(backend, breaker=CircuitBreaker(threshold=10**6))
    tracker = Tracker(upstream, EntitlementCache(upstream), flush_interval=0, max_queue=10, drain_timeout=0)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for wave in range(5):  # a customer each: each wave is a batch of its own, taken by a sender
            for i in range(10):
                tracker.submit(event(f"w{wave}-{i}", customer=f"c{wave}"))
            with anyio.fail_after(10):  # taken by a sender (its first attempt failed), or dropped
                while tracker.stats.retried + tracker.stats.dropped // 10 <= wave:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        assert tracker.backlog + tracker.stats.in_flight == 10
        assert (tracker.stats.queued, tracker.stats.dropped, unaccounted(tracker)) == (50, 40, 0)
        await tracker.stop()


async def test_an_inline_send_counts_as_queued_and_its_riders_wait_in_the_backlog(billing: LocalBilling) -> None:
    backend = Gated(billing)
    tracker = tracker_for(backend, max_queue=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tracker.send, event("first"))
        with anyio.fail_after(10):
            while backend.calls == 0:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
        for i in range(3):  # two ride along, the third finds the riders full
            await tracker.send(event(f"rider{i}"))
        assert (tracker.stats.queued, tracker.backlog, tracker.stats.in_flight) == (4, 2, 1)
        assert unaccounted(tracker) == 0
        backend.gate.set()
    assert (tracker.stats.sent, tracker.stats.dropped, unaccounted(tracker)) == (3, 1, 0)


@pytest.mark.parametrize("left_known", [True, False])
async def test_a_batch_settled_in_parts_gives_its_room_in_the_queue_back(
    billing: LocalBilling, left_known: bool
) -> None:
    """A batch refused for quota is settled in parts (what fits, what is split, what is rejected):
    each part must leave the backlog, or the queue's bound would shrink for good and drop later events."""
    tracker = tracker_for(billing if left_known else Unchecked(billing), flush_interval=0, max_queue=12)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(12):  # a quota of 10: 10 recorded, 2 rejected, in parts
            assert tracker.submit(event(f"k{i}", quantity=1))
        with anyio.fail_after(10):
            while tracker.stats.sent + tracker.stats.rejected < 12:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
        assert (tracker.backlog, tracker.stats.in_flight, unaccounted(tracker)) == (0, 0, 0)
        for i in range(12):  # room for a full queue again (c1's quota takes 10 of them)
            assert tracker.submit(event(f"again{i}", customer="c1"))
        assert tracker.stats.dropped == 0
        await tracker.stop()
    assert (tracker.stats.sent, tracker.stats.rejected, tracker.stats.dropped) == (20, 4, 0)


async def test_one_event_object_submitted_twice_and_settled_in_parts_leaves_the_backlog(billing: LocalBilling) -> None:
    """Held once by identity once its lot was settled in parts, it was counted twice in the backlog,
    and its second count stayed there, a place in the queue lost for good."""
    tracker = tracker_for(billing, flush_interval=0.05, max_queue=20)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        same = event("k-same", quantity=6)
        assert tracker.submit(same) and tracker.submit(same)  # one lot of 12 units against a quota of 10
        with anyio.fail_after(10):
            while tracker.stats.sent + tracker.stats.rejected < 2:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
        assert (tracker.backlog, tracker.stats.in_flight) == (0, 0)
        await tracker.stop()


async def test_an_event_cut_in_two_by_a_refusal_counts_each_part_once(billing: LocalBilling) -> None:
    """2.5 of its 4 units recorded, 1.5 rejected: one event, two outcomes, and the split says so."""
    await billing.track_usage("c0", "api_calls", 7.5)
    tracker = tracker_for(billing, flush_interval=0)
    await run_tracker(tracker, [event("big", quantity=4), event("whole", customer="c1", quantity=4)])
    stats = tracker.stats
    assert (stats.queued, stats.split, stats.sent, stats.rejected, unaccounted(tracker)) == (2, 1, 2, 1, 0)


async def test_a_storm_of_one_line_never_hides_another(billing: LocalBilling, caplog: pytest.LogCaptureFixture) -> None:
    """One line a second was the tracker's budget for all its lines: a retry's warning held back the
    rejections of the same second, which then showed only as a count on a later warning, and the
    count said 'similar' of lines that were not. Each kind of line now has its second of its own."""
    backend = Failing(billing, failures=1, error=NetworkError("connection refused"))
    tracker = tracker_for(backend, flush_interval=0.2)
    with caplog.at_level(logging.WARNING, "billingos_asgi"):
        await run_tracker(tracker, [event("k1", customer="c1"), event("k2", customer="nobody")])
    assert (tracker.stats.retried, tracker.stats.rejected) == (1, 1)
    retries = [
        r for r in caplog.records if "of c1's api_calls failed" in r.getMessage() and "retry in" in r.getMessage()
    ]
    rejections = [r for r in caplog.records if "usage event k2 (nobody api_calls x1) rejected" in r.getMessage()]
    assert len(retries) == 1 and retries[0].levelno == logging.WARNING, caplog.text
    assert len(rejections) == 1 and rejections[0].levelno == logging.ERROR, caplog.text
    assert "held back" not in caplog.text


async def test_without_a_lifespan_an_event_the_budget_never_let_out_is_dropped_not_in_doubt(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More keys at once than the call budget serves within the inline deadline: the ones never sent
    were reported "in doubt ... it may be recorded upstream", which they could not be."""
    monkeypatch.setattr(tracker_module, "INLINE_DEADLINE", 0.5)
    upstream = Upstream(billing, budget=Budget(60, 2))  # one track at once (the other token kept for checks)
    reasons: dict[str, str] = {}
    tracker = Tracker(upstream, EntitlementCache(upstream), on_rejected=lambda e, r: reasons.update({e.customer_id: r}))
    async with anyio.create_task_group() as tg:
        for customer in ("c0", "c1"):
            tg.start_soon(tracker.send, event(f"{customer}-k", customer=customer))
    stats = tracker.stats
    assert (stats.sent, stats.dropped, stats.in_doubt, upstream.tracks) == (1, 1, 0, 1)
    [reason] = reasons.values()
    assert reason.startswith("no upstream call allowed within 0.5 s without a lifespan (never sent")


async def test_without_a_lifespan_an_event_refused_and_cut_off_while_what_fits_is_found_is_dropped(
    billing: LocalBilling, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused for quota (nothing recorded), then the inline deadline passed during the check of what
    is left: it was reported in doubt (maybe recorded), its units counted as used."""
    monkeypatch.setattr(tracker_module, "INLINE_DEADLINE", 0.5)
    await billing.track_usage("c0", "api_calls", 8)
    reasons: list[str] = []
    tracker = tracker_for(Unanswered(billing), on_rejected=lambda e, r: reasons.append(r))
    await tracker.send(event("k0", quantity=4))
    assert (tracker.stats.in_doubt, tracker.stats.dropped, tracker.upstream.tracks) == (0, 1, 1)
    assert reasons == ["refused upstream, and 0.5 s passed before what fits of it was found"]
    assert await billing.recorded_units("c0", "api_calls") == 8


async def test_confirmed_rows_leave_the_outbox_before_new_events_are_measured_against_its_bound(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """A full outbox whose rows were all confirmed, with their removal still to come: new events
    were refused as "outbox full" by the pass that then removed the old rows."""
    backend = Gated(billing)
    tracker = tracker_for(backend, flush_interval=0, outbox=Outbox(tmp_path / "outbox.db", max_events=5))
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(5):
            tracker.submit(event(f"a{i}"))
        with anyio.fail_after(10):
            while backend.calls == 0:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
            backend.gate.set()
            while tracker.stats.sent < 5:  # noqa: ASYNC110 - confirmed; the writer has yet to forget them
                await anyio.lowlevel.checkpoint()
        for i in range(5):
            tracker.submit(event(f"b{i}"))
        await tracker.stop()
    assert (tracker.stats.sent, tracker.stats.dropped) == (10, 0)
    assert await billing.recorded_units("c0", "api_calls") == 10


def delete_files(directory: Path, pattern: str) -> None:
    for found in directory.glob(pattern):
        found.unlink()


async def test_events_written_after_the_outbox_file_was_deleted_are_known_not_durable(
    billing: LocalBilling, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite writes on to a file deleted while open, and what it holds is gone when it closes: a
    crash then lost every event, none counted as kept in memory only, nothing said until shutdown."""
    backend = Gated(billing)
    path = tmp_path / "outbox.db"
    tracker = tracker_for(backend, flush_interval=0, outbox=Outbox(path, max_events=100))
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tracker.submit(event("before"))
        with anyio.fail_after(10):
            while backend.calls == 0:  # noqa: ASYNC110 - written, then sent
                await anyio.sleep(0.01)
        delete_files(tmp_path, "outbox.db*")  # a clean-up script, a redeploy
        with caplog.at_level(logging.ERROR, "billingos_asgi"):
            tracker.submit(event("after", customer="c1"))
            with anyio.fail_after(10):
                while tracker.stats.not_durable == 0:  # noqa: ASYNC110 - polling a counter
                    await anyio.sleep(0.01)
        backend.gate.set()
        await tracker.stop()
    assert tracker.stats.not_durable == 1
    assert "was deleted or replaced while in use" in caplog.text
    assert tracker.stats.sent == 2  # (still delivered, from memory)


async def test_a_relative_outbox_path_names_one_file_whatever_the_working_directory_does_later(
    billing: LocalBilling, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file was opened relative to the working directory when opened, and checked where it was when
    made: after a chdir between the two, every write was refused as "deleted or replaced"."""
    monkeypatch.chdir(tmp_path)
    outbox = Outbox("usage.db", max_events=10)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    outbox.open()
    try:
        assert outbox.add([event("k1")]) == 1 and outbox.is_in_place
    finally:
        outbox.close()
    assert (tmp_path / "usage.db").exists() and not (tmp_path / "elsewhere" / "usage.db").exists()
