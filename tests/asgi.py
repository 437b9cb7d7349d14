"""Drive ASGI apps in-process for tests: an httpx client over ASGITransport, inside the app's lifespan,
or a client's side scripted message by message."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Send

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


def scripted(incoming: list[Message]) -> tuple[Receive, Send, list[Message]]:
    """A client's side of one request: ``receive`` hands out ``incoming`` in turn, then a disconnect;
    ``send`` keeps what the app sent, in the list returned with them."""
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    return receive, send, sent
