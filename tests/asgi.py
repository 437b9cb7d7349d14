"""Drive ASGI apps in-process for tests: an httpx client over ASGITransport, inside the app's lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp

from billingos_asgi.testing import lifespan


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, *, with_lifespan: bool = True, **client: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling ``app`` in-process, inside its lifespan."""
    transport = httpx.ASGITransport(app=app)
    async with contextlib.AsyncExitStack() as stack:
        if with_lifespan:
            await stack.enter_async_context(lifespan(app))
        client.setdefault("base_url", "http://app")
        yield await stack.enter_async_context(httpx.AsyncClient(transport=transport, **client))
