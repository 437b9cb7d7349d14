"""A metered app for the process-level tests, configured from the environment.

``uvicorn tests.delivery.served_app:app`` (SIGTERM test) or ``python -m tests.delivery.served_app``
(SIGKILL test: drives itself in-process, then waits to be killed). Environment:
``BILLING_URL`` (the BillingOS API), ``OUTBOX`` (optional path), ``FLUSH_INTERVAL`` (seconds).
"""

from __future__ import annotations

import asyncio
import os
import sys

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from billingos_asgi import BillingMiddleware, BillingOS, RetryPolicy
from billingos_asgi.testing import lifespan

SECRET_KEY = "sk_test_local"


def customer(request: Request) -> str | None:
    return request.headers.get("x-customer")  # fine for a test; never trust a client header in production


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


billing = BillingOS(
    secret_key=SECRET_KEY,
    base_url=os.environ["BILLING_URL"],
    timeout=0.5,
    retry=RetryPolicy(max_retries=0),
)
app = BillingMiddleware(
    Starlette(routes=[Route("/hello", hello)]),
    billing=billing,
    customer=customer,
    default_feature="api_calls",
    flush_interval=float(os.environ.get("FLUSH_INTERVAL", "1")),
    drain_timeout=20,
    calls_per_minute=None,
    outbox=os.environ.get("OUTBOX") or None,
)


async def drive_then_wait(requests: int) -> None:
    """Serve ``requests`` metered requests in-process, say READY once all are in the outbox, then hang."""
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for i in range(requests):
                response = await client.get("/hello", headers={"x-customer": f"user_{i % 3}"})
                assert response.status_code == 200, response.text
        outbox = app.tracker.outbox
        assert outbox is not None
        while outbox.size < requests or app.upstream.tracks < 3:  # noqa: ASYNC110 - polling counters
            await asyncio.sleep(0.01)
        print(f"READY {outbox.size} {app.upstream.tracks}", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(drive_then_wait(int(sys.argv[1])))
