"""Per-request overhead of BillingMiddleware, in-process (the ASGI app called directly, no server).

Alternating rounds in one run: bare Starlette, + BillingMiddleware on a warm cache, + slowapi's
pure-ASGI middleware. The billing backend answers from memory (no I/O), so the figure is the
middleware's own cost: routing, customer resolution, the cache, local accounting, the quota
headers and queueing the usage event (the tracker's worker runs and "delivers" every event).
Also: upstream checks per 1,000 requests over 100 customers, and for 1,000 concurrent cold misses.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from billingos_asgi import BillingMiddleware, Entitlement, TrackUsageResult, UsageSnapshot
from billingos_asgi.testing import lifespan

from ._util import print_table

ROUNDS = 7
REQUESTS_PER_ROUND = 3_000
LIMIT = 1e12


class InMemoryBackend:
    """A billing backend that answers instantly: isolates the middleware's own cost."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.checks = 0
        self.tracks = 0
        self.units = 0.0
        self.resets_at = datetime.now(timezone.utc) + timedelta(days=30)

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement:
        self.checks += 1
        if self.delay:
            await anyio.sleep(self.delay)
        return Entitlement(feature_key, True, None, LIMIT, 0.0, LIMIT, self.resets_at, "usage_quota")

    async def track_usage(
        self,
        customer_id: str,
        feature_key: str,
        quantity: float,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TrackUsageResult:
        self.tracks += 1
        self.units += quantity
        now = datetime.now(timezone.utc)
        usage = UsageSnapshot(float(self.tracks), LIMIT, LIMIT - self.tracks, now, self.resets_at)
        return TrackUsageResult(True, feature_key, quantity, now, usage)

    async def get_usage_metrics(self, customer_id: str, feature_key: str | None = None) -> Any:
        raise NotImplementedError

    async def create_session_token(self, external_user_id: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


async def search(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/v1/search", search)])


def customer_from_header(request: Request) -> str | None:
    return request.headers.get("x-customer")


def billing_app(backend: InMemoryBackend) -> Starlette:
    app = starlette_app()
    app.add_middleware(
        BillingMiddleware,
        billing=backend,
        customer=customer_from_header,
        routes={"/v1/search": "api_calls"},
        calls_per_minute=None,  # the in-memory backend has no rate limit to respect
    )
    return app


def slowapi_app() -> Starlette:
    from slowapi import Limiter
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address

    app = starlette_app()
    app.state.limiter = Limiter(key_func=get_remote_address, default_limits=["100000000/minute"])
    app.add_middleware(SlowAPIASGIMiddleware)
    return app


def scope_for(customer: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/search",
        "raw_path": b"/v1/search",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-customer", customer.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    pass


async def drive(app: ASGIApp, count: int, customers: int = 1, *, yield_each: bool = False) -> float:
    """Call ``app`` ``count`` times; return microseconds per request.

    ``yield_each``: let the event loop turn after each request, as a server's loop does, so that
    background work (the tracker delivering events) runs inside the timed window.
    """
    templates = [scope_for(f"customer_{i}") for i in range(customers)]
    gc.collect()
    start = time.perf_counter()
    for i in range(count):
        scope = templates[i % customers].copy()
        scope["state"] = {}
        await app(scope, _receive, _send)
        if yield_each:
            await anyio.lowlevel.checkpoint()
    return (time.perf_counter() - start) / count * 1e6


async def with_lifespan(app: ASGIApp, body: Callable[[], Awaitable[None]]) -> None:
    async with lifespan(app):
        await body()


async def overhead_table(*, delivery: bool) -> None:
    backend = InMemoryBackend()
    apps: dict[str, ASGIApp] = {
        "bare Starlette": starlette_app(),
        "+ BillingMiddleware (warm cache)": billing_app(backend),
        "+ slowapi SlowAPIASGIMiddleware": slowapi_app(),
    }
    timings: dict[str, list[float]] = {name: [] for name in apps}

    async def rounds() -> None:
        for app in apps.values():
            await drive(app, 300)  # warm-up: builds middleware stacks, fills the cache
        for _ in range(ROUNDS):
            for name, app in apps.items():
                timings[name].append(await drive(app, REQUESTS_PER_ROUND, yield_each=delivery))
                await anyio.sleep(0.05)  # untimed: the tracker delivers what the round queued

    await with_lifespan(apps["+ BillingMiddleware (warm cache)"], rounds)
    bare = statistics.median(timings["bare Starlette"])
    rows = []
    for name, samples in timings.items():
        median = statistics.median(samples)
        extra = f"{median - bare:+.1f}" if name != "bare Starlette" else "-"
        rows.append((name, f"{median:.1f}", extra, f"{median / bare:.2f}x"))
    what = (
        "event delivery inside the timed window" if delivery else "request path only (events delivered between rounds)"
    )
    print_table(
        f"In-process ASGI, {what}: median of {ROUNDS} alternating rounds x {REQUESTS_PER_ROUND:,} requests",
        ("app", "us/request", "overhead us", "vs bare"),
        rows,
    )
    expected = ROUNDS * REQUESTS_PER_ROUND + 300
    print(f"(units delivered upstream: {backend.units:,.0f} of {expected:,}, in {backend.tracks:,} track calls)")


async def upstream_calls_table() -> None:
    rows = []
    backend = InMemoryBackend()
    app = billing_app(backend)

    async def thousand() -> None:
        await drive(app, 1_000, customers=100)

    await with_lifespan(app, thousand)
    rows.append(("1,000 requests, 100 customers, cold start", f"{backend.checks:,}"))

    slow = InMemoryBackend(delay=0.05)
    app = billing_app(slow)

    async def stampede() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(1_000):
                tg.start_soon(drive, app, 1)

    await with_lifespan(app, stampede)
    rows.append(("1,000 concurrent cold misses on one key (50 ms check)", f"{slow.checks:,}"))
    print_table("Upstream check calls", ("scenario", "check calls"), rows)


async def run() -> None:
    await overhead_table(delivery=False)
    await overhead_table(delivery=True)
    await upstream_calls_table()
