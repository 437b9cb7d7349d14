"""The upstream door: the call budget, the circuit breaker, and how answers feed them."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from billingos_asgi import (
    BillingOS,
    BudgetExhaustedError,
    CircuitOpenError,
    CustomerNotFoundError,
    LocalBilling,
    NetworkError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    UsageEvent,
)
from billingos_asgi import upstream as upstream_module
from billingos_asgi.cache import EntitlementCache
from billingos_asgi.tracker import Tracker
from billingos_asgi.upstream import Budget, CircuitBreaker, Upstream, door_of, share_door

from .conftest import Scenario
from .test_cache import Delayed
from .test_tracker import PLANS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state, read afresh (an attribute read twice would be narrowed by the type checker)."""
    return breaker.state


def test_the_budget_allows_a_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    budget = Budget(60, burst=3, clock=clock)  # one call a second
    assert [budget.try_take() for _ in range(4)] == [True, True, True, False]
    assert budget.wait_time() == pytest.approx(1.0)
    clock.now += 0.5
    assert not budget.try_take()
    clock.now += 0.5
    assert budget.try_take() and not budget.try_take()
    clock.now += 100
    assert budget.tokens == 3  # never more than the burst


def test_a_reserve_keeps_tokens_for_callers_with_priority() -> None:
    clock = Clock()
    budget = Budget(60, burst=4, clock=clock)
    assert budget.try_take(reserve=2) and budget.try_take(reserve=2)
    assert not budget.try_take(reserve=2)  # the last two are kept for checks
    assert budget.try_take() and budget.try_take() and not budget.try_take()


@pytest.mark.parametrize("burst", [1, 2, 3, 10])
async def test_tracks_can_always_get_a_token_whatever_the_burst(billing: LocalBilling, burst: int) -> None:
    budget = Budget(60, burst=burst, clock=Clock())
    upstream = Upstream(billing, budget=budget)
    assert budget.try_take(reserve=upstream.track_reserve)  # a full bucket has one for a track


async def test_a_burst_of_one_still_delivers(billing: LocalBilling) -> None:
    upstream = Upstream(billing, budget=Budget(600, burst=1))
    tracker = Tracker(upstream, EntitlementCache(upstream), flush_interval=0.01, drain_timeout=5)
    async with anyio.create_task_group() as task_group:
        await tracker.start(task_group)
        tracker.submit(UsageEvent("c0", "api_calls", 1, "k1"))
        with anyio.fail_after(5):
            while not tracker.stats.sent:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
        await tracker.stop()
    assert await billing.recorded_units("c0", "api_calls") == 1


def test_a_pause_empties_the_budget_until_it_ends() -> None:
    clock = Clock()
    budget = Budget(60, burst=5, clock=clock)
    budget.pause(10)
    clock.now += 9.9
    assert not budget.try_take()
    assert budget.wait_time() == pytest.approx(1.1)
    clock.now += 1.1
    assert budget.try_take()


@pytest.mark.parametrize(("asked", "paused"), [(86_400, 60), (float("inf"), 60), (float("nan"), 1)])
def test_a_pause_is_bounded_whatever_a_429_asks(asked: float, paused: float) -> None:
    clock = Clock()
    budget = Budget(60, burst=5, clock=clock)
    budget.pause(asked)
    assert budget.wait_time() == pytest.approx(paused + 1)  # then the first token refills


@pytest.mark.parametrize("args", [(0, 1), (-5, 1), (60, 0), (float("nan"), 1)])
def test_bad_budgets_are_refused(args: tuple[float, int]) -> None:
    with pytest.raises(ValueError, match="budget"):
        Budget(*args)


def test_the_breaker_opens_after_failures_in_a_row_then_probes_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, cooldown=10, clock=clock)
    breaker.failed()
    breaker.failed()
    breaker.succeeded()  # not in a row
    breaker.failed()
    breaker.failed()
    assert state(breaker) == "closed" and breaker.allow()
    breaker.failed()
    assert state(breaker) == "open" and not breaker.allow()
    assert breaker.retry_after() == pytest.approx(10)
    clock.now += 10
    assert breaker.allow() and state(breaker) == "half_open"
    assert not breaker.allow()  # one probe at a time
    breaker.failed()  # the probe failed: open again
    assert state(breaker) == "open" and breaker.opened == 2
    clock.now += 10
    assert breaker.allow()
    breaker.succeeded()
    assert state(breaker) == "closed" and breaker.allow()


def test_a_probe_cancelled_before_its_answer_hands_the_probe_to_the_next_call(
    tmp_path: Path, on_each_loop: Callable[[Scenario], None]
) -> None:
    """The probe's request went away (its client disconnected) before upstream answered: that says
    nothing of upstream, yet every call was kept out for one more cooldown, the request waiting on
    the same check too. The next call is the probe now."""

    async def scenario() -> None:
        async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db") as billing:
            clock = Clock()
            backend = Delayed(billing)
            backend.held = anyio.Event()
            upstream = Upstream(backend, breaker=CircuitBreaker(1, cooldown=15, clock=clock))
            cache = EntitlementCache(upstream, clock=clock)
            upstream.breaker.failed()
            clock.now += 15
            probe = anyio.CancelScope()
            answers: list[bool] = []

            async def probing() -> None:
                with probe:
                    await cache.fetch("c0", "api_calls")

            async def waiting() -> None:
                quota = await cache.fetch("c0", "api_calls")
                answers.append(quota.entitlement is not None and quota.entitlement.has_access)

            with anyio.fail_after(10):  # (a hang guard only)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(probing)
                    await backend.answered.wait()
                    tg.start_soon(waiting)
                    await anyio.wait_all_tasks_blocked()
                    probe.cancel()
                    backend.held.set()
            assert answers == [True] and backend.calls == 2
            assert state(upstream.breaker) == "closed"

    on_each_loop(scenario)


def test_a_probe_unanswered_in_time_keeps_the_breaker_open_for_a_cooldown(
    tmp_path: Path, on_each_loop: Callable[[Scenario], None]
) -> None:
    async def scenario() -> None:
        async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db") as billing:
            clock = Clock()
            backend = Delayed(billing)
            backend.held = anyio.Event()  # never set: upstream hangs
            upstream = Upstream(backend, breaker=CircuitBreaker(1, cooldown=15, clock=clock))
            upstream.breaker.failed()
            clock.now += 15
            with pytest.raises(NetworkError, match="unanswered"):
                await upstream.check_entitlement("c0", "api_calls", wait=0, answer_within=0.01)
            assert state(upstream.breaker) == "open" and upstream.breaker.retry_after() == 15
            with pytest.raises(CircuitOpenError):
                await upstream.check_entitlement("c0", "api_calls", wait=0)

    on_each_loop(scenario)


def test_a_probe_that_vanished_is_replaced_after_a_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, cooldown=5, clock=clock)
    breaker.failed()
    clock.now += 5
    assert breaker.allow()  # the probe is cancelled: neither success nor failure is reported
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_a_replaced_probe_cancelled_late_lets_no_second_probe_go_beside_the_running_one() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, cooldown=5, clock=clock)
    breaker.failed()
    clock.now += 5
    assert breaker.allow()
    first = breaker.probes
    clock.now += 5  # the first probe vanished for a cooldown: a second one goes
    assert breaker.allow()
    second = breaker.probes
    breaker.abandoned(first)  # the first one's client went away at last: it says nothing of the second
    assert not breaker.allow()
    breaker.abandoned(second)  # the running probe's client went away: the next call is the probe
    assert breaker.allow() and breaker.probes == second + 1


@pytest.fixture
async def billing(tmp_path: Path) -> AsyncIterator[LocalBilling]:
    async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db") as billing:
        yield billing


class Scripted:
    """A backend answering checks with the errors it is given, then with the real LocalBilling."""

    def __init__(self, billing: LocalBilling, errors: list[Exception]) -> None:
        self.billing = billing
        self.errors = errors
        self.calls = 0

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return await self.billing.check_entitlement(customer_id, feature_key)


async def test_unwell_answers_open_the_breaker_and_later_calls_fail_at_once(billing: LocalBilling) -> None:
    clock = Clock()
    backend = Scripted(billing, [NetworkError("down")] * 2)
    upstream = Upstream(backend, breaker=CircuitBreaker(2, cooldown=30, clock=clock))  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(NetworkError):
            await upstream.check_entitlement("c0", "api_calls", wait=0)
    with pytest.raises(CircuitOpenError) as raised:
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    assert backend.calls == 2 and raised.value.retry_after == pytest.approx(30)
    clock.now += 30
    assert (await upstream.check_entitlement("c0", "api_calls", wait=0)).has_access
    assert upstream.breaker.state == "closed" and upstream.checks == 3


async def test_definite_refusals_keep_the_breaker_closed(billing: LocalBilling) -> None:
    upstream = Upstream(billing, breaker=CircuitBreaker(1))
    for _ in range(3):
        with pytest.raises(CustomerNotFoundError):
            await upstream.check_entitlement("nobody", "api_calls", wait=0)
    assert upstream.breaker.state == "closed"


async def test_a_429_pauses_the_budget_for_its_retry_after(billing: LocalBilling) -> None:
    clock = Clock()
    backend = Scripted(billing, [RateLimitError("slow down", status=429, retry_after=20)])
    upstream = Upstream(backend, budget=Budget(600, burst=5, clock=clock))  # type: ignore[arg-type]
    with pytest.raises(RateLimitError):
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    assert upstream.throttled == 1 and upstream.breaker.state == "closed"
    with pytest.raises(BudgetExhaustedError) as raised:
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    assert raised.value.retry_after == pytest.approx(20.1)
    assert backend.calls == 1 and upstream.refused_by_budget == 1
    clock.now += 20.1
    assert (await upstream.check_entitlement("c0", "api_calls", wait=0)).has_access


async def test_a_429_is_honoured_without_a_budget_too(billing: LocalBilling) -> None:
    """calls_per_minute=None lifts the budget, not upstream's 429: its wait was kept by the budget
    only, and every check went straight back upstream through a 429 storm."""
    backend = Scripted(billing, [RateLimitError("slow down", status=429, retry_after=0.3)])
    upstream = Upstream(backend)  # type: ignore[arg-type]
    with pytest.raises(RateLimitError):
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    with pytest.raises(BudgetExhaustedError) as raised:  # would wait longer than it may: refused at once
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    assert backend.calls == 1 and raised.value.retry_after == pytest.approx(0.3, abs=0.1)
    assert (await upstream.check_entitlement("c0", "api_calls", wait=1)).has_access  # waited the rest out
    assert backend.calls == 2


async def test_a_check_waits_briefly_for_a_token(billing: LocalBilling) -> None:
    upstream = Upstream(billing, budget=Budget(600, burst=1))  # a token every 0.1 s
    await upstream.check_entitlement("c0", "api_calls", wait=0)
    await upstream.check_entitlement("c0", "api_calls", wait=1)  # waited ~0.1 s for it
    with pytest.raises(BudgetExhaustedError):
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    assert upstream.checks == 2


def test_a_backend_is_shared_through_the_last_door_built_by_its_identity_hashable_or_not(
    billing: LocalBilling,
) -> None:
    class Unhashable(Scripted):  # as a class defining __eq__ alone (a dataclass's eq=True)
        __hash__ = None  # type: ignore[assignment]

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Unhashable)

    first, last = Upstream(billing), Upstream(billing)
    share_door(billing, first)
    share_door(billing, last)
    assert door_of(billing) is last
    unhashable, equal = Unhashable(billing, []), Unhashable(billing, [])
    share_door(unhashable, first)  # type: ignore[arg-type]
    assert door_of(unhashable) is first  # type: ignore[arg-type]
    assert door_of(equal) is None  # type: ignore[arg-type]  # (equal, yet another backend: not its door)
    gone, key = weakref.ref(unhashable), id(unhashable)
    del unhashable
    gc.collect()
    assert gone() is None and key not in upstream_module._doors  # its entry goes with it: nothing leaks


async def test_a_shared_door_keeps_neither_its_backend_nor_itself_alive(tmp_path: Path) -> None:
    # A door holds its backend: a registry holding the door would keep both (and the backend's
    # database) for the life of the process, and lend a middleware gone to the next usage endpoints.
    async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db") as billing:
        door = Upstream(billing)
        share_door(billing, door)
        assert door_of(billing) is door
        door_gone = weakref.ref(door)
        backend_gone = weakref.ref(billing)
    del door
    gc.collect()
    assert door_gone() is None and door_of(billing) is None
    del billing
    gc.collect()
    assert backend_gone() is None


def starved_door(billing: LocalBilling, clock: Clock) -> Upstream:
    """A door whose breaker has just ended its cooldown, its budget holding a token for a check but
    none for a track or a usage call (a burst of 2, one of them the checks' reserve; one a 100 s)."""
    budget = Budget(0.6, burst=2, clock=clock)
    upstream = Upstream(billing, budget=budget, breaker=CircuitBreaker(1, cooldown=15, clock=clock))
    assert budget.try_take()
    upstream.breaker.failed()
    clock.now += 15
    return upstream


async def test_a_usage_call_refused_by_the_budget_leaves_the_breakers_probe_to_a_check(billing: LocalBilling) -> None:
    # Taken and not made, the probe would keep every check answered "circuit open" for a cooldown more.
    upstream = starved_door(billing, Clock())
    with pytest.raises(BudgetExhaustedError):
        await upstream.get_usage_metrics("c0")
    assert (await upstream.check_entitlement("c0", "api_calls", wait=0)).has_access
    assert upstream.breaker.state == "closed" and upstream.checks == 1 and upstream.endpoint_calls == 0


async def test_a_track_waiting_for_a_token_leaves_the_breakers_probe_to_a_check(billing: LocalBilling) -> None:
    upstream = starved_door(billing, Clock())
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(upstream.ready_to_track)
        await anyio.wait_all_tasks_blocked()  # the track waits for a token beyond the checks' reserve
        assert (await upstream.check_entitlement("c0", "api_calls", wait=0)).has_access
        task_group.cancel_scope.cancel()
    assert upstream.breaker.state == "closed" and upstream.checks == 1


async def test_a_429_answering_the_probe_closes_the_breaker_and_the_budget_keeps_the_pause(
    billing: LocalBilling,
) -> None:
    """A 429 is upstream answering: the breaker's question (is it up?) has its answer, and the
    wait it asks for is the budget's to keep, not a cooldown more of the breaker's on top."""
    clock = Clock()
    backend = Scripted(billing, [NetworkError("down"), RateLimitError("slow down", status=429, retry_after=5)])
    upstream = Upstream(
        backend,  # type: ignore[arg-type]
        budget=Budget(600, burst=5, clock=clock),
        breaker=CircuitBreaker(1, cooldown=30, clock=clock),
    )
    with pytest.raises(NetworkError):
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    clock.now += 30
    with pytest.raises(RateLimitError):
        await upstream.check_entitlement("c0", "api_calls", wait=0)  # the probe
    assert upstream.breaker.state == "closed"
    with pytest.raises(BudgetExhaustedError):
        await upstream.check_entitlement("c0", "api_calls", wait=0)
    clock.now += 5.2  # (the bucket starts empty after a pause: a token more than 0.1 s later)
    assert (await upstream.check_entitlement("c0", "api_calls", wait=0)).has_access
    assert backend.calls == 3


async def test_the_breakers_probe_is_one_call_not_retried() -> None:
    """The client's retries went on through the budget's hook, whatever the breaker's state: its one
    probe made four calls to a failing upstream, as did a call retrying while the breaker was open."""
    calls: list[str] = []

    def unavailable(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(503, json={"statusCode": 503, "message": "down"})

    clock = Clock()
    retry = RetryPolicy(backoff_base=0.001, backoff_max=0.001)
    client = BillingOS(
        "sk_test_x", base_url="http://billing.test", retry=retry, transport=httpx.MockTransport(unavailable)
    )
    async with client:
        upstream = Upstream(client, breaker=CircuitBreaker(1, cooldown=10, clock=clock))
        with pytest.raises(ServerError):
            await upstream.check_entitlement("c0", "api_calls", wait=0)  # closed: retried (4 calls), then open
        assert (len(calls), upstream.breaker.state) == (4, "open")
        clock.now += 10
        with pytest.raises(CircuitOpenError):
            await upstream.check_entitlement("c0", "api_calls", wait=0)  # the probe: one call, failed
        assert (len(calls), upstream.breaker.state) == (5, "open")


async def test_a_track_waiting_on_the_probe_goes_once_the_probe_closes_the_breaker(billing: LocalBilling) -> None:
    """It slept the probe's whole cooldown (15 s by default) though the probe was answered at once."""
    clock = Clock()
    upstream = Upstream(billing, breaker=CircuitBreaker(1, cooldown=30, clock=clock))
    upstream.breaker.failed()  # open
    clock.now += 30  # its cooldown over: the next call is the probe
    assert upstream.breaker.allow() and state(upstream.breaker) == "half_open"  # a request's check took it
    with anyio.fail_after(5):  # (a guard: the track went 30 s after the probe started)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(upstream.ready_to_track)
            await anyio.wait_all_tasks_blocked()
            upstream.breaker.succeeded()  # the probe's answer
    assert state(upstream.breaker) == "closed"
