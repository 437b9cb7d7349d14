"""Pure ASGI: websocket and lifespan scopes pass through; context variables and background tasks still work."""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from billingos_asgi import BillingMiddleware, LocalBilling, Metered
from billingos_asgi.testing import lifespan
from tests.asgi import serve

from .support import PLANS, as_customer, by_header, websocket_echo_session


def websocket_app() -> Starlette:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"echo:{text}")
        except WebSocketDisconnect:
            pass

    async def http(request: Request) -> Response:
        return PlainTextResponse("http")

    return Starlette(routes=[WebSocketRoute("/ws", echo), Route("/http", http)])


async def test_websocket_scope_passes_through_untouched(billing: LocalBilling) -> None:
    resolved: list[str] = []

    def resolver(request: Request) -> str | None:
        resolved.append(request.url.path)
        return by_header(request)

    middleware = BillingMiddleware(websocket_app(), billing=billing, customer=resolver, default_feature="api_calls")
    expected = await websocket_echo_session(websocket_app(), ["a", "b", "c"])
    async with lifespan(middleware):
        got = await websocket_echo_session(middleware, ["a", "b", "c"])
    assert got == expected
    assert [m["type"] for m in got] == ["websocket.accept"] + ["websocket.send"] * 3
    assert [m.get("text") for m in got[1:]] == ["echo:a", "echo:b", "echo:c"]
    assert resolved == []
    assert middleware.upstream.checks == 0
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_app_lifespan_runs_once_and_after_the_tracker_drained(tmp_path: Any) -> None:
    events: list[str] = []
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db")

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        # The middleware drained its queue before the app's own shutdown runs (which closes billing).
        events.append(f"shutdown units={await billing.recorded_units('user_free', 'api_calls'):g}")
        await billing.aclose()

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", endpoint)], lifespan=app_lifespan)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes={"/x": "api_calls"})
    async with serve(app) as client:
        assert events == ["startup"]
        statuses = [(await client.get("/x", headers=as_customer("user_free"))).status_code for _ in range(4)]
    assert statuses == [200] * 4
    assert events == ["startup", "shutdown units=4"]


class TenantMiddleware:
    """An outer pure-ASGI middleware putting the tenant in a context variable."""

    def __init__(self, app: ASGIApp, var: ContextVar[str]) -> None:
        self.app = app
        self.var = var

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = self.var.set(dict(scope["headers"]).get(b"x-tenant", b"-").decode())
        try:
            await self.app(scope, receive, send)
        finally:
            self.var.reset(token)


async def test_context_variable_of_an_outer_middleware_reaches_the_endpoint(billing: LocalBilling) -> None:
    tenant: ContextVar[str] = ContextVar("tenant")

    async def endpoint(request: Request) -> Response:
        return JSONResponse({"tenant": tenant.get("unset")})

    app = Starlette(routes=[Route("/x", endpoint)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes={"/x": "api_calls"})
    app.add_middleware(TenantMiddleware, var=tenant)  # added last: outermost
    async with serve(app) as client:
        responses = [
            await client.get("/x", headers=as_customer("user_free", **{"x-tenant": name}))
            for name in ("acme", "globex")
        ]
    assert [r.json() for r in responses] == [{"tenant": "acme"}, {"tenant": "globex"}]
    assert all(r.headers["x-request-id"] for r in responses)
    assert await billing.recorded_units("user_free", "api_calls") == 2


async def test_background_tasks_run_after_the_response(billing: LocalBilling) -> None:
    ran: list[str] = []

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks()
        tasks.add_task(ran.append, "first")
        tasks.add_task(ran.append, "second")
        return PlainTextResponse("accepted", status_code=202, background=tasks)

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/jobs", endpoint, methods=["POST"])]),
        billing=billing,
        customer=by_header,
        routes={"POST /jobs": "api_calls"},
    )
    async with serve(middleware) as client:
        response = await client.post("/jobs", headers=as_customer("user_free"))
        assert ran == ["first", "second"]
    assert response.status_code == 202 and response.text == "accepted"
    assert await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize("identified", ["by resolver", "late"])
async def test_a_cors_preflight_passes_through_unbilled_to_the_cors_middleware_inside(
    billing: LocalBilling, identified: str
) -> None:
    resolved: list[str] = []

    def resolver(request: Request) -> str | None:
        resolved.append(request.method)
        return by_header(request)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", endpoint, methods=["GET", "OPTIONS"])])
    middleware = BillingMiddleware(
        CORSMiddleware(app, allow_origins=["https://app.test"], allow_methods=["*"]),  # inside
        billing=billing,
        customer=resolver if identified == "by resolver" else None,
        default_feature="api_calls",
    )
    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with serve(middleware) as client:
        answered = await client.options("/x", headers=preflight)
        plain = await client.options("/x", headers={"origin": "https://app.test"})  # not a preflight: metered
        # Nor without its Origin (no browser sends one so): a handler of OPTIONS would run unbilled.
        no_origin = await client.options("/x", headers={"access-control-request-method": "GET"})
        disguised = await client.get("/x", headers=preflight)  # a GET is never a preflight: metered
    assert answered.status_code == 200
    assert answered.headers["access-control-allow-origin"] == "https://app.test"
    assert middleware.upstream.checks == 0
    if identified == "by resolver":
        assert resolved == ["OPTIONS"] * 2 + ["GET"]  # never the preflight's (its URL may name one)
        assert plain.status_code == no_origin.status_code == disguised.status_code == 401
    else:
        assert all("x-request-id" in answer.headers for answer in (plain, no_origin, disguised))
        assert middleware.unidentified == 3
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_a_preflight_whose_url_names_a_customer_is_not_billed(billing: LocalBilling) -> None:
    """A browser keeps the query string on its preflight (?api_key=...): still the CORS middleware's."""

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", endpoint)])
    middleware = BillingMiddleware(
        CORSMiddleware(app, allow_origins=["https://app.test"], allow_methods=["*"]),
        billing=billing,
        customer=lambda request: request.query_params.get("api_key"),
        default_feature="api_calls",
    )
    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with serve(middleware) as client:
        answers = [await client.options("/x?api_key=user_free", headers=preflight) for _ in range(12)]
    assert [answer.status_code for answer in answers] == [200] * 12
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_a_preflight_never_asks_the_quantity_function(billing: LocalBilling) -> None:
    """A preflight has no body to size: a quantity function reading Content-Length is not asked
    (it would fail, and on_error="deny" answer the browser 503)."""

    def size(request: Request) -> float:
        return int(request.headers["content-length"]) / 1e9

    async def upload(request: Request) -> Response:
        return PlainTextResponse("stored")

    app = Starlette(routes=[Route("/v1/upload", upload, methods=["POST"])])
    middleware = BillingMiddleware(
        CORSMiddleware(app, allow_origins=["https://app.test"], allow_methods=["*"]),
        billing=billing,
        customer=by_header,
        routes={"/v1/upload": Metered("storage_gb", quantity=size)},
        on_error="deny",
    )
    preflight = {"origin": "https://app.test", "access-control-request-method": "POST"}
    async with serve(middleware) as client:
        answered = await client.options("/v1/upload", headers=preflight)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://app.test"


def lifespan_less(*, refuse: bool) -> ASGIApp:
    """An app without a lifespan: it refuses the scope (as Django's handler does) or ignores it."""
    ok = PlainTextResponse("ok")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            if refuse:
                raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")
            return
        await ok(scope, receive, send)

    return app


async def test_an_app_without_lifespan_still_gets_a_running_tracker(billing: LocalBilling) -> None:
    for refuse in (True, False):
        middleware = BillingMiddleware(
            lifespan_less(refuse=refuse),
            billing=billing,
            customer=by_header,
            default_feature="api_calls",
            flush_interval=60,  # nothing leaves before shutdown unless the tracker's worker runs
        )
        with anyio.fail_after(10):  # an unanswered lifespan hangs the server's start-up
            async with lifespan(middleware):
                assert middleware.tracker.running
                async with serve(middleware, with_lifespan=False) as client:
                    for _ in range(3):
                        assert (await client.get("/x", headers=as_customer("user_pro"))).status_code == 200
                assert middleware.tracker.backlog == 3  # queued, not sent inline
        assert not middleware.tracker.running
    assert await billing.recorded_units("user_pro", "api_calls") == 6  # drained at each shutdown


async def test_an_app_whose_lifespan_fails_after_starting_still_fails(billing: LocalBilling) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("the app's own start-up failed")

    middleware = BillingMiddleware(app, billing=billing, customer=by_header)
    with pytest.raises(Exception) as caught:  # noqa: B017 - the task group may wrap it in a group
        async with lifespan(middleware):
            raise AssertionError("started")
    assert "the app's own start-up failed" in "".join(traceback.format_exception(caught.value))
    assert not middleware.tracker.running


async def test_an_unusable_outbox_fails_the_startup_where_the_server_sees_it(
    billing: LocalBilling, tmp_path: Any
) -> None:
    """Starlette reads its first lifespan message outside its own error handling: raised from
    there, the failure would look like "no lifespan support" to a server in auto mode, which
    would then serve without the tracker and its outbox."""
    junk = tmp_path / "usage.db"
    junk.write_bytes(b"not a database" * 100)
    middleware = BillingMiddleware(
        Starlette(), billing=billing, customer=by_header, default_feature="api_calls", outbox=junk
    )
    told: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        told.append(message)

    with pytest.raises(Exception):  # noqa: B017 - the app's own failure, as the server sees it after
        await middleware({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [message["type"] for message in told] == ["lifespan.startup.failed"]
    assert "usage.db" in told[0]["message"] and not middleware.tracker.running


async def test_a_second_lifespan_fails_and_leaves_the_first_running(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(Starlette(), billing=billing, customer=by_header, default_feature="api_calls")
    async with lifespan(middleware):
        with pytest.raises(RuntimeError, match="already running"):
            async with lifespan(middleware):
                raise AssertionError("started twice")
        assert middleware.tracker.running
    assert not middleware.tracker.running
