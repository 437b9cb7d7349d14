"""An API authenticated by API keys: each key is mapped to its customer before routing, by `from_api_key`.

Clients send `Authorization: Bearer <key>`. The app keeps only the keys' SHA-256 digests (a
leaked table reveals no key) and looks them up asynchronously, as a database query would;
`from_api_key` caches each answer, unknown keys included, for `ttl` seconds, so the store sees one
lookup per key per minute and a revoked key stops working within the minute. The resolver runs in
the middleware, before the app: the same lines meter any ASGI framework (here plain Starlette).

Run it:  uvicorn examples.api_key_app:app --port 8000
         curl -H "Authorization: Bearer key_alice" "localhost:8000/v1/search?q=cats"
Billing: the embedded engine with `plans.toml` beside this file, or the hosted BillingOS API when
BILLINGOS_SECRET_KEY is set.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billingos_asgi import BillingBackend, BillingMiddleware, BillingOS, LocalBilling, from_api_key

PLANS = Path(__file__).with_name("plans.toml")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# The app's own credential store (a table in a real app): key digests -> customer ids.
KEY_DIGESTS = {digest("key_alice"): "user_123", digest("key_bob"): "user_456"}


async def customer_of(authorization: str) -> str | None:
    """The customer of an `Authorization: Bearer <key>` header's key, or None (401)."""
    scheme, _, key = authorization.partition(" ")
    return KEY_DIGESTS.get(digest(key)) if scheme.lower() == "bearer" and key else None


def default_billing() -> BillingBackend:
    if os.environ.get("BILLINGOS_SECRET_KEY"):
        return BillingOS()
    return LocalBilling.from_file(PLANS, os.environ.get("BILLING_DB", ":memory:"))


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def search(request: Request) -> JSONResponse:
    q = request.query_params.get("q", "")
    return JSONResponse({"query": q, "results": [f"result for {q!r}"]})


async def export(request: Request) -> JSONResponse:
    return JSONResponse({"export": "started"})


def create_app(billing: BillingBackend) -> Starlette:
    app = Starlette(
        routes=[Route("/health", health), Route("/v1/search", search), Route("/v1/export", export, methods=["POST"])]
    )
    app.add_middleware(
        BillingMiddleware,
        billing=billing,
        customer=from_api_key(customer_of, header="authorization", ttl=60),
        default_feature="api_calls",  # every route...
        routes={"POST /v1/export": "export"},  # ...but this one, gated by a flag
        exclude=["/health"],  # ...and this one, free
    )
    return app


app = create_app(default_billing())
