"""Helpers for testing (and benchmarking) ASGI apps that use the middleware, without a server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import anyio
from starlette.types import ASGIApp, Message

from .local import LocalBilling

__all__ = ["assert_recorded", "lifespan"]


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan as a server does: startup on entry, shutdown (and the usage drain) on exit."""
    to_app, app_inbox = anyio.create_memory_object_stream[Message](4)
    app_outbox, from_app = anyio.create_memory_object_stream[Message](4)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

    async def run() -> None:
        await app(scope, app_inbox.receive, app_outbox.send)

    async with anyio.create_task_group() as tg, to_app, from_app, app_inbox, app_outbox:
        tg.start_soon(run)
        await to_app.send({"type": "lifespan.startup"})
        started = await from_app.receive()
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app's lifespan startup failed: {started}")
        try:
            yield
        finally:
            await to_app.send({"type": "lifespan.shutdown"})
            stopped = await from_app.receive()
            if stopped["type"] != "lifespan.shutdown.complete":
                raise RuntimeError(f"the app's lifespan shutdown failed: {stopped}")


async def assert_recorded(billing: LocalBilling, customer_id: str, expected: Mapping[str, float]) -> None:
    """Assert the units recorded for ``customer_id``, by feature (run it after the lifespan has drained)."""
    recorded = {feature: await billing.recorded_units(customer_id, feature) for feature in expected}
    wrong = {f: (recorded[f], units) for f, units in expected.items() if abs(recorded[f] - units) > 1e-9}
    if wrong:
        details = ", ".join(f"{f}: recorded {got:g}, expected {want:g}" for f, (got, want) in wrong.items())
        raise AssertionError(f"usage of {customer_id!r}: {details}")
