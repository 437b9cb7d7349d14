"""Shared pieces of the middleware tests: plans, a header resolver, raw ASGI drivers and small helpers.

Nothing here replaces a part of billingos_asgi: the billing backend is a real ``LocalBilling`` on a
SQLite file (or the real client against the real local server), the apps are real Starlette apps.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Scope

from billingos_asgi import get_usage_context
from billingos_asgi.routes import FoundRoutes, RouteTable

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

CUSTOMER_HEADER = "x-customer"
PROBLEM = "https://docs.billingos.dev/problems/"

# free: counted quotas; pro: unlimited quotas and the export flag, but no storage; q37: a quota of 37.
PLANS: dict[str, Any] = {
    "features": {
        "api_calls": {"title": "API calls", "type": "usage_quota"},
        "storage_gb": {"title": "Storage", "type": "usage_quota"},
        "tokens": {"title": "Tokens", "type": "usage_quota"},
        "export": {"title": "Data export", "type": "boolean_flag"},
        "seats": {"title": "Seats", "type": "numeric_limit"},
    },
    "plans": {
        "free": {"name": "Free", "features": {"api_calls": 10, "storage_gb": 1.5, "tokens": 100, "seats": 1}},
        "pro": {
            "name": "Pro",
            "features": {"api_calls": "unlimited", "tokens": "unlimited", "export": True, "seats": 10},
        },
        "q37": {"name": "Thirty-seven", "features": {"api_calls": 37}},
    },
    "customers": {"user_free": "free", "user_pro": "pro", "user_37": "q37", "user_cancelled": "free"},
}


def by_header(request: Request) -> str | None:
    """The customer the test names in a header (fine for tests, never for production)."""
    return request.headers.get(CUSTOMER_HEADER)


def as_customer(customer: str, **extra: str) -> dict[str, str]:
    return {CUSTOMER_HEADER: customer, **extra}


async def concurrent_statuses(
    client: httpx.AsyncClient, count: int, headers: dict[str, str], path: str = "/x"
) -> list[int]:
    """The statuses of ``count`` GET requests sent at once."""
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await client.get(path, headers=headers)).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return statuses


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def raw_http(base_url: str, request: bytes) -> bytes:
    """Send ``request`` byte for byte on a new connection to ``base_url`` and read until the server
    closes it (ask for ``Connection: close``): for requests an HTTP client will not make."""
    url = urlsplit(base_url)
    assert url.hostname is not None and url.port is not None, base_url
    received = b""
    async with await anyio.connect_tcp(url.hostname, url.port) as stream:
        await stream.send(request)
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                received += await stream.receive()
    return received


def seconds_until(moment: float, start: float, end: float) -> tuple[int, int]:
    """Bounds of ``ceil(moment - now)`` for a ``now`` between ``start`` and ``end``."""
    return math.ceil(moment - end), math.ceil(moment - start)


def now() -> float:
    return time.time()


# -- raw ASGI ------------------------------------------------------------------------------------


def http_scope(
    path: str,
    *,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    query: bytes = b"",
    spec_version: str | None = None,
    extensions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    asgi: dict[str, str] = {"version": "3.0"}
    if spec_version is not None:
        asgi["spec_version"] = spec_version
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": asgi,
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"app"), *((k.lower().encode(), v.encode()) for k, v in headers)],
        "client": ("127.0.0.1", 50000),
        "server": ("app", 80),
        "state": {},
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


@dataclass
class RawExchange:
    """Every message an app sent for one raw HTTP request."""

    messages: list[Message] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.messages
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(bytes(k), bytes(v)) for k, v in self.start.get("headers", [])]

    def header(self, name: str) -> str | None:
        found = [v.decode() for k, v in self.headers if k.lower() == name.lower().encode()]
        assert len(found) <= 1, found
        return found[0] if found else None

    @property
    def chunks(self) -> list[bytes]:
        return [bytes(m.get("body", b"")) for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def complete(self) -> bool:
        bodies = [m for m in self.messages if m["type"] == "http.response.body"]
        return bool(bodies) and not bodies[-1].get("more_body", False)


def unwrapped(error: BaseException | None) -> BaseException | None:
    """``error``, or the one exception of a group of one: Starlette before 0.46 runs a streaming
    response in a task group, which wraps what the stream (or a ``send``) raised in a group."""
    if isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        return error.exceptions[0]
    return error


OnSend = Callable[[Message], Awaitable[None]]


async def call_raw(
    app: ASGIApp,
    scope: dict[str, Any],
    *,
    disconnect_after_chunks: int | None = None,
    raise_on_chunk: int | None = None,
    on_send: OnSend | None = None,
    yield_in_last_send: bool = False,
    cancellable_last_send: bool = False,
) -> RawExchange:
    """Run one HTTP request through ``app`` with hand-made ``receive`` / ``send``.

    ``receive`` hands out the (empty) request body, then waits: it answers ``http.disconnect``
    once the response is complete (as servers do), or once ``disconnect_after_chunks`` body
    chunks have been sent (a client going away mid-body). ``raise_on_chunk``: ``send`` raises
    ``OSError`` on that body chunk (1-based), as an ASGI 2.4 server does for a vanished client.
    ``on_send`` sees every message before it is recorded. ``yield_in_last_send``: the last send
    yields once it has the bytes, and the client, served, closes meanwhile (Hypercorn does, on a
    ``Connection: close``); ``cancellable_last_send``: that yield is not shielded, so the app's
    disconnect listener cancels the send (Hypercorn under trio). An exception the app raises is
    kept in ``error`` rather than raised.
    """
    exchange = RawExchange()
    gone = anyio.Event()
    request_sent = False
    body_chunks = 0

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal body_chunks
        if gone.is_set() and disconnect_after_chunks is not None:
            raise OSError("client went away")  # what a server does when sending to a vanished client
        if message["type"] == "http.response.body":
            body_chunks += 1
            if raise_on_chunk is not None and body_chunks >= raise_on_chunk:
                raise OSError("client went away")
        if on_send is not None:
            await on_send(message)
        exchange.messages.append(message)
        if message["type"] == "http.response.body":
            if not message.get("more_body", False):
                gone.set()
                if yield_in_last_send:
                    with anyio.CancelScope(shield=not cancellable_last_send):  # the bytes are the server's
                        for _ in range(3):
                            await anyio.lowlevel.checkpoint()
            elif disconnect_after_chunks is not None and body_chunks >= disconnect_after_chunks:
                gone.set()

    try:
        await app(scope, receive, send)
    except Exception as exc:  # noqa: BLE001 - kept for the test to inspect
        exchange.error = exc
    return exchange


async def websocket_echo_session(app: ASGIApp, texts: Sequence[str]) -> list[Message]:
    """Connect to ``/ws``, send ``texts``, disconnect; return every message the app sent."""
    sent: list[Message] = []
    inbox: list[Message] = [{"type": "websocket.connect"}]
    inbox += [{"type": "websocket.receive", "text": text} for text in texts]
    inbox.append({"type": "websocket.disconnect", "code": 1000})
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"app"), (CUSTOMER_HEADER.encode(), b"user_free")],
        "client": ("127.0.0.1", 50000),
        "server": ("app", 80),
        "subprotocols": [],
        "state": {},
    }

    async def receive() -> Message:
        if inbox:
            return inbox.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent


def fast_and_slow(gate: anyio.Event) -> Starlette:
    """``/fast`` answers at once, ``/slow`` once ``gate`` is set (a request kept running meanwhile)."""

    async def fast(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def slow(request: Request) -> PlainTextResponse:
        await gate.wait()
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/fast", fast), Route("/slow", slow)])


def recording_app(calls: list[str]) -> ASGIApp:
    """A Starlette app answering every path and method, noting each call it handles in ``calls``."""

    async def endpoint(request: Request) -> JSONResponse:
        calls.append(f"{request.method} {request.url.path}")
        context = get_usage_context(request)
        return JSONResponse(
            {"path": request.url.path, "request_id": None if context is None else context.request_id},
            headers={"x-app": "yes"},
        )

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])])


#: A route of a random app: its template, its methods (None: the framework's default), its feature if metered.
RouteSpec = tuple[str, list[str] | None, str | None]
#: Path segments, a parameter's name left to fill in (a template names each parameter once).
SEGMENTS = ["a", "b", "7", "0.5", "items", "{{p{}}}", "{{p{}:int}}", "{{p{}:float}}", "{{p{}:uuid}}", "f-{{p{}}}.txt"]
PARAMETER = re.compile(r"{[^}]*}")
REQUESTED = ["a", "b", "7", "0.5", "items", "x", "7/8", "f-1.txt", "00000000-0000-0000-0000-000000000000"]


async def sweep(
    rng: random.Random,
    methods: Sequence[list[str] | None],
    build: Callable[[list[RouteSpec]], tuple[Mapping[str, Any], ASGIApp]],
    apps: int = 1_000,
) -> int:
    """Build ``apps`` random apps of up to five routes on overlapping templates (``build``: the
    table found on the routes, and the app's router), and check that for every request the app
    serves, the table names the feature of the route that serves it. The number checked."""
    checked = 0
    for _ in range(apps):
        specs: list[RouteSpec] = []
        for index in range(rng.randint(1, 5)):
            path = "/" + "/".join(rng.choice(SEGMENTS).format(at) for at in range(rng.randint(1, 3)))
            if rng.random() < 0.2:
                path += "/{rest:path}"
            elif rng.random() < 0.15:  # another path than without the slash, to the app's router
                path += "/"
            specs.append((path, rng.choice(methods), rng.choice([None, f"feature{index}"])))
        try:
            found, router = build(specs)
            table = RouteTable(found, exact_paths=isinstance(found, FoundRoutes))  # (as the middleware builds it)
        except ValueError:  # a template declared twice with different features: refused, by design
            continue
        for _ in range(12):
            method = rng.choice(["GET", "POST", "HEAD"])
            if rng.random() < 0.5:  # one of a route's own paths, its parameters given any value
                path = PARAMETER.sub(lambda _: rng.choice(REQUESTED), rng.choice(specs)[0])
            else:
                path = "/" + "/".join(rng.choice(REQUESTED) for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.2:  # its slash variants: the app routes each as requested
                path = rng.choice([path + "/", path.rstrip("/") or "/", "/" + path])
            name = await served_by(router, method, path)
            if name is None:
                continue
            metered_as = table.match(method, path)
            assert (metered_as.feature if metered_as else None) == specs[int(name[5:])][2], (method, path, specs)
            checked += 1
    return checked


def answer(index: int) -> Callable[[Request], Awaitable[PlainTextResponse]]:
    """An endpoint answering its route's name (taking the request alone: FastAPI reads a signature)."""

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"route{index}")

    return endpoint


async def served_by(router: ASGIApp, method: str, path: str) -> str | None:
    """The route that serves the request (its name, "route<n>"), as the app routes it; None: no route does."""
    scope: Scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": [], "query_string": b""}
    scope["state"] = {"billing": None}  # let through unmetered, as if excluded: no middleware runs here
    answer: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        answer.append(message)

    await router(scope, receive, send)
    body = b"".join(message.get("body", b"") for message in answer).decode()
    return body if answer[0]["status"] == 200 else None
