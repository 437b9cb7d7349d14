"""An LLM-style FastAPI endpoint billed by the tokens it streamed, reported after it streams.

`metered("tokens", quantity=None)`: the endpoint reports its own units; they are billed once the
last chunk has gone out (a client that disconnects mid-stream is not billed, unless
`bill_partial=True`). Customers authenticate with an API key.

Run it:  uvicorn examples.llm_streaming:app --port 8000
         curl -X POST -H "X-API-Key: key_alice" "localhost:8000/v1/chat?prompt=cats"
Billing: the embedded engine with `llm_plans.toml` beside this file, or the hosted BillingOS API
when BILLINGOS_SECRET_KEY is set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from billingos_asgi import BillingBackend, BillingMiddleware, BillingOS, LocalBilling, from_api_key
from billingos_fastapi import Billing, declared, metered

PLANS = Path(__file__).with_name("llm_plans.toml")
API_KEYS = {"key_alice": "alice", "key_bob": "bob"}


def default_billing() -> BillingBackend:
    if os.environ.get("BILLINGOS_SECRET_KEY"):
        return BillingOS()
    return LocalBilling.from_file(PLANS, os.environ.get("BILLING_DB", ":memory:"))


async def generate(prompt: str) -> AsyncIterator[str]:
    """A stand-in for a model: one token per word of a canned answer."""
    for word in f"You asked about {prompt}. Here is a short answer.".split():
        yield word + " "


def create_app(billing: BillingBackend) -> FastAPI:
    app = FastAPI(title="Chat API")

    @app.post("/v1/chat", dependencies=[metered("tokens", quantity=None)])
    async def chat(prompt: str, billing: Billing) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            async for token in generate(prompt):
                if billing is not None:
                    billing.report(1)  # counted once the response completes
                yield token

        return StreamingResponse(stream(), media_type="text/plain")

    app.add_middleware(BillingMiddleware, billing=billing, customer=from_api_key(API_KEYS.get), routes=declared(app))
    return app


app = create_app(default_billing())
