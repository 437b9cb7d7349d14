"""The same scenarios once through the network: BillingMiddleware -> BillingOS client -> the local
BillingOS server under uvicorn on a loopback socket (the ``local_server`` fixture)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from billingos_asgi import BillingMiddleware, BillingOS, LocalBilling, UsageEvent
from billingos_asgi.local.background import serve_in_thread
from billingos_asgi.local.server import create_app
from tests.asgi import serve
from tests.conftest import SECRET_KEY, RunningServer

from . import support
from .support import PROBLEM, as_customer, by_header, recording_app


@pytest.fixture
def server37(tmp_path: Path) -> Iterator[RunningServer]:
    """The local server over this suite's plans (which have a plan with a quota of 37)."""
    database = tmp_path / "remote.db"
    engine = LocalBilling.from_dict(support.PLANS, database)
    with serve_in_thread(create_app(engine, secret_key=SECRET_KEY)) as base_url:
        yield RunningServer(base_url, engine, database)


async def test_decision_rows_over_the_network(local_server: RunningServer) -> None:
    engine = local_server.billing
    await engine.set_plan("user_gone", "free")
    await engine.cancel_subscription("user_gone")
    calls: list[str] = []
    async with BillingOS(SECRET_KEY, base_url=local_server.base_url) as remote:
        middleware = BillingMiddleware(
            recording_app(calls),
            billing=remote,
            customer=by_header,
            routes={"/search": "api_calls", "/export": "export", "/upload": "storage_gb"},
        )
        async with serve(middleware) as client:
            anonymous = await client.get("/search")
            no_flag = await client.get("/export", headers=as_customer("user_free"))
            not_in_plan = await client.get("/upload", headers=as_customer("user_pro"))
            unknown = await client.get("/search", headers=as_customer("user_nobody"))
            cancelled = await client.get("/search", headers=as_customer("user_gone"))
            assert calls == []
            ok = [await client.get("/search", headers=as_customer("user_free")) for _ in range(10)]
            exhausted = await client.get("/search", headers=as_customer("user_free"))
            flag = await client.get("/export", headers=as_customer("user_pro"))
    assert anonymous.status_code == 401 and anonymous.json()["type"] == PROBLEM + "unauthenticated"
    for refused in (no_flag, not_in_plan, unknown, cancelled):
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == PROBLEM + "no-access"
    assert [r.status_code for r in ok] == [200] * 10
    assert [re.match(r'"api_calls";r=(\d+);t=\d+$', r.headers["ratelimit"])[1] for r in ok] == [  # type: ignore[index]
        str(n) for n in range(9, -1, -1)
    ]
    assert all(r.headers["ratelimit-policy"] == '"api_calls";q=10' for r in ok)
    assert exhausted.status_code == 429 and int(exhausted.headers["retry-after"]) > 0
    assert (exhausted.json()["limit"], exhausted.json()["usage"]) == (10, 10)
    assert flag.status_code == 200
    assert calls == ["GET /search"] * 10 + ["GET /export"]
    assert await engine.recorded_units("user_free", "api_calls") == 10
    assert await engine.recorded_units("user_pro", "export") == 0


async def test_upstream_usage_already_exhausted(local_server: RunningServer) -> None:
    await local_server.billing.track_usage("user_free", "api_calls", 10)
    calls: list[str] = []
    async with BillingOS(SECRET_KEY, base_url=local_server.base_url) as remote:
        middleware = BillingMiddleware(
            recording_app(calls), billing=remote, customer=by_header, routes={"/x": "api_calls"}
        )
        async with serve(middleware) as client:
            response = await client.get("/x", headers=as_customer("user_free"))
    assert response.status_code == 429
    assert response.headers["ratelimit"].startswith('"api_calls";r=0;t=')
    assert calls == []
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 10


async def test_exact_counts_over_the_network(local_server: RunningServer) -> None:
    async with BillingOS(SECRET_KEY, base_url=local_server.base_url) as remote:
        middleware = BillingMiddleware(
            recording_app([]), billing=remote, customer=by_header, routes={"POST /v1/search": "api_calls"}
        )
        async with serve(middleware) as client:
            pro = [(await client.post("/v1/search", headers=as_customer("user_pro"))).status_code for _ in range(25)]
            free = [(await client.post("/v1/search", headers=as_customer("user_free"))).status_code for _ in range(7)]
        assert pro == [200] * 25 and free == [200] * 7
        metrics = await remote.get_usage_metrics("user_free", "api_calls")
    assert await local_server.billing.recorded_units("user_pro", "api_calls") == 25
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 7
    assert [(m.consumed, m.remaining) for m in metrics.metrics] == [(7, 3)]
    stats = middleware.tracker.stats
    assert (stats.sent, stats.dead_lettered, stats.dropped) == (32, 0, 0)


async def test_concurrent_requests_over_the_network_local_server(local_server: RunningServer) -> None:
    async with BillingOS(SECRET_KEY, base_url=local_server.base_url) as remote:
        middleware = BillingMiddleware(
            recording_app([]), billing=remote, customer=by_header, routes={"/x": "api_calls"}
        )
        async with serve(middleware) as client:
            statuses = await support.concurrent_statuses(client, 100, as_customer("user_free"))
    assert (statuses.count(200), statuses.count(429)) == (10, 90)
    assert middleware.upstream.checks == 1
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 10


async def test_concurrent_37_over_the_network(server37: RunningServer) -> None:
    async with BillingOS(SECRET_KEY, base_url=server37.base_url) as remote:
        middleware = BillingMiddleware(
            recording_app([]), billing=remote, customer=by_header, routes={"/x": "api_calls"}
        )
        async with serve(middleware) as client:
            statuses = await support.concurrent_statuses(client, 100, as_customer("user_37"))
    assert (statuses.count(200), statuses.count(429), len(statuses)) == (37, 63, 100)
    assert middleware.upstream.checks == 1
    assert (middleware.tracker.stats.sent, middleware.tracker.stats.rejected) == (37, 0)
    assert await server37.billing.recorded_units("user_37", "api_calls") == 37


async def test_two_processes_sharing_a_quota_lose_nothing_silently(local_server: RunningServer) -> None:
    """Two middlewares (two app processes) admit on their own cached view of one quota of 10.
    Whatever each lets through is either recorded upstream or reported as rejected: never both,
    never neither, and upstream never goes past the limit."""
    rejected: list[tuple[str, str]] = []

    def on_rejected(event: UsageEvent, reason: str) -> None:
        rejected.append((event.idempotency_key, reason))

    async with BillingOS(SECRET_KEY, base_url=local_server.base_url) as remote:
        first = BillingMiddleware(
            recording_app([]), billing=remote, customer=by_header, routes={"/x": "api_calls"}, on_rejected=on_rejected
        )
        second = BillingMiddleware(
            recording_app([]), billing=remote, customer=by_header, routes={"/x": "api_calls"}, on_rejected=on_rejected
        )
        async with serve(first) as one, serve(second) as two:
            # Both caches are warm before either process has used anything.
            warm = [(await c.get("/x", headers=as_customer("user_free"))).status_code for c in (one, two)]
            async with anyio.create_task_group() as tg:
                statuses: list[int] = []

                async def hit(client: httpx.AsyncClient) -> None:
                    response = await client.get("/x", headers=as_customer("user_free"))
                    statuses.append(response.status_code)

                for _ in range(8):
                    tg.start_soon(hit, one)
                    tg.start_soon(hit, two)
    admitted = warm.count(200) + statuses.count(200)
    sent = first.tracker.stats.sent + second.tracker.stats.sent
    refused = first.tracker.stats.rejected + second.tracker.stats.rejected
    assert warm == [200, 200]
    assert await local_server.billing.recorded_units("user_free", "api_calls") == sent
    assert sent == 10
    assert sent + refused == admitted
    assert len(rejected) == refused and all(reason == "quota_exceeded" for _, reason in rejected)
    assert first.tracker.stats.dropped + second.tracker.stats.dropped == 0


async def test_a_429_on_a_check_pauses_the_budget_and_is_no_outage(tmp_path: Path) -> None:
    """Over the global limit (3 calls here), upstream's 429 reaches the budget at once: later checks
    wait for its Retry-After without calling, each request is decided by ``on_error`` then and
    there, and the breaker stays closed (upstream is up). The client retrying the 429 itself slept
    through the request's check timeout instead: 5 s a request, and an outage to the breaker."""
    engine = LocalBilling.from_dict(support.PLANS, tmp_path / "limited.db")
    asked = [
        (customer, feature) for customer in ("user_free", "user_pro", "user_37") for feature in ("api_calls", "tokens")
    ]
    with serve_in_thread(create_app(engine, secret_key=SECRET_KEY, rate_limit=3)) as base_url:
        async with BillingOS(SECRET_KEY, base_url=base_url) as remote:
            middleware = BillingMiddleware(
                recording_app([]),
                billing=remote,
                customer=by_header,
                routes={"/a": "api_calls", "/t": "tokens"},
                flush_interval=60,
                drain_timeout=0,
            )
            async with serve(middleware) as client:
                with anyio.fail_after(4):  # (well within one check timeout: nothing waits on the 429)
                    statuses = [
                        (
                            await client.get("/a" if feature == "api_calls" else "/t", headers=as_customer(customer))
                        ).status_code
                        for customer, feature in asked
                    ]
    upstream = middleware.upstream
    assert statuses == [200] * 6  # three checked, the rest let through by on_error="allow"
    assert (upstream.checks, upstream.throttled, upstream.retries, upstream.refused_by_budget) == (4, 1, 0, 2)
    assert (upstream.breaker.state, upstream.breaker.failures, upstream.breaker.opened) == ("closed", 0, 0)
