"""Which templates share paths, and so the table routing each request to the route the app serves it by."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, Router
from starlette.types import ASGIApp

from billingos_asgi import BillingMiddleware, LocalBilling
from billingos_asgi._overlap import overlap
from billingos_asgi.discovery import declared_routes
from billingos_asgi.routes import Metered
from billingos_starlette import declared, metered

from ..asgi import serve
from .support import RouteSpec, answer, as_customer, by_header, sweep


@pytest.mark.parametrize(
    ("template", "other", "shared"),
    [
        ("/{org}/b/items", "/b/{rest:path}", True),  # /b/b/items: no sample of either spells it
        ("/users/{id:int}", "/users/me", False),
        ("/users/{id:int}", "/users/{name}", True),
        ("/a/{f:float}", "/a/{n:int}", True),
        ("/a/{n:int}", "/a/1.5", False),
        ("/a/{f:float}", "/a/1.5", True),
        ("/u/{u:uuid}", "/u/{name}", True),
        ("/u/{u:uuid}", "/u/0123456789abcdef0123456789ABCDEF", True),  # its dashes are optional
        ("/u/{u:uuid}", "/u/0123", False),
        ("/x/{rest:path}", "/x", False),
        ("/x/{rest:path}", "/x/", True),
        ("/{a}", "/{b}/c", False),
        ("/{a}-{b}.txt", "/x-y.txt", True),
        ("/{a}-{b}.txt", "/x.txt", False),
        ("/f/{x:custom}", "/f/1", None),  # a type of the app's own: left to sample paths
    ],
)
def test_templates_share_a_path_exactly_when_one_matches_both(template: str, other: str, shared: bool | None) -> None:
    assert overlap(template, other) is shared
    assert overlap(other, template) is shared


async def test_a_free_template_before_a_metered_one_sharing_a_path_no_sample_finds_stays_free(
    billing: LocalBilling,
) -> None:
    async def org_items(request: Request) -> PlainTextResponse:
        return PlainTextResponse("free")

    @metered("api_calls")
    async def browse(request: Request) -> PlainTextResponse:
        return PlainTextResponse("metered")

    app = Starlette(routes=[Route("/{org}/b/items", org_items), Route("/b/{rest:path}", browse)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        free = await client.get("/b/b/items")  # the free route serves it first
        anonymous = await client.get("/b/shelf")
        paid = await client.get("/b/b/items", headers=as_customer("user_free"))
    assert (free.status_code, free.text, anonymous.status_code) == (200, "free", 401)
    assert paid.text == "free" and await billing.recorded_units("user_free", "api_calls") == 0


async def test_the_table_meters_each_request_as_the_route_that_serves_it() -> None:
    """Random apps of overlapping templates, free and metered: for every request the app serves,
    the table names the feature of the route that serves it (seeded: a failure reproduces)."""

    def starlette_app(specs: list[RouteSpec]) -> tuple[Mapping[str, str | Metered | None], ASGIApp]:
        routes = [
            Route(path, metered(feature)(answer(index)) if feature else answer(index), methods=methods)
            for index, (path, methods, feature) in enumerate(specs)
        ]
        return declared_routes(routes), Router(routes=routes)

    checked = await sweep(random.Random(20261201), [["GET"], ["POST"], ["GET", "POST"], None], starlette_app)
    assert checked > 2_000  # the sweep reaches served requests, not only 404s and 405s
