"""Which templates share paths, and so the table routing each request to the route the app serves it by."""

from __future__ import annotations

import random
import re

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, Router
from starlette.types import Message, Scope

from billingos_asgi import BillingMiddleware, LocalBilling
from billingos_asgi._overlap import overlap
from billingos_asgi.discovery import declared_routes
from billingos_asgi.routes import RouteTable
from billingos_starlette import declared, metered

from ..asgi import serve
from .support import as_customer, by_header


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


#: Path segments, a parameter's name left to fill in (a template names each parameter once).
SEGMENTS = ["a", "b", "7", "0.5", "items", "{{p{}}}", "{{p{}:int}}", "{{p{}:float}}", "{{p{}:uuid}}", "f-{{p{}}}.txt"]
PARAMETER = re.compile(r"{[^}]*}")
REQUESTED = ["a", "b", "7", "0.5", "items", "x", "7/8", "f-1.txt", "00000000-0000-0000-0000-000000000000"]


def random_app(rng: random.Random) -> tuple[list[Route], dict[str, str | None]]:
    """Up to five routes on random templates and methods, some metered: the routes, and each endpoint's feature."""
    routes: list[Route] = []
    features: dict[str, str | None] = {}
    for index in range(rng.randint(1, 5)):
        path = "/" + "/".join(rng.choice(SEGMENTS).format(at) for at in range(rng.randint(1, 3)))
        if rng.random() < 0.2:
            path += "/{rest:path}"
        name, feature = f"route{index}", rng.choice([None, f"feature{index}"])

        async def endpoint(request: Request, name: str = name) -> PlainTextResponse:
            return PlainTextResponse(name)

        routes.append(Route(path, metered(feature)(endpoint) if feature else endpoint, methods=rng.choice(METHODS)))
        features[name] = feature
    return routes, features


METHODS = [["GET"], ["POST"], ["GET", "POST"], None]


async def served_by(router: Router, method: str, path: str) -> str | None:
    """The route that serves the request (its name), as the app routes it; None: no route does."""
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


async def test_the_table_meters_each_request_as_the_route_that_serves_it() -> None:
    """Random apps of overlapping templates, free and metered: for every request the app serves,
    the table names the feature of the route that serves it (seeded: a failure reproduces)."""
    rng = random.Random(20261201)
    checked = 0
    for _ in range(1_000):
        routes, features = random_app(rng)
        try:
            table = RouteTable(declared_routes(routes))
        except ValueError:  # a template declared twice with different features: refused, by design
            continue
        router = Router(routes=routes)
        for _ in range(12):
            method = rng.choice(["GET", "POST", "HEAD"])
            if rng.random() < 0.5:  # one of a route's own paths, its parameters given any value
                path = PARAMETER.sub(lambda _: rng.choice(REQUESTED), rng.choice(routes).path)
            else:
                path = "/" + "/".join(rng.choice(REQUESTED) for _ in range(rng.randint(1, 3)))
            name = await served_by(router, method, path)
            if name is None:
                continue
            metered_as = table.match(method, path)
            assert (metered_as.feature if metered_as else None) == features[name], (method, path, routes)
            checked += 1
    assert checked > 2_000  # the sweep reaches served requests, not only 404s and 405s
