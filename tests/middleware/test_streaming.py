"""Streaming bodies: billed once, after the last chunk; an aborted response is not billed (or partly, on request).

Most tests drive the raw ASGI app with hand-made ``receive`` / ``send`` so that the moment of
billing can be observed chunk by chunk, and a client disconnect placed exactly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billingos_asgi import BillingMiddleware, LocalBilling, Metered, report_usage
from billingos_asgi.testing import lifespan
from tests.asgi import scripted, serve

from .support import CUSTOMER_HEADER, by_header, call_raw, http_scope, unwrapped

FREE = [(CUSTOMER_HEADER, "user_free")]


def stream_endpoint(
    *, stall_after_first: bool = False, report: float = 0, fail_after_first: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    """Three chunks; optionally reporting units first, stalling or failing after chunk one."""

    async def chunks() -> AsyncIterator[bytes]:
        if report:
            report_usage(report)
        yield b"first;"
        if stall_after_first:
            await anyio.sleep_forever()  # only a disconnect (cancellation) ends this stream
        if fail_after_first:
            raise RuntimeError("generator failed")
        yield b"second;"
        yield b"third"

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), media_type="text/plain")

    return stream


def streaming_app(**options: Any) -> Starlette:
    return Starlette(routes=[Route("/stream", stream_endpoint(**options))])


def metered_stream(billing: LocalBilling, metered: str | Metered, **options: Any) -> BillingMiddleware:
    """:func:`streaming_app` with ``/stream`` metered as ``metered``, the customer named by header."""
    return BillingMiddleware(streaming_app(**options), billing=billing, customer=by_header, routes={"/stream": metered})


async def test_streaming_response_is_billed_once_after_its_last_chunk(billing: LocalBilling) -> None:
    middleware = metered_stream(billing, "api_calls")
    observed: list[tuple[bool, int, float]] = []

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            units = await billing.recorded_units("user_free", "api_calls")
            observed.append((message.get("more_body", False), middleware.tracker.stats.queued, units))

    async with lifespan(middleware):
        exchange = await call_raw(middleware, http_scope("/stream", headers=FREE), on_send=on_send)
        queued_after = middleware.tracker.stats.queued
    assert exchange.error is None
    assert exchange.status == 200 and exchange.complete and exchange.body == b"first;second;third"
    assert exchange.header("x-request-id")
    # Nothing was queued or recorded while any chunk, the last one included, was being sent.
    assert observed == [(True, 0, 0), (True, 0, 0), (True, 0, 0), (False, 0, 0)]
    assert queued_after == 1
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_streaming_response_through_httpx_is_billed_once(billing: LocalBilling) -> None:
    middleware = metered_stream(billing, Metered("tokens", quantity=1), report=3)
    async with serve(middleware) as client:
        async with client.stream("GET", "/stream", headers={CUSTOMER_HEADER: "user_free"}) as response:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert response.status_code == 200 and body == b"first;second;third"
    assert await billing.recorded_units("user_free", "tokens") == 4  # 1 fixed + 3 reported
    assert middleware.tracker.stats.queued == 1


@pytest.mark.parametrize(
    ("metered", "feature", "billed"),
    [
        (Metered("api_calls"), "api_calls", 0),
        (Metered("tokens", quantity=None), "tokens", 0),
        (Metered("tokens", quantity=None, bill_partial=True), "tokens", 5),
        (Metered("tokens", quantity=2, bill_partial=True), "tokens", 5),
    ],
    ids=["fixed", "reported", "reported-partial", "fixed-and-reported-partial"],
)
async def test_client_disconnect_mid_stream(
    billing: LocalBilling, metered: Metered, feature: str, billed: float
) -> None:
    """The client goes away after the first chunk: ``receive`` answers ``http.disconnect`` (ASGI < 2.4)."""
    middleware = metered_stream(billing, metered, stall_after_first=True, report=5)
    async with lifespan(middleware):
        with anyio.fail_after(10):
            exchange = await call_raw(middleware, http_scope("/stream", headers=FREE), disconnect_after_chunks=1)
    assert exchange.error is None
    assert exchange.status == 200 and not exchange.complete and exchange.body == b"first;"
    assert await billing.recorded_units("user_free", feature) == billed
    assert middleware.tracker.stats.queued == (1 if billed else 0)


@pytest.mark.parametrize("cancellable", [False, True], ids=["asyncio", "trio"])
async def test_a_client_closing_once_served_while_the_last_send_yields_is_billed(
    billing: LocalBilling, cancellable: bool
) -> None:
    """Hypercorn's last send yields after taking the bytes; a client that closes its connection
    then (``Connection: close``) was served in full, and Starlette's disconnect listener sees it
    (under trio it cancels that send: the bytes stay sent)."""
    middleware = metered_stream(billing, Metered("tokens", quantity=1), report=5)
    async with lifespan(middleware):
        with anyio.fail_after(10):
            exchange = await call_raw(
                middleware,
                http_scope("/stream", headers=FREE),
                yield_in_last_send=True,
                cancellable_last_send=cancellable,
            )
    assert exchange.error is None and exchange.status == 200 and exchange.complete
    assert await billing.recorded_units("user_free", "tokens") == 6


def sized_stream_app(status: int = 200, *, pause_at_end: bool = False) -> Starlette:
    """``/sized``: three chunks of 10 bytes under ``Content-Length: 30``; ``/stall``: one chunk, then
    nothing until a disconnect. ``pause_at_end``: a pause after the last chunk, before the app's
    last (empty) message."""

    async def sized(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"0123456789"
            if pause_at_end:
                await anyio.sleep(0.05)

        return StreamingResponse(chunks(), headers={"content-length": "30"})

    async def stall(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b""
            await anyio.sleep_forever()  # a server that sends no body ends it through a disconnect
            yield b""

        return StreamingResponse(chunks(), status_code=status)

    return Starlette(routes=[Route("/sized", sized), Route("/stall", stall, methods=["GET", "HEAD"])])


@pytest.mark.parametrize(
    ("spec_version", "after", "billed"),
    [("2.0", 3, 1), ("2.4", 3, 1), ("2.0", 2, 0), ("2.4", 2, 0)],
    ids=["listened-served", "raised-served", "listened-cut-short", "raised-cut-short"],
)
async def test_a_client_leaving_with_every_byte_of_its_content_length_is_billed(
    billing: LocalBilling, spec_version: str, after: int, billed: float
) -> None:
    """Starlette's StreamingResponse ends with an empty last message; a client that has every byte
    of the declared length may close before it (curl, an HTTP/1.0 proxy): it was served in full,
    whether the app hears of it by ``http.disconnect`` or by a last send that raises."""
    middleware = BillingMiddleware(
        sized_stream_app(pause_at_end=spec_version == "2.0"),
        billing=billing,
        customer=by_header,
        routes={"/sized": "api_calls"},
    )
    scope = http_scope("/sized", headers=FREE, spec_version=spec_version)
    async with lifespan(middleware):
        with anyio.fail_after(10):
            exchange = await call_raw(middleware, scope, disconnect_after_chunks=after)
    assert exchange.status == 200 and exchange.body == b"0123456789" * after and not exchange.complete
    assert await billing.recorded_units("user_free", "api_calls") == billed


@pytest.mark.parametrize("length", ["\u00b2", "1" * 5_000, "-2", "2 "])
async def test_a_content_length_int_cannot_read_is_no_crash_and_not_served_in_full(
    billing: LocalBilling, length: str
) -> None:
    """An app's Content-Length of a digit ``int()`` refuses ("²"), or more digits than it reads: the
    client leaving mid-body is a client leaving, not a ValueError raised into the app."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", length.encode("latin-1"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        await receive()
        await receive()

    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes={"/x": "api_calls"})
    async with lifespan(middleware):
        with anyio.fail_after(10):
            exchange = await call_raw(middleware, http_scope("/x", headers=FREE), disconnect_after_chunks=1)
    assert exchange.error is None and exchange.status == 200
    assert await billing.recorded_units("user_free", "api_calls") == 0


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
async def test_a_response_without_a_body_is_billed_once_its_headers_are_out(
    billing: LocalBilling, method: str, status: int
) -> None:
    """A server sends no body for HEAD, 204 or 304: once the headers are out the client is served,
    and may close (Granian even ends the app there) before a streaming app's last message."""
    middleware = BillingMiddleware(
        sized_stream_app(status), billing=billing, customer=by_header, routes={"/stall": "api_calls"}
    )
    async with lifespan(middleware):
        with anyio.fail_after(10):
            exchange = await call_raw(
                middleware, http_scope("/stall", method=method, headers=FREE), disconnect_after_chunks=1
            )
    assert exchange.error is None and exchange.status == status and not exchange.complete
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_aborted_streams_release_their_reserved_units(billing: LocalBilling) -> None:
    app = Starlette(
        routes=[Route("/stall", stream_endpoint(stall_after_first=True)), Route("/stream", stream_endpoint())]
    )
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, default_feature="api_calls")
    async with lifespan(middleware):
        for _ in range(10):
            with anyio.fail_after(10):
                aborted = await call_raw(middleware, http_scope("/stall", headers=FREE), disconnect_after_chunks=1)
            assert aborted.status == 200 and not aborted.complete
        # Ten aborted requests left the quota of ten whole.
        statuses = [(await call_raw(middleware, http_scope("/stream", headers=FREE))).status for _ in range(11)]
    assert statuses == [200] * 10 + [429]
    assert await billing.recorded_units("user_free", "api_calls") == 10


@pytest.mark.parametrize(("bill_partial", "billed"), [(False, 0), (True, 5)])
async def test_client_disconnect_seen_as_oserror_on_send(
    billing: LocalBilling, bill_partial: bool, billed: float
) -> None:
    """ASGI spec 2.4: a server raises ``OSError`` from ``send`` once the client is gone, and Starlette's
    ``StreamingResponse`` turns it into ``ClientDisconnect``. With ``bill_partial=True`` the units
    reported before the disconnect must still be billed (SPEC section 5, streaming)."""
    middleware = metered_stream(billing, Metered("tokens", quantity=None, bill_partial=bill_partial), report=5)
    async with lifespan(middleware):
        exchange = await call_raw(middleware, http_scope("/stream", headers=FREE, spec_version="2.4"), raise_on_chunk=2)
    assert isinstance(exchange.error, ClientDisconnect)
    assert exchange.status == 200 and exchange.body == b"first;"
    assert await billing.recorded_units("user_free", "tokens") == billed


@pytest.mark.parametrize("installed", ["add_middleware", "around the app"])
async def test_an_upload_the_client_aborts_and_the_app_fails_on_is_not_billed_partially(
    billing: LocalBilling, installed: str
) -> None:
    """The client leaves mid-upload: Starlette raises ClientDisconnect before any answer. With the
    middleware inside the app's error layer it saw the failure unanswered, and billed what the
    endpoint reported (around the app it saw the 500 the layer sent, and did not)."""

    async def upload(request: Request) -> PlainTextResponse:
        async for _ in request.stream():
            report_usage(0.25)  # stored chunk by chunk
        return PlainTextResponse("stored")

    options: dict[str, Any] = {
        "billing": billing,
        "customer": by_header,
        "routes": {"POST /up": Metered("storage_gb", quantity=None, bill_partial=True)},
    }
    app: Any = Starlette(routes=[Route("/up", upload, methods=["POST"])])
    if installed == "add_middleware":
        app.add_middleware(BillingMiddleware, **options)
    else:
        app = BillingMiddleware(app, **options)
    receive, send, sent = scripted(
        [
            {"type": "http.request", "body": b"x", "more_body": True},
            {"type": "http.request", "body": b"y", "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    async with lifespan(app):
        with pytest.raises(ClientDisconnect):
            await app(http_scope("/up", method="POST", headers=FREE), receive, send)
    assert sent[0]["status"] == 500
    assert await billing.recorded_units("user_free", "storage_gb") == 0


async def test_a_last_chunk_the_server_could_not_send_is_not_billed(billing: LocalBilling) -> None:
    """ASGI 2.4: the send of the last chunk raises (the client went away as it was sent): the
    response did not complete, so nothing is billed and its units are released."""
    middleware = metered_stream(billing, Metered("tokens", quantity=95), report=5)
    async with lifespan(middleware):
        # Chunks 1-3 carry the body; the 4th, empty, closes it.
        failed = await call_raw(middleware, http_scope("/stream", headers=FREE, spec_version="2.4"), raise_on_chunk=4)
        served = await call_raw(middleware, http_scope("/stream", headers=FREE))  # 100 tokens: needs all of them
    assert isinstance(failed.error, ClientDisconnect) and failed.body == b"first;second;third"
    assert served.error is None and served.status == 200 and served.complete
    assert await billing.recorded_units("user_free", "tokens") == 100
    assert middleware.tracker.stats.queued == 1


async def test_a_body_finished_after_the_client_left_is_not_billed(billing: LocalBilling) -> None:
    """ASGI < 2.4: once the client is gone a server's ``send`` does nothing (uvicorn's). An app
    that hears the ``http.disconnect`` and still finishes its body has not served anyone."""

    async def finishes_anyway(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan: the middleware answers it
        await receive()  # the request body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first;", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.body", "body": b"rest", "more_body": False})

    middleware = BillingMiddleware(finishes_anyway, billing=billing, customer=by_header, default_feature="api_calls")
    delivered: list[Message] = []
    inbox: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        if not inbox:  # the client is gone: the bytes go nowhere
            return
        delivered.append(message)

    async with lifespan(middleware):
        await middleware(http_scope("/export", headers=FREE), receive, send)
    assert [m["type"] for m in delivered] == ["http.response.start", "http.response.body"]
    assert await billing.recorded_units("user_free", "api_calls") == 0
    assert middleware.tracker.stats.queued == 0


async def test_a_slash_redirect_the_client_left_once_served_is_not_billed(billing: LocalBilling) -> None:
    """A redirect to the canonical path whose (empty) Content-Length is out has served its client,
    which may close before the app's last message: still the framework's redirect, not billed."""

    async def redirects(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan: the middleware answers it
        await receive()  # the request body
        headers = [(b"location", b"http://app/export"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 307, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"  # the server stops the app there

    middleware = BillingMiddleware(redirects, billing=billing, customer=by_header, default_feature="api_calls")
    inbox: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        pass

    async with lifespan(middleware):
        await middleware(http_scope("/export/", headers=FREE), receive, send)
    assert middleware.tracker.stats.queued == 0


def waiting_client() -> tuple[Receive, anyio.Event]:
    """The request, then an ``http.disconnect`` once the returned event is set (the client closes)."""
    inbox: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]
    gone = anyio.Event()

    async def receive() -> Message:
        if inbox:
            return inbox.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive, gone


def is_last(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


async def test_a_last_send_cancelled_while_the_client_waits_is_not_billed(billing: LocalBilling) -> None:
    """Cancelled by something else than the client's close (a server's timeout), the last send may
    not have sent its bytes: the response did not complete."""
    middleware = metered_stream(billing, "api_calls")
    receive, _ = waiting_client()
    async with lifespan(middleware):
        with anyio.CancelScope() as timeout:

            async def send(message: Message) -> None:
                if is_last(message):
                    timeout.cancel()
                    await anyio.lowlevel.checkpoint()

            await middleware(http_scope("/stream", headers=FREE), receive, send)
    assert timeout.cancelled_caught and middleware.tracker.stats.queued == 0


async def test_a_last_send_failing_after_the_client_closed_is_not_billed(billing: LocalBilling) -> None:
    """The client closes as the last chunk goes (the app's disconnect listener hears it), and the
    server cannot send it: an error, not the cancellation of a send whose bytes were the server's."""
    middleware = metered_stream(billing, "api_calls")
    receive, gone = waiting_client()

    async def send(message: Message) -> None:
        if is_last(message):
            gone.set()
            with anyio.CancelScope(shield=True):
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
            raise OSError("the client closed before the last bytes left")

    async with lifespan(middleware):
        # (Starlette before 0.46 streams in a task group, which wraps the error in a group of one.)
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="last bytes"), allow_unwrapped=True):
            await middleware(http_scope("/stream", headers=FREE), receive, send)
    assert middleware.tracker.stats.queued == 0


@pytest.mark.parametrize("bill_partial", [False, True])
async def test_stream_that_fails_mid_body_is_not_billed(billing: LocalBilling, bill_partial: bool) -> None:
    """``bill_partial`` keeps what a client's disconnect cut short; an app that fails is not billed at all."""
    middleware = metered_stream(
        billing, Metered("tokens", quantity=1, bill_partial=bill_partial), fail_after_first=True, report=5
    )
    async with lifespan(middleware):
        exchange = await call_raw(middleware, http_scope("/stream", headers=FREE))
    error = unwrapped(exchange.error)
    assert isinstance(error, RuntimeError) and str(error) == "generator failed"
    assert not exchange.complete
    assert await billing.recorded_units("user_free", "tokens") == 0
    assert middleware.tracker.stats.queued == 0


@pytest.mark.parametrize("answered", [True, False], ids=["mid-body", "before-answering"])
async def test_an_apps_own_oserror_is_a_failure_not_a_disconnect_under_bill_partial(
    billing: LocalBilling, answered: bool
) -> None:
    """Its backend's timeout (``TimeoutError``, an ``OSError`` as servers raise for a client gone)
    was taken for a disconnect: with ``bill_partial=True`` the units reported were billed, of a
    request answered 500 even (installed with ``add_middleware``, inside the error middleware)."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first tokens;"
        with anyio.fail_after(0.01):  # the model's backend hangs
            await anyio.sleep(1)
        yield b"never"

    async def llm(request: Request) -> Response:
        report_usage(40)
        if not answered:
            with anyio.fail_after(0.01):
                await anyio.sleep(1)
        return StreamingResponse(chunks())

    app = Starlette(routes=[Route("/llm", llm)])
    app.add_middleware(
        BillingMiddleware,
        billing=billing,
        customer=by_header,
        routes={"/llm": Metered("tokens", quantity=None, bill_partial=True)},
    )
    async with lifespan(app):
        exchange = await call_raw(app, http_scope("/llm", headers=FREE))
    assert isinstance(unwrapped(exchange.error), TimeoutError)
    assert exchange.status == (200 if answered else 500) and not (answered and exchange.complete)
    assert await billing.recorded_units("user_free", "tokens") == 0


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("client_left", [False, True], ids=["answered", "client-left-mid-body"])
async def test_an_error_answer_is_not_billed_even_with_bill_partial(
    billing: LocalBilling, status: int, client_left: bool
) -> None:
    """``bill_partial`` keeps what a client's disconnect cut short of a successful answer; an answer
    >= 400 is never billed (SPEC section 5), whether it completes or its client leaves mid-body."""

    async def chunks() -> AsyncIterator[bytes]:
        report_usage(5)
        yield b"error;"
        yield b"details"

    async def failing(request: Request) -> Response:
        return StreamingResponse(chunks(), status_code=status)

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/stream", failing)]),
        billing=billing,
        customer=by_header,
        routes={"/stream": Metered("tokens", quantity=None, bill_partial=True)},
    )
    scope = http_scope("/stream", headers=FREE, spec_version="2.4")
    async with lifespan(middleware):
        exchange = await call_raw(middleware, scope, raise_on_chunk=2 if client_left else None)
    assert exchange.status == status and exchange.complete is not client_left
    assert middleware.tracker.stats.queued == 0
    assert await billing.recorded_units("user_free", "tokens") == 0
    assert middleware.cache.get("user_free", "tokens").local == 0  # type: ignore[union-attr]


async def test_file_response_sent_with_pathsend_is_billed(billing: LocalBilling, tmp_path: Path) -> None:
    """With the ``http.response.pathsend`` extension (zero-copy file sending, e.g. under Granian),
    Starlette's FileResponse completes its body with one ``http.response.pathsend`` message instead of
    ``http.response.body``. That is a complete, successful response and must be billed once."""
    report = tmp_path / "report.csv"
    report.write_bytes(b"a,b\n1,2\n")

    async def download(request: Request) -> Response:
        return FileResponse(report)

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/report.csv", download)]),
        billing=billing,
        customer=by_header,
        routes={"/report.csv": "api_calls"},
    )
    scope = http_scope("/report.csv", headers=FREE, extensions={"http.response.pathsend": {}})
    async with lifespan(middleware):
        exchange = await call_raw(middleware, scope)
    assert exchange.error is None and exchange.status == 200
    if exchange.messages[-1]["type"] == "http.response.body":  # (Starlette's FileResponse sends pathsend since 0.46)
        pytest.skip("this Starlette's FileResponse does not use http.response.pathsend")
    assert [m["type"] for m in exchange.messages] == ["http.response.start", "http.response.pathsend"]
    assert exchange.messages[1]["path"] == str(report)
    assert await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize("more", [False, True], ids=["complete", "cut-short"])
async def test_a_body_sent_with_zerocopysend_is_billed_once_complete(billing: LocalBilling, more: bool) -> None:
    """``http.response.zerocopysend`` carries the body from a file descriptor, with ``more_body`` as
    ``http.response.body`` has it: its last message completes the response."""

    async def from_a_file(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan: the middleware answers it
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.zerocopysend", "file": 0, "count": 5, "more_body": more})

    middleware = BillingMiddleware(from_a_file, billing=billing, customer=by_header, default_feature="api_calls")
    scope = http_scope("/export", headers=FREE, extensions={"http.response.zerocopysend": {}})
    async with lifespan(middleware):
        exchange = await call_raw(middleware, scope)
    assert exchange.error is None and exchange.status == 200
    assert await billing.recorded_units("user_free", "api_calls") == (0 if more else 1)


# -- the app's messages, as the ASGI spec allows them --

START: Message = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
BODY: Message = {"type": "http.response.body", "body": b"ok"}


async def test_a_start_message_the_app_sends_again_is_left_as_it_was(billing: LocalBilling) -> None:
    """A raw app's constant start message: the headers added to one answer went into it, and so into
    every later answer, another customer's request id and quota into a free route's."""

    async def constant(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send(START)
            await send(BODY)

    middleware = BillingMiddleware(constant, billing=billing, customer=by_header, routes={"/metered": "api_calls"})
    async with lifespan(middleware):
        metered = [await call_raw(middleware, http_scope("/metered", headers=FREE)) for _ in range(3)]
        free = await call_raw(middleware, http_scope("/free", headers=FREE))
    assert START["headers"] == [(b"content-type", b"text/plain")]
    assert free.headers == [(b"content-type", b"text/plain")]
    assert len({answer.header("x-request-id") for answer in metered}) == 3  # (one each: header() asserts it)
    assert [answer.header("ratelimit").partition(";t=")[0] for answer in metered] == [  # type: ignore[union-attr]
        f'"api_calls";r={left}' for left in (9, 8, 7)
    ]


async def test_headers_given_as_a_generator_are_all_sent_on_a_redirect(billing: LocalBilling) -> None:
    """Headers may be any iterable: read once to tell a redirect to itself, they were gone when sent."""

    async def redirect(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(b"content-type", b"text/plain"), (b"location", b"https://example.com/next")]
            await send({"type": "http.response.start", "status": 302, "headers": (h for h in headers)})
            await send(BODY)

    middleware = BillingMiddleware(redirect, billing=billing, customer=by_header, default_feature="api_calls")
    async with lifespan(middleware):
        answer = await call_raw(middleware, http_scope("/old", headers=FREE))
    assert (answer.header("location"), answer.header("content-type")) == ("https://example.com/next", "text/plain")
    assert await billing.recorded_units("user_free", "api_calls") == 1  # (a redirect elsewhere is an answer)


def with_trailers(fail_before_trailers: bool = False) -> ASGIApp:
    """A raw app announcing trailers (ASGI's HTTP trailers extension): the response ends with them."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"payload"})
        if fail_before_trailers:
            raise RuntimeError("the checksum could not be computed")
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc")]})

    return app


@pytest.mark.parametrize("fail", [False, True], ids=["trailers sent", "failed before them"])
async def test_a_response_with_trailers_is_billed_once_they_are_sent(billing: LocalBilling, fail: bool) -> None:
    middleware = BillingMiddleware(
        with_trailers(fail), billing=billing, customer=by_header, default_feature="api_calls"
    )
    scope = http_scope("/checked", headers=FREE, extensions={"http.response.trailers": {}})
    async with lifespan(middleware):
        exchange = await call_raw(middleware, scope)
    assert [m["type"] for m in exchange.messages][-1] == ("http.response.body" if fail else "http.response.trailers")
    assert await billing.recorded_units("user_free", "api_calls") == (0 if fail else 1)


@pytest.mark.parametrize("heard", [True, False], ids=["the app hears it", "the server's send fails"])
async def test_a_client_leaving_before_the_trailers_is_not_billed(billing: LocalBilling, heard: bool) -> None:
    """Every byte of the body is out, and still the response is not complete without its trailers."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"7")], "trailers": True}
        )
        await send({"type": "http.response.body", "body": b"payload"})
        if heard:
            assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc")]})

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.trailers":
            raise OSError("client went away")

    middleware = BillingMiddleware(app, billing=billing, customer=by_header, default_feature="api_calls")
    scope = http_scope("/checked", headers=FREE, extensions={"http.response.trailers": {}})
    async with lifespan(middleware):
        with pytest.raises(OSError, match="went away"):
            await middleware(scope, receive, send)
    assert middleware.tracker.stats.queued == 0


async def test_a_second_start_the_server_refuses_after_a_complete_answer_leaves_it_billed(
    billing: LocalBilling,
) -> None:
    """An error layer answering a background task's failure sends a 500's start after the 200 the
    client has in full: the server refuses it, and the watch took its status for the answer's."""

    async def answered_then_failed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send(BODY)
            await send({"type": "http.response.start", "status": 500, "headers": []})

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 500:
            raise RuntimeError("Unexpected ASGI message 'http.response.start' sent, after response already completed.")

    middleware = BillingMiddleware(
        answered_then_failed, billing=billing, customer=by_header, default_feature="api_calls"
    )
    async with lifespan(middleware):
        exchange = await call_raw(middleware, http_scope("/x", headers=FREE), on_send=on_send)
    assert isinstance(exchange.error, RuntimeError)
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_second_last_message_the_server_refuses_leaves_the_answer_billed(billing: LocalBilling) -> None:
    """The first last message completed the response; a stray one after it, refused by the server,
    made it look cut short (as a plain error after a complete answer does not)."""

    async def twice(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send(BODY)
            await send(BODY)

    async def on_send(message: Message) -> None:
        if message is not BODY and message["type"] == "http.response.body":
            return
        if on_send.completed:  # type: ignore[attr-defined]
            raise RuntimeError("Unexpected ASGI message 'http.response.body' sent, after response already completed.")
        on_send.completed = message["type"] == "http.response.body"  # type: ignore[attr-defined]

    on_send.completed = False  # type: ignore[attr-defined]
    middleware = BillingMiddleware(twice, billing=billing, customer=by_header, default_feature="api_calls")
    async with lifespan(middleware):
        exchange = await call_raw(middleware, http_scope("/twice", headers=FREE), on_send=on_send)
    assert isinstance(exchange.error, RuntimeError)
    assert await billing.recorded_units("user_free", "api_calls") == 1
