"""The entitlement cache over a real LocalBilling: freshness, stale answers, period ends, refreshes."""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from billingos_asgi import BillingOSError, Entitlement, LocalBilling, NetworkError, QuotaExceededError, UsageEvent
from billingos_asgi.backend import BillingBackend
from billingos_asgi.cache import EntitlementCache, Quota, Refresh
from billingos_asgi.tracker import Tracker
from billingos_asgi.upstream import Budget, Upstream

from .conftest import Scenario

PLANS: dict[str, Any] = {
    "features": {"api_calls": {"type": "usage_quota"}, "export": {"type": "boolean_flag"}},
    "plans": {
        "small": {"features": {"api_calls": 5, "export": True}},
        "big": {"features": {"api_calls": 100}},
        "unlimited": {"features": {"api_calls": "unlimited"}},
        "yearly": {"interval": "year", "features": {"api_calls": 1000}},
        "yearly_small": {"interval": "year", "features": {"api_calls": 10}},
        "daily": {"interval": "day", "features": {"api_calls": 10}},
    },
    "customers": {"c1": "small"},
}
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Clocks:
    """The cache's monotonic clock and the wall clock (billing's too), moved by hand."""

    def __init__(self) -> None:
        self.monotonic = 1_000.0
        self.wall = START

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += timedelta(seconds=seconds)


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
async def billing(tmp_path: Path, clocks: Clocks) -> AsyncIterator[LocalBilling]:
    async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db", clock=lambda: clocks.wall) as billing:
        yield billing


def cache_for(billing: BillingBackend, clocks: Clocks, **kwargs: Any) -> tuple[EntitlementCache, Upstream]:
    upstream = Upstream(billing)
    cache = EntitlementCache(
        upstream, clock=lambda: clocks.monotonic, wall_clock=lambda: clocks.wall.timestamp(), **kwargs
    )
    return cache, upstream


async def test_fresh_entries_are_served_without_asking_again(billing: LocalBilling, clocks: Clocks) -> None:
    cache, upstream = cache_for(billing, clocks, ttl=30)
    assert cache.get("c1", "api_calls") is None
    quota = await cache.fetch("c1", "api_calls")
    clocks.advance(29)
    assert cache.get("c1", "api_calls") is quota
    assert upstream.checks == 1


async def test_stale_entries_serve_while_one_refresh_runs(billing: LocalBilling, clocks: Clocks) -> None:
    cache, upstream = cache_for(billing, clocks, ttl=30, stale_ttl=600)
    quota = await cache.fetch("c1", "api_calls")
    clocks.advance(31)
    assert cache.get("c1", "api_calls") is None  # no task group to refresh in: a blocking fetch is needed
    spawned: list[Refresh] = []
    cache.spawn = spawned.append
    assert cache.get("c1", "api_calls") is quota
    assert cache.get("c1", "api_calls") is quota
    assert len(spawned) == 1  # one refresh however many requests see the stale entry
    await spawned[0]()
    assert upstream.checks == 2
    clocks.advance(29)
    assert cache.get("c1", "api_calls") is quota  # fresh again
    clocks.advance(600)
    assert cache.get("c1", "api_calls") is None  # too old even to serve stale


async def test_an_ended_period_is_never_served(billing: LocalBilling, clocks: Clocks) -> None:
    cache, _ = cache_for(billing, clocks, ttl=10**8, stale_ttl=10**8)
    cache.spawn = lambda refresh: None
    quota = await cache.fetch("c1", "api_calls")
    assert quota.resets_at is not None
    clocks.advance(quota.resets_at - clocks.wall.timestamp() - 1)
    assert cache.get("c1", "api_calls") is quota
    clocks.advance(2)
    assert cache.get("c1", "api_calls") is None


async def test_unknown_customers_are_cached_for_the_negative_ttl(billing: LocalBilling, clocks: Clocks) -> None:
    cache, upstream = cache_for(billing, clocks, negative_ttl=10, stale_ttl=600)
    cache.spawn = lambda refresh: None
    unknown = await cache.fetch("nobody", "api_calls")
    assert unknown.entitlement is None and unknown.admit(1) == 403
    clocks.advance(9)
    assert cache.get("nobody", "api_calls") is unknown
    clocks.advance(2)
    assert cache.get("nobody", "api_calls") is None  # never served stale: the customer may exist by now
    assert upstream.checks == 1


async def test_a_refresh_while_requests_run_keeps_their_accounting(billing: LocalBilling, clocks: Clocks) -> None:
    cache, _ = cache_for(billing, clocks, ttl=30)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.admit(1) == 0 and quota.admit(1) == 0  # two requests running
    clocks.advance(31)
    refreshed = await cache.fetch("c1", "api_calls")
    # The requests finish on the entry they were admitted by: one succeeded, one failed (settled).
    quota.local -= 1
    assert refreshed is quota and refreshed.local == 1  # the success's unit, on its way upstream
    for _ in range(4):
        assert refreshed.admit(1) == 0
    assert refreshed.admit(1) == 429


async def test_an_entry_evicted_with_units_open_keeps_them(billing: LocalBilling, clocks: Clocks) -> None:
    cache, _ = cache_for(billing, clocks, max_size=1)
    quota = await cache.fetch("c1", "api_calls")
    for _ in range(4):
        assert quota.admit(1) == 0  # four requests let through, their usage not confirmed yet
    await cache.fetch("c1", "export")  # evicts the quota (a cache of one entry)
    assert len(cache) == 1 and cache.get("c1", "api_calls") is None
    again = await cache.fetch("c1", "api_calls")
    assert again is quota and again.local == 4  # the same accounting, not a fresh one forgetting them
    assert again.admit(1) == 0 and again.admit(1) == 429  # the limit of 5 holds
    # Evicted again; confirmations and refusals still find it, and it is let go once settled.
    await cache.fetch("c1", "export")
    result = await billing.track_usage("c1", "api_calls", 4, "four")
    cache.confirm("c1", "api_calls", 4, result)
    assert quota.local == 1 and quota.usage == 4
    cache.reject("c1", "api_calls", 1, None)
    assert quota.local == 0 and not cache._entries.aside


def test_entries_set_aside_are_bounded_by_what_is_still_open() -> None:
    from billingos_asgi.cache import Quota, _Entries

    entries = _Entries(2)
    quotas = [Quota(None, local=1.0) for _ in range(40)]
    for i, quota in enumerate(quotas):
        entries[(f"c{i}", "api_calls")] = quota
        if i >= 2 and i % 2:
            quotas[i - 2].local = 0.0  # set aside, then its request failed: nothing open, never confirmed
    evicted = range(38)
    assert {(f"c{i}", "api_calls") for i in evicted if i % 2 == 0} <= set(entries.aside)  # open: all kept
    assert len(entries.aside) < 30  # the settled ones were swept as the aside grew


async def test_a_failed_check_falls_back_to_the_stale_answer(tmp_path: Path, clocks: Clocks) -> None:
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db", clock=lambda: clocks.wall)
    cache, _ = cache_for(billing, clocks, ttl=30)
    quota = await cache.fetch("c1", "api_calls")
    await billing.aclose()  # upstream gone
    clocks.advance(31)
    assert await cache.fetch("c1", "api_calls") is quota
    with pytest.raises(Exception):  # noqa: B017 - whatever the closed engine raises
        await cache.fetch("c1", "export")  # nothing to fall back on


async def test_a_failed_check_never_falls_back_to_an_unknown_customer_answer(tmp_path: Path, clocks: Clocks) -> None:
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db", clock=lambda: clocks.wall)
    cache, _ = cache_for(billing, clocks, negative_ttl=10)
    assert (await cache.fetch("nobody", "api_calls")).entitlement is None
    await billing.aclose()  # upstream gone; meanwhile "nobody" may have signed up
    clocks.advance(11)
    with pytest.raises(Exception):  # noqa: B017 - whatever the closed engine raises: on_error decides
        await cache.fetch("nobody", "api_calls")  # not a 403 for as long as billing is down


async def test_a_failed_check_never_falls_back_to_an_ended_period(tmp_path: Path, clocks: Clocks) -> None:
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db", clock=lambda: clocks.wall)
    cache, _ = cache_for(billing, clocks, ttl=30)
    quota = await cache.fetch("c1", "api_calls")
    await billing.aclose()  # upstream gone
    assert quota.resets_at is not None
    clocks.advance(quota.resets_at - clocks.wall.timestamp() + 1)
    with pytest.raises(Exception):  # noqa: B017 - whatever the closed engine raises
        await cache.fetch("c1", "api_calls")  # last period's figures would refuse or admit wrongly


async def test_concurrent_misses_make_one_check(billing: LocalBilling, clocks: Clocks) -> None:
    cache, upstream = cache_for(billing, clocks)
    answers = []

    async def miss() -> None:
        answers.append(await cache.fetch("c1", "api_calls"))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(miss)
    assert upstream.checks == 1 and len({id(a) for a in answers}) == 1


async def test_after_a_quota_refusal_upstreams_next_figure_replaces_the_guess(
    billing: LocalBilling, clocks: Clocks
) -> None:
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    await billing.track_usage("c1", "api_calls", 2)
    assert quota.admit(4) == 0  # four more units on their way: 6 of 5, refused as a batch upstream
    cache.reject("c1", "api_calls", 4, QuotaExceededError("Usage would exceed limit"))
    assert cache.get("c1", "api_calls") is None and quota.admit(1) == 429  # full, as far as we know
    assert await cache.fetch("c1", "api_calls") is quota
    assert (quota.usage, quota.admit(3), quota.admit(1)) == (2, 0, 429)  # upstream: 2 of 5 used


async def test_after_a_quota_refusal_a_track_answer_leaves_the_guess_to_a_check(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A retry's answer is upstream's answer to its first call, whose figures may be older than the
    refusal: had it replaced the guess, the quota would have looked open again for a TTL, every
    request admitted on it served, then refused upstream (unbilled)."""
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.admit(2) == 0
    first = await billing.track_usage("c1", "api_calls", 2, "r1")  # recorded; its answer lost on the way
    await billing.track_usage("c1", "api_calls", 3, "another-process")  # 5 of 5
    assert quota.admit(1) == 0
    cache.reject("c1", "api_calls", 1, QuotaExceededError("Usage would exceed limit"))
    replay = await billing.track_usage("c1", "api_calls", 2, "r1")  # r1 retried: the first call's answer
    assert replay == first and replay.usage.consumed_units == 2
    cache.confirm("c1", "api_calls", 2, replay)
    assert cache.get("c1", "api_calls") is None and quota.admit(1) == 429  # still full: a check is asked
    assert await cache.fetch("c1", "api_calls") is quota
    assert (quota.usage, quota.local, quota.admit(1)) == (5, 0, 429)


async def test_a_track_answer_arriving_late_never_lowers_the_usage(billing: LocalBilling, clocks: Clocks) -> None:
    """Two batches of one key in flight at once (two senders, two flush windows): the answer of
    the first recorded may arrive last; its smaller figure must not undo the later one's."""
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 5 units
    assert quota.admit(1) == 0 and quota.admit(2) == 0
    earlier = await billing.track_usage("c1", "api_calls", 1, "window-1")  # consumed: 1
    later = await billing.track_usage("c1", "api_calls", 2, "window-2")  # consumed: 3
    cache.confirm("c1", "api_calls", 2, later)
    cache.confirm("c1", "api_calls", 1, earlier)
    assert (quota.usage, quota.local) == (3, 0)
    assert quota.admit(2) == 0 and quota.admit(1) == 429


class Delayed:
    """A real LocalBilling whose check answers, once ``held`` is set, are computed at once and
    delivered when the test releases them (an answer still on the wire); ``error`` arrives instead
    of the answer when set."""

    def __init__(self, billing: LocalBilling, error: Exception | None = None) -> None:
        self.billing = billing
        self.held: anyio.Event | None = None
        self.answered = anyio.Event()
        self.error = error
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.billing, name)

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement:
        self.calls += 1
        answer = await self.billing.check_entitlement(customer_id, feature_key)
        if self.held is not None:
            self.answered.set()
            await self.held.wait()
        if self.error is not None:
            raise self.error
        return answer


async def test_a_check_crossing_a_track_answer_leaves_the_guess_of_full_in_place(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """After a refusal the entry is guessed full; a check reading usage before a track recorded
    its units, answered after that track's answer (whose figures a guessed entry does not take),
    must not open the quota again: the guess holds, and the next request asks again."""
    backend = Delayed(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 5 units a period
    assert quota.admit(2) == 0 and quota.admit(1) == 0  # E1 (2 units) and E2 (1) on their way
    await billing.track_usage("c1", "api_calls", 3, "another-process")
    cache.reject("c1", "api_calls", 1, QuotaExceededError("Usage would exceed limit"))  # E2: 4 of 5, guessed full
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # reads 3 of 5...
        await backend.answered.wait()
        recorded = await billing.track_usage("c1", "api_calls", 2, "E1")  # ...then E1 makes it 5 of 5
        cache.confirm("c1", "api_calls", 2, recorded)
        backend.held.set()
    assert (quota.local, quota.admit(1)) == (0, 429)  # (it read 3 of 5: two more would have been let through)
    assert cache.get("c1", "api_calls") is None  # asked again
    assert await cache.fetch("c1", "api_calls") is quota and quota.usage == 5 and quota.admit(1) == 429


async def test_a_check_answered_in_the_last_period_never_undoes_a_newer_track_answer(
    billing: LocalBilling, clocks: Clocks
) -> None:
    backend = Delayed(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 5 units a period
    assert quota.resets_at is not None
    await billing.track_usage("c1", "api_calls", 1, "last period")
    clocks.advance(quota.resets_at - clocks.wall.timestamp() - 1)
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # answered a second before the period ends...
        await backend.answered.wait()
        clocks.advance(2)  # ...and delivered in the next one, after a track answer of the new period
        assert quota.admit(3) == 0
        cache.confirm("c1", "api_calls", 3, await billing.track_usage("c1", "api_calls", 3, "this period"))
        period_end = quota.resets_at
        backend.held.set()
    assert (quota.usage, quota.resets_at) == (3, period_end)  # not last period's 1 of 5
    assert quota.admit(2) == 0 and quota.admit(1) == 429


async def test_units_reported_on_an_evicted_entry_while_its_check_is_on_its_way_are_kept(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A request admitted with 0 units (it reports its own), its entry evicted with nothing open on
    it; another request's check for the key is on its way when the first reports 5 units: the
    answer lands on the entry holding them, not on a new one forgetting them."""
    backend = Delayed(billing)
    cache, _ = cache_for(backend, clocks, max_size=1)
    quota = await cache.fetch("c1", "api_calls")  # 5 units a period
    assert quota.admit(0) == 0
    await cache.fetch("c1", "export")  # evicts it: nothing open on it, it is let go
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")
        await backend.answered.wait()
        assert quota.hold(5) is quota  # the running request reports its units: set aside
        backend.held.set()
    again = cache.get("c1", "api_calls")
    assert again is quota and again.local == 5 and again.admit(1) == 429


@pytest.mark.parametrize(("old_plan", "old_limit"), [("big", 100), ("unlimited", None)])
async def test_a_check_on_its_way_while_a_track_answer_lowers_the_limit_never_raises_it_back(
    billing: LocalBilling, clocks: Clocks, old_plan: str, old_limit: float | None
) -> None:
    """Which of the two answers is newer is not known: the lower limit holds, and the entry is
    asked again at once (here: a downgrade from 100, or unlimited, to 5 that the older check would undo)."""
    await billing.set_plan("c1", old_plan)
    backend = Delayed(billing)
    cache, upstream = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.limit == old_limit
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # answered with the old limit...
        await backend.answered.wait()
        await billing.set_plan("c1", "small")
        assert quota.admit(1) == 0
        cache.confirm("c1", "api_calls", 1, await billing.track_usage("c1", "api_calls", 1, "after"))
        assert quota.limit == 5
        backend.held.set()  # ...delivered after the track answer of the limit of 5
    assert (quota.limit, quota.usage) == (5, 1)
    assert [quota.admit(1) for _ in range(5)] == [0, 0, 0, 0, 429]
    spawned: list[Refresh] = []
    cache.spawn = spawned.append
    assert cache.get("c1", "api_calls") is quota and len(spawned) == 1  # asked again at once
    backend.held = None
    await spawned[0]()
    assert quota.limit == 5 and upstream.checks == 3


@pytest.mark.parametrize("plan", ["small", "unlimited"])
async def test_a_check_read_before_an_upstream_refusal_leaves_the_entry_to_be_asked_again(
    billing: LocalBilling, clocks: Clocks, plan: str
) -> None:
    """Refused upstream (the subscription cancelled, or a quota on an unlimited entry: downgraded),
    the entry is checked again before any request is admitted on it; a check on its way, which read
    before the refusal, made it fresh again for a whole TTL."""
    await billing.set_plan("c1", plan)
    backend = Delayed(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.admit(5) == 0
    clocks.advance(31)
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # reads "has access"...
        await backend.answered.wait()
        if plan == "small":
            await billing.cancel_subscription("c1")
        else:
            await billing.set_plan("c1", "small")
            await billing.track_usage("c1", "api_calls", 1, "other")
        with pytest.raises(BillingOSError) as refused:
            await billing.track_usage("c1", "api_calls", 5, "e1")
        cache.reject("c1", "api_calls", 5, refused.value)
        backend.held.set()  # ...its answer arrives after the refusal
    cache.spawn = lambda refresh: None  # (with a lifespan: not even served stale)
    assert cache.get("c1", "api_calls") is None


async def test_units_in_doubt_survive_a_check_that_read_before_them(billing: LocalBilling, clocks: Clocks) -> None:
    """A track given up in doubt (its answer never came) while a check that read before it is on
    its way: the guess holds, and the entry is asked again (the check's 0 used made it fresh)."""
    backend = Delayed(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 5 a period
    assert quota.admit(5) == 0
    clocks.advance(31)
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # reads 0 used...
        await backend.answered.wait()
        await billing.track_usage("c1", "api_calls", 5, "a")  # recorded; its answer never comes
        cache.doubt("c1", "api_calls", 5)
        assert quota.admit(1) == 429
        backend.held.set()  # ...its answer arrives after the doubt
    assert quota.admit(1) == 429 and cache.get("c1", "api_calls") is None


async def test_units_confirmed_while_a_doubt_is_guessed_still_count(billing: LocalBilling, clocks: Clocks) -> None:
    backend = Delayed(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 5 a period
    assert [quota.admit(1) for _ in range(4)] == [0] * 4  # a, and b0..b2 on their way
    await billing.track_usage("c1", "api_calls", 1, "a")  # recorded; its answer never comes
    cache.doubt("c1", "api_calls", 1)
    backend.held = anyio.Event()
    renewals = cache.renewals
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # reads 1 used...
        await backend.answered.wait()
        for i in range(3):  # ...b0..b2 confirmed meanwhile
            cache.confirm("c1", "api_calls", 1, await billing.track_usage("c1", "api_calls", 1, f"b{i}"), renewals)
        backend.held.set()
    assert [quota.admit(1) for _ in range(3)] == [0, 429, 429]  # upstream holds 4 of 5


async def test_requests_waiting_on_a_failed_check_each_get_its_error_with_a_traceback_of_their_own(
    billing: LocalBilling, clocks: Clocks
) -> None:
    backend = Delayed(billing, NetworkError("connection refused"))
    backend.held = anyio.Event()
    cache, _ = cache_for(backend, clocks)
    depths: list[int] = []
    joined = anyio.Event()

    async def miss(number: int) -> None:
        if number == 20:
            joined.set()  # (every task waits on the one check from its first await on)
        with pytest.raises(NetworkError) as failed:
            await cache.fetch("c1", "api_calls")
        depths.append(len(traceback.extract_tb(failed.value.__traceback__)))

    async with anyio.create_task_group() as tg:
        for number in range(1, 21):
            tg.start_soon(miss, number)
        await joined.wait()
        backend.held.set()
    assert backend.calls == 1 and len(depths) == 20
    assert len(set(depths[1:])) == 1, depths  # not one frame more for each follower before


async def test_when_the_check_leader_is_cancelled_one_waiting_request_asks_again_for_all(
    billing: LocalBilling, clocks: Clocks
) -> None:
    backend = Delayed(billing)
    backend.held = anyio.Event()
    cache, _ = cache_for(backend, clocks)
    answers: list[Quota] = []
    joined = anyio.Event()
    leader = anyio.CancelScope()  # cancelled as a server does when the client goes away

    async def lead() -> None:
        with leader:
            await cache.fetch("c1", "api_calls")

    async def follower(number: int) -> None:
        if number == 5:
            joined.set()  # (every follower waits on the leader's check from its first await on)
        answers.append(await cache.fetch("c1", "api_calls"))

    with anyio.fail_after(10):  # (a hang guard only)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            await backend.answered.wait()
            for number in range(1, 6):
                tg.start_soon(follower, number)
            await joined.wait()
            leader.cancel()
            backend.held.set()
    assert backend.calls == 2  # the leader's, and one for all five followers
    assert len(answers) == 5 and all(answer is answers[0] for answer in answers)
    assert cache.get("c1", "api_calls") is answers[0]


async def test_a_waiting_request_gets_the_entry_back_if_it_was_evicted_before_it_resumed(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """The answer the requests waited on can be pushed out of a full cache before a waiting one
    resumes: units admitted on that lost object would be counted where no later request looks."""
    backend = Delayed(billing)
    backend.held = anyio.Event()
    cache, _ = cache_for(backend, clocks, max_size=1)
    answers: list[Quota] = []

    async def lead() -> None:
        answers.append(await cache.fetch("c1", "api_calls"))
        cache._entries["c1", "export"] = Quota(None)  # before the follower resumes: evicts it, nothing open

    async def follow() -> None:
        joined.set()  # (it waits on the leader's check from its first await on)
        answers.append(await cache.fetch("c1", "api_calls"))

    joined = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        await backend.answered.wait()
        tg.start_soon(follow)
        await joined.wait()
        backend.held.set()
    assert backend.calls == 1 and answers[0] is answers[1]
    assert cache.get("c1", "api_calls") is answers[1]  # cached again: what it admits, later requests see


def test_a_refresh_cancelled_with_its_lifespan_leaves_the_entry_to_the_next_ones_refresh(
    tmp_path: Path, clocks: Clocks, on_each_loop: Callable[[Scenario], None]
) -> None:
    """A refresh running when the lifespan ends is cancelled with its task group: the entry kept
    saying a refresh was running, and the next lifespan served it stale without one until the
    stale TTL ran out (ten minutes of answers a revoked plan no longer gives)."""

    async def scenario() -> None:
        async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db", clock=lambda: clocks.wall) as billing:
            backend = Delayed(billing)
            cache, upstream = cache_for(backend, clocks, ttl=30, stale_ttl=600)
            quota = await cache.fetch("c1", "api_calls")
            clocks.advance(31)
            backend.held = anyio.Event()  # the refresh's answer is still on the wire when the lifespan ends
            with anyio.fail_after(10):  # (a hang guard only)
                async with anyio.create_task_group() as lifespan:

                    def spawn(refresh: Refresh) -> None:  # as the middleware's lifespan does
                        lifespan.start_soon(refresh)

                    cache.spawn = spawn
                    assert cache.get("c1", "api_calls") is quota
                    await backend.answered.wait()
                    cache.spawn = None
                    lifespan.cancel_scope.cancel()
            backend.held = None
            spawned: list[Refresh] = []
            cache.spawn = spawned.append  # the next lifespan
            assert cache.get("c1", "api_calls") is quota and len(spawned) == 1
            await spawned[0]()
            assert upstream.checks == 3 and cache.get("c1", "api_calls") is quota

    on_each_loop(scenario)


@pytest.mark.parametrize(("old_plan", "old_limit"), [("big", 100), ("unlimited", None)])
async def test_a_track_answer_crossing_a_check_keeps_the_lower_limit_and_asks_again(
    billing: LocalBilling, clocks: Clocks, old_plan: str, old_limit: float | None
) -> None:
    """A track recorded on the big (or an unlimited) plan, answered after a check that saw the
    downgrade: its answer put the old limit back, fresh for the TTL, and requests were admitted
    past the new one."""
    await billing.set_plan("c1", old_plan)
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.limit == old_limit and quota.admit(1) == 0
    renewals = cache.renewals  # the track is sent...
    recorded = await billing.track_usage("c1", "api_calls", 1, "before the downgrade")
    await billing.set_plan("c1", "small")  # ...the plan changes to 5 a period...
    clocks.advance(31)
    assert cache.get("c1", "api_calls") is None
    assert (await cache.fetch("c1", "api_calls")).limit == 5  # ...a check sees it...
    cache.confirm("c1", "api_calls", 1, recorded, renewals)  # ...then the track's answer lands
    assert (quota.limit, quota.usage) == (5, 1)
    assert cache.get("c1", "api_calls") is None  # asked again at once
    # An answer sent after the check (none crossed it) is taken as it is.
    later = await billing.track_usage("c1", "api_calls", 1, "after the check")
    cache.confirm("c1", "api_calls", 0, later, cache.renewals)
    assert (quota.limit, quota.usage) == (5, 2) and cache.get("c1", "api_calls") is quota


async def test_answers_crossing_after_an_upgrade_take_it_once_both_say_so(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """Of two answers crossing on the way the lower limit holds: the lower of the two answers', not
    of a limit kept lower by an earlier crossing, which under steady traffic (each answer crossing
    another) kept an upgrade from ever taking."""
    backend = Delayed(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # small: 5 a period
    before = cache.renewals
    old_answers = [await billing.track_usage("c1", "api_calls", 1, f"before {i}") for i in range(2)]
    await billing.set_plan("c1", "big")  # 100 a period
    clocks.advance(31)
    assert (await cache.fetch("c1", "api_calls")).limit == 100  # a check sees the upgrade...
    cache.confirm("c1", "api_calls", 0, old_answers[0], before)  # ...an older track answer crosses it
    assert quota.limit == 5  # the lower holds, asked again at once
    sent = cache.renewals
    new_answer = await billing.track_usage("c1", "api_calls", 1, "after")  # on its way back...
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # ...while a check is asked (it reads 100)...
        await backend.answered.wait()
        cache.confirm("c1", "api_calls", 0, old_answers[1], before)  # ...another old answer lands meanwhile...
        backend.held.set()
    assert quota.limit == 5  # (the check crossed a track answer saying 5)
    cache.confirm("c1", "api_calls", 0, new_answer, sent)  # ...then the new track's answer, crossed by that check
    assert quota.limit == 100  # both answers of the crossing say 100: the upgrade holds


async def test_a_plan_whose_period_ends_sooner_is_taken_from_checks_and_track_answers(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """Yearly to monthly: every answer of the new plan ends its period before the year the entry
    held, and was taken for one of a period already over: the entry kept the year's figures (and a
    customer refused for the month was refused until the year's end)."""
    await billing.set_plan("c1", "yearly")
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    year_end = quota.resets_at
    assert quota.limit == 1000 and year_end is not None
    await billing.set_plan("c1", "small")  # another interval: a new (monthly) period starts now
    clocks.advance(31)
    assert (await cache.fetch("c1", "api_calls")) is quota
    assert quota.limit == 5 and quota.resets_at is not None and quota.resets_at < year_end
    # A track answer alike: back to yearly, read by a check; then monthly again, a track answered.
    await billing.set_plan("c1", "yearly")
    clocks.advance(31)
    assert (await cache.fetch("c1", "api_calls")).limit == 1000 and quota.resets_at is not None
    year_end = quota.resets_at
    await billing.set_plan("c1", "small")
    cache.confirm("c1", "api_calls", 0, await billing.track_usage("c1", "api_calls", 2, "k"), cache.renewals)
    assert (quota.usage, quota.limit) == (2, 5) and quota.resets_at is not None and quota.resets_at < year_end


async def test_a_full_cache_evicts_the_entry_used_least_recently(tmp_path: Path, clocks: Clocks) -> None:
    plans = {**PLANS, "customers": {f"c{i}": "big" for i in range(12)}}
    async with LocalBilling.from_dict(plans, tmp_path / "many.db", clock=lambda: clocks.wall) as billing:
        cache, upstream = cache_for(billing, clocks, max_size=3)
        hot = await cache.fetch("c0", "api_calls")
        for i in range(1, 12):  # a stream of one-off customers, the hot one served between each
            await cache.fetch(f"c{i}", "api_calls")
            assert cache.get("c0", "api_calls") is hot
            assert len(cache) <= 3
        assert cache.get("c11", "api_calls") is not None and cache.get("c10", "api_calls") is not None
        assert cache.get("c1", "api_calls") is None  # out: used once, long ago
        assert upstream.checks == 12  # the hot customer was never asked again


class CheckFailingFor:
    """A real LocalBilling whose checks of one customer, once set, wait for ``release`` and then fail."""

    def __init__(self, billing: LocalBilling) -> None:
        self.billing = billing
        self.fail_for: str | None = None
        self.release = anyio.Event()
        self.entered = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.billing, name)

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement:
        if customer_id == self.fail_for:
            self.entered.set()
            await self.release.wait()
            raise NetworkError("connection refused")
        return await self.billing.check_entitlement(customer_id, feature_key)


async def test_units_held_on_an_entry_set_aside_survive_a_failed_refresh(tmp_path: Path, clocks: Clocks) -> None:
    """A failed refresh put back the entry it refreshed, dropping the one set aside meanwhile with a
    running request's reported units: the quota was admitted twice over."""
    plans = {**PLANS, "customers": {"c1": "small", "c2": "big"}}  # c1: 5 api_calls a period
    async with LocalBilling.from_dict(plans, tmp_path / "b.db", clock=lambda: clocks.wall) as billing:
        backend = CheckFailingFor(billing)
        cache, _ = cache_for(backend, clocks, max_size=1)
        old = await cache.fetch("c1", "api_calls")
        assert old.admit(0) == 0  # a request reporting its own units later
        await cache.fetch("c2", "api_calls")  # evicts c1's entry, nothing open on it
        new = await cache.fetch("c1", "api_calls")
        clocks.advance(31)  # stale: refreshed in the background, while billing is down
        backend.fail_for = "c1"
        async with anyio.create_task_group() as tg:
            tg.start_soon(cache._refresh, ("c1", "api_calls"))
            await backend.entered.wait()
            await cache.fetch("c2", "api_calls")  # evicts the newer entry too
            assert old.hold(5) is old  # the request reports the whole quota: set aside, counted
            backend.release.set()
        current = cache._entries.find(("c1", "api_calls"))
        assert current is not None and current is not new
        assert current.admit(5) == 429 and current.local == 5


def test_an_entry_set_aside_is_let_go_once_its_units_are_released() -> None:
    from billingos_asgi.cache import _Entries

    entries = _Entries(1)
    quota = Quota(None, key=("c1", "tokens"), home=entries)
    entries["c1", "tokens"] = quota
    entries["c2", "tokens"] = Quota(None)  # evicts it, nothing open
    assert quota.hold(7) is quota and entries.aside == {("c1", "tokens"): quota}
    quota.release(7)  # its request failed: not billed
    assert not entries.aside


def test_an_eviction_passes_over_a_bounded_number_of_used_entries() -> None:
    """Not the whole cache on one request's insert when every entry was used since the last pass."""
    from billingos_asgi.cache import _Entries

    entries = _Entries(1_000)
    quotas = [Quota(None) for _ in range(1_000)]
    for i, quota in enumerate(quotas):
        entries[f"c{i}", "api_calls"] = quota
        quota.used = True
    entries["new", "api_calls"] = Quota(None)
    assert len(entries) == 1_000
    assert sum(not quota.used for quota in quotas) <= 33  # passed over (or evicted), not 1,000


# -- answers crossing each other across plan changes, retries and refusals --


class HeldCheck:
    """Checks read upstream at once and answer when the test lets them (``held``, once set)."""

    def __init__(self, billing: LocalBilling) -> None:
        self.billing = billing
        self.held: anyio.Event | None = None
        self.read = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.billing, name)

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement:
        answer = await self.billing.check_entitlement(customer_id, feature_key)
        if self.held is not None:
            self.read.set()
            await self.held.wait()
        return answer


async def crossed(cache: EntitlementCache, backend: HeldCheck, meanwhile: Callable[[], Awaitable[None]]) -> Quota:
    """A check of c1's entry that reads upstream, then answers only after ``meanwhile`` has run (other
    checks go through meanwhile): the entry it hands the request that waited on it."""
    held = backend.held = anyio.Event()
    answers: list[Quota] = []

    async def waiting() -> None:
        answers.append(await cache.fetch("c1", "api_calls"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiting)
        await backend.read.wait()
        backend.held = None
        await meanwhile()
        held.set()
    return answers[0]


def admitted_of(cache: EntitlementCache, tries: int) -> int:
    """How many of ``tries`` one-unit requests the entry served now admits."""
    served = cache.get("c1", "api_calls")
    return sum(1 for _ in range(tries) if served is not None and served.admit(1) == 0)


# -- units held with no answer (a request let through while billing was unreachable, a replay) --


async def test_units_held_with_no_answer_take_no_room_and_decide_nothing(billing: LocalBilling, clocks: Clocks) -> None:
    cache, _ = cache_for(billing, clocks, max_size=1)
    quota = await cache.fetch("c1", "api_calls")
    assert [quota.admit(1) for _ in range(5)] == [0] * 5  # used up, here
    for customer in ("c2", "c3", "c4"):
        cache.count_pending(customer, "api_calls", 1)
    assert len(cache) == 1 and cache.get("c1", "api_calls") is quota  # not evicted for them
    assert cache.get("c2", "api_calls") is None  # asked for: held units are no answer
    answer = await cache.fetch("c2", "api_calls")  # billing does not know c2: its answer, not an entry with no answer's
    assert answer.entitlement is None and answer.local == 1 and len(cache) == 1


async def test_a_request_waiting_on_a_check_is_decided_on_its_answer(billing: LocalBilling, clocks: Clocks) -> None:
    """Its answer evicted before the waiting request resumed (other checks answered in the same turn
    of the loop), and units held for the key since (a request let through): the waiter was handed
    the entry holding them, with no answer in it (a 403)."""
    cache, _ = cache_for(billing, clocks, max_size=1)
    answer = await cache.fetch("c1", "api_calls")
    await cache.fetch("c2", "api_calls")  # evicts c1's answer, nothing open on it
    cache.count_pending("c1", "api_calls", 1)
    waiter = cache._current(("c1", "api_calls"), answer)  # (what fetch() hands a request that waited on it)
    assert waiter is answer and waiter.local == 1 and waiter.admit(4) == 0 and waiter.admit(1) == 429
    assert cache.get("c1", "api_calls") is answer


async def test_units_held_with_no_answer_and_recorded_while_a_check_is_on_its_way_count(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """The check read upstream before they were recorded, and answers after their confirmation: its
    figure (nothing used) held, and a whole quota was admitted on top of them."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    cache.count_pending("c1", "api_calls", 4)

    async def recorded() -> None:
        renewals = cache.renewals
        result = await billing.track_usage("c1", "api_calls", 4, "let-through")
        cache.confirm("c1", "api_calls", 4, result, renewals)

    await crossed(cache, backend, recorded)
    assert cache.get("c1", "api_calls") is None  # crossed: asked again before a request is decided on it
    quota = await cache.fetch("c1", "api_calls")
    assert (quota.usage, quota.local, admitted_of(cache, 5)) == (4, 0, 1)


async def test_units_held_after_a_check_left_and_settled_before_it_answered_are_not_forgotten(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A check of c1 leaves with nothing cached (no entry with no answer yet); a request let through earlier
    finishes meanwhile (count_pending), its event is recorded and confirmed (the entry holding them,
    settled, is let go), then the check answers with a figure read before the recording: the
    confirmation's crossing and figures are lost, and a whole quota is admitted on top of them."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)

    async def let_through_then_recorded() -> None:
        cache.count_pending("c1", "api_calls", 4)
        renewals = cache.renewals
        result = await billing.track_usage("c1", "api_calls", 4, "let-through")
        cache.confirm("c1", "api_calls", 4, result, renewals)

    await crossed(cache, backend, let_through_then_recorded)
    served = cache.get("c1", "api_calls")
    # Either asked again (crossed) or counting the 4 recorded units: at most 1 more of 5.
    assert served is None or admitted_of(cache, 5) <= 1


async def test_a_retrys_older_figures_do_not_lower_the_usage_noted_on_units_held_with_no_answer(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """Two replayed events held on an entry with no answer; the first confirmed with the newest figures (2
    used), the second a resend whose first call was recorded before (upstream answers with its
    first call's figures: 1 used). The entry with no answer keeps 1, and a check that read in between
    (1 used) is taken as is: 4 more admitted, 6 of 5 recorded or refused upstream."""
    first = await billing.track_usage("c1", "api_calls", 1, "resent")  # first call, its answer lost
    assert first.usage.consumed_units == 1
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    cache.count_pending("c1", "api_calls", 1)  # the resent event, replayed
    cache.count_pending("c1", "api_calls", 1)  # another one

    async def both_confirmed() -> None:  # after the check read: 1 used
        renewals = cache.renewals
        result = await billing.track_usage("c1", "api_calls", 1, "fresh")
        assert result.usage.consumed_units == 2
        cache.confirm("c1", "api_calls", 1, result, renewals)
        retry = await billing.track_usage("c1", "api_calls", 1, "resent")  # the first call's answer
        assert retry.usage.consumed_units == 1
        cache.confirm("c1", "api_calls", 1, retry, renewals)

    quota = await crossed(cache, backend, both_confirmed)
    # The waiting request is decided on this: 2 are recorded, so 4 more must not fit in 5.
    assert quota.admit(4) == 429


async def test_units_held_with_no_answer_in_doubt_are_not_forgotten_by_a_crossing_check(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """Units held with no answer go up, and their track's answer never comes (in doubt): recorded in
    fact. A check that read before they were recorded answers after: the entry holding them let them go
    and noted no crossing, so the check's figure (nothing used) admits a whole quota on top."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    cache.count_pending("c1", "api_calls", 4)

    async def in_doubt() -> None:
        await billing.track_usage("c1", "api_calls", 4, "lost-answer")  # recorded; the answer is lost
        cache.doubt("c1", "api_calls", 4)

    await crossed(cache, backend, in_doubt)
    served = cache.get("c1", "api_calls")
    assert served is None or admitted_of(cache, 5) <= 1


async def test_units_a_running_request_holds_where_units_with_no_answer_were_are_released(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A request admitted for 0 units (it reports later) on c1's answer; the answer is evicted (nothing
    open on it); a let-through request's unit is held for c1 (entry with no answer); the running request
    reports 2 units (hold: onto the entry holding them, which it keeps); a request that waited on c1's check
    resumes and its answer takes the entry holding them's units over. The running request then fails: its
    2 units are released on the entry holding them, no longer anyone's entry, and stay held on the answer
    for good (c1 refused with quota left)."""
    cache, _ = cache_for(billing, clocks, max_size=1)
    answer = await cache.fetch("c1", "api_calls")
    assert answer.admit(0) == 0  # the running request (reports its own units)
    await cache.fetch("c2", "api_calls")  # evicts c1's answer, nothing open on it
    cache.count_pending("c1", "api_calls", 1)  # a let-through request's unit
    running = answer.hold(2)  # what UsageContext._add does
    waiter = cache._current(("c1", "api_calls"), answer)  # (what fetch() hands a request that waited)
    assert waiter is answer
    running.release(2)  # the running request failed: its units are let go (middleware._settle)
    cache.reject("c1", "api_calls", 1, None)  # the let-through event given up / or confirmed
    assert answer.local == 0  # nothing open any more


class HeldThenFailing(HeldCheck):
    """c1's check is held until let go, then fails (billing went down meanwhile)."""

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        if customer_id == "c1" and self.held is not None:
            self.read.set()
            await self.held.wait()
            raise NetworkError("down")
        return await self.billing.check_entitlement(customer_id, feature_key)


async def test_a_failed_check_falls_back_on_the_stale_answer_though_units_were_held_meanwhile(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """c1's answer (quota used up) is stale and asked again; meanwhile it is evicted (nothing open
    on it) and units are held for c1 (a let-through request finishing): the check fails, and the
    fallback looks at the units held with no answer instead of the stale answer: the request
    waiting on it is let through (or 503), c1's used-up quota is forgotten."""
    backend = HeldThenFailing(billing)
    cache, _ = cache_for(backend, clocks, max_size=1, ttl=30, stale_ttl=600)
    await billing.track_usage("c1", "api_calls", 5, "used-up")
    stale = await cache.fetch("c1", "api_calls")
    assert stale.admit(1) == 429
    clocks.advance(601)  # past stale_ttl, still in the period: a blocking check, the stale answer to fall back on
    backend.held = anyio.Event()
    outcome: list[object] = []

    async def waiter() -> None:
        try:
            outcome.append(await cache.fetch("c1", "api_calls"))
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await backend.read.wait()
        held, backend.held = backend.held, None  # c2's check goes through
        await cache.fetch("c2", "api_calls")  # evicts c1's stale answer (nothing open on it)
        cache.count_pending("c1", "api_calls", 1)
        held.set()
    (answer,) = outcome
    assert answer is stale  # the stale answer beats none


C1 = ("c1", "api_calls")


async def recorded(cache: EntitlementCache, billing: LocalBilling, units: float, key: str) -> None:
    renewals = cache.renewals
    result = await billing.track_usage("c1", "api_calls", units, key)
    cache.confirm("c1", "api_calls", units, result, renewals)


async def test_a_cancelled_check_leaves_no_kept_entry_aside(billing: LocalBilling, clocks: Clocks) -> None:
    """count_pending, a check leaves, the units settle (kept for the check), the check's caller is
    cancelled (no waiter): the kept entry with nothing open stays in aside for good."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    cache.count_pending("c1", "api_calls", 1)
    backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")
        await backend.read.wait()
        await recorded(cache, billing, 1, "let-through")
        assert cache._entries.aside[C1].local == 0  # kept for the check
        tg.cancel_scope.cancel()  # its client went away
    assert not cache._flights
    assert cache._entries.aside == {}, cache._entries.aside


async def test_a_takeover_keeps_the_figures_noted_on_units_with_no_answer(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A check of c1 leaves with nothing cached. A let-through request's 3 units are held (entry with no answer)
    and recorded (confirm: usage 3 noted on it, kept for the check). A running request admitted for 0 units
    on an old, evicted answer of c1 reports 2: hold() sets that answer aside, taking over the entry's units
    and crossing, not its usage. The check (read: nothing used) answers: the waiting request is decided on 0
    used + 2 held: 3 more admitted, 3 + 2 + 3 = 8 of 5."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks, max_size=1)
    old = await cache.fetch("c1", "api_calls")
    assert old.admit(0) == 0  # a request that reports its own units later
    await cache.fetch("c2", "api_calls")  # evicts c1's answer, nothing open on it

    async def let_through_and_reported() -> None:  # after the check read: 0 used
        cache.count_pending("c1", "api_calls", 3)
        await recorded(cache, billing, 3, "let-through")
        old.hold(2)

    quota = await crossed(cache, backend, let_through_and_reported)
    # 3 recorded + 2 running: at most 0 more of 5
    assert quota.admit(1) == 429, (quota.usage, quota.local)


async def test_without_the_takeover_the_same_figures_are_kept(billing: LocalBilling, clocks: Clocks) -> None:
    """Control: the same, with no running request reporting (the entry with no answer is renewed itself)."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks, max_size=1)

    async def let_through() -> None:
        cache.count_pending("c1", "api_calls", 3)
        await recorded(cache, billing, 3, "let-through")

    quota = await crossed(cache, backend, let_through)
    assert quota.admit(2) == 0 and quota.admit(1) == 429


async def test_a_release_does_not_let_go_of_an_entry_kept_for_a_check(billing: LocalBilling, clocks: Clocks) -> None:
    """As above, and the running request then fails (release): the entry set aside, kept for the check with
    the crossing it took over, is let go by release() (which ignores keep); the check's answer (0 used)
    lands on a new entry, fresh: 5 admitted on top of 3 recorded."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks, max_size=1)
    old = await cache.fetch("c1", "api_calls")
    assert old.admit(0) == 0
    await cache.fetch("c2", "api_calls")

    async def let_through_and_reported_then_failed() -> None:
        cache.count_pending("c1", "api_calls", 3)
        await recorded(cache, billing, 3, "let-through")
        old.hold(2).release(2)  # the running request reported, then failed

    quota = await crossed(cache, backend, let_through_and_reported_then_failed)
    served = cache.get("c1", "api_calls")
    assert served is None or admitted_of(cache, 5) <= 2
    assert quota.admit(3) == 429


async def test_an_eviction_sweep_does_not_forget_an_entry_kept_for_a_check(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A check of c1 leaves with nothing cached; a let-through request's 4 units are held and recorded
    (kept for the check, nothing open). Meanwhile an eviction with units open sweeps aside: the kept entry
    goes with the crossing; the check's answer (0 used) is fresh: 5 admitted on top of 4."""
    await billing.set_plan("c2", "big")
    await billing.set_plan("c3", "big")
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks, max_size=1)

    async def let_through_then_swept() -> None:
        cache.count_pending("c1", "api_calls", 4)
        await recorded(cache, billing, 4, "let-through")
        c2 = await cache.fetch("c2", "api_calls")
        assert c2.admit(1) == 0
        await cache.fetch("c3", "api_calls")  # evicts c2 with a unit open: aside is swept

    await crossed(cache, backend, let_through_then_swept)
    served = cache.get("c1", "api_calls")
    assert served is None or admitted_of(cache, 5) <= 1


@pytest.mark.parametrize("evicted", [False, True])
async def test_a_check_crossing_a_track_answer_on_an_evicted_entry_keeps_the_crossing(
    billing: LocalBilling, clocks: Clocks, evicted: bool
) -> None:
    """c1's answer A is refreshed (the check reads: 0 used). Meanwhile a request admitted on A is recorded
    (confirm: usage 1 and a crossing noted on A, nothing open), A is evicted (nothing open: dropped), and a
    let-through request's unit is held for c1 (an entry with no answer). The answer lands on that entry (found
    first), not on A (``previous``): the crossing and A's usage are lost, 4 more admitted on 1 recorded + 1
    held: 6 of 5. (evicted=False: the control, 3 more.)"""
    await billing.set_plan("c2", "big")
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks, max_size=1)
    a = await cache.fetch("c1", "api_calls")
    assert a.admit(1) == 0

    async def recorded_evicted_and_let_through() -> None:
        await recorded(cache, billing, 1, "admitted-on-a")
        if evicted:
            await cache.fetch("c2", "api_calls")  # evicts A, nothing open on it
        cache.count_pending("c1", "api_calls", 1)  # a let-through request (set_customer) finishes

    quota = await crossed(cache, backend, recorded_evicted_and_let_through)
    assert sum(1 for _ in range(5) if quota.admit(1) == 0) <= 3


async def test_a_failed_checks_fallback_does_not_drop_units_set_aside_on_an_older_answer(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A request R admitted for 0 units on c1's January answer A runs into February; A was evicted (nothing
    open). February's answer P is cached; its check (stale) fails while P is evicted and R reports 2 units
    (hold: A set aside, period over: no fallback). The fallback is P (``previous``): cached again, it pops A
    from aside, R's 2 units with it: 5 more admitted on top of them."""
    from tests.test_cache import HeldThenFailing

    await billing.set_plan("c2", "big")
    backend = HeldThenFailing(billing)
    cache, _ = cache_for(backend, clocks, max_size=1, ttl=30, stale_ttl=600)
    a = await cache.fetch("c1", "api_calls")
    assert a.admit(0) == 0  # R, reporting its units later
    await cache.fetch("c2", "api_calls")  # evicts A
    assert a.resets_at is not None
    clocks.advance(a.resets_at - clocks.wall.timestamp() + 60)  # February
    p = await cache.fetch("c1", "api_calls")
    assert p is not a
    clocks.advance(601)  # P too old to serve: a blocking check, P to fall back on
    backend.held = anyio.Event()
    answers: list[Quota | Exception] = []

    async def waiter() -> None:
        try:
            answers.append(await cache.fetch("c1", "api_calls"))
        except Exception as exc:  # (no fallback: let through or a 503, as on_error says)
            answers.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await backend.read.wait()
        held, backend.held = backend.held, None
        await cache.fetch("c2", "api_calls")  # evicts P, nothing open
        a.hold(2)  # R reports 2
        held.set()
    entry = cache._entries.find(C1)
    # R's 2 units are still counted for c1 (else 5 more are admitted on top of them)
    assert entry is not None and entry.local == 2, (entry, answers)


async def test_a_retrys_answer_from_a_period_over_since_leaves_the_entry_as_it_is(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """Upstream answers a retry with its first call's figures: January's limit of 100 came back in
    February, after a check saw the downgrade to 5, fresh for a whole TTL."""
    await billing.set_plan("c1", "big")
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.resets_at is not None and quota.admit(1) == 0
    clocks.advance(quota.resets_at - clocks.wall.timestamp() - 60)  # January's last minute
    first = await billing.track_usage("c1", "api_calls", 1, "r1")  # recorded; its answer lost
    clocks.advance(120)  # February
    await billing.set_plan("c1", "small")
    assert (await cache.fetch("c1", "api_calls")).limit == 5
    sent = cache.renewals
    replayed = await billing.track_usage("c1", "api_calls", 1, "r1")  # the retry: January's answer
    assert replayed == first
    cache.confirm("c1", "api_calls", 1, replayed, sent)
    assert (quota.limit, quota.usage, quota.local) == (5, 0, 0)  # figures kept, asked again all the same:
    assert cache.get("c1", "api_calls") is None  # (a period another plan's may overlap: a plan changed since)
    assert await cache.fetch("c1", "api_calls") is quota and admitted_of(cache, 20) == 5


async def test_a_track_answer_crossing_a_check_across_a_plans_new_period_keeps_the_checks_figures(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """Yearly (1,000) to monthly (5), a new period: the old plan's answer, ending later, was taken as the newer."""
    await billing.set_plan("c1", "yearly")
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.limit == 1000 and quota.admit(1) == 0
    sent = cache.renewals
    recorded = await billing.track_usage("c1", "api_calls", 1, "before the change")
    await billing.set_plan("c1", "small")
    clocks.advance(31)
    assert (await cache.fetch("c1", "api_calls")).limit == 5  # a check sees the new plan...
    cache.confirm("c1", "api_calls", 1, recorded, sent)  # ...then the old track's answer lands
    assert quota.limit == 5 and cache.get("c1", "api_calls") is None  # asked again at once
    assert admitted_of(cache, 50) == 0


async def test_units_recorded_in_a_new_period_while_a_check_of_the_last_one_crossed_them_are_kept(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A track sent in January's last seconds, recorded in February, crossed by a (stale entry's)
    January check: its February figures are the newer ones. Dropped, February's first check (read
    before the track was recorded) made the entry 0 of 5 used, and it admitted 5 more."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks, ttl=30)
    quota = await cache.fetch("c1", "api_calls")  # January: 0 of 5
    assert quota.resets_at is not None
    assert [quota.admit(1) for _ in range(5)] == [0] * 5  # 5 admitted here, their event on its way
    clocks.advance(quota.resets_at - clocks.wall.timestamp() - 10)  # January's last seconds
    sent = cache.renewals  # the event's track call leaves now...
    await cache.fetch("c1", "api_calls")  # ...and a January check answers meanwhile
    clocks.advance(20)  # February

    async def recorded_in_february() -> None:
        result = await billing.track_usage("c1", "api_calls", 5, "r1:api_calls")
        assert (result.usage.consumed_units, result.usage.limit_units) == (5, 5)
        cache.confirm("c1", "api_calls", 5, result, sent)

    answered = await crossed(cache, backend, recorded_in_february)  # read 0 of 5 before the track
    assert (answered.usage, answered.local) == (5, 0)
    cache.spawn = lambda refresh: None  # (a lifespan: a stale entry serves while it is refreshed)
    assert admitted_of(cache, 5) == 0


async def test_a_check_crossing_a_track_answer_across_a_plans_new_period_keeps_the_lower_figures(
    billing: LocalBilling, clocks: Clocks
) -> None:
    await billing.set_plan("c1", "yearly")
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")
    clocks.advance(31)

    async def downgraded_and_tracked() -> None:
        await billing.set_plan("c1", "small")  # monthly, 5 a period
        assert quota.admit(1) == 0
        sent = cache.renewals
        cache.confirm("c1", "api_calls", 1, await billing.track_usage("c1", "api_calls", 1, "k"), sent)
        assert quota.limit == 5

    await crossed(cache, backend, downgraded_and_tracked)  # the yearly answer lands after the monthly track's
    spawned: list[Refresh] = []
    cache.spawn = spawned.append  # a lifespan runs: served stale while it is asked again, the lower limit holding
    assert quota.limit == 5 and admitted_of(cache, 50) <= 4 and len(spawned) == 1


async def test_an_older_track_answer_after_an_upstream_refusal_does_not_make_the_entry_fresh(
    billing: LocalBilling, clocks: Clocks
) -> None:
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.admit(1) == 0 and quota.admit(1) == 0  # two batches on their way
    sent = cache.renewals
    first = await billing.track_usage("c1", "api_calls", 1, "batch 1")  # recorded; its answer still on the wire
    await billing.cancel_subscription("c1")
    cache.reject("c1", "api_calls", 1, NetworkError("stands for upstream's refusal of batch 2"))
    cache.confirm("c1", "api_calls", 1, first, sent)  # then batch 1's (older) answer lands
    assert cache.get("c1", "api_calls") is None  # checked again before any request is admitted


async def test_a_check_read_before_a_quota_refusal_keeps_the_entry_full(billing: LocalBilling, clocks: Clocks) -> None:
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 0 of 5
    clocks.advance(31)

    async def used_up_and_refused() -> None:
        await billing.track_usage("c1", "api_calls", 5, "another process")  # uses them all
        assert quota.admit(1) == 0
        cache.reject("c1", "api_calls", 1, QuotaExceededError("quota_exceeded"))  # ours refused: full

    await crossed(cache, backend, used_up_and_refused)  # the check read 0 of 5 before
    assert sum(1 for _ in range(10) if quota.admit(1) == 0) == 0


async def test_a_check_at_a_new_period_waits_for_a_budget_token_as_a_miss_does(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """The entry of a period over is no answer to fall back on: refused at once for want of a token,
    its requests went through unchecked (or were answered 503)."""
    upstream = Upstream(billing, budget=Budget(calls_per_minute=600, burst=1))  # a token every 0.1 s
    cache = EntitlementCache(upstream, clock=lambda: clocks.monotonic, wall_clock=lambda: clocks.wall.timestamp())
    quota = await cache.fetch("c1", "api_calls")  # the one token
    assert quota.resets_at is not None
    clocks.advance(quota.resets_at - clocks.wall.timestamp() + 1)
    assert cache.get("c1", "api_calls") is None
    with anyio.fail_after(5):
        assert (await cache.fetch("c1", "api_calls")).limit == 5  # waited for the next token


async def test_a_tracks_retry_answered_with_its_first_calls_figures_crosses_the_checks_since_that_call(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """The retry's answer is the first call's (limit 100): a check that saw the downgrade to 5
    between the two calls crossed it, though it came before the retry was sent."""
    await billing.set_plan("c1", "big")
    cache_of: list[EntitlementCache] = []

    class FirstAnswerLost:
        calls = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(billing, name)

        async def track_usage(self, *args: Any, **kwargs: Any) -> Any:
            FirstAnswerLost.calls += 1
            result = await billing.track_usage(*args, **kwargs)
            if FirstAnswerLost.calls == 1:  # recorded; meanwhile the plan is downgraded, and a check sees it
                await billing.set_plan("c1", "small")
                clocks.advance(31)
                assert (await cache_of[0].fetch("c1", "api_calls")).limit == 5
                raise NetworkError("the answer was lost")
            return result

    cache, upstream = cache_for(FirstAnswerLost(), clocks)
    cache_of.append(cache)
    tracker = Tracker(upstream, cache)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.limit == 100 and quota.admit(1) == 0
    await tracker.send(UsageEvent("c1", "api_calls", 1.0, "r1:api_calls"))
    assert FirstAnswerLost.calls == 2 and quota.local == 0
    assert quota.limit == 5 and admitted_of(cache, 50) <= 4


async def test_a_natural_period_rollover_does_not_carry_last_periods_usage(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """The new period's first check crossing the old period's last answer: February started used up."""
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 0 of 5
    assert quota.resets_at is not None
    for i in range(4):
        assert quota.admit(1) == 0
        cache.confirm("c1", "api_calls", 1, await billing.track_usage("c1", "api_calls", 1, f"jan{i}"), cache.renewals)
    clocks.advance(quota.resets_at - clocks.wall.timestamp() - 1)  # January's last second
    assert quota.admit(1) == 0
    sent = cache.renewals
    last = await billing.track_usage("c1", "api_calls", 1, "jan-last")  # recorded: 5 of 5; answer on the wire
    clocks.advance(2)  # February: a new period, nothing used
    assert cache.get("c1", "api_calls") is None

    async def last_answer_lands() -> None:
        cache.confirm("c1", "api_calls", 1, last, sent)

    await crossed(cache, backend, last_answer_lands)  # the check reads February (0 of 5), then January's answer lands
    clocks.advance(1)
    await cache.fetch("c1", "api_calls")  # asked again, not raced: February 0 of 5
    assert (await billing.check_entitlement("c1", "api_calls")).usage == 0
    assert quota.usage == 0, f"February's entry holds January's usage {quota.usage}"
    assert admitted_of(cache, 10) == 5


async def test_a_quota_refusal_crossing_the_new_periods_first_check_does_not_carry_the_guess(
    billing: LocalBilling, clocks: Clocks
) -> None:
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")  # 0 of 5
    assert quota.resets_at is not None
    await billing.track_usage("c1", "api_calls", 5, "another process")  # January used up
    clocks.advance(quota.resets_at - clocks.wall.timestamp() - 1)
    assert quota.admit(1) == 0  # January's last request, refused upstream on its way
    clocks.advance(2)  # February

    async def refusal_lands() -> None:
        cache.reject("c1", "api_calls", 1, QuotaExceededError("quota_exceeded"))

    await crossed(cache, backend, refusal_lands)  # the check reads February (0 of 5), then January's refusal lands
    clocks.advance(1)
    await cache.fetch("c1", "api_calls")
    assert quota.usage == 0, f"February's entry holds January's guess {quota.usage}"
    assert admitted_of(cache, 10) == 5


async def test_a_new_period_ending_as_the_old_one_did_takes_the_checks_lower_usage(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A daily plan anchored where the monthly one was: on the month's last day its period ends when
    the month's did. Told apart by their end only, the month's usage held, 429 for the rest of the day."""
    clocks.advance(30 * 86400 + 10 * 3600)  # Jan 31, 10:00
    await billing.set_plan("c1", "big", started_at=START)
    await billing.track_usage("c1", "api_calls", 50, "january")
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert (quota.usage, quota.limit) == (50, 100)
    await billing.set_plan("c1", "daily", started_at=START)  # Jan 31 to Feb 1: 0 of 10
    clocks.advance(31)
    assert await cache.fetch("c1", "api_calls") is quota
    assert (quota.usage, quota.limit) == (0, 10) and quota.admit(1) == 0


async def test_usage_carried_across_a_plans_new_period_is_asked_again_after_the_next_track_answer(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A check reading the new yearly period crossed a monthly track answer: the higher usage is
    carried until asked again, at once. A track answer after it made the entry fresh for a whole TTL,
    carrying the month's 90 units onto a year of 10: 429 with 9 units left."""
    await billing.set_plan("c1", "big")
    clocks.advance(10 * 86400)
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")
    await billing.track_usage("c1", "api_calls", 89, "another process")
    assert quota.admit(1) == 0 and quota.admit(1) == 0  # two requests' units on their way
    sent = cache.renewals
    monthly = await billing.track_usage("c1", "api_calls", 1, "first")  # 90 of 100
    await billing.set_plan("c1", "yearly_small")
    clocks.advance(31)

    async def monthly_answer_lands() -> None:
        cache.confirm("c1", "api_calls", 1, monthly, sent)

    await crossed(cache, backend, monthly_answer_lands)
    assert quota.usage == 90 and quota.carried
    sent = cache.renewals
    yearly = await billing.track_usage("c1", "api_calls", 1, "second")
    assert (yearly.usage.consumed_units, yearly.usage.limit_units) == (1, 10)
    cache.confirm("c1", "api_calls", 1, yearly, sent)
    spawned: list[Refresh] = []
    cache.spawn = spawned.append
    assert cache.get("c1", "api_calls") is quota and len(spawned) == 1  # asked again at once


def test_a_request_reporting_its_own_units_needs_some_of_the_quota_left() -> None:
    """Quantity 0 (the endpoint reports its units): refused on a quota used up exactly, admitted below it."""
    assert Quota(None, limit=10, usage=10, refusal=0).admit(0) == 429
    assert Quota(None, limit=10, usage=9.5, refusal=0).admit(0) == 0


async def test_a_track_answer_of_a_plans_new_period_landing_after_the_crossing_check_still_counts(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A refresh reads the yearly plan (0 of 1,000); the plan drops to 5 a month (a new period) and a
    track is recorded there (4 of 5); the refresh answers first, then the track. The lower limit and
    the higher usage hold: the check's 0 kept, 5 more were admitted (served stale) where 1 is left."""
    await billing.set_plan("c1", "yearly")
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert [quota.admit(1) for _ in range(4)] == [0] * 4  # their event on its way
    clocks.advance(31)  # stale: refreshed
    held = backend.held = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.fetch, "c1", "api_calls")  # reads the yearly plan...
        await backend.read.wait()
        backend.held = None
        sent = cache.renewals  # the track call leaves
        await billing.set_plan("c1", "small")
        result = await billing.track_usage("c1", "api_calls", 4, "r1:api_calls")
        assert (result.usage.consumed_units, result.usage.limit_units) == (4, 5)
        held.set()  # ...and answers first
    cache.confirm("c1", "api_calls", 4, result, sent)
    assert (quota.limit, quota.usage, quota.local) == (5, 4, 0)
    cache.spawn = lambda refresh: None  # a lifespan: a stale entry serves while it is refreshed
    assert admitted_of(cache, 50) == 1
    renewed = await cache.fetch("c1", "api_calls")  # the next check's usage replaces the one kept
    assert (renewed.limit, renewed.usage) == (5, 4)


async def test_a_retrys_answer_of_a_plan_left_since_is_not_taken_for_the_next_period(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """A yearly plan's track recorded, its answer lost; the customer moves to 5 a month (a check sees
    it), that month ends, and the retry lands with the first call's yearly figures: taken for the
    newer period's, fresh, they admitted 50 of 50 against a quota of 5."""
    await billing.set_plan("c1", "yearly")
    cache, _ = cache_for(billing, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.admit(1) == 0
    sent = cache.renewals
    first = await billing.track_usage("c1", "api_calls", 1, "r1:api_calls")  # recorded; its answer lost
    await billing.set_plan("c1", "small", started_at=START + timedelta(hours=1))  # its month ends in an hour
    clocks.advance(31)
    assert await cache.fetch("c1", "api_calls") is quota and (quota.limit, quota.usage) == (5, 0)
    clocks.advance(3600)  # the next month begins
    replayed = await billing.track_usage("c1", "api_calls", 1, "r1:api_calls")
    assert replayed == first  # answered with the first call's (yearly) figures
    cache.confirm("c1", "api_calls", 1, replayed, sent)
    assert quota.local == 0 and cache.get("c1", "api_calls") is None  # only a check says
    cache.spawn = lambda refresh: None
    assert admitted_of(cache, 50) == 0  # none decided on it: each request would wait for the check
    renewed = await cache.fetch("c1", "api_calls")
    assert (renewed.limit, renewed.usage) == (5, 0)


async def test_usage_carried_across_a_plan_change_stays_when_a_check_crossed_by_tracks_answers(
    billing: LocalBilling, clocks: Clocks
) -> None:
    """Usage carried (a daily plan's track answer crossing the check of the monthly plan that replaced
    it) is replaced by the next check's: not by one that read before 3 units were recorded and
    confirmed, which took the entry back to 0 used and let 100 more through where 97 are left."""
    clocks.advance(3600)
    await billing.set_plan("c1", "daily")  # 10 a day, from now
    backend = HeldCheck(billing)
    cache, _ = cache_for(backend, clocks)
    quota = await cache.fetch("c1", "api_calls")
    assert quota.admit(1) == 0
    sent = cache.renewals
    daily = await billing.track_usage("c1", "api_calls", 1, "r0:api_calls")  # its answer on its way...
    clocks.advance(31)
    await billing.set_plan("c1", "big")  # 100 a month, a new period from now
    assert await cache.fetch("c1", "api_calls") is quota and quota.limit == 100
    cache.confirm("c1", "api_calls", 1, daily, sent)  # ...lands after the check: which is current is not known
    assert (quota.limit, quota.usage, quota.carried) == (10, 1, True)

    async def three_recorded() -> None:
        assert [quota.admit(1) for _ in range(3)] == [0] * 3
        sent = cache.renewals
        cache.confirm("c1", "api_calls", 3, await billing.track_usage("c1", "api_calls", 3, "r1:api_calls"), sent)
        assert quota.usage == 3

    assert await crossed(cache, backend, three_recorded) is quota  # read 0 used, before the 3
    assert (quota.limit, quota.usage, quota.local) == (100, 3, 0)
    cache.spawn = lambda refresh: None  # a lifespan: a stale entry serves while it is refreshed
    assert admitted_of(cache, 100) == 97
    quota.release(97)
    assert (await cache.fetch("c1", "api_calls")).usage == 3  # the next check's, as it is
