"""A Litestar API metered by BillingMiddleware, the customer named by Litestar's own authentication.

Litestar authenticates inside the app (its auth middleware runs after routing and sets
`connection.user`), so the middleware has no `customer=` resolver: `BillingPlugin`'s guard names
the signed-in account's customer once auth has run, before the handler, and the middleware records
the usage of successful responses as for any metered route.

Run it:  uvicorn examples.litestar_app:app --port 8000
         curl -H "Authorization: Bearer token-alice" "localhost:8000/v1/search?q=cats"
Billing: the embedded engine with `plans.toml` beside this file, or the hosted BillingOS API when
BILLINGOS_SECRET_KEY is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware

from billingos_asgi import BillingBackend, BillingMiddleware, BillingOS, LocalBilling
from billingos_litestar import BillingPlugin

PLANS = Path(__file__).with_name("plans.toml")
TOKENS = {"token-alice": "user_123", "token-bob": "user_456"}  # the app's own credentials (a database)


@dataclass(frozen=True)
class Account:
    customer_id: str  # who pays BillingOS for this account's usage


class TokenAuth(AbstractAuthenticationMiddleware):
    """The app's own authentication (a stand-in): a bearer token names the account."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        customer = TOKENS.get(token) if scheme.lower() == "bearer" else None
        if customer is None:
            raise NotAuthorizedException("a valid bearer token is required")
        return AuthenticationResult(user=Account(customer), auth=token)


def default_billing() -> BillingBackend:
    if os.environ.get("BILLINGOS_SECRET_KEY"):
        return BillingOS()
    return LocalBilling.from_file(PLANS, os.environ.get("BILLING_DB", ":memory:"))


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/v1/search")
async def search(request: Request[Account, str, Any]) -> dict[str, Any]:
    q = request.query_params.get("q", "")
    return {"query": q, "results": [f"result for {q!r}"]}


@post("/v1/export")
async def export() -> dict[str, str]:
    return {"export": "started"}


def create_app(billing: BillingBackend) -> BillingMiddleware:
    app = Litestar(
        route_handlers=[health, search, export],
        middleware=[DefineMiddleware(TokenAuth, exclude=["/health"])],
        plugins=[BillingPlugin(customer=lambda connection: connection.user.customer_id)],
    )
    routes = {"GET /v1/search": "api_calls", "POST /v1/export": "export"}
    return BillingMiddleware(app, billing=billing, customer=None, routes=routes)


app = create_app(default_billing())
