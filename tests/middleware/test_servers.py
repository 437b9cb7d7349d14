"""The decision table and billing under real ASGI servers, over real sockets: uvicorn, and Hypercorn
over HTTP/1.1 and HTTP/2 (many requests on one connection; a stream reset, not a closed socket,
when its client leaves). Servers differ where it matters to billing: when ``send`` returns, what it
raises once the client has gone, how a disconnect reaches ``receive``, and the lifespan's shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from billingos_asgi import BillingMiddleware, BillingOS, LocalBilling, Metered
from billingos_asgi.local.background import serve_in_thread
from billingos_asgi.local.server import create_app

from ..conftest import SECRET_KEY
from ..servers import served
from .support import CUSTOMER_HEADER, PLANS, as_customer, by_header
from .test_streaming import stream_endpoint

pytest.importorskip("hypercorn")

PROTOCOLS = [("uvicorn", "http1"), ("hypercorn", "http1"), ("hypercorn", "http2"), ("hypercorn-trio", "http1")]


@pytest.fixture(params=PROTOCOLS, ids=["-".join(p) for p in PROTOCOLS])
def protocol(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def billing(tmp_path: Path) -> Iterator[LocalBilling]:
    """Used from the server's event loop and the test's: LocalBilling runs SQLite in worker threads."""
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db")
    yield billing
    anyio.run(billing.aclose)


def client_for(base_url: str, protocol: str, **options: Any) -> httpx.AsyncClient:
    http2 = protocol == "http2"  # with prior knowledge: no upgrade, every request on one connection
    return httpx.AsyncClient(base_url=base_url, http1=not http2, http2=http2, **options)


async def search(request: Request) -> Response:
    return JSONResponse({"results": []})


async def broken(request: Request) -> Response:
    return JSONResponse({"error": "bad input"}, status_code=400)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def metered_app(billing: LocalBilling, stream: Metered, **stream_options: Any) -> BillingMiddleware:
    app = Starlette(
        routes=[
            Route("/v1/search", search),
            Route("/v1/broken", broken),
            Route("/health", health),
            Route("/stream", stream_endpoint(**stream_options)),
        ]
    )
    routes: dict[str, str | Metered] = {"GET /v1/search": "api_calls", "/v1/broken": "api_calls", "/stream": stream}
    return BillingMiddleware(app, billing=billing, customer=by_header, routes=routes)


async def test_each_successful_request_is_billed_once_and_drained_at_shutdown(
    protocol: tuple[str, str], billing: LocalBilling
) -> None:
    server, http = protocol
    middleware = metered_app(billing, Metered("tokens"))
    with served(server, middleware) as base_url:
        async with client_for(base_url, http) as client:
            answers = [await client.get("/v1/search", headers=as_customer("user_free")) for _ in range(4)]
            refused = await client.get("/v1/broken", headers=as_customer("user_free"))
            anonymous = await client.get("/v1/search")
            free = await client.get("/health", headers=as_customer("user_free"))
    # Leaving served() waited for the lifespan's shutdown: the tracker has drained.
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.http_version for a in answers} == {"HTTP/2" if http == "http2" else "HTTP/1.1"}
    assert len({a.headers["x-request-id"] for a in answers}) == 4
    assert [a.headers["ratelimit"].split(";t=")[0] for a in answers] == [f'"api_calls";r={n}' for n in (9, 8, 7, 6)]
    assert refused.status_code == 400 and "x-request-id" in refused.headers
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert free.text == "ok" and "x-request-id" not in free.headers
    assert await billing.recorded_units("user_free", "api_calls") == 4
    assert middleware.tracker.stats.sent == 4 and middleware.tracker.stats.dropped == 0


async def test_concurrent_requests_never_pass_the_quota(protocol: tuple[str, str], billing: LocalBilling) -> None:
    server, http = protocol
    middleware = metered_app(billing, Metered("tokens"))
    statuses: list[int] = []
    with served(server, middleware) as base_url:
        async with client_for(base_url, http, timeout=30) as client:

            async def one() -> None:
                statuses.append((await client.get("/v1/search", headers=as_customer("user_37"))).status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(60):
                    tg.start_soon(one)
    assert sorted(statuses) == [200] * 37 + [429] * 23
    assert await billing.recorded_units("user_37", "api_calls") == 37


async def test_a_stream_read_to_its_end_is_billed_once_with_its_reported_units(
    protocol: tuple[str, str], billing: LocalBilling
) -> None:
    server, http = protocol
    middleware = metered_app(billing, Metered("tokens", quantity=1), report=3)
    with served(server, middleware) as base_url:
        async with client_for(base_url, http) as client:
            async with client.stream("GET", "/stream", headers={CUSTOMER_HEADER: "user_free"}) as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert response.status_code == 200 and body == b"first;second;third"
    assert await billing.recorded_units("user_free", "tokens") == 4  # 1 fixed + 3 reported
    assert middleware.tracker.stats.queued == 1


@pytest.mark.parametrize(("bill_partial", "billed"), [(False, 0), (True, 5)])
async def test_a_client_leaving_mid_stream_is_not_billed(
    protocol: tuple[str, str], billing: LocalBilling, bill_partial: bool, billed: float
) -> None:
    """The client reads the first chunk and hangs up (HTTP/2: resets its stream, the connection
    stays); the stream then only ends through the server noticing. Units the endpoint reported
    before are kept when the route says so."""
    server, http = protocol
    metered = Metered("tokens", quantity=None, bill_partial=bill_partial)
    middleware = metered_app(billing, metered, stall_after_first=True, report=5)
    with served(server, middleware) as base_url:
        async with client_for(base_url, http) as client:
            async with client.stream("GET", "/stream", headers={CUSTOMER_HEADER: "user_free"}) as response:
                assert response.status_code == 200
                first = await response.aiter_raw().__anext__()
            assert first == b"first;"
            # Still connected over HTTP/2: the next request on the connection is served as usual.
            assert (await client.get("/v1/search", headers=as_customer("user_free"))).status_code == 200
    assert middleware.tracker.stats.queued == (2 if billed else 1)
    assert await billing.recorded_units("user_free", "tokens") == billed
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_through_the_client_with_an_outbox_every_unit_arrives_once(
    protocol: tuple[str, str], billing: LocalBilling, tmp_path: Path
) -> None:
    """The whole pipeline on the server's own event loop (trio's too): the hosted client (httpx)
    against the local BillingOS server, coalescing, the outbox on disk, the drain at shutdown,
    then the app's own shutdown closing the client, as an app does."""
    server, http = protocol
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY)) as billing_url:
        remote = BillingOS(SECRET_KEY, base_url=billing_url)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await remote.aclose()  # after the middleware's drain

        app = Starlette(routes=[Route("/v1/search", search)], lifespan=lifespan)
        middleware = BillingMiddleware(
            app, billing=remote, customer=by_header, default_feature="api_calls", outbox=tmp_path / "outbox.db"
        )
        with served(server, middleware) as base_url:
            async with client_for(base_url, http) as client:
                for customer in ("user_free", "user_free", "user_pro", "user_free", "user_pro"):
                    assert (await client.get("/v1/search", headers=as_customer(customer))).status_code == 200
        assert middleware.tracker.stats.sent == 5 and middleware.tracker.stats.deferred == 0
        assert middleware.tracker.outbox is not None and not middleware.tracker.outbox.is_open
        assert await billing.recorded_units("user_free", "api_calls") == 3
        assert await billing.recorded_units("user_pro", "api_calls") == 2
