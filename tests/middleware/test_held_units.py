"""Units of requests let through while billing was unreachable: pending here until recorded, whatever crosses them."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from billingos_asgi import BillingMiddleware, LocalBilling, Metered, NetworkError, get_usage_context
from tests.asgi import serve
from tests.test_tracker import Around

from .support import CUSTOMER_HEADER, as_customer, by_header, fast_and_slow, recording_app


class FirstChecksFail(Around):
    """The real LocalBilling, whose first ``failing`` entitlement checks fail (a network blip)."""

    def __init__(self, billing: LocalBilling, failing: int = 1) -> None:
        super().__init__(billing)
        self.failing = failing

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        if self.failing:
            self.failing -= 1
            raise NetworkError("blip")
        return await self.billing.check_entitlement(customer_id, feature_key)


async def test_a_request_let_through_uncounted_leaves_the_others_pending_units_alone(billing: LocalBilling) -> None:
    """Let through with nothing cached (on_error="allow"), a request's units were never counted here:
    their confirmation must not take units off the requests still running (or more get through)."""
    gate = anyio.Event()

    middleware = BillingMiddleware(
        fast_and_slow(gate),
        billing=FirstChecksFail(billing),
        customer=by_header,
        default_feature="api_calls",
        flush_interval=0.01,
    )
    statuses: list[int] = []
    async with serve(middleware) as client:
        statuses.append((await client.get("/fast", headers=as_customer("user_free"))).status_code)  # let through

        async def slow_one() -> None:
            statuses.append((await client.get("/slow", headers=as_customer("user_free"))).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(9):
                tg.start_soon(slow_one)  # 9 units admitted, running
            with anyio.fail_after(5):
                while middleware.tracker.stats.sent < 1:  # noqa: ASYNC110 - polling a counter
                    await anyio.sleep(0.01)
            # 1 recorded + 9 running: the limit of 10 is reached.
            statuses.append((await client.get("/fast", headers=as_customer("user_free"))).status_code)
            gate.set()
    assert sorted(statuses) == [200] * 10 + [429]
    assert await billing.recorded_units("user_free", "api_calls") == 10 and middleware.tracker.stats.rejected == 0


@pytest.mark.parametrize("identified", ["by the middleware", "late, by the app"])
async def test_units_let_through_during_a_blip_are_pending_for_the_requests_admitted_once_it_is_over(
    billing: LocalBilling, identified: str
) -> None:
    """Billing down for 4 checks (on_error="allow"): 4 requests let through, their events still on
    their way when the next check answers. That quota must count them: 10 served of a limit of 10,
    not 4 + 10 with 4 refused upstream afterwards (served for free)."""
    late = identified != "by the middleware"

    async def search(request: Request) -> PlainTextResponse:
        context = get_usage_context(request)
        if late and context is not None:
            await context.identify(request.headers[CUSTOMER_HEADER])
        return PlainTextResponse("ok")

    rejected: list[str] = []
    middleware = BillingMiddleware(
        Starlette(routes=[Route("/search", search)]),
        billing=FirstChecksFail(billing, failing=4),
        customer=None if late else by_header,
        routes={"/search": Metered("api_calls", late=True) if late else "api_calls"},
        flush_interval=5.0,  # the let-through events are still queued when the quota is cached
        on_rejected=lambda event, reason: rejected.append(reason),
    )
    async with serve(middleware) as client:
        statuses = [(await client.get("/search", headers=as_customer("user_free"))).status_code for _ in range(14)]
    assert statuses == [200] * 10 + [429] * 4 and not rejected
    assert await billing.recorded_units("user_free", "api_calls") == 10
    quota = middleware.cache.get("user_free", "api_calls")
    assert quota is not None and quota.local == 0  # every unit settled


async def test_requests_let_through_in_an_outage_evict_no_cached_answer(billing: LocalBilling) -> None:
    """user_free's used-up quota is cached (fresh); billing goes down and other customers are let
    through: their units are held, but take no room in the cache, and user_free stays refused."""
    await billing.track_usage("user_free", "api_calls", 10)
    backend = FirstChecksFail(billing, failing=0)
    middleware = BillingMiddleware(
        recording_app([]),
        billing=backend,
        customer=by_header,
        default_feature="api_calls",
        cache_size=2,
        flush_interval=60,  # their events still queued when user_free comes back
        drain_timeout=0.2,
    )
    async with serve(middleware) as client:
        assert (await client.get("/search", headers=as_customer("user_free"))).status_code == 429
        backend.failing = 10**6  # billing unreachable from now on
        for customer in ("someone1", "someone2", "someone3"):
            assert (await client.get("/search", headers=as_customer(customer))).status_code == 200  # let through
        assert middleware.metrics()["cache_entries"] == 1  # their held units are no entitlement cached
        assert (await client.get("/search", headers=as_customer("user_free"))).status_code == 429


class FailThenHeld(FirstChecksFail):
    """The first check fails (a blip); the next ones read upstream, then answer once ``held`` is set."""

    def __init__(self, billing: LocalBilling) -> None:
        super().__init__(billing)
        self.held = anyio.Event()
        self.read = anyio.Event()

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        if self.failing:
            return await super().check_entitlement(customer_id, feature_key)
        answer = await self.billing.check_entitlement(customer_id, feature_key)
        self.read.set()
        await self.held.wait()
        return answer


async def test_a_let_through_requests_units_recorded_while_a_check_is_on_its_way_are_counted(
    billing: LocalBilling,
) -> None:
    """Request A is let through (the check failed) and runs; the next check of user_free leaves (no
    entry for the key yet) with 11 requests waiting on it; A finishes, its unit is held (entry with no answer)
    and recorded (confirmed: the entry holding them goes); the check answers with what it read before (0
    used). 10 of the 11 are served on top of A's unit: 11 of a limit of 10, one refused upstream."""
    gate = anyio.Event()

    backend = FailThenHeld(billing)
    rejected: list[str] = []
    middleware = BillingMiddleware(
        fast_and_slow(gate),
        billing=backend,
        customer=by_header,
        default_feature="api_calls",
        flush_interval=0.01,
        on_rejected=lambda event, reason: rejected.append(reason),
    )
    statuses: list[int] = []
    async with serve(middleware) as client:

        async def one(path: str) -> None:
            statuses.append((await client.get(path, headers=as_customer("user_free"))).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "/slow")  # let through (the check fails), runs until the gate opens
            with anyio.fail_after(5):
                while backend.failing:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            for _ in range(11):
                tg.start_soon(one, "/fast")  # all wait on the next check
            with anyio.fail_after(5):
                await backend.read.wait()
            gate.set()  # A finishes: its unit is held, then recorded and confirmed
            with anyio.fail_after(5):
                while middleware.tracker.stats.sent < 1:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            backend.held.set()
    recorded = await billing.recorded_units("user_free", "api_calls")
    assert (sorted(statuses), recorded, rejected) == ([200] * 10 + [429] * 2, 10, [])


class Scripted(Around):
    """user_free's checks: the first fails, the second answers, the third reads, waits for
    ``held``, then fails (billing went down); the others' checks answer."""

    def __init__(self, billing: LocalBilling) -> None:
        super().__init__(billing)
        self.calls = 0
        self.held = anyio.Event()
        self.read = anyio.Event()

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        if customer_id != "user_free":
            return await self.billing.check_entitlement(customer_id, feature_key)
        self.calls += 1
        if self.calls == 1:
            raise NetworkError("blip")
        if self.calls == 2:
            return await self.billing.check_entitlement(customer_id, feature_key)
        self.read.set()
        await self.held.wait()
        raise NetworkError("down")


async def test_a_used_up_quota_stays_refused_on_its_stale_answer_when_billing_goes_down(billing: LocalBilling) -> None:
    """user_free's quota is used up. A request let through during a blip runs; the next check caches
    the used-up answer (429). Past its stale TTL the entry is asked again and billing is down: the
    stale answer should decide (429). Meanwhile the entry was evicted (nothing open on it) and the
    let-through request finished (its unit held for the key): the failed check's fallback looks at
    that units held with no answer, not at the stale answer, and the request is let through."""
    await billing.track_usage("user_free", "api_calls", 10)
    gate = anyio.Event()

    backend = Scripted(billing)
    middleware = BillingMiddleware(
        fast_and_slow(gate),
        billing=backend,
        customer=by_header,
        default_feature="api_calls",
        cache_size=1,
        cache_ttl=0.05,
        cache_stale_ttl=0.1,
        flush_interval=60,  # the let-through unit stays pending
        drain_timeout=0.2,
    )
    statuses: dict[str, int] = {}
    async with serve(middleware) as client:

        async def one(name: str, path: str, customer: str = "user_free") -> None:
            statuses[name] = (await client.get(path, headers=as_customer(customer))).status_code

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "let through", "/slow")
            with anyio.fail_after(5):
                while backend.calls < 1:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            await one("cached", "/fast")
            await anyio.sleep(0.2)  # past the stale TTL, in the period
            tg.start_soon(one, "stale, billing down", "/fast")
            with anyio.fail_after(5):
                await backend.read.wait()
            await one("other customer", "/fast", "user_pro")  # evicts user_free's answer
            gate.set()
            with anyio.fail_after(5):
                while "let through" not in statuses:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            backend.held.set()
    assert statuses == {"let through": 200, "cached": 429, "other customer": 200, "stale, billing down": 429}
