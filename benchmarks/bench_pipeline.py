"""Delivery against a real LocalBilling (SQLite file): upstream calls at a steady rate, and the cost of tracking.

Coalescing sends one track call per (customer, feature) per flush window (1 s by default), and
fewer when the call budget (90 calls/min by default, the hosted limit) is the tighter bound: the
groups keep growing while they wait. So the call count depends on how many customers are active,
not on the request rate. Tracking on vs. off: the same middleware and app at full speed, with
usage events queued and delivered (on) or discarded (off), in alternating rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from billingos_asgi import BillingMiddleware, LocalBilling
from billingos_asgi.testing import lifespan
from billingos_asgi.upstream import DEFAULT_CALLS_PER_MINUTE

from ._util import print_table
from .bench_middleware import _receive, _send, customer_from_header, scope_for, starlette_app, with_lifespan

RATE = 500  # requests per second
SECONDS = 6
ROUNDS = 5
REQUESTS_PER_ROUND = 4_000
CONCURRENCY = 20


def plans(customers: int) -> dict[str, Any]:
    return {
        "features": {"api_calls": {"type": "usage_quota"}},
        "plans": {"big": {"features": {"api_calls": 10**9}}},
        "customers": {f"customer_{i}": "big" for i in range(customers)},
    }


async def steady_load(customers: int, calls_per_minute: float | None) -> tuple[int, int, int, float]:
    with tempfile.TemporaryDirectory() as workdir:
        async with LocalBilling.from_dict(plans(customers), Path(workdir) / "billing.db") as billing:
            middleware = BillingMiddleware(
                starlette_app(),
                billing=billing,
                customer=customer_from_header,
                routes={"/v1/search": "api_calls"},
                calls_per_minute=calls_per_minute,
                drain_timeout=60,
            )
            templates = [scope_for(f"customer_{i}") for i in range(customers)]
            total = RATE * SECONDS

            async def load() -> None:
                start = time.perf_counter()
                for i in range(total):
                    scope = templates[i % customers].copy()
                    scope["state"] = {}
                    await middleware(scope, _receive, _send)
                    if i % 10 == 9:  # pace: 10 requests every 20 ms
                        await anyio.sleep(max(0.0, start + (i + 1) / RATE - time.perf_counter()))

            await with_lifespan(middleware, load)
            recorded = sum([await billing.recorded_units(f"customer_{i}", "api_calls") for i in range(customers)])
            assert recorded == total, f"recorded {recorded} of {total}"
            return total, middleware.upstream.tracks, middleware.upstream.checks, recorded


async def calls_table() -> None:
    rows = []
    for customers, budget in ((10, DEFAULT_CALLS_PER_MINUTE), (10, None), (1_000, None)):
        total, tracks, checks, recorded = await steady_load(customers, budget)
        per_thousand = 1000 * (tracks + checks) / total
        rows.append(
            (
                f"{customers:,}",
                "none" if budget is None else f"{budget:g}/min",
                f"{total:,}",
                f"{tracks:,}",
                f"{checks:,}",
                f"{per_thousand:.1f}",
                f"{recorded:,.0f}",
            )
        )
    print_table(
        f"Upstream calls at a steady {RATE} requests/s for {SECONDS} s (flush window 1 s, LocalBilling)",
        ("customers", "call budget", "requests", "track calls", "check calls", "calls per 1,000", "units recorded"),
        rows,
    )


async def full_speed(middleware: BillingMiddleware, customers: int) -> float:
    """Requests per second of ``CONCURRENCY`` clients calling the app back to back."""
    templates = [scope_for(f"customer_{i}") for i in range(customers)]
    per_client = REQUESTS_PER_ROUND // CONCURRENCY

    async def client(offset: int) -> None:
        for i in range(per_client):
            scope = templates[(offset + i) % customers].copy()
            scope["state"] = {}
            await middleware(scope, _receive, _send)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for offset in range(CONCURRENCY):
            tg.start_soon(client, offset)
    return per_client * CONCURRENCY / (time.perf_counter() - start)


async def tracking_cost_table(customers: int = 10) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        async with LocalBilling.from_dict(plans(customers), Path(workdir) / "billing.db") as billing:

            def metered() -> BillingMiddleware:
                return BillingMiddleware(
                    starlette_app(), billing=billing, customer=customer_from_header, routes={"/v1/search": "api_calls"}
                )

            on, off = metered(), metered()
            off.tracker.submit = lambda event: True  # type: ignore[method-assign]  # events discarded
            rates: dict[str, list[float]] = {"on": [], "off": []}
            async with lifespan(on), lifespan(off):
                for variant in (on, off):
                    await full_speed(variant, customers)  # warm-up
                for _ in range(ROUNDS):
                    for name, variant in (("on", on), ("off", off)):
                        rates[name].append(await full_speed(variant, customers))
            delivered = sum([await billing.recorded_units(f"customer_{i}", "api_calls") for i in range(customers)])
    on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
    print_table(
        f"App throughput with tracking on vs. off: {CONCURRENCY} concurrent in-process clients, {customers} customers,"
        f" median of {ROUNDS} alternating rounds x {REQUESTS_PER_ROUND:,} requests (LocalBilling on SQLite)",
        ("tracking", "requests/s", "ratio"),
        [
            ("off (events discarded)", f"{off_rate:,.0f}", "1.00x"),
            ("on", f"{on_rate:,.0f}", f"{on_rate / off_rate:.2f}x"),
        ],
    )
    expected = (ROUNDS + 1) * (REQUESTS_PER_ROUND // CONCURRENCY) * CONCURRENCY
    print(f"(units recorded with tracking on: {delivered:,.0f} of {expected:,}, in {on.upstream.tracks:,} track calls)")


async def run() -> None:
    await calls_table()
    await tracking_cost_table()
