"""Units of requests let through while billing was unreachable: pending here until recorded, whatever crosses them."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from billingos_asgi import BillingMiddleware, LocalBilling, NetworkError
from tests.asgi import serve

from .support import as_customer, by_header


class FailThenHeld:
    """The first check fails (a blip); the next ones read upstream, then answer once ``held`` is set."""

    def __init__(self, billing: LocalBilling) -> None:
        self.billing = billing
        self.failing = 1
        self.held = anyio.Event()
        self.read = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.billing, name)

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        if self.failing:
            self.failing -= 1
            raise NetworkError("blip")
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

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def slow(request: Request) -> PlainTextResponse:
        await gate.wait()
        return PlainTextResponse("ok")

    backend = FailThenHeld(billing)
    rejected: list[str] = []
    middleware = BillingMiddleware(
        Starlette(routes=[Route("/fast", fast), Route("/slow", slow)]),
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


class Scripted:
    """user_free's checks: the first fails, the second answers, the third reads, waits for
    ``held``, then fails (billing went down); the others' checks answer."""

    def __init__(self, billing: LocalBilling) -> None:
        self.billing = billing
        self.calls = 0
        self.held = anyio.Event()
        self.read = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.billing, name)

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

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def slow(request: Request) -> PlainTextResponse:
        await gate.wait()
        return PlainTextResponse("ok")

    backend = Scripted(billing)
    middleware = BillingMiddleware(
        Starlette(routes=[Route("/fast", fast), Route("/slow", slow)]),
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
