"""The apps every benchmark measures, built the same way in-process and under uvicorn.

One endpoint (``GET /v1/search`` answering ``ok``) on bare Starlette or FastAPI, alone or behind
one middleware: ours or a peer's, each configured as its documentation suggests. Our billing
backend answers from memory (:class:`InMemoryBackend`), so the figures are the middleware's own
cost, not a network's. uvicorn imports :func:`served` (``--factory``), which builds the app named
by the ``BENCH_APP`` environment variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from billingos_asgi import BillingMiddleware, Entitlement, TrackUsageResult, UsageSnapshot, from_api_key

LIMIT = 1e12
METERED_ROUTES = {"/v1/search": "api_calls"}
#: moesifasgi's API base URL: a closed loopback port, so its worker threads fail fast and send nothing.
MOESIF_CLOSED_URL = "http://127.0.0.1:9"


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


def key_owner(key: str) -> str | None:
    """The app's API key store (a stand-in answering from memory): each key names its customer."""
    return key if key.startswith("customer_") else None


#: Customers identified as an API product identifies them: an API key header, looked up once per
#: key (cached), the resolver we ship for it.
customer_from_header = from_api_key(key_owner, header="x-api-key")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/v1/search", search)])


def fastapi_app() -> ASGIApp:
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/v1/search", response_class=PlainTextResponse)
    async def search_endpoint() -> str:
        return "ok"

    return app


def billing_middleware(
    app: ASGIApp, backend: InMemoryBackend, routes: Mapping[str, str] = METERED_ROUTES, **options: Any
) -> BillingMiddleware:
    """Ours, around ``app`` (as ``add_middleware`` would put it, but keeping a handle on the instance)."""
    return BillingMiddleware(
        app,
        billing=backend,
        customer=customer_from_header,
        routes=routes,
        calls_per_minute=None,  # the in-memory backend has no rate limit to respect
        **options,
    )


def billing_app(backend: InMemoryBackend, **options: Any) -> BillingMiddleware:
    return billing_middleware(starlette_app(), backend, **options)


def slowapi_app() -> ASGIApp:
    """slowapi's pure-ASGI middleware with a limit never reached: the cost of counting each request."""
    from slowapi import Limiter
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address

    app = starlette_app()
    app.state.limiter = Limiter(key_func=get_remote_address, default_limits=["100000000/minute"])
    app.add_middleware(SlowAPIASGIMiddleware)
    return app


def correlation_id_app() -> ASGIApp:
    """asgi-correlation-id with its defaults: a request id per request, echoed in a header."""
    from asgi_correlation_id import CorrelationIdMiddleware

    app = starlette_app()
    app.add_middleware(CorrelationIdMiddleware)
    return app


def moesif_app() -> ASGIApp:
    """moesifasgi (API analytics and metering) with a dummy application id, its API at a closed port.

    It is a ``BaseHTTPMiddleware``: each request builds an event (headers, body, timings) on the
    event loop and queues it; APScheduler threads batch the queue every second and post it with
    ``requests`` (here: connection refused at once). That thread work is part of its real cost.
    """
    import moesifapi.http.requests_client
    from moesifasgi import MoesifMiddleware

    # Keep the benchmark's output clean: it calls logging.basicConfig (a no-op while the root logger
    # has a handler), logs and prints every failed post.
    for name in ("moesifasgi", "moesifapi", "apscheduler", "urllib3"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    moesifapi.http.requests_client.print = lambda *args, **kwargs: None
    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        settings = {"APPLICATION_ID": "bench-dummy-application-id", "BASE_URI": MOESIF_CLOSED_URL, "LOG_BODY": True}
        app: ASGIApp = MoesifMiddleware(starlette_app(), settings=settings)
    finally:
        root.removeHandler(guard)
    # Its scheduler's failed jobs log here, with propagation off: without a handler, Python's last resort prints.
    logging.getLogger("apscheduler.executors.default").addHandler(logging.NullHandler())
    return app


#: The apps served under uvicorn, by ``BENCH_APP`` name.
SERVED: dict[str, Callable[[], ASGIApp]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "billing": lambda: billing_app(InMemoryBackend()),
    "slowapi": slowapi_app,
    "correlation_id": correlation_id_app,
    "moesif": moesif_app,
}


def served() -> ASGIApp:
    """uvicorn's ``--factory`` entry point: the app named by ``BENCH_APP``."""
    return SERVED[os.environ.get("BENCH_APP", "starlette")]()
