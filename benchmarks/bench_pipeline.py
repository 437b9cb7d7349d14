"""Upstream calls per 1,000 metered requests at a steady 500 requests/s (LocalBilling behind the middleware).

Coalescing sends one track call per (customer, feature) per flush window (1 s by default), so the
call count depends on how many customers are active, not on the request rate.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from billingos_asgi import BillingMiddleware, LocalBilling

from ._util import print_table
from .bench_middleware import _receive, _send, customer_from_header, scope_for, starlette_app, with_lifespan

RATE = 500  # requests per second
SECONDS = 6


def plans(customers: int) -> dict[str, Any]:
    return {
        "features": {"api_calls": {"type": "usage_quota"}},
        "plans": {"big": {"features": {"api_calls": 10**9}}},
        "customers": {f"customer_{i}": "big" for i in range(customers)},
    }


async def steady_load(customers: int) -> tuple[int, int, int, float]:
    with tempfile.TemporaryDirectory() as workdir:
        async with LocalBilling.from_dict(plans(customers), Path(workdir) / "billing.db") as billing:
            middleware = BillingMiddleware(
                starlette_app(), billing=billing, customer=customer_from_header, routes={"/v1/search": "api_calls"}
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
            return total, middleware.tracker.stats.upstream_calls, middleware.upstream.checks, recorded


async def run() -> None:
    rows = []
    for customers in (10, 1_000):
        total, tracks, checks, recorded = await steady_load(customers)
        per_thousand = 1000 * (tracks + checks) / total
        rows.append(
            (f"{customers:,}", f"{total:,}", f"{tracks:,}", f"{checks:,}", f"{per_thousand:.1f}", f"{recorded:,.0f}")
        )
    print_table(
        f"Upstream calls at a steady {RATE} requests/s for {SECONDS} s (flush window 1 s, LocalBilling)",
        ("active customers", "requests", "track calls", "check calls", "calls per 1,000 requests", "units recorded"),
        rows,
    )
