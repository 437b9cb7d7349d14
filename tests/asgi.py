"""Drive ASGI apps in-process for tests: a lifespan runner and an httpx client over ASGITransport."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from starlette.types import ASGIApp, Message


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan: startup on entry, shutdown (and the drain) on exit, as a server does."""
    to_app, app_inbox = anyio.create_memory_object_stream[Message](4)
    app_outbox, from_app = anyio.create_memory_object_stream[Message](4)

    async def run() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, app_inbox.receive, app_outbox.send)

    async with anyio.create_task_group() as tg, to_app, from_app, app_inbox, app_outbox:
        tg.start_soon(run)
        await to_app.send({"type": "lifespan.startup"})
        started = await from_app.receive()
        assert started["type"] == "lifespan.startup.complete", started
        try:
            yield
        finally:
            await to_app.send({"type": "lifespan.shutdown"})
            stopped = await from_app.receive()
            assert stopped["type"] == "lifespan.shutdown.complete", stopped


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, *, with_lifespan: bool = True, **client: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling ``app`` in-process, inside its lifespan."""
    transport = httpx.ASGITransport(app=app)
    async with contextlib.AsyncExitStack() as stack:
        if with_lifespan:
            await stack.enter_async_context(lifespan(app))
        yield await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://app", **client))
