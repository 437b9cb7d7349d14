"""A Starlette app whose routes declare their own features, with the usage routes for a front end.

`@metered` sits next to each endpoint; `declared(app)` hands them to the middleware at start-up
(mounts included). The app's own auth puts the customer in `request.state.customer_id`.

Run it:  uvicorn examples.starlette_routes:app --port 8000
         curl -b session=session-alice "localhost:8000/v1/search?q=cats"
         curl -b session=session-alice localhost:8000/billing/usage
Billing: the embedded engine with `plans.toml` beside this file, or the hosted BillingOS API when
BILLINGOS_SECRET_KEY is set.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from billingos_asgi import BillingBackend, BillingMiddleware, BillingOS, LocalBilling, from_state, report_usage
from billingos_starlette import declared, metered, usage_routes

PLANS = Path(__file__).with_name("plans.toml")
SESSIONS = {"session-alice": "user_123", "session-bob": "user_456"}  # the app's own sessions


def default_billing() -> BillingBackend:
    if os.environ.get("BILLINGOS_SECRET_KEY"):
        return BillingOS()
    return LocalBilling.from_file(PLANS, os.environ.get("BILLING_DB", ":memory:"))


class SessionAuth:
    """The app's own authentication (a stand-in): a session cookie names the customer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            session = Request(scope).cookies.get("session", "")
            scope.setdefault("state", {})["customer_id"] = SESSIONS.get(session)
        await self.app(scope, receive, send)


@metered("api_calls")
async def search(request: Request) -> JSONResponse:
    return JSONResponse({"results": [request.query_params.get("q", "")]})


@metered("storage_gb", quantity=None)  # the handler reports what it stored
async def upload(request: Request) -> JSONResponse:
    # Billed by the bytes received, not the client's Content-Length: a chunked upload sends none,
    # and a client may send any. The middleware never reads the body; the handler does.
    size = 0
    async for chunk in request.stream():
        size += len(chunk)  # a real app writes the chunk to its storage here
    gigabytes = round(size / 1e9, 6)  # upstream counts in millionths: a few hundred bytes are free
    if gigabytes:
        report_usage(gigabytes)
    return JSONResponse({"stored": size}, 201)


@metered("export")
async def export(request: Request) -> JSONResponse:
    return JSONResponse({"export": "started"})


def create_app(billing: BillingBackend) -> Starlette:
    customer = from_state("customer_id")
    app = Starlette(
        routes=[
            Mount(
                "/v1",
                routes=[
                    Route("/search", search),
                    Route("/files", upload, methods=["POST"]),
                    Route("/export", export, methods=["POST"]),
                ],
            ),
            usage_routes(billing, customer),
        ]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=customer, routes=declared(app))
    app.add_middleware(SessionAuth)  # added last: runs first, before billing
    return app


app = create_app(default_billing())
