"""Delivery guarantees under network faults: every admitted request is recorded upstream exactly once.

The real pieces end to end: BillingMiddleware over a Starlette app, the BillingOS client, the
fault proxy (tests/faultproxy.py) and the local BillingOS server on a loopback socket. The proxy
loses calls before they arrive, loses the answers of calls that were recorded (the case that
counts twice if a retry is not idempotent), resets connections, hangs past the client's timeout,
answers 429 storms, and goes down altogether. Whatever it does, after the lifespan's drain the
server must hold exactly one unit per successful request, and the tracker must account for every
event as sent. The fault draws are seeded.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from billingos_asgi import BillingMiddleware, BillingOS, ServerError
from billingos_asgi.client import RetryPolicy
from billingos_asgi.upstream import Budget, Upstream
from tests.asgi import serve
from tests.conftest import SECRET_KEY, RunningServer
from tests.faultproxy import KINDS, FaultPlan, FaultProxy, serve_fault_proxy
from tests.middleware.support import as_customer, by_header, recording_app
from tests.test_tracker import unaccounted

CUSTOMERS = ("user_pro", "user_pro_b", "user_pro_c")  # all on "pro": api_calls unlimited, so every request is admitted
FEATURE = "api_calls"


@pytest.fixture
async def server(local_server: RunningServer) -> RunningServer:
    for customer in CUSTOMERS[1:]:
        await local_server.billing.set_plan(customer, "pro")
    return local_server


@pytest.fixture
def proxy(server: RunningServer) -> Iterator[FaultProxy]:
    """The fault proxy in front of the server, passing everything until a test sets its plan."""
    with serve_fault_proxy(server.base_url, FaultPlan()) as running:
        yield running


@asynccontextmanager
async def metered_app(proxy: FaultProxy, **options: Any) -> AsyncIterator[tuple[BillingMiddleware, httpx.AsyncClient]]:
    """The middleware (metering ``/x`` as api_calls) over the client through the proxy, in its lifespan.

    The drain runs when the block exits; the client is closed after it.
    """
    settings: dict[str, Any] = {
        "flush_interval": 0.05,
        "drain_timeout": 30.0,
        "calls_per_minute": None,
        "breaker_cooldown": 0.2,
        **options,
    }
    retry = RetryPolicy(max_retries=1, backoff_base=0.05)
    async with BillingOS(SECRET_KEY, base_url=proxy.base_url, timeout=0.5, retry=retry) as remote:
        middleware = BillingMiddleware(
            recording_app([]), billing=remote, customer=by_header, routes={"/x": FEATURE}, **settings
        )
        async with serve(middleware) as client:
            yield middleware, client


async def send_waves(client: httpx.AsyncClient, total: int, *, waves: int, pause: float = 0.1) -> list[int]:
    """``total`` requests spread evenly over the customers, sent concurrently in ``waves`` with pauses."""
    statuses: list[int] = []

    async def one(customer: str) -> None:
        statuses.append((await client.get("/x", headers=as_customer(customer))).status_code)

    sent = 0
    for wave in range(waves):
        size = total * (wave + 1) // waves - sent
        async with anyio.create_task_group() as tg:
            for i in range(sent, sent + size):
                tg.start_soon(one, CUSTOMERS[i % len(CUSTOMERS)])
        sent += size
        await anyio.sleep(pause)
    return statuses


async def recorded(server: RunningServer) -> list[float]:
    return [await server.billing.recorded_units(customer, FEATURE) for customer in CUSTOMERS]


def expected(total: int) -> list[float]:
    return [float(len(range(i, total, len(CUSTOMERS)))) for i in range(len(CUSTOMERS))]


def assert_all_sent(middleware: BillingMiddleware, total: int) -> None:
    stats = middleware.tracker.stats
    assert (stats.queued, stats.sent) == (total, total), stats
    assert (stats.rejected, stats.dropped, stats.dead_lettered, stats.deferred) == (0, 0, 0, 0), stats
    assert (stats.in_flight, middleware.tracker.backlog, unaccounted(middleware.tracker)) == (0, 0, 0), stats


async def assert_each_request_counted_once(
    server: RunningServer, proxy: FaultProxy, plan: FaultPlan, total: int, waves: int
) -> None:
    """``total`` requests in ``waves`` through the proxy faulting as ``plan`` says: all answered,
    each recorded upstream exactly once, every event sent."""
    proxy.plan = plan
    async with metered_app(proxy) as (middleware, client):
        statuses = await send_waves(client, total, waves=waves)
    assert statuses == [200] * total
    assert await recorded(server) == expected(total)
    assert_all_sent(middleware, total)


def draws_to_see_every_kind(plan: FaultPlan) -> int:
    """How many draws of ``plan`` (fresh, so from its seed) it takes to meet every fault kind."""
    seen: set[str] = set()
    draws = 0
    while len(seen) < len(KINDS):
        draws += 1
        kind = plan.pick()
        if kind is not None:
            seen.add(kind)
    return draws


async def test_each_retry_of_the_client_is_a_call_within_the_budget(server: RunningServer, proxy: FaultProxy) -> None:
    """The client's own retries (three by default) made four calls of each one the budget counted:
    in a 5xx storm, four times the budget upstream. Each retry now takes a token of its own."""
    proxy.plan = FaultPlan(before=1.0, all_calls=True)
    async with BillingOS(SECRET_KEY, base_url=proxy.base_url, retry=RetryPolicy(backoff_base=0.01)) as remote:
        upstream = Upstream(remote, budget=Budget(calls_per_minute=1, burst=10))  # no refill to speak of
        await upstream.ready_to_track()
        with pytest.raises(ServerError):
            await upstream.track_usage("user_pro", FEATURE, 1, "k1", None)
        with pytest.raises(ServerError):
            await upstream.check_entitlement("user_pro", FEATURE, wait=1)
        assert (proxy.draws, upstream.retries) == (8, 6)
        assert upstream.budget is not None and 2 <= upstream.budget.tokens < 2.5  # 10 - 8 calls
        with pytest.raises(ServerError):  # the client itself is left as it was: not budgeted
            await remote.track_usage("user_pro", FEATURE, 1, idempotency_key="k2")
        assert (proxy.draws, upstream.retries) == (12, 6)


async def test_a_tracks_retries_leave_the_checks_reserve_alone(server: RunningServer, proxy: FaultProxy) -> None:
    """A track's first attempt leaves the checks their reserve of the bucket; its retries took from
    it as well, so a 5xx storm on tracks left a request's check no token to go with."""
    proxy.plan = FaultPlan(before=1.0)  # tracks fail; checks pass
    async with BillingOS(SECRET_KEY, base_url=proxy.base_url, retry=RetryPolicy(backoff_base=0.01)) as remote:
        upstream = Upstream(remote, budget=Budget(calls_per_minute=1, burst=4))  # no refill to speak of; reserve 2
        await upstream.ready_to_track()
        with anyio.move_on_after(0.5):  # its second retry waits for a token beyond the reserve (a minute)
            await upstream.track_usage("user_pro", FEATURE, 1, "k1", None)
        assert (proxy.draws, upstream.retries) == (2, 1)  # the retry cut off waiting was never made: not a call
        assert upstream.tracks + upstream.retries == proxy.draws
        assert upstream.budget is not None and 2 <= upstream.budget.tokens < 2.1
        entitlement = await upstream.check_entitlement("user_pro", FEATURE, wait=0)
        assert entitlement.has_access


async def test_a_drains_retries_take_from_the_checks_reserve_as_its_first_attempt_did(
    server: RunningServer, proxy: FaultProxy
) -> None:
    """At shutdown the drain's tracks take the checks' reserve too (no request is left to check);
    their client's retries still waited for a token beyond it, behind the drain's next tracks,
    until the drain's deadline cut them off."""
    proxy.plan = FaultPlan(before=1.0)  # tracks fail; checks pass
    retry = RetryPolicy(max_retries=2, backoff_base=0.01)
    async with BillingOS(SECRET_KEY, base_url=proxy.base_url, retry=retry) as remote:
        upstream = Upstream(remote, budget=Budget(calls_per_minute=1, burst=4))  # no refill to speak of; reserve 2
        await upstream.ready_to_track(reserve=False)
        with anyio.move_on_after(5), pytest.raises(ServerError):  # (waiting for a token beyond the reserve: a minute)
            await upstream.track_usage("user_pro", FEATURE, 1, "k1", None)
        assert (proxy.draws, upstream.retries) == (3, 2)
        assert upstream.budget is not None and 1 <= upstream.budget.tokens < 1.1


@pytest.mark.parametrize(
    ("rate", "all_calls", "seed"),
    [(0.2, False, 45), (0.4, False, 4), (0.4, True, 22)],
    ids=["20%-tracks", "40%-tracks", "40%-every-call"],
)
async def test_mixed_faults_count_every_request_once(
    server: RunningServer, proxy: FaultProxy, rate: float, all_calls: bool, seed: int
) -> None:
    """Every fault kind mixed (``rate`` in all, evenly); with ``all_calls`` the checks fail too."""
    await assert_each_request_counted_once(server, proxy, FaultPlan.mixed(rate, seed=seed, all_calls=all_calls), 60, 10)
    # The draws are seeded: once enough calls have drawn, every kind has happened.
    assert proxy.draws >= draws_to_see_every_kind(FaultPlan.mixed(rate, seed=seed)), proxy.counts
    assert all(proxy.counts[kind] > 0 for kind in KINDS), proxy.counts


@pytest.mark.parametrize("kind", KINDS)
async def test_one_fault_kind_at_half_the_calls(server: RunningServer, proxy: FaultProxy, kind: str) -> None:
    """Half the track calls meet one fault kind, and only that one: still exactly one unit per request."""
    plan = FaultPlan(seed=7)
    setattr(plan, kind, 0.5)
    await assert_each_request_counted_once(server, proxy, plan, 30, 5)
    assert proxy.counts[kind] > 0, proxy.counts
    assert all(proxy.counts[other] == 0 for other in KINDS if other != kind), proxy.counts


async def test_a_2xx_saying_success_false_is_resent_until_recorded(server: RunningServer, proxy: FaultProxy) -> None:
    """A quarter of the track calls are answered 201 ``success: false`` and not recorded (the odds the
    kinds above give each attempt: the client retries those once itself, not a malformed answer).
    Taken for recordings, their units would be lost; resent under their keys, each counts once."""
    await assert_each_request_counted_once(server, proxy, FaultPlan(seed=7, unsuccessful=0.25), 30, 5)
    assert proxy.counts["unsuccessful"] > 0, proxy.counts


@pytest.mark.parametrize("calls_per_minute", [None, 600.0], ids=["no-budget", "budget"])
async def test_429_storm(server: RunningServer, proxy: FaultProxy, calls_per_minute: float | None) -> None:
    """For 3 s, nine track calls in ten are answered 429 (Retry-After: 1), then the storm passes:
    delivery slows down (with a budget, each 429 pauses it), but nothing is lost or doubled."""
    proxy.plan = FaultPlan(seed=3, throttle=0.9)
    total = 30
    async with metered_app(proxy, calls_per_minute=calls_per_minute) as (middleware, client):
        started = time.monotonic()
        statuses = await send_waves(client, total, waves=5)
        await anyio.sleep(3 - (time.monotonic() - started))
        storm = (middleware.upstream.throttled, middleware.tracker.stats.sent)
        proxy.plan.throttle = 0.0
    assert statuses == [200] * total
    assert await recorded(server) == expected(total)
    assert_all_sent(middleware, total)
    assert storm[0] > 0 and storm[1] < total, storm  # the storm held delivery back
    assert proxy.counts["throttle"] >= storm[0], proxy.counts


async def test_outage_longer_than_the_flush_window(server: RunningServer, proxy: FaultProxy) -> None:
    """Upstream unreachable for many flush windows: requests are decided from the (stale) cache at
    once, the breaker opens, and after the outage every unit arrives exactly once."""
    warm, during, after = 6, 36, 6
    options = {"cache_ttl": 0.2, "breaker_threshold": 3}
    async with metered_app(proxy, **options) as (middleware, client):
        assert await send_waves(client, warm, waves=1) == [200] * warm
        with anyio.fail_after(10):
            while middleware.tracker.stats.sent < warm:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
        assert await recorded(server) == expected(warm)

        proxy.plan.down = True
        outage = await send_waves(client, during, waves=12, pause=0.1)  # ~1.2 s: about 24 flush windows
        assert outage == [200] * during
        assert middleware.upstream.breaker.opened >= 1
        assert proxy.counts["down"] > 0
        assert await recorded(server) == expected(warm)  # nothing got through meanwhile
        assert middleware.tracker.stats.sent == warm
        metrics = middleware.metrics()  # what an operator sees: the outage's events all waiting
        assert int(metrics["events_backlog"]) + int(metrics["events_in_flight"]) == during, metrics
        assert unaccounted(middleware.tracker) == 0

        proxy.plan.down = False
        assert await send_waves(client, after, waves=1) == [200] * after
    total = warm + during + after
    assert await recorded(server) == expected(total)
    assert_all_sent(middleware, total)
    assert middleware.upstream.breaker.state == "closed"


async def test_a_base_url_missing_its_path_keeps_every_event_for_a_restart_with_the_right_one(
    server: RunningServer, tmp_path: Path
) -> None:
    """Every call answered 404 "Cannot POST ..." (no such route): a wrong base URL, not a customer
    without the feature. Its events are kept, not rejected, and delivered once after the fix."""
    outbox = tmp_path / "outbox.db"

    @asynccontextmanager
    async def metered_over(base_url: str) -> AsyncIterator[tuple[BillingMiddleware, httpx.AsyncClient]]:
        async with BillingOS(SECRET_KEY, base_url=base_url) as remote:
            middleware = BillingMiddleware(
                recording_app([]),
                billing=remote,
                customer=by_header,
                routes={"/x": FEATURE},
                flush_interval=0.05,
                drain_timeout=0.5,
                calls_per_minute=None,
                outbox=outbox,
            )
            async with serve(middleware) as client:
                yield middleware, client

    async with metered_over(server.base_url + "/billing") as (wrong, client):
        statuses = [(await client.get("/x", headers=as_customer(CUSTOMERS[0]))).status_code for _ in range(5)]
        with anyio.fail_after(10):
            while wrong.upstream.tracks == 0:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
    assert statuses == [200] * 5  # checks fail too: let through, on_error="allow"
    assert (wrong.tracker.stats.rejected, wrong.tracker.stats.sent) == (0, 0)
    assert await recorded(server) == [0.0, 0.0, 0.0]

    async with metered_over(server.base_url) as (right, _):
        with anyio.fail_after(10):
            while right.tracker.stats.sent < 5:  # noqa: ASYNC110 - polling a counter
                await anyio.sleep(0.01)
    assert await recorded(server) == [5.0, 0.0, 0.0]
    assert right.tracker.stats.replayed == 5
