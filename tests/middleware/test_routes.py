"""Which requests are metered: methods, templates, mounts, the default feature and its exclusions."""

from __future__ import annotations

import logging
import math
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from billingos_asgi import BillingMiddleware, LocalBilling, Metered, UsageEvent, report_usage
from billingos_asgi.discovery import route_table
from billingos_asgi.local.background import serve_in_thread
from billingos_asgi.routes import EXCLUDED, UNDECLARED, FoundRoutes, RouteTable, redirects_to_itself
from billingos_asgi.testing import lifespan
from tests.asgi import serve

from .support import CUSTOMER_HEADER, PLANS, as_customer, by_header, call_raw, http_scope, raw_http

FREE = [(CUSTOMER_HEADER, "user_free")]


async def hello(request: Request) -> Response:
    return PlainTextResponse(f"hello {request.url.path}")


async def test_method_and_template_key_meters_only_that_method(billing: LocalBilling) -> None:
    app = Starlette(routes=[Route("/v1/items/{item_id:int}", hello, methods=["GET", "POST"])])
    middleware = BillingMiddleware(
        app, billing=billing, customer=by_header, routes={"POST /v1/items/{item_id:int}": "api_calls"}
    )
    async with serve(middleware) as client:
        get = await client.get("/v1/items/7")  # no customer needed: not metered
        anonymous_post = await client.post("/v1/items/7")
        post = await client.post("/v1/items/7", headers=as_customer("user_free"))
        not_int = await client.post("/v1/items/abc")  # the template does not match: the app's own 404
    assert (get.status_code, get.text) == (200, "hello /v1/items/7")
    assert "x-request-id" not in get.headers
    assert anonymous_post.status_code == 401
    assert post.status_code == 200 and post.headers["x-request-id"]
    assert not_int.status_code == 404 and "x-request-id" not in not_int.headers
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_routes_inside_mounts_are_metered_by_their_full_path(billing: LocalBilling) -> None:
    app = Starlette(
        routes=[
            Mount(
                "/api",
                routes=[Route("/items", hello), Mount("/v2", routes=[Route("/deep/{n:int}", hello)])],
            ),
            Mount("/orgs/{org}", routes=[Route("/search", hello)]),
            Route("/free", hello),
        ]
    )
    middleware = BillingMiddleware(
        app,
        billing=billing,
        customer=by_header,
        routes={"/api/items": "api_calls", "/api/v2/deep/{n:int}": "api_calls", "/orgs/{org}/search": "api_calls"},
    )
    async with serve(middleware) as client:
        anonymous = [(await client.get(p)).status_code for p in ("/api/items", "/api/v2/deep/3", "/orgs/acme/search")]
        paid = [
            await client.get(p, headers=as_customer("user_free"))
            for p in ("/api/items", "/api/v2/deep/3", "/orgs/acme/search")
        ]
        free = await client.get("/free")
    assert anonymous == [401, 401, 401]
    assert [(r.status_code, r.text) for r in paid] == [
        (200, "hello /api/items"),
        (200, "hello /api/v2/deep/3"),
        (200, "hello /orgs/acme/search"),
    ]
    assert free.status_code == 200 and "x-request-id" not in free.headers
    assert await billing.recorded_units("user_free", "api_calls") == 3


async def test_fastapi_router_with_prefix(billing: LocalBilling) -> None:
    router = APIRouter(prefix="/v1")

    @router.post("/search")
    async def search() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes={"POST /v1/search": "api_calls"})
    async with serve(app) as client:
        anonymous = await client.post("/v1/search")
        paid = await client.post("/v1/search", headers=as_customer("user_free"))
        docs = await client.get("/openapi.json")
    assert anonymous.status_code == 401
    assert paid.status_code == 200 and paid.json() == {"ok": True}
    assert docs.status_code == 200 and "x-request-id" not in docs.headers
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_default_feature_meters_everything_except_exclusions(billing: LocalBilling) -> None:
    app = Starlette(routes=[Route("/{path:path}", hello)])
    middleware = BillingMiddleware(
        app,
        billing=billing,
        customer=by_header,
        default_feature="api_calls",
        exclude=["/health", "/users/{user_id}/avatar", "/static/*"],
    )
    excluded = ["/health", "/users/42/avatar", "/static/app.js", "/static/css/site.css"]
    metered = ["/", "/v1/anything", "/health/deep", "/users/42/avatar/big", "/users/42", "/staticfile", "/static"]
    async with serve(middleware) as client:
        passed = [await client.get(path) for path in excluded]
        refused = [await client.get(path) for path in metered]
        paid = [await client.get(path, headers=as_customer("user_pro")) for path in metered]
    assert [(r.status_code, "x-request-id" in r.headers) for r in passed] == [(200, False)] * 4
    assert [r.status_code for r in refused] == [401] * len(metered)
    assert [r.status_code for r in paid] == [200] * len(metered)
    assert await billing.recorded_units("user_pro", "api_calls") == len(metered)


async def test_explicit_routes_take_precedence_over_the_default(billing: LocalBilling) -> None:
    app = Starlette(routes=[Route("/{path:path}", hello, methods=["GET", "POST"])])
    middleware = BillingMiddleware(
        app,
        billing=billing,
        customer=by_header,
        routes={"POST /upload": Metered("storage_gb", quantity=0.5), "/tokens/{n}": Metered("tokens", quantity=3)},
        default_feature="api_calls",
    )
    async with serve(middleware) as client:
        for path in ("/upload", "/tokens/1", "/other"):
            assert (await client.post(path, headers=as_customer("user_free"))).status_code == 200
        assert (await client.get("/upload", headers=as_customer("user_free"))).status_code == 200  # GET: default
    assert await billing.recorded_units("user_free", "storage_gb") == 0.5
    assert await billing.recorded_units("user_free", "tokens") == 3
    assert await billing.recorded_units("user_free", "api_calls") == 2


@pytest.mark.parametrize(
    "routes",
    [{"GET /x": "api_calls"}, {"/x": "api_calls"}, {"GET /x/{n:int}": "api_calls", "GET /y": "api_calls"}],
    ids=["static-get", "static-any", "template-get"],
)
async def test_head_is_metered_like_get(billing: LocalBilling, routes: dict[str, str]) -> None:
    app = Starlette(routes=[Route("/x", hello), Route("/x/{n:int}", hello), Route("/y", hello)])
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes)
    path = "/x/5" if "GET /x/{n:int}" in routes else "/x"
    async with serve(middleware) as client:
        anonymous = await client.head(path)
        paid = await client.head(path, headers=as_customer("user_free"))
    assert anonymous.status_code == 401
    assert paid.status_code == 200 and paid.headers["x-request-id"] and paid.content == b""
    assert await billing.recorded_units("user_free", "api_calls") == 1


def test_route_table_prefers_the_method_then_any_method_then_the_default() -> None:
    table = RouteTable(
        {
            "GET /a": "reads",
            "/a": "other_methods",
            "HEAD /b": "heads",
            "GET /b": "reads",
            "POST /c": "writes",
            "/d/{n:int}": "templated",
            "GET /e/{n}": "reads",
            "GET /f/{n}": "reads",
            "HEAD /f/{n}": "heads",
        },
        default_feature="everything",
        exclude=["/health", "/static/*"],
    )
    feature = {
        (method, path): (None if metered is None or metered is EXCLUDED else metered.feature)
        for method, path in [
            ("GET", "/a"),
            ("HEAD", "/a"),
            ("DELETE", "/a"),
            ("HEAD", "/b"),
            ("GET", "/b"),
            ("POST", "/c"),
            ("GET", "/c"),
            ("PUT", "/d/3"),
            ("HEAD", "/e/1"),
            ("HEAD", "/f/1"),
            ("GET", "/health"),
            ("GET", "/static/app.js"),
            ("GET", "/elsewhere"),
        ]
        for metered in [table.match(method, path)]
    }
    assert feature == {
        ("GET", "/a"): "reads",
        ("HEAD", "/a"): "reads",  # HEAD follows GET
        ("DELETE", "/a"): "other_methods",
        ("HEAD", "/b"): "heads",  # configured on its own
        ("GET", "/b"): "reads",
        ("POST", "/c"): "writes",
        ("GET", "/c"): "everything",
        ("PUT", "/d/3"): "templated",
        ("HEAD", "/e/1"): "reads",  # a template's too
        ("HEAD", "/f/1"): "heads",
        ("GET", "/health"): None,
        ("GET", "/static/app.js"): None,
        ("GET", "/elsewhere"): "everything",
    }


def test_a_found_table_names_what_serves_head_and_a_hand_written_get_takes_head_too() -> None:
    """FastAPI's GET routes do not serve HEAD: in a table found on the routes, HEAD follows GET
    only where ``also`` (written by hand, of routes not found) says GET."""
    found = route_table(
        [("GET /items", Metered("api_calls")), ("GET /items/{item_id}", Metered("api_calls"))],
        also={"GET /mounted": "export", "GET /other": "export", "HEAD /other": "tokens"},
    )
    assert isinstance(found, FoundRoutes) and set(found) == {
        "GET /items",
        "GET /items/{item_id}",
        "GET /mounted",
        "HEAD /mounted",
        "GET /other",
        "HEAD /other",
    }
    table = RouteTable(found, default_feature="everything")
    features = [metered.feature if (metered := table.match("HEAD", path)) else None for path in ("/items", "/items/7")]
    assert features == ["everything", "everything"]  # as no route of the table serves it
    assert table.match("HEAD", "/mounted") == Metered("export") and table.match("HEAD", "/other") == Metered("tokens")
    assert RouteTable(dict(found)).match("HEAD", "/items/7") == Metered("api_calls")  # a plain dict: HEAD follows


@pytest.mark.parametrize(
    ("routes", "exclude"),
    [
        ({"FETCH /x": "api_calls"}, ()),
        ({"no-slash": "api_calls"}, ()),
        ({"GET no-slash": "api_calls"}, ()),
        ({"GET": "api_calls"}, ()),
        ({"/x": ""}, ()),
        ({"/x": "api_calls", "ANY /y": "api_calls"}, ()),
        ({}, ("health",)),
        ({"/x": "api_calls", " /x": "tokens"}, ()),
        ({"/internal/items": "api_calls"}, ("/internal/*",)),
        ({"GET /internal/items/{id}": "api_calls"}, ("/internal/*",)),
        ({"/health": "api_calls"}, ("/health",)),
        ({"/items/7": "api_calls"}, ("/items/{id:int}",)),
        ({"GET /v1/search?q=x": "api_calls"}, ()),
        ({"GET /v1/search#top": "api_calls"}, ()),
        ({"GET /items/{id": "api_calls"}, ()),
        ({"GET /items/id}": "api_calls"}, ()),
        ({"GET /items/{1st}": "api_calls"}, ()),
        ({}, ("/health?probe=1",)),
        ({}, ("/items/{id",)),
    ],
    ids=[
        "unknown-method",
        "no-slash",
        "method-no-slash",
        "method-only",
        "empty-feature",
        "any",
        "exclude",
        "twice",
        "excluded-prefix",
        "template-in-excluded-prefix",
        "excluded-path",
        "excluded-template",
        "query-string",
        "fragment",
        "unclosed-brace",
        "unopened-brace",
        "bad-parameter-name",
        "excluded-query-string",
        "excluded-unclosed-brace",
    ],
)
def test_invalid_configuration_raises_at_construction(
    billing: LocalBilling, routes: dict[str, str], exclude: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        BillingMiddleware(Starlette(), billing=billing, customer=by_header, routes=routes, exclude=exclude)


@pytest.mark.parametrize("flag", ["bill_partial", "late"])
def test_metereds_flags_are_true_or_false(flag: str) -> None:
    """ "false" from a setting is true: a late route, never named by a resolver's app, went unbilled."""
    with pytest.raises(ValueError, match=f"Metered\\('api_calls'\\): {flag} must be True or False, got 'false'"):
        Metered("api_calls", **{flag: "false"})  # type: ignore[arg-type]


def test_metered_quantity_is_validated() -> None:
    for bad in (-1, float("inf"), float("nan"), True, "1", 1e-7, 0.1234567, Decimal("NaN"), Decimal("sNaN"), 10**15):
        with pytest.raises(ValueError):
            Metered("api_calls", quantity=bad)  # type: ignore[arg-type]
    assert Metered("api_calls", quantity=0.25).quantity == 0.25
    assert Metered("api_calls", quantity=Decimal("0.25")).quantity == 0.25  # type: ignore[arg-type]


async def test_routes_are_metered_when_served_under_a_root_path(tmp_path: Path) -> None:
    """Behind a proxy that strips a prefix (uvicorn ``--root-path /billing-app``), the ASGI scope's
    ``path`` carries the root path ("/billing-app/v1/search") while the app's routes, and the keys
    of ``routes=``, are written without it; Starlette routes on the path minus ``root_path``. The
    metered route must stay metered: a request without a customer gets 401, not the endpoint."""
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db")
    try:
        calls: list[str] = []

        async def search(request: Request) -> Response:
            calls.append(request.url.path)
            return PlainTextResponse("results")

        middleware = BillingMiddleware(
            Starlette(routes=[Route("/v1/search", search)]),
            billing=billing,
            customer=by_header,
            routes={"/v1/search": "api_calls"},
        )
        with serve_in_thread(middleware, root_path="/billing-app") as base_url:
            async with httpx.AsyncClient(base_url=base_url) as client:
                anonymous = await client.get("/v1/search")
                paid = await client.get("/v1/search", headers=as_customer("user_free"))
        assert anonymous.status_code == 401
        assert paid.status_code == 200 and paid.headers.get("x-request-id")
        assert len(calls) == 1
        assert await billing.recorded_units("user_free", "api_calls") == 1
    finally:
        await billing.aclose()


async def test_a_final_newline_in_the_path_does_not_slip_past_the_gate(billing: LocalBilling) -> None:
    """Starlette's route patterns end in "$", which also matches before a final newline:
    "/v1/export%0A" reaches the /v1/export endpoint, so it must be metered as /v1/export."""
    calls: list[str] = []

    async def export(request: Request) -> Response:
        calls.append(request.url.path)
        return PlainTextResponse("started")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/v1/export", export, methods=["POST"])]),
        billing=billing,
        customer=by_header,
        routes={"POST /v1/export": "export"},
        exclude=["/health"],
    )
    async with serve(middleware) as client:
        anonymous = await client.post("/v1/export%0A")
        free = await client.post("/v1/export%0A", headers=as_customer("user_free"))  # the free plan has no export
    assert (anonymous.status_code, free.status_code, calls) == (401, 403, [])
    assert middleware.routes.match("GET", "/health\n") is EXCLUDED


async def test_a_parameter_of_newlines_does_not_slip_past_the_gate(billing: LocalBilling) -> None:
    """Starlette's "[^/]+" takes a newline: "/v1/search/%0A" reaches /v1/search/{query} with the
    query "\\n". With its final newline stripped, the path "/v1/search" matched no template."""
    queries: list[str] = []

    async def search(request: Request) -> Response:
        queries.append(request.path_params["query"])
        return PlainTextResponse("results")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/v1/search/{query}", search)]),
        billing=billing,
        customer=by_header,
        routes={"/v1/search/{query}": "api_calls"},
    )
    async with serve(middleware) as client:
        anonymous = await client.get("/v1/search/%0A")
        paid = [
            await client.get(path, headers=as_customer("user_free")) for path in ("/v1/search/%0A", "/v1/search/%0A%0A")
        ]
    assert anonymous.status_code == 401
    assert [answer.status_code for answer in paid] == [200, 200] and queries == ["\n", "\n\n"]
    assert await billing.recorded_units("user_free", "api_calls") == 2


def test_paths_are_matched_in_their_canonical_form() -> None:
    table = RouteTable(
        {"GET /v1/search": "api_calls", "/v1/items/{item_id}/": "tokens"}, exclude=["/health/", "/static/*"]
    )
    for path in ("/v1/search", "/v1/search/", "/v1//search", "//v1/search//", "v1/search", "v1/search/\n"):
        found = table.match("GET", path)
        assert found is not None and found.feature == "api_calls", path
    for path in ("/v1/items/7", "/v1/items/7/", "/v1//items/7"):
        found = table.match("POST", path)
        assert found is not None and found.feature == "tokens", path
    assert table.match("GET", "/health") is EXCLUDED and table.match("GET", "//health/") is EXCLUDED
    assert table.match("GET", "health") is EXCLUDED and table.match("GET", "") is None
    assert table.match("GET", "/static/") is EXCLUDED and table.match("GET", "//static/app.js") is EXCLUDED
    with pytest.raises(ValueError, match="configured twice, as 'api_calls' and as 'tokens'"):
        RouteTable({"/v1/search": "api_calls", "/v1/search/": "tokens"})
    # The same twice (FastAPI's router.get("") and router.get("/") under a prefix): one route here.
    twins = RouteTable({"/v1/search": "api_calls", "/v1/search/": "api_calls"})
    found = twins.match("GET", "/v1/search/")
    assert found is not None and found.feature == "api_calls"


@pytest.mark.parametrize(
    "routes",
    [
        {"/v1/docs/{doc_id}": "api_calls", "GET /v1/docs/{doc_id}": None},
        {"GET /v1/docs/{id}/": None, "/v1/docs/{doc_id}": "api_calls"},
    ],
)
async def test_a_template_keyed_with_a_method_wins_over_it_without_one(
    billing: LocalBilling, routes: dict[str, str | None]
) -> None:
    """As on a static path, whatever order the keys come in: reads free, writes metered."""
    table = RouteTable(routes)
    assert [table.match(method, "/v1/docs/7") for method in ("GET", "HEAD", "PUT")] == [
        None,
        None,
        Metered("api_calls"),
    ]

    async def doc(request: Request) -> PlainTextResponse:
        return PlainTextResponse("doc")

    app = Starlette(routes=[Route("/v1/docs/{doc_id}", doc, methods=["GET", "PUT"])])
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes)
    async with serve(middleware) as client:
        anonymous = await client.get("/v1/docs/7")
        read = await client.get("/v1/docs/7", headers=as_customer("user_free"))
        written = await client.put("/v1/docs/7", headers=as_customer("user_free"))
    assert [anonymous.status_code, read.status_code, written.status_code] == [200, 200, 200]
    assert await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize(
    "routes",
    [
        {"GET /items/{item_id}": "api_calls", "GET /items/{id}/": "tokens"},
        {"/items/{id:int}": "api_calls", "/items/{item_id:int}": None},
    ],
)
def test_a_template_configured_twice_is_refused(routes: dict[str, str | None]) -> None:
    """Parameter names and slashes aside, as static paths are: the second would never be reached."""
    with pytest.raises(ValueError, match="is configured twice"):
        RouteTable(routes)


@pytest.mark.parametrize(
    ("key", "excluded"), [("/items/{item_id}", "/items/{item_id}"), ("GET /items/{id:int}/", "/items/{item_id:int}")]
)
def test_a_template_an_exclusion_covers_whole_is_refused(key: str, excluded: str) -> None:
    with pytest.raises(ValueError, match="also excluded"):
        RouteTable({key: "api_calls"}, exclude=[excluded])
    carved = RouteTable({key: "api_calls"}, exclude=["/items/0", "/items/{item_id:int}/extra"])
    assert carved.match("GET", "/items/7") == Metered("api_calls") and carved.match("GET", "/items/0") is EXCLUDED


def test_the_root_and_an_excluded_prefix_are_matched_where_no_route_is_a_template() -> None:
    table = RouteTable({"GET /": "tokens"}, default_feature="api_calls", exclude=["/static/*"])
    for path in ("/", "//"):
        found = table.match("GET", path)
        assert found is not None and found.feature == "tokens", path
    assert table.match("GET", "/static/app.js") is EXCLUDED and table.match("GET", "/static/") is EXCLUDED


async def test_a_redirect_to_the_canonical_path_is_not_billed_the_request_after_it_is(billing: LocalBilling) -> None:
    async def moved(request: Request) -> Response:
        return RedirectResponse("https://files.example/report.pdf")  # the endpoint's own answer: billed

    app = Starlette(routes=[Route("/v1/search", hello), Route("/v1/report", moved)])  # "/v1/search/": a 307
    middleware = BillingMiddleware(
        app, billing=billing, customer=by_header, routes={"/v1/search": "api_calls", "/v1/report": "api_calls"}
    )
    async with serve(middleware, follow_redirects=True) as client:
        anonymous = await client.get("/v1/search/")
        searched = await client.get("/v1/search/", headers=as_customer("user_free"))
        report = await client.get("/v1/report", headers=as_customer("user_free"), follow_redirects=False)
    assert anonymous.status_code == 401
    assert searched.status_code == 200 and [r.status_code for r in searched.history] == [307]
    assert "ratelimit" not in searched.history[0].headers  # not billed: no quota spent on it
    assert report.status_code == 307
    assert await billing.recorded_units("user_free", "api_calls") == 2  # the search once, the report


class Convert:
    """An ASGI app as a route's endpoint: it does its work, then sends the client on to its next page."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await RedirectResponse("/v1/convert/")(scope, receive, send)


@pytest.mark.parametrize("framework", [Starlette, FastAPI])
async def test_an_asgi_endpoints_own_slash_redirect_is_billed(
    billing: LocalBilling, framework: type[Starlette]
) -> None:
    app = framework()
    app.add_route("/v1/convert", Convert(), methods=["POST"])  # type: ignore[arg-type]  # (an ASGI app, as Route takes)
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes={"POST /v1/convert": "api_calls"})
    async with serve(middleware) as client:
        answer = await client.post("/v1/convert", headers=as_customer("user_free"))
    assert answer.status_code == 307
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_slash_redirect_of_an_app_mounted_in_function_middleware_is_not_billed(billing: LocalBilling) -> None:
    """The scope names the mount's app, a function here, on the way to the sub-app's router."""
    sub = Starlette(routes=[Route("/items/", hello)])

    def logged(app: Any) -> Any:  # a pure ASGI middleware written as a closure
        async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
            await app(scope, receive, send)

        return asgi

    app = FastAPI()
    app.mount("/sub", logged(sub))
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes={"/sub/items": "api_calls"})
    async with serve(middleware) as client:
        redirected = await client.get("/sub/items", headers=as_customer("user_free"))
    assert redirected.status_code == 307 and redirected.headers["location"].endswith("/sub/items/")
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_a_routes_own_https_redirect_middleware_is_not_billed_the_request_after_it_is(
    billing: LocalBilling,
) -> None:
    """Middleware on a Route runs after the router named the route: its move to https is still the
    framework's, as on the app or a Mount."""
    app = Starlette(routes=[Route("/v1/search", hello, middleware=[Middleware(HTTPSRedirectMiddleware)])])
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes={"/v1/search": "api_calls"})
    async with serve(middleware, base_url="http://api.example", follow_redirects=True) as client:
        searched = await client.get("/v1/search?q=1", headers=as_customer("user_free"))
    assert searched.status_code == 200 and [r.status_code for r in searched.history] == [307]
    assert "ratelimit" not in searched.history[0].headers
    assert await billing.recorded_units("user_free", "api_calls") == 1  # the search, not its redirect


async def test_a_redirect_of_an_absolute_form_target_that_urlparse_refuses_is_answered(billing: LocalBilling) -> None:
    """ "GET http://[::1/x" (h11 and Hypercorn pass the target on as the path) answered with a redirect:
    urlparse() raises on its bracket, which the response watch made a 500."""
    app = Starlette(routes=[Route("/x", hello)], middleware=[Middleware(HTTPSRedirectMiddleware)])
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, default_feature="api_calls")
    exchange = await call_raw(middleware, http_scope("http://[::1/x", headers=[(CUSTOMER_HEADER, "user_free")]))
    assert exchange.error is None and exchange.status == 307
    assert await billing.recorded_units("user_free", "api_calls") == 0  # the framework's redirect


async def test_a_slash_redirect_without_a_usable_host_header_is_not_billed(tmp_path: Path) -> None:
    """Without a Host header it can use (HTTP/1.0 without one, a Host with a path), Starlette's slash
    redirect names the server's address; a query with a raw "#" comes back with it in the Location
    (a fragment there), one with a "|" or "{" (which browsers send as they are) comes back quoted,
    and a path with a "%" (from "%25") comes back with it unquoted. None is an endpoint's own
    answer: the redirect is not billed either way."""
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db")
    calls: list[str] = []

    async def search(request: Request) -> Response:
        calls.append(request.url.path)
        return PlainTextResponse("results")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/v1/search", search), Route("/v1/items/{name}", search)]),
        billing=billing,
        customer=by_header,
        routes={"/v1/search": "api_calls", "/v1/items/{name}": "api_calls"},
    )
    requests = [
        b"GET /v1/items/%2541/ HTTP/1.1\r\nHost: app\r\nx-customer: user_free\r\nConnection: close\r\n\r\n",
        b"GET /v1/search/ HTTP/1.0\r\nx-customer: user_free\r\n\r\n",
        b"GET /v1/search/ HTTP/1.1\r\nHost: app/x\r\nx-customer: user_free\r\nConnection: close\r\n\r\n",
        b"GET /v1/search/?q=a#b HTTP/1.1\r\nHost: app\r\nx-customer: user_free\r\nConnection: close\r\n\r\n",
        b"GET /v1/search/?q=a|{b} HTTP/1.1\r\nHost: app\r\nx-customer: user_free\r\nConnection: close\r\n\r\n",
    ]
    try:
        with serve_in_thread(middleware) as base_url:
            answers = [await raw_http(base_url, request) for request in requests]
        assert [answer.split(b" ", 2)[1] for answer in answers] == [b"307"] * 5, answers
        assert calls == []
        assert await billing.recorded_units("user_free", "api_calls") == 0
    finally:
        await billing.aclose()


async def test_a_root_path_is_a_whole_segment(billing: LocalBilling) -> None:
    """Under root_path "/api", "/apiusage" is the app's "/apiusage", not "usage" (as Starlette routes it)."""
    app = Starlette(routes=[Route("/apiusage", hello), Route("/api/usage", hello)])
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes={"/apiusage": "api_calls"})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware, root_path="/api"), base_url="http://a"
    ) as client:
        anonymous = await client.get("/apiusage")
    assert anonymous.status_code == 401


async def test_the_root_path_itself_and_a_path_outside_it_are_routed_as_starlette_routes_them(
    billing: LocalBilling,
) -> None:
    """Under root_path "/api", "/api" is the app's "" (its "/", free here: Starlette redirects it to
    "/api/"), and "/v1/usage", which a server left the root path out of, is "/v1/usage", not "/usage"."""
    app = Starlette(routes=[Route("/", hello), Route("/v1/usage", hello)])
    middleware = BillingMiddleware(
        app, billing=billing, customer=by_header, routes={"/": None, "/v1/usage": None}, default_feature="api_calls"
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware, root_path="/api"), base_url="http://a"
    ) as client:
        root = await client.get("/api")
        outside = await client.get("/v1/usage")
    assert (root.status_code, outside.status_code) == (307, 200)


async def test_an_endpoints_own_redirects_are_billed(billing: LocalBilling) -> None:
    """Only a redirect to the same URL with slashes added or removed is a framework's: a form's
    next page on the same path, another query or another host is the endpoint's answer."""

    async def upload(request: Request) -> Response:
        return RedirectResponse("/v1/upload", status_code=303)  # Post/Redirect/Get

    async def search(request: Request) -> Response:
        return RedirectResponse("/v1/search?page=2", status_code=302)

    async def region(request: Request) -> Response:
        return RedirectResponse("https://eu.example.com/v1/region/", status_code=307)

    app = Starlette(
        routes=[Route("/v1/upload", upload, methods=["POST"]), Route("/v1/search", search), Route("/v1/region", region)]
    )
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, default_feature="api_calls")
    async with serve(middleware) as client:
        answers = [
            (await client.post("/v1/upload", headers=as_customer("user_free"))).status_code,
            (await client.get("/v1/search", headers=as_customer("user_free"))).status_code,
            (await client.get("/v1/region", headers=as_customer("user_free"))).status_code,
        ]
    assert answers == [303, 302, 307]
    assert await billing.recorded_units("user_free", "api_calls") == 3


async def test_an_endpoints_own_redirect_to_its_url_with_a_slash_is_billed(billing: LocalBilling) -> None:
    """A form's next page (the client's to name), even the endpoint's own path with a slash added:
    its answer after its work, billed; the router's slash redirect, inside a mount too, is not."""

    async def convert(request: Request) -> Response:
        return RedirectResponse((await request.body()).decode() or "/v1/done")  # (a 307)

    app = Starlette(
        routes=[
            Route("/v1/convert", convert, methods=["POST"]),
            Mount("/v2", routes=[Route("/convert", convert, methods=["POST"])]),
        ]
    )
    routes = {"POST /v1/convert": "api_calls", "POST /v2/convert": "api_calls"}
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes)
    targets = ["/v1/convert/", "http://test/v1/convert/", "/v1/convert//"]
    async with serve(middleware) as client:
        answers = [
            await client.post(path, content=target, headers=as_customer("user_free"))
            for path in ("/v1/convert", "/v2/convert")
            for target in targets
        ]
        slashed = await client.post("/v2/convert/", headers=as_customer("user_free"))  # the router's 307
    assert [answer.status_code for answer in answers] == [307] * 6 and slashed.status_code == 307
    assert await billing.recorded_units("user_free", "api_calls") == 6


@pytest.mark.parametrize(("status", "billed"), [(301, 1), (302, 1), (308, 1), (303, 2)])
async def test_a_slash_redirect_is_not_billed_whatever_its_status_but_see_other(
    billing: LocalBilling, status: int, billed: int
) -> None:
    """Frameworks answer a slash with 301 (Django), 302, 307 (Starlette) or 308 (Werkzeug, under
    Quart), here over https, before any endpoint runs (a router of its own, naming none in the
    scope); a 303 ("see other") is an endpoint's own answer, billed."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].endswith("/"):
            response: Response = RedirectResponse("https://app/v1/search", status_code=status)
        else:
            response = PlainTextResponse("results")
        await response(scope, receive, send)

    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes={"/v1/search": "api_calls"})
    async with serve(middleware, base_url="https://app", follow_redirects=True) as client:
        searched = await client.get("/v1/search/", headers=as_customer("user_free"))
    assert searched.status_code == 200 and [r.status_code for r in searched.history] == [status]
    assert await billing.recorded_units("user_free", "api_calls") == billed


@pytest.mark.parametrize("path", ["/v1/search" + "/\n" * 2_000, "/v1/search" + "\n" * 5_000, "/" * 100_000])
def test_odd_paths_are_matched_without_recursing(path: str) -> None:
    table = RouteTable({"/v1/search": "api_calls", "/v1/items/{n}": "tokens"}, exclude=["/static/*"])
    found = table.match("GET", path)
    assert found is None or found.feature == "api_calls"


def test_a_method_is_matched_whatever_its_case() -> None:
    """Servers pass the method as the client spelt it; Django serves ``get`` as GET."""
    table = RouteTable(
        {
            "GET /v1/search": "api_calls",
            "/v1/search": "other_methods",
            "POST /v1/items/{item_id}": "tokens",
            "/v1/any": "export",
        }
    )
    features = [
        (found.feature if found else None)
        for method, path in [("get", "/v1/search"), ("Get", "/v1/search"), ("post", "/v1/items/7"), ("get", "/v1/any")]
        for found in [table.match(method, path)]
    ]
    assert features == ["api_calls", "api_calls", "tokens", "export"]
    assert table.match("get", "/v1/items/7") is None and table.match("123", "/v1/elsewhere") is None


async def test_a_lower_case_method_does_not_slip_past_the_gate(billing: LocalBilling) -> None:
    async def any_case(scope: Scope, receive: Receive, send: Send) -> None:  # as Django: "get" is GET
        await PlainTextResponse(f"searched by {scope['method'].upper()}")(scope, receive, send)

    middleware = BillingMiddleware(
        any_case, billing=billing, customer=by_header, routes={"GET /v1/search": "api_calls"}
    )
    anonymous = await call_raw(middleware, http_scope("/v1/search", method="get"))
    paid = await call_raw(middleware, http_scope("/v1/search", method="get", headers=[("x-customer", "user_free")]))
    assert (anonymous.status, paid.status, paid.body) == (401, 200, b"searched by GET")
    assert await billing.recorded_units("user_free", "api_calls") == 1


def test_typed_parameters_take_every_spelling_their_parsers_take_when_parsed() -> None:
    """Litestar parses ``{item_id:int}`` with ``int()``: ``+5``, ``5_0``, `` 5``, full-width digits."""
    routes = {
        "/items/{item_id:int}": "api_calls",
        "/prices/{value:float}": "tokens",
        "/prices/{value:float}/{currency}": "tokens",  # a typed parameter before an untyped one
        "/orders/{order:uuid}": "export",
        "/items/{slug}/reviews": "reviews",
    }
    parsed, strict = RouteTable(routes, parsed_parameters=True), RouteTable(routes)
    taken = {
        "/items/+5": "api_calls",
        "/items/5_0": "api_calls",
        "/items/ 5": "api_calls",
        "/items/\uff15": "api_calls",
        "/prices/1e3": "tokens",
        "/prices/-inf": "tokens",
        "/prices/1e3/eur": "tokens",
        "/orders/{12345678-1234-5678-1234-567812345678}": "export",
        "/orders/urn:uuid:12345678123456781234567812345678": "export",
        # UUID() deletes "uuid:" anywhere, strips any braces, and parses as int(..., 16) does:
        "/orders/1234567812345678123456781234567\u0668": "export",
        "/orders/0x123456781234567812345678123456": "export",
        "/orders/123456781234567812345678123456_7": "export",
        "/orders/1234uuid:5678123456781234567812345678": "export",
        "/orders/{{12345678123456781234567812345678}}": "export",
    }
    for path, feature in taken.items():
        found = parsed.match("GET", path)
        assert found is not None and found.feature == feature, path
        assert strict.match("GET", path) is None, path  # Starlette routes these elsewhere
    for path in ("/items/abc", "/prices/cheap", "/orders/not-hex", "/orders/export", "/orders/1234567812345678"):
        assert parsed.match("GET", path) is None, path  # no parser takes them: the app's 404 (or another route)
    # Only where no template takes the path as written: "/items/+5" is the slug's here.
    found = RouteTable({**routes, "/items/{slug}": "reviews"}, parsed_parameters=True).match("GET", "/items/+5")
    assert found is not None and found.feature == "reviews"


async def test_a_free_route_starlette_serves_after_a_typed_one_is_not_billed(billing: LocalBilling) -> None:
    async def slug_page(request: Request) -> Response:
        return PlainTextResponse(f"page {request.path_params['slug']}")

    app = Starlette(routes=[Route("/items/{item_id:int}", hello), Route("/items/{slug}", slug_page)])
    middleware = BillingMiddleware(
        app, billing=billing, customer=by_header, routes={"/items/{item_id:int}": "api_calls"}
    )
    async with serve(middleware) as client:
        anonymous = await client.get("/items/+5")
        free = await client.get("/items/5_0", headers=as_customer("user_free"))
        metered = await client.get("/items/5")
    assert (anonymous.status_code, anonymous.text, free.text) == (200, "page +5", "page 5_0")
    assert "ratelimit" not in free.headers and metered.status_code == 401
    assert await billing.recorded_units("user_free", "api_calls") == 0


def test_a_route_configured_as_none_is_not_metered_whatever_the_default() -> None:
    table = RouteTable(
        {"GET /items/featured": None, "/items/{item_id}": "api_calls", "/items/{item_id}/preview": None},
        default_feature="everything",
    )
    features = [
        (found.feature if found else None)
        for method, path in [("GET", "/items/featured"), ("GET", "/items/7"), ("GET", "/other")]
        + [("POST", "/items/featured")]  # not the static route's method: the template's
        + [("GET", "/items/7/preview")]  # a template configured as None
        for found in [table.match(method, path)]
    ]
    assert features == [None, "api_calls", "everything", "api_calls", None]


def test_a_route_found_undeclared_is_metered_as_the_default_an_exclusion_deciding_first() -> None:
    routes: dict[str, str | Metered | None] = {"GET /items/featured": UNDECLARED, "GET /pub/featured": UNDECLARED}
    routes |= {"/items/{item_id}": "api_calls", "/pub/{page_id:int}": "api_calls"}
    table = RouteTable(routes, default_feature="everything", exclude=["/pub/{page}"])
    assert table.match("GET", "/items/featured") == Metered("everything")
    assert table.match("HEAD", "/items/featured") == Metered("everything")
    assert table.match("GET", "/pub/featured") is EXCLUDED and table.match("HEAD", "/pub/featured") is EXCLUDED
    assert table.features == {"api_calls", "everything"}
    without_default = RouteTable(routes)
    assert without_default.match("GET", "/items/featured") is None and without_default.features == {"api_calls"}


async def test_a_redirect_to_https_is_not_billed_the_request_after_it_is(billing: LocalBilling) -> None:
    app = Starlette(routes=[Route("/v1/search", hello)])
    app.add_middleware(HTTPSRedirectMiddleware)  # inside the billing middleware (added after it)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes={"/v1/search": "api_calls"})
    async with serve(app, base_url="http://api.example:8000", follow_redirects=True) as client:
        searched = await client.get("/v1/search?q=1", headers=as_customer("user_free"))
    assert searched.status_code == 200 and [r.status_code for r in searched.history] == [307]
    assert str(searched.url) == "https://api.example:8000/v1/search?q=1"
    assert await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize(
    ("status", "location", "to_itself"),
    [
        (307, "https://api.example/v1/jobs", True),  # Starlette's HTTPSRedirectMiddleware
        (308, "https://api.example/v1/jobs", True),  # a permanent move that keeps the method
        (301, "https://api.example:8443/v1/jobs", True),  # Django's SECURE_SSL_REDIRECT, another port
        (302, "https://api.example/v1/jobs", False),  # Post/Redirect/Get to the app's https URL: billed
        (303, "https://api.example/v1/jobs", False),
        (307, "https://other.example/v1/jobs", False),
        (307, "https://api.example/v1/other", False),
        (307, "ftp://api.example/v1/jobs", False),
    ],
)
def test_only_a_frameworks_move_to_https_is_a_redirect_to_itself(status: int, location: str, to_itself: bool) -> None:
    assert redirects_to_itself("/v1/jobs", "", "api.example", location, "http", status) is to_itself
    assert not redirects_to_itself("/v1/jobs", "", "api.example", location.replace("https:", "http:"), "https", status)


def test_a_redirect_names_the_request_by_its_host_header_or_by_the_servers_address() -> None:
    server = ("10.0.0.5", 8000)
    assert redirects_to_itself("/v1/jobs/", "", None, "http://10.0.0.5:8000/v1/jobs", "http", 307, server)
    assert redirects_to_itself("/v1/jobs", "", None, "https://10.0.0.5:8000/v1/jobs", "http", 307, server)
    assert redirects_to_itself("/v1/jobs/", "", "[::1", "http://[::1]:8000/v1/jobs", "http", 307, ("::1", 8000))
    assert not redirects_to_itself("/v1/jobs/", "", None, "http://10.0.0.6:8000/v1/jobs", "http", 307, server)
    # Starlette leaves out the scheme's default port, and brackets an IPv6 address (unless it is).
    assert redirects_to_itself("/v1/jobs/", "", None, "http://10.0.0.5/v1/jobs", "http", 307, ("10.0.0.5", 80))
    assert redirects_to_itself("/v1/jobs/", "", None, "https://10.0.0.5/v1/jobs", "https", 307, ("10.0.0.5", 443))
    # Werkzeug names the host as it normalises it: in lower case, without the scheme's default port.
    assert redirects_to_itself("/v1/files", "", "127.0.0.1:80", "http://127.0.0.1/v1/files/", "http", 308)
    assert redirects_to_itself("/v1/files", "", "API.example.com", "http://api.example.com/v1/files/", "http", 308)
    assert not redirects_to_itself("/v1/files", "", "127.0.0.1:8080", "http://127.0.0.1/v1/files/", "http", 308)
    bracketed = ("[FE80::1]", 8000)
    assert redirects_to_itself("/v1/jobs/", "", None, "http://[FE80::1]:8000/v1/jobs", "http", 307, bracketed)
    assert redirects_to_itself("/v1/jobs", "", None, "https://[FE80::1]:8000/v1/jobs", "http", 307, bracketed)
    assert redirects_to_itself("/v1/jobs/", "q=a#b", "app", "http://app/v1/jobs?q=a#b")
    assert redirects_to_itself("/v1/jobs/", "q=a#", "app", "http://app/v1/jobs?q=a#")  # an empty fragment
    assert redirects_to_itself("/v1/jobs/", "q=a|{b}", "app", "http://app/v1/jobs?q=a%7C%7Bb%7D")
    assert not redirects_to_itself("/v1/jobs/", "q=a", "app", "http://app/v1/jobs?q=b")
    # A Host with a path: Starlette before 1.1 keeps it, its path ahead of the request's; later ones name the server.
    assert redirects_to_itself("/v1/jobs/", "", "app/x", "http://app/x/v1/jobs", "http", 307, server)
    assert redirects_to_itself("/v1/jobs", "", "app/x", "https://app/x/v1/jobs", "http", 307, server)
    assert redirects_to_itself("/v1/jobs/", "", "app/x", "http://10.0.0.5:8000/v1/jobs", "http", 307, server)
    assert not redirects_to_itself("/v1/jobs/", "", "app/x", "http://app/v1/jobs", "http", 307, server)
    assert not redirects_to_itself("/v1/jobs/", "", "app/x", "http://app/y/v1/jobs", "http", 307, server)
    assert not redirects_to_itself("/v1/jobs/", "", "app", "http://app/v1/jobs#top")  # the endpoint's own
    assert not redirects_to_itself("/v1/jobs", "", "app", "http://app/v1/jobs", "http", 302)  # to itself as asked


async def alert_async(event: UsageEvent, reason: str) -> None:
    """An async ``on_rejected``: called as events are rejected, it would return a coroutine nothing awaits."""


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"billing": None}, "billing must be a BillingOS, a LocalBilling or another BillingBackend, got NoneType"),
        ({"billing": "sk_live_x"}, "another BillingBackend, got str"),  # (a key given by mistake: not quoted)
        ({"trust_request_id": "false"}, "trust_request_id must be True or False, got 'false'"),
        ({"parsed_parameters": 1}, "parsed_parameters must be True, False or None"),
        ({"customer": "user_123"}, "customer must be a function (or None), got str"),
        ({"customer": {"key_alice": "user_123"}}, "customer must be a function (or None), got dict"),
        ({"customer": {"key_alice": "user_123"}.get}, "for an API key store, pass from_api_key(keys.get)"),
        ({"problem_factory": "x"}, "problem_factory must be a function"),
        ({"on_rejected": "x"}, "on_rejected must be a function"),
        ({"on_rejected": alert_async}, "on_rejected must be a plain function, not async"),
        ({"problem_factory": alert_async}, "problem_factory must be a plain function returning a Response, not async"),
        ({"upgrade_url": 5}, "upgrade_url must be a URL string"),
        ({"metrics_path": "metrics"}, "metrics_path must be a path starting with '/'"),
        ({"on_error": "ignore"}, "on_error must be 'allow' or 'deny'"),
        ({"default_feature": 5}, "default_feature: a feature key or a Metered"),
        ({"routes": ["/a"]}, "routes must map"),
        ({"routes": {"/a": 5}}, "routes: '/a': a feature key or a Metered"),
        ({"routes": {"/a": " "}}, "routes: '/a': feature"),
        ({"routes": {7: "api_calls"}}, "routes: keys are"),
        ({"routes": {"/a/{x:money}": "api_calls"}}, "routes: '/a/{x:money}': Unknown path convertor 'money'"),
        ({"exclude": "/health"}, "exclude must be a list of paths, got the string '/health'"),
        ({"exclude": ["/a/{x:money}"]}, "exclude: '/a/{x:money}': Unknown path convertor"),
        ({"cache_ttl": 900}, "cache_stale_ttl (600.0) must be >= cache_ttl (900)"),
        ({"cache_ttl": math.nan}, "cache_ttl must be a number of seconds > 0, got nan"),
        ({"cache_negative_ttl": "30"}, "cache_negative_ttl must be a number of seconds > 0, got '30'"),
        ({"flush_interval": math.nan}, "flush_interval must be a number of seconds >= 0, got nan"),
        ({"drain_timeout": -1}, "drain_timeout must be a number of seconds >= 0, got -1"),
        ({"max_queue": 1.5}, "max_queue must be a whole number >= 1, got 1.5"),
        ({"cache_size": 0}, "cache_size must be a whole number >= 1, got 0"),
        # (each of these crashed unnamed, or was taken: a budget whose bucket never fills lets every
        # uncached request through unbilled; an infinite wait never ends: a drain, a breaker, a refusal)
        ({"exclude": [1]}, "exclude: 1: a path starting with '/'"),
        ({"exclude": [b"/health"]}, "exclude: b'/health': a path starting with '/'"),
        ({"exclude": ["/internal/*/status"]}, "'/internal/*/status': '*' only ends a prefix"),
        ({"calls_per_minute": "90"}, "calls_per_minute must be a number > 0 (or None: no budget), got '90'"),
        ({"calls_per_minute": True}, "calls_per_minute must be a number > 0"),
        ({"calls_per_minute": math.inf}, "calls_per_minute must be a number > 0"),
        ({"call_burst": math.nan}, "call_burst must be a whole number >= 1, got nan"),
        ({"call_burst": 2.5}, "call_burst must be a whole number >= 1, got 2.5"),
        ({"breaker_threshold": True}, "breaker_threshold must be a whole number >= 1, got True"),
        ({"breaker_threshold": math.nan}, "breaker_threshold must be a whole number >= 1, got nan"),
        ({"breaker_cooldown": "15"}, "breaker_cooldown must be a number of seconds > 0, got '15'"),
        ({"breaker_cooldown": math.inf}, "breaker_cooldown must be a finite number of seconds, got inf"),
        ({"drain_timeout": math.inf}, "drain_timeout must be a finite number of seconds, got inf"),
        ({"flush_interval": math.inf}, "flush_interval must be a finite number of seconds, got inf"),
        ({"cache_negative_ttl": math.inf}, "cache_negative_ttl must be a finite number of seconds, got inf"),
        (
            {"routes": {"GET /metrics": "api_calls"}, "metrics_path": "/metrics"},
            "metrics_path '/metrics' is a metered route's path",
        ),
    ],
)
def test_wrong_options_are_refused_by_name(billing: LocalBilling, options: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"billing": billing, "customer": by_header, **options}
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        BillingMiddleware(Starlette(), **settings)
    assert "key_alice" not in str(refused.value)  # a key store passed by mistake is not shown


def test_a_resolver_that_is_a_method_of_a_mapping_is_taken(billing: LocalBilling) -> None:
    """Only a mapping's ``get`` or ``[]`` (a key store) is refused as the resolver, not another method of one."""

    class Accounts(dict[str, str]):
        def customer_of(self, request: Request) -> str | None:
            return self.get(request.headers.get("x-api-key", ""))

    BillingMiddleware(Starlette(), billing=billing, customer=Accounts().customer_of)


def test_a_feature_the_local_plans_do_not_declare_is_warned_of_at_construction(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    routes: dict[str, str | Metered | None] = {"/a": "api_calls", "/b/{id}": "exprot", "/c": None}
    BillingMiddleware(Starlette(), billing=billing, customer=by_header, routes=routes, default_feature="api_cals")
    warned = warnings_in(caplog)
    assert len(warned) == 1 and warned[0].startswith("features ['api_cals', 'exprot'] are metered but not in the plans")
    caplog.clear()
    known: dict[str, str | Metered | None] = {"/a": "export"}
    BillingMiddleware(Starlette(), billing=billing, customer=by_header, routes=known, default_feature="tokens")
    assert not caplog.records


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def unserved_warning(keys: list[str]) -> str:
    """What the middleware says at start-up of ``keys`` no route serves."""
    return f"routes {keys} are metered but no route of the app serves them: a typo? (the routes meant go unmetered)"


async def test_a_key_no_route_serves_is_warned_of_at_start_up(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in ``routes=`` leaves the route it meant served unmetered: said once the app has all its routes."""

    async def opaque(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("files")(scope, receive, send)

    starlette = Starlette(
        routes=[
            Route("/v1/search", hello, methods=["POST"]),
            Route("/v1/items/{item_id:int}", hello),
            Route("/reports/", hello),
            Mount("/files", app=opaque),  # shows no routes: it may serve any path under it
        ]
    )
    routes: dict[str, str | Metered | None] = {
        "POST /v1/search": "api_calls",
        "GET /v1/item/{item_id:int}": "api_calls",  # the typo: /v1/items/... goes unmetered
        "GET /v1/search": "api_calls",  # a method the route does not take (405)
        "/v1/items/{id}": "api_calls",
        "/reports": "api_calls",  # served by a redirect to "/reports/"
        "/files/{name}": "api_calls",
        "/free": None,
    }
    async with lifespan(BillingMiddleware(starlette, billing=billing, customer=by_header, routes=routes)):
        pass
    assert warnings_in(caplog) == [unserved_warning(["GET /v1/item/{item_id:int}", "GET /v1/search"])]
    caplog.clear()

    fastapi = FastAPI()

    @fastapi.post("/v1/chat")
    async def chat() -> dict[str, str]:
        return {}

    fastapi.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes={"POST /v1/chta": "tokens"})
    async with lifespan(fastapi):
        pass
    assert "routes ['POST /v1/chta'] are metered but no route" in caplog.text


async def test_a_key_no_route_of_an_included_fastapi_router_serves_is_warned_of_too(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI includes a router as a route of its own kind (``_IncludedRouter``), which the walk of
    the routes cannot see into: it is asked whether it takes each key's path (it took every path)."""
    router = APIRouter(prefix="/v1")

    @router.get("/search")
    async def search() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(router)
    routes: dict[str, str | Metered | None] = {
        "/v1/search": "api_calls",
        "HEAD /v1/search": "api_calls",  # (HEAD follows GET, as in the table)
        "/v1/serch": "api_calls",  # the typo
        "POST /v1/search": "api_calls",  # a method the route does not take
    }
    async with lifespan(BillingMiddleware(app, billing=billing, customer=by_header, routes=routes)):
        pass
    assert warnings_in(caplog) == [unserved_warning(["/v1/serch", "POST /v1/search"])]


async def test_quota_headers_show_what_is_left_once_billed_and_only_on_answers_billed(billing: LocalBilling) -> None:
    async def llm(request: Request) -> Response:
        report_usage(30)  # before the response starts: in its headers
        return PlainTextResponse("answer")

    async def missing(request: Request) -> Response:
        return PlainTextResponse("no such item", status_code=404)

    app = Starlette(routes=[Route("/llm", llm), Route("/items", missing)])
    routes: dict[str, str | Metered | None] = {"/llm": Metered("tokens", quantity=None), "/items": "tokens"}
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes)
    async with serve(middleware) as client:
        answered = await client.get("/llm", headers=as_customer("user_free"))
        not_found = await client.get("/items", headers=as_customer("user_free"))
    assert answered.headers["ratelimit"].startswith('"tokens";r=70;')  # of 100
    assert "ratelimit" not in not_found.headers and not_found.headers["x-request-id"]


def test_leaving_out_the_customer_is_an_error_not_an_app_served_free(billing: LocalBilling) -> None:
    with pytest.raises(TypeError, match="customer"):
        BillingMiddleware(Starlette(), billing=billing, default_feature="api_calls")  # type: ignore[call-arg]
    late = BillingMiddleware(Starlette(), billing=billing, customer=None, default_feature="api_calls")  # said so
    assert late.routes.match("GET", "/") is not None


async def test_dot_segments_do_not_take_a_file_out_of_an_excluded_prefix(billing: LocalBilling, tmp_path: Path) -> None:
    """StaticFiles resolves "..": "/static/free/../paid.zip" (as a server passes "%2E%2E" on, decoded)
    started with the excluded "/static/free/" and was served, ungated and unbilled, from outside it."""
    (tmp_path / "free").mkdir()
    (tmp_path / "free" / "readme.txt").write_text("free")
    (tmp_path / "paid.zip").write_text("PAID")
    app = Starlette(routes=[Mount("/static", StaticFiles(directory=tmp_path))])
    middleware = BillingMiddleware(
        app, billing=billing, customer=by_header, default_feature="api_calls", exclude=["/static/free/*"]
    )
    async with lifespan(middleware):
        escaping = [
            await call_raw(middleware, http_scope(path))
            for path in ("/static/free/../paid.zip", "/static/free/./../paid.zip")
        ]
        staying = await call_raw(middleware, http_scope("/static/free/./readme.txt"))
        paid = await call_raw(middleware, http_scope("/static/free/../paid.zip", headers=FREE))
    assert [exchange.status for exchange in escaping] == [401, 401]
    assert (staying.status, staying.header("x-request-id")) == (200, None)
    assert paid.status == 200 and await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize("found", [True, False], ids=["found_table", "plain_dict"])
async def test_a_file_metered_by_a_key_written_by_hand_is_gated_whatever_its_spelling(
    billing: LocalBilling, tmp_path: Path, found: bool
) -> None:
    """StaticFiles serves "/static//paid.zip", "/static/paid.zip/" and "/static/x/../paid.zip" as
    "/static/paid.zip": a key written for it (``also=``, of a mount whose files no table sees) is
    compared as that app routes it, not as requested, or the variants were served free."""
    (tmp_path / "paid.zip").write_text("PAID")
    app = Starlette(routes=[Route("/v1/search", hello), Mount("/static", StaticFiles(directory=tmp_path))])
    routes = route_table([("GET /v1/search", Metered("api_calls"))], {"GET /static/paid.zip": "export"})
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes if found else dict(routes))
    variants = ("/static/paid.zip", "/static//paid.zip", "/static/paid.zip/", "/static/x/../paid.zip")
    async with lifespan(middleware):
        anonymous = [await call_raw(middleware, http_scope(path)) for path in variants]
        head = await call_raw(middleware, http_scope("/static//paid.zip", method="HEAD"))
        free_plan = [await call_raw(middleware, http_scope(path, headers=FREE)) for path in variants]
    assert [exchange.status for exchange in (*anonymous, head)] == [401] * 5
    assert [exchange.status for exchange in free_plan] == [403] * 4  # (no export on the free plan)


async def test_a_root_path_ending_mid_segment_leaves_a_free_route_starlette_serves_free(
    billing: LocalBilling,
) -> None:
    """Under root path "/api", Starlette routes "/apiv1/search" whole, to its free route; the
    middleware, finding the whole path unmetered, matched "v1/search" and gated it as /v1/search."""
    app = Starlette(routes=[Route("/apiv1/search", hello), Route("/v1/search", hello)])
    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes={"/v1/search": "api_calls"})
    scope = http_scope("/apiv1/search")
    scope["root_path"] = "/api"
    async with lifespan(middleware):
        exchange = await call_raw(middleware, scope)
    assert (exchange.status, exchange.header("x-request-id")) == (200, None)


def test_with_exact_paths_exclusions_still_cover_a_final_newline_and_prefixes_their_directory() -> None:
    """ "/health%0A" is served by the excluded "/health" (a pattern's "$" matches before a final
    newline); a route at "/internal/" is what "/internal/*" excludes: configured both ways, refused."""
    found = route_table([("GET /health", None)])
    table = RouteTable(found, default_feature="api_calls", exclude=["/health"], exact_paths=True)
    assert table.match("GET", "/health\n") is EXCLUDED and table.match("GET", "/other") == Metered("api_calls")
    with pytest.raises(ValueError, match="also excluded"):
        RouteTable(route_table([("GET /internal/", Metered("api_calls"))]), exclude=["/internal/*"], exact_paths=True)


async def test_a_slash_variant_of_an_excluded_path_a_metered_template_serves_is_metered(
    billing: LocalBilling,
) -> None:
    """Starlette routes "/v1/health/" (the excluded "/v1/health" with a slash) to "/v1/{dataset}/",
    and "/v1/files/" to "/v1/files/{name:path}": with the app's routes found (``declared(app)``),
    metered as the templates serving them. The excluded spelling stays excluded, and so does a
    variant a route of the app serves itself, or no template takes (a redirect); a table written by
    hand, which does not know the app's routes, excludes every variant."""
    served: list[str] = []

    async def endpoint(request: Request) -> Response:
        served.append(request.url.path)
        return PlainTextResponse("ok")

    paths = ["/v1/health", "/v1/status/", "/v1/status", "/v1/files", "/v1/files/{name:path}", "/v1/{dataset}/"]
    app = Starlette(routes=[Route(path, endpoint) for path in paths])
    metered = {"/v1/files/{name:path}", "/v1/{dataset}/"}
    found = route_table((f"GET {path}", Metered("api_calls") if path in metered else None) for path in paths)
    middleware = BillingMiddleware(
        app, billing=billing, customer=by_header, routes=found, exclude=["/v1/health", "/v1/files", "/v1/status"]
    )
    async with lifespan(middleware):
        variants = [(await call_raw(middleware, http_scope(path))).status for path in ("/v1/health/", "/v1/files/")]
        excluded = [
            (await call_raw(middleware, http_scope(path))).status for path in ("/v1/health", "/v1/files", "/v1/status/")
        ]
        paid = await call_raw(middleware, http_scope("/v1/health/", headers=FREE))
    assert (variants, excluded, paid.status) == ([401, 401], [200, 200, 200], 200)
    assert served == ["/v1/health", "/v1/files", "/v1/status/", "/v1/health/"]
    assert await billing.recorded_units("user_free", "api_calls") == 1
    routes: dict[str, Metered | None] = {"GET /v1/{dataset}/": Metered("api_calls"), "GET /v1/health": None}
    exact = RouteTable(route_table(routes.items()), exclude=["/v1/health"], exact_paths=True)
    assert exact.match("GET", "/v1/health/") == Metered("api_calls")
    assert [exact.match("GET", path) for path in ("/v1/health", "/v1/health\n")] == [EXCLUDED] * 2
    by_hand = RouteTable(routes, exclude=["/v1/health"])
    assert [by_hand.match("GET", path) for path in ("/v1/health", "/v1/health/", "//v1/health")] == [EXCLUDED] * 3


def test_a_template_exclusions_variant_and_two_final_newlines_a_metered_template_serves_are_metered() -> None:
    """With the app's routes found: "/items/42/" is the metered "/items/{item_id}/{path:path}"'s (an
    empty path), not the excluded "/items/{item_id}"'s, and "/docs/index\n\n" the metered "/docs/{name}"'s
    (Starlette's "$" takes one final newline, not two): both were taken as excluded, served free."""
    found = route_table(
        [
            ("GET /docs/index", None),
            ("GET /docs/{name}", Metered("api_calls")),
            ("GET /items/{item_id}", None),
            ("GET /items/{item_id}/{path:path}", Metered("api_calls")),
        ]
    )
    table = RouteTable(found, exclude=["/docs/index", "/items/{item_id}"], exact_paths=True)
    metered = ["/items/42/", "/items/42//", "/docs/index\n\n", "/docs/other"]
    assert [table.match("GET", path) for path in metered] == [Metered("api_calls")] * 4
    excluded = ["/items/42", "/items/42\n", "/docs/index", "/docs/index\n"]
    assert [table.match("GET", path) for path in excluded] == [EXCLUDED] * 4


def test_a_path_an_exclusion_takes_as_requested_or_as_written_is_excluded() -> None:
    """ "/items/42/" is the excluded "/items/{item_id}/" as written (the app's free route), and another
    exclusion's "/items/{item_id}/{rest:path}" as requested: taken for a variant of the canonical
    "/items/{item_id}", it was metered as the later template, the free route billed."""
    found = route_table([("GET /items/{item_id}/{rest:path}", Metered("api_calls"))])
    as_written = RouteTable(found, exclude=["/items/{item_id}/"], exact_paths=True)
    assert as_written.match("GET", "/items/42/") is EXCLUDED
    found = route_table([("GET /items/{item_id}/{rest:path}", UNDECLARED), ("GET /{path:path}", Metered("api_calls"))])
    both = RouteTable(
        found,
        default_feature="api_calls",
        exclude=["/items/{item_id}", "/items/{item_id}/{rest:path}"],
        exact_paths=True,
    )
    assert [both.match("GET", path) for path in ("/items/42/x", "/items/42/", "/items/42")] == [EXCLUDED] * 3
    # The canonical form of one written with its slash is another route's, here metered: not excluded.
    found = route_table([("GET /items/{item_id}", Metered("api_calls")), ("GET /items/{item_id}/", None)])
    slashed = RouteTable(found, exclude=["/items/{item_id}/"], exact_paths=True)
    assert [slashed.match("GET", path) for path in ("/items/42", "/items/42/")] == [Metered("api_calls"), EXCLUDED]


def test_a_route_written_with_its_slash_takes_that_path_before_a_catch_all() -> None:
    """FastAPI's "/items/" and "/users/{uid}/" serve their paths before a later catch-all (a single
    page app's fallback): matching templates first on the path as requested metered them as it."""
    table = RouteTable({"GET /items/": "api_calls", "GET /users/{uid}/": "api_calls", "GET /{full_path:path}": None})
    assert [table.match("GET", path) for path in ("/items/", "/users/7/")] == [Metered("api_calls")] * 2


def test_an_excluded_prefix_takes_a_directory_url_before_a_template() -> None:
    """ "/files/public/*" takes "/files/public/", "/files/public/sub/" and "/files//public/x" (a
    StaticFiles mount's pages), though a metered "/files/{rest:path}" takes them as requested too."""
    table = RouteTable({"/files/{rest:path}": "downloads"}, exclude=["/files/public/*"])
    paths = ("/files/public/", "/files/public/sub/", "/files//public/x")
    assert [table.match("GET", path) for path in paths] == [EXCLUDED] * 3
    assert table.match("GET", "/files/x/") == Metered("downloads")


def test_dot_segments_resolving_to_a_directory_keep_its_slash() -> None:
    table = RouteTable(default_feature="api_calls", exclude=["/public/*"])
    assert [table.match("GET", path) for path in ("/public/.", "/public/sub/..")] == [EXCLUDED] * 2
    assert table.match("GET", "/public/../paid.zip") == Metered("api_calls")
