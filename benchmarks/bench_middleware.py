"""Per-request cost of BillingMiddleware and its peers, in-process (the ASGI app called directly, no server).

Every app answers the same one-line endpoint; all are measured in alternating rounds in one run,
so a noisy neighbour slows them all alike, and the median round is kept. Ours is measured four
ways: a warm cache (the steady state: one customer, its events delivered after each round, untimed), a cold
cache (a new customer on every request, so every check goes to the in-memory backend), an
unmetered route (passes through), and tracking on (the tracker's flush and delivery of the
round's events, 100 customers, inside the timed window). Peers: slowapi's pure-ASGI
middleware, asgi-correlation-id, moesifasgi. Also: upstream checks per 1,000 requests over 100
customers, and for 1,000 concurrent cold misses on one key.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from starlette.types import ASGIApp, Message

from billingos_asgi import BillingMiddleware
from billingos_asgi.testing import lifespan

from ._util import Section, Table, command, median, percentile, scaled
from .apps import (
    InMemoryBackend,
    billing_app,
    billing_middleware,
    correlation_id_app,
    fastapi_app,
    moesif_app,
    slowapi_app,
    starlette_app,
)

ROUNDS = scaled(15, 2)
REQUESTS_PER_ROUND = scaled(2_000, 300)
WARM_UP = scaled(300, 50)
TRACKED_CUSTOMERS = 100
BARE_STARLETTE, BARE_FASTAPI = "bare Starlette", "bare FastAPI"
WARM = "+ BillingMiddleware, warm cache"


def scope_for(customer: str, path: str = "/v1/search") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-api-key", customer.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    # Every app here answers 200: one answering 401 or 429 would look cheap. (A cost every row pays alike.)
    if message["type"] == "http.response.start" and message["status"] != 200:
        raise RuntimeError(f"the app answered {message['status']}, not 200: its figures would measure a refusal")


async def drive(
    app: ASGIApp,
    count: int,
    customers: int = 1,
    *,
    first: int = 0,
    yield_each: bool = False,
    then: Callable[[], Awaitable[None]] | None = None,
) -> float:
    """Call ``app`` ``count`` times over customers ``first`` .. ``first + customers - 1``; return us/request.

    ``yield_each``: let the event loop turn after each request, as a server's loop does, so that
    background work (the tracker delivering events) runs inside the timed window. ``then``: more
    work inside the timed window, after the requests.
    """
    templates = [scope_for(f"customer_{first + i}") for i in range(customers)]
    gc.collect()
    start = time.perf_counter()
    for i in range(count):
        scope = templates[i % customers].copy()
        scope["state"] = {}
        await app(scope, _receive, _send)
        if yield_each:
            await anyio.lowlevel.checkpoint()
    if then is not None:
        await then()
    return (time.perf_counter() - start) / count * 1e6


async def delivered(app: ASGIApp | None) -> None:
    """Wait, untimed, until a row of ours has delivered the usage events of its round (its tracker's
    flush window included), so that they are not delivered inside another row's timed window."""
    await anyio.sleep(0.02)  # (a peer's background work too)
    if isinstance(app, BillingMiddleware):
        with anyio.fail_after(60):
            while app.tracker.backlog or app.tracker.stats.in_flight:  # noqa: ASYNC110 - polling counters
                await anyio.sleep(0.01)


async def with_lifespan(app: ASGIApp, body: Callable[[], Awaitable[None]]) -> None:
    async with lifespan(app):
        await body()


@dataclass
class Variant:
    """One row: how to time a round of ``count`` requests, and which bare app it is compared with."""

    name: str
    measure: Callable[[int], Awaitable[float]]
    baseline: str | None  # None for the bare apps
    peer: bool = False
    needs_lifespan: ASGIApp | None = None


def simple(name: str, app: ASGIApp, baseline: str | None, *, peer: bool = False, lifespan: bool = False) -> Variant:
    async def measure(count: int) -> float:
        return await drive(app, count)

    return Variant(name, measure, baseline, peer, app if lifespan else None)


def cold_cache(backend: InMemoryBackend) -> Variant:
    app = billing_app(backend)
    fresh = itertools.count(1_000_000, REQUESTS_PER_ROUND)  # never-seen customer ids, round after round

    async def measure(count: int) -> float:
        return await drive(app, count, customers=count, first=next(fresh))

    return Variant("+ BillingMiddleware, cold cache (new customer each request)", measure, BARE_STARLETTE, False, app)


def tracking_on(backend: InMemoryBackend) -> Variant:
    """The round's requests, then the tracker's flush and delivery of their events, all timed."""
    middleware: BillingMiddleware = billing_middleware(starlette_app(), backend)

    async def measure(count: int) -> float:
        async with anyio.create_task_group() as tg:
            await middleware.tracker.start(tg)
            # stop() flushes at once and delivers everything queued
            us = await drive(middleware, count, customers=TRACKED_CUSTOMERS, then=middleware.tracker.stop)
        return us

    return Variant(f"+ BillingMiddleware, tracking on ({TRACKED_CUSTOMERS} customers)", measure, BARE_STARLETTE)


def variants(backend: InMemoryBackend) -> list[Variant]:
    metered_fastapi = billing_middleware(fastapi_app(), backend)
    return [
        simple(BARE_STARLETTE, starlette_app(), None),
        simple(BARE_FASTAPI, fastapi_app(), None),
        simple(WARM, billing_app(backend), BARE_STARLETTE, lifespan=True),
        cold_cache(backend),
        simple(
            "+ BillingMiddleware, unmetered route",
            billing_middleware(starlette_app(), backend, routes={"/v1/other": "api_calls"}),
            BARE_STARLETTE,
            lifespan=True,
        ),
        tracking_on(backend),
        simple("FastAPI + BillingMiddleware, warm cache", metered_fastapi, BARE_FASTAPI, lifespan=True),
        simple("+ slowapi (SlowAPIASGIMiddleware)", slowapi_app(), BARE_STARLETTE, peer=True),
        simple("+ asgi-correlation-id", correlation_id_app(), BARE_STARLETTE, peer=True),
        simple("+ moesifasgi (API at a closed port)", moesif_app(), BARE_STARLETTE, peer=True),
    ]


async def overhead_table() -> tuple[Table, dict[str, Any]]:
    backend = InMemoryBackend()
    rows_of = variants(backend)
    timings: dict[str, list[float]] = {variant.name: [] for variant in rows_of}

    async def rounds() -> None:
        for variant in rows_of:
            await variant.measure(WARM_UP)  # builds middleware stacks, fills caches
        for _ in range(ROUNDS):
            for variant in rows_of:
                timings[variant.name].append(await variant.measure(REQUESTS_PER_ROUND))
                await delivered(variant.needs_lifespan)  # untimed: no other row's window pays for it

    async with contextlib.AsyncExitStack() as stack:
        for variant in rows_of:
            if variant.needs_lifespan is not None:
                await stack.enter_async_context(lifespan(variant.needs_lifespan))
        await rounds()

    medians = {name: median(samples) for name, samples in timings.items()}
    rows, overheads, peers = [], {}, []
    for variant in rows_of:
        us = medians[variant.name]
        if variant.baseline is None:
            rows.append((variant.name, f"{us:.1f}", "-", "-", "1.00x"))
            continue
        # Paired by round: the machine's speed drifts, a round and its baseline's round ran side by side.
        extra = [ours - bare for ours, bare in zip(timings[variant.name], timings[variant.baseline], strict=True)]
        ratios = [ours / bare for ours, bare in zip(timings[variant.name], timings[variant.baseline], strict=True)]
        overheads[variant.name] = median(extra)
        if variant.peer:
            peers.append(variant.name)
        spread = f"{percentile(extra, 0.25):+.1f} .. {percentile(extra, 0.75):+.1f}"
        rows.append((variant.name, f"{us:.1f}", f"{median(extra):+.1f}", spread, f"{median(ratios):.2f}x"))
    table = Table(
        f"In-process ASGI: {ROUNDS} alternating rounds x {REQUESTS_PER_ROUND:,} requests",
        "Microseconds per request with the app called directly (no server, no sockets): the middleware's own "
        "cost. Overhead and ratio are against the bare app it wraps (Starlette unless named), round by round "
        "(medians; the middle half of the rounds' overheads shows the noise). Our billing backend answers from "
        "memory. The rows with a lifespan deliver their usage after each timed round, untimed (the cold cache's "
        "track calls, one per request, included), except the tracking-on row, timed until its events are "
        "delivered. moesifasgi's worker threads (batching, posting to a closed port) compete for the GIL during "
        "every app's rounds.",
        command("middleware"),
        ("app", "us/request", "overhead us", "middle half of rounds", "cost vs bare"),
        rows,
        [f"units delivered upstream: {backend.units:,.0f} in {backend.tracks:,} track calls"],
    )
    return table, {"us_per_request": medians, "overhead_us": overheads, "peers": peers, "warm": WARM}


async def upstream_calls_table() -> Table:
    rows = []
    backend = InMemoryBackend()
    app = billing_app(backend)

    async def thousand() -> None:
        await drive(app, 1_000, customers=100)

    await with_lifespan(app, thousand)
    rows.append(("1,000 requests, 100 customers, cold start", f"{backend.checks:,}"))

    slow = InMemoryBackend(delay=0.05)
    app = billing_app(slow)

    async def one() -> None:
        await app(scope_for("customer_0"), _receive, _send)

    async def stampede() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(1_000):
                tg.start_soon(one)

    await with_lifespan(app, stampede)
    rows.append(("1,000 concurrent cold misses on one key (50 ms check)", f"{slow.checks:,}"))
    return Table(
        "Upstream check calls",
        "Entitlement checks sent upstream: one per (customer, feature), however many requests miss together.",
        command("middleware"),
        ("scenario", "check calls"),
        rows,
    )


async def run() -> Section:
    overhead, data = await overhead_table()
    return Section("middleware", [overhead, await upstream_calls_table()], data)
