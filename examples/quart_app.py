"""A Quart API metered by BillingMiddleware, the customer named by the app's own authentication.

Quart authenticates inside the app (here a `before_request` hook that sets `g.account`), so the
middleware around `app.asgi_app` has no `customer=` resolver: the `Billing` extension's hook,
registered after the app's, names the signed-in account's customer and runs the gate before the
view, and the middleware records the usage of successful responses as for any metered route.

Run it:  hypercorn examples.quart_app:app --bind 127.0.0.1:8000   (or uvicorn examples.quart_app:app)
         curl -H "Authorization: Bearer token-alice" "localhost:8000/v1/search?q=cats"
Billing: the embedded engine with `plans.toml` beside this file, or the hosted BillingOS API when
BILLINGOS_SECRET_KEY is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quart import Quart, Request, g, request

from billingos_asgi import BillingBackend, BillingMiddleware, BillingOS, LocalBilling
from billingos_quart import Billing

PLANS = Path(__file__).with_name("plans.toml")
TOKENS = {"token-alice": "user_123", "token-bob": "user_456"}  # the app's own credentials (a database)


@dataclass(frozen=True)
class Account:
    customer_id: str  # who pays BillingOS for this account's usage


def default_billing() -> BillingBackend:
    if os.environ.get("BILLINGOS_SECRET_KEY"):
        return BillingOS()
    return LocalBilling.from_file(PLANS, os.environ.get("BILLING_DB", ":memory:"))


def customer_of(request: Request) -> str | None:
    account: Account | None = g.get("account")
    return None if account is None else account.customer_id


def create_app(billing: BillingBackend) -> Quart:
    app = Quart(__name__)

    @app.before_request
    async def authenticate() -> None:
        """The app's own authentication (a stand-in): a bearer token names the account."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        customer = TOKENS.get(token) if scheme.lower() == "bearer" else None
        g.account = None if customer is None else Account(customer)

    Billing(app, customer=customer_of)  # after the app's own hooks: they run in order

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/search")
    async def search() -> dict[str, Any]:
        q = request.args.get("q", "")
        return {"query": q, "results": [f"result for {q!r}"]}

    @app.post("/v1/export")
    async def export() -> tuple[dict[str, str], int]:
        return {"export": "started"}, 201

    routes = {"GET /v1/search": "api_calls", "POST /v1/export": "export"}
    middleware = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)
    app.asgi_app = middleware  # type: ignore[assignment,method-assign]
    return app


app = create_app(default_billing())
