"""Delivery: upstream calls per 1,000 requests and delivery lag against the real local server; the cost of tracking.

Coalescing sends one track call per (customer, feature) per flush window (1 s by default), and
fewer when the call budget (90 calls/min by default, the hosted limit) is the tighter bound: the
groups keep growing while they wait. So the call count depends on how many customers are active,
not on the request rate, and the budget trades calls for lag. Lag is measured from outside the
core: from the moment a response's last byte is sent to the moment the track call carrying its
event returns from the server (a batch's key is a hash of its events' keys, so each confirmed
call is matched to its events). Tracking on vs. off: the same middleware and app at full speed,
with usage events queued and delivered (on) or discarded (off), in alternating rounds long enough
to span a flush window or two, each client yielding to the event loop between requests as a
server's socket reads would (so that delivery runs while the app serves, as it does in production).
A round's time ends once its events are delivered: none of its delivery runs in the next round.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx

from billingos_asgi import BillingMiddleware, BillingOS, LocalBilling, TrackUsageResult
from billingos_asgi.client import DEFAULT_LIMITS
from billingos_asgi.events import Batch, UsageEvent
from billingos_asgi.upstream import DEFAULT_CALLS_PER_MINUTE

from ._util import Section, Table, command, free_port, median, percentile, scaled, stop_server
from .apps import customer_from_header, starlette_app
from .bench_client_server import start_server
from .bench_middleware import _receive, _send, scope_for, with_lifespan

RATE = 500  # requests per second
#: Long enough for the budgeted row to leave its start-up (the first checks spend the burst) for its
#: steady state: one budget cycle over 10 groups is about 7 s at 90 calls/min.
SECONDS = scaled(30, 2)
ROUNDS = scaled(15, 2)
REQUESTS_PER_ROUND = scaled(40_000, 400)  # 2 s or so: the rounds share the flushes evenly
CONCURRENCY = 20
FEATURE = "api_calls"


@dataclass
class Confirming:
    """A backend that notes when each track call returns: the upstream confirmation of its events."""

    inner: BillingOS
    confirmed: list[tuple[float, str, str, float]] = field(default_factory=list)  # time, customer, key, units

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        return await self.inner.check_entitlement(customer_id, feature_key)

    async def track_usage(
        self,
        customer_id: str,
        feature_key: str,
        quantity: float,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TrackUsageResult:
        result = await self.inner.track_usage(customer_id, feature_key, quantity, idempotency_key, metadata)
        self.confirmed.append((time.perf_counter(), customer_id, idempotency_key or "", quantity))
        return result

    async def get_usage_metrics(self, customer_id: str, feature_key: str | None = None) -> Any:
        return await self.inner.get_usage_metrics(customer_id, feature_key)

    async def create_session_token(self, external_user_id: str, **kwargs: Any) -> Any:
        return await self.inner.create_session_token(external_user_id, **kwargs)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Attempts(httpx.AsyncBaseTransport):
    """The client's transport, counting the HTTP requests it sends: the upstream rate limits count
    each attempt, retries included, where the backend sees one call."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=DEFAULT_LIMITS)
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def delivery_lags(
    confirmed: list[tuple[float, str, str, float]], ends: dict[str, float], order: dict[str, list[str]]
) -> list[float]:
    """Seconds from request end to confirmation, per event, matching each track call to its events.

    A batch is a run of one customer's events in the order they were queued; its key is the lone
    event's key, or a hash of the run's keys (``Batch.of``), tried from the oldest unconfirmed run on.
    """
    unconfirmed = {customer: list(keys) for customer, keys in order.items()}
    lags = []
    for at, customer, key, units in sorted(confirmed):
        pending, size = unconfirmed.get(customer, []), round(units)
        for start in range(len(pending) - size + 1):
            run = pending[start : start + size]
            events = tuple(UsageEvent(customer, FEATURE, 1.0, k) for k in run)
            if Batch.of(events).idempotency_key == key:
                lags += [at - ends[k] for k in run]
                del pending[start : start + size]
                break
    return lags


async def steady_load(customers: int, calls_per_minute: float | None) -> dict[str, float]:
    """``RATE`` requests/s for ``SECONDS`` over ``customers``, delivered to the local server; then drained."""
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        server = start_server(Path(workdir), port, customers)
        try:
            attempts = Attempts()
            async with BillingOS("sk_test_local", base_url=f"http://127.0.0.1:{port}", transport=attempts) as client:
                backend = Confirming(client)
                middleware = BillingMiddleware(
                    starlette_app(),
                    billing=backend,
                    customer=customer_from_header,
                    routes={"/v1/search": FEATURE},
                    calls_per_minute=calls_per_minute,
                    drain_timeout=60,
                )
                ends: dict[str, float] = {}
                order: dict[str, list[str]] = {f"customer_{i}": [] for i in range(customers)}
                total = RATE * SECONDS

                async def request(i: int) -> None:
                    customer = f"customer_{i % customers}"
                    request_id = ""

                    async def send(message: Any) -> None:
                        nonlocal request_id
                        if message["type"] == "http.response.start":
                            request_id = dict(message["headers"])[b"x-request-id"].decode()
                        elif not message.get("more_body", False):
                            key = f"{request_id}:{FEATURE}"
                            ends[key] = time.perf_counter()
                            order[customer].append(key)

                    await middleware(scope_for(customer), _receive, send)

                async def load() -> None:
                    start = time.perf_counter()
                    for i in range(total):
                        await request(i)
                        if i % 10 == 9:  # pace: 10 requests every 20 ms
                            await anyio.sleep(max(0.0, start + (i + 1) / RATE - time.perf_counter()))

                await with_lifespan(middleware, load)
                upstream = middleware.upstream
                tracks, checks = upstream.tracks, upstream.checks
            sent = attempts.sent
        finally:
            stop_server(server)
        async with LocalBilling.from_file(Path(workdir) / "plans.toml", Path(workdir) / "bench.db") as billing:
            recorded = sum([await billing.recorded_units(customer, FEATURE) for customer in order])
    lags = delivery_lags(backend.confirmed, ends, order)
    return {
        "requests": total,
        "tracks": tracks,
        "checks": checks,
        "sent": sent,
        "recorded": recorded,
        "matched": len(lags),
        "p50": percentile(lags, 0.5),
        "p99": percentile(lags, 0.99),
        "max": max(lags, default=float("nan")),
    }


async def calls_table() -> tuple[Table, list[dict[str, Any]]]:
    rows, results = [], []
    for customers, budget in ((10, DEFAULT_CALLS_PER_MINUTE), (10, None), (1_000, None)):
        found = await steady_load(customers, budget)
        results.append({"customers": customers, "budget": budget, **found})
        rows.append(
            (
                f"{customers:,}",
                "none" if budget is None else f"{budget:g}/min",
                f"{found['requests']:,.0f}",
                f"{found['tracks']:,.0f}",
                f"{found['checks']:,.0f}",
                f"{1000 * found['sent'] / found['requests']:.1f}",
                f"{found['sent'] - found['tracks'] - found['checks']:,.0f}",
                f"{found['p50']:.2f}",
                f"{found['p99']:.2f}",
                f"{found['recorded']:,.0f} ({found['matched']:,.0f} matched)",
            )
        )
    table = Table(
        f"Delivery at a steady {RATE} requests/s for {SECONDS} s to the local server (flush window 1 s)",
        "Upstream calls per 1,000 requests (HTTP requests the client sent, each retry one more, as upstream's "
        "rate limits count them) and delivery lag (request end to the track call's confirmation by "
        "`billingos-asgi serve` over loopback, p50/p99 in seconds, the shutdown drain included) with the "
        "BillingOS client; units recorded are read back from the server's database.",
        command("pipeline"),
        (
            "customers",
            "call budget",
            "requests",
            "track calls",
            "check calls",
            "calls per 1,000",
            "retries",
            "lag p50 s",
            "lag p99 s",
            "units recorded",
        ),
        rows,
    )
    return table, results


def plans(customers: int) -> dict[str, Any]:
    return {
        "features": {FEATURE: {"type": "usage_quota"}},
        "plans": {"big": {"features": {FEATURE: 10**9}}},
        "customers": {f"customer_{i}": "big" for i in range(customers)},
    }


def metered(billing: LocalBilling) -> BillingMiddleware:
    """No call budget: a round waiting for budget tokens would time idleness, not the cost of tracking."""
    return BillingMiddleware(
        starlette_app(),
        billing=billing,
        customer=customer_from_header,
        routes={"/v1/search": FEATURE},
        calls_per_minute=None,
    )


async def full_speed(middleware: BillingMiddleware, customers: int, requests: int = REQUESTS_PER_ROUND) -> float:
    """Requests per second of ``CONCURRENCY`` clients calling the app back to back, the delivery of the
    round's usage included: its tracker runs for the round only and its stop (a flush at once, then
    delivery) is timed, so that no delivery of one round runs during the next (the other variant's)."""
    templates = [scope_for(f"customer_{i}") for i in range(customers)]
    per_client = requests // CONCURRENCY

    async def client(offset: int) -> None:
        for i in range(per_client):
            scope = templates[(offset + i) % customers].copy()
            scope["state"] = {}
            await middleware(scope, _receive, _send)
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tracker_group:
        await middleware.tracker.start(tracker_group)
        start = time.perf_counter()
        async with anyio.create_task_group() as clients:
            for offset in range(CONCURRENCY):
                clients.start_soon(client, offset)
        await middleware.tracker.stop()
        elapsed = time.perf_counter() - start
    return per_client * CONCURRENCY / elapsed


async def tracking_cost_table(customers: int = 10) -> tuple[Table, float]:
    """The table, and the ratio of throughput with tracking on to that with it off."""
    with tempfile.TemporaryDirectory() as workdir:
        async with LocalBilling.from_dict(plans(customers), Path(workdir) / "billing.db") as billing:
            on, off = metered(billing), metered(billing)
            off.tracker.add = lambda *usage: True  # type: ignore[method-assign]  # events discarded
            rates: dict[str, list[float]] = {"on": [], "off": []}
            for variant in (on, off):
                await full_speed(variant, customers)  # warm-up
            for _ in range(ROUNDS):
                for name, variant in (("on", on), ("off", off)):
                    rates[name].append(await full_speed(variant, customers))
            delivered = sum([await billing.recorded_units(f"customer_{i}", FEATURE) for i in range(customers)])
    on_rate, off_rate = median(rates["on"]), median(rates["off"])
    # Each "on" round against the "off" round beside it: the machine's speed drifts (a shared host)
    # over a run more than between two rounds.
    ratio = median([on / off for on, off in zip(rates["on"], rates["off"], strict=True)])
    expected = (ROUNDS + 1) * (REQUESTS_PER_ROUND // CONCURRENCY) * CONCURRENCY
    table = Table(
        f"App throughput with tracking on vs. off: medians of {ROUNDS} alternating rounds x "
        f"{REQUESTS_PER_ROUND:,} requests",
        f"{CONCURRENCY} concurrent in-process clients, {customers} customers, LocalBilling on a SQLite file as the "
        "backend, no call budget: what queueing and delivering the usage costs the app. Each round's time includes "
        "the delivery of its own events (the tracker runs for the round, and its closing flush and drain are timed). "
        "Ratio: the median of each round's over the round beside it.",
        command("pipeline"),
        ("tracking", "requests/s", "ratio"),
        [
            ("off (events discarded)", f"{off_rate:,.0f}", "1.00x"),
            ("on", f"{on_rate:,.0f}", f"{ratio:.2f}x"),
        ],
        [f"units recorded with tracking on: {delivered:,.0f} of {expected:,}, in {on.upstream.tracks:,} track calls"],
    )
    return table, ratio


async def run() -> Section:
    calls, results = await calls_table()
    tracking, ratio = await tracking_cost_table()
    return Section("pipeline", [calls, tracking], {"delivery": results, "tracking_ratio": ratio})
