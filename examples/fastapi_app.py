"""A FastAPI API metered with one `add_middleware` line.

Customers authenticate with an API key (`X-API-Key`); every route is metered as `api_calls`
except the health check and the docs, and `/v1/export` is gated by the `export` flag.

Run it:  uvicorn examples.fastapi_app:app --port 8000
         curl -H "X-API-Key: key_alice" "localhost:8000/v1/search?q=cats"
Billing: the embedded engine with `plans.toml` beside this file, or the hosted BillingOS API when
BILLINGOS_SECRET_KEY is set.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI

from billingos_asgi import BillingBackend, BillingMiddleware, BillingOS, LocalBilling, from_api_key

PLANS = Path(__file__).with_name("plans.toml")

# The app's own credential store: API key -> customer id (a database in a real app).
API_KEYS = {"key_alice": "user_123", "key_bob": "user_456"}


def default_billing() -> BillingBackend:
    if os.environ.get("BILLINGOS_SECRET_KEY"):
        return BillingOS()
    return LocalBilling.from_file(PLANS, os.environ.get("BILLING_DB", ":memory:"))


def create_app(billing: BillingBackend) -> FastAPI:
    app = FastAPI(title="Search API")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/search")
    async def search(q: str = "") -> dict[str, object]:
        return {"query": q, "results": [f"result for {q!r}"]}

    @app.post("/v1/export")
    async def export() -> dict[str, str]:
        return {"export": "started"}

    app.add_middleware(
        BillingMiddleware,
        billing=billing,
        customer=from_api_key(API_KEYS.get),
        default_feature="api_calls",
        routes={"POST /v1/export": "export"},  # a flag: gated, not counted
        exclude=["/health", "/docs", "/docs/*", "/redoc", "/openapi.json"],
        upgrade_url="https://example.com/pricing",
    )
    return app


app = create_app(default_billing())
