"""Litestar: its own auth middleware names the customer, the plugin's guard gates before the handler runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

pytest.importorskip("litestar")

from litestar import Litestar, Request, Response, asgi, get, post  # noqa: E402
from litestar.connection import ASGIConnection  # noqa: E402
from litestar.exceptions import NotAuthorizedException, NotFoundException  # noqa: E402
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware  # noqa: E402
from litestar.response import Redirect  # noqa: E402
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware  # noqa: E402

from billingos_asgi import BillingMiddleware, LocalBilling, from_api_key  # noqa: E402
from billingos_asgi.local.background import serve_in_thread  # noqa: E402
from billingos_asgi.testing import lifespan  # noqa: E402
from billingos_litestar import BillingPlugin  # noqa: E402

from ..asgi import serve  # noqa: E402
from ..middleware.support import PLANS, raw_http  # noqa: E402

TOKENS = {"token-free": "user_free", "token-pro": "user_pro"}
ENTERED: list[str] = []  # the handlers a request reached, in order
ROUTES = {
    "GET /v1/search": "api_calls",
    "POST /v1/exports": "export",
    "/v1/broken": "api_calls",
    "/v1/public": "tokens",
}


@dataclass
class Account:
    customer_id: str


class TokenAuth(AbstractAuthenticationMiddleware):
    """The app's own authentication: a bearer token names the account, or Litestar answers 401."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        customer = TOKENS.get(token) if scheme == "Bearer" else None
        if customer is None:
            raise NotAuthorizedException("a bearer token is required")
        return AuthenticationResult(user=Account(customer), auth=token)


def account_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    user = connection.scope.get("user")  # absent on routes the auth middleware skips
    return user.customer_id if isinstance(user, Account) else None


@get("/v1/search")
async def search() -> dict[str, list[str]]:
    ENTERED.append("search")
    return {"results": []}


@post("/v1/exports")
async def export() -> dict[str, str]:
    ENTERED.append("export")
    return {"export": "started"}


@get("/v1/broken")
async def broken() -> Response[dict[str, str]]:
    ENTERED.append("broken")
    return Response({"error": "bad input"}, status_code=400)


@get("/v1/public")
async def public() -> dict[str, str]:
    ENTERED.append("public")
    return {"answer": "42"}


@get("/health")
async def health() -> dict[str, str]:
    ENTERED.append("health")
    return {"status": "ok"}


class Logged:
    """An app's own pure ASGI middleware around Litestar, inside ours."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def build(billing: LocalBilling, *, wrapped: bool = False, **options: Any) -> BillingMiddleware:
    app: Any = Litestar(
        route_handlers=[search, export, broken, public, health],
        middleware=[DefineMiddleware(TokenAuth, exclude=["/health", "/v1/public"])],
        plugins=[BillingPlugin(customer=account_of)],
        logging_config=None,  # leave the test process's logging alone
    )
    if wrapped:
        app = Logged(app)
    return BillingMiddleware(app, billing=billing, customer=None, routes=ROUTES, **options)


def identified_late(handlers: list[Any], customer: Any, billing: LocalBilling, **options: Any) -> BillingMiddleware:
    """``handlers`` in a Litestar app whose plugin names the customer (``customer``), metered as ``options`` say."""
    app = Litestar(route_handlers=handlers, plugins=[BillingPlugin(customer=customer)], logging_config=None)
    return BillingMiddleware(app, billing=billing, customer=None, **options)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
def entered() -> Iterator[list[str]]:
    ENTERED.clear()
    yield ENTERED


async def test_the_authenticated_account_pays_and_handlers_run_only_once_admitted(
    billing: LocalBilling, entered: list[str]
) -> None:
    async with serve(build(billing)) as client:
        unauthenticated = await client.get("/v1/search")
        anonymous = await client.get("/v1/public")  # metered, but no auth ran: nobody to bill
        searches = [await client.get("/v1/search", headers=bearer("token-free")) for _ in range(11)]
        forbidden = await client.post("/v1/exports", headers=bearer("token-free"))
        exported = await client.post("/v1/exports", headers=bearer("token-pro"))
        healthy = await client.get("/health")
    assert unauthenticated.status_code == 401  # Litestar's own auth answered
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert anonymous.json()["feature"] == "tokens"
    assert [r.status_code for r in searches] == [200] * 10 + [429]
    refused = searches[-1]
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["feature"] == "api_calls" and int(refused.headers["retry-after"]) > 0
    assert refused.headers["ratelimit"].startswith('"api_calls";r=0')
    assert searches[0].headers["ratelimit"].startswith('"api_calls";r=9')
    assert forbidden.status_code == 403 and forbidden.json()["detail"] == "your plan does not include export"
    assert exported.status_code == 201 and "x-request-id" in exported.headers
    assert healthy.status_code == 200 and "x-request-id" not in healthy.headers
    assert entered == ["search"] * 10 + ["export", "health"]
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_a_problem_factorys_content_type_given_as_a_header_is_kept(billing: LocalBilling) -> None:
    from starlette.responses import Response as StarletteResponse

    def problem(denial: Any) -> StarletteResponse:
        return StarletteResponse(
            b'{"error": "sign in"}', denial.status, headers={"content-type": "application/vnd.acme+json"}
        )

    async with serve(build(billing, problem_factory=problem)) as client:
        anonymous = await client.get("/v1/public")  # metered, no auth ran: refused by the plugin's gate
    assert (anonymous.status_code, anonymous.headers["content-type"]) == (401, "application/vnd.acme+json")


def test_a_customer_that_is_no_function_is_refused_at_start_up() -> None:
    """A dotted path (as Django's BILLINGOS_CUSTOMER takes) failed in the guard of every metered request,
    which on_error="allow" then served unbilled to anyone, signed in or not."""
    with pytest.raises(ValueError, match="customer must be a function"):
        BillingPlugin(customer=f"{__name__}.account_of")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="customer must be a function of the connection, got dict$"):
        BillingPlugin(customer=TOKENS)  # type: ignore[arg-type]  # (its keys are never quoted)


async def test_a_failing_answer_is_not_billed(billing: LocalBilling, entered: list[str]) -> None:
    async with serve(build(billing)) as client:
        failed = await client.get("/v1/broken", headers=bearer("token-pro"))
        succeeded = await client.get("/v1/search", headers=bearer("token-pro"))
    assert (failed.status_code, succeeded.status_code) == (400, 200)
    assert entered == ["broken", "search"]
    assert await billing.recorded_units("user_pro", "api_calls") == 1


@get("/v1/orders/{order_id:int}")
async def order(request: Request[Any, Any, Any]) -> dict[str, int]:
    order_id: int = request.path_params["order_id"]
    ENTERED.append(f"order {order_id}")
    if order_id != 1:
        raise NotFoundException("no such order")
    return {"order": order_id}


def home(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return Redirect("/")


async def test_a_handler_that_raised_is_not_billed_whatever_the_apps_handler_answers(
    billing: LocalBilling, entered: list[str]
) -> None:
    """SPEC: the app raised, not billed; here a handler's NotFoundException the app answers with a redirect home."""
    app = Litestar(
        route_handlers=[order],
        plugins=[BillingPlugin(customer=lambda connection: "user_free")],
        exception_handlers={NotFoundException: home},
        logging_config=None,
    )
    metered = BillingMiddleware(
        app, billing=billing, customer=None, routes={"GET /v1/orders/{order_id:int}": "api_calls"}
    )
    async with serve(metered) as client:
        answers = [await client.get(f"/v1/orders/{i}") for i in (2, 1)]
    assert [answer.status_code for answer in answers] == [302, 200] and entered == ["order 2", "order 1"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_customer_resolved_before_litestar_is_left_alone(billing: LocalBilling, entered: list[str]) -> None:
    asked: list[str] = []

    def not_expected(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
        asked.append(connection.url.path)
        return None

    app = Litestar(route_handlers=[search], plugins=[BillingPlugin(customer=not_expected)], logging_config=None)
    keys = {"key-pro": "user_pro"}
    metered = BillingMiddleware(app, billing=billing, customer=from_api_key(keys.get), routes=ROUTES)
    async with serve(metered) as client:
        answers = [(await client.get("/v1/search", headers={"x-api-key": key})).status_code for key in ("key-pro", "x")]
    assert answers == [200, 401]
    assert asked == [] and entered == ["search"]
    assert await billing.recorded_units("user_pro", "api_calls") == 1


async def test_slashes_do_not_take_a_request_past_the_gate(billing: LocalBilling, entered: list[str]) -> None:
    """Litestar serves "/v1/search/" and "/v1//search" as "/v1/search": metered the same."""
    async with serve(build(billing)) as client:
        searches = [await client.get(path, headers=bearer("token-free")) for path in ("/v1/search/", "/v1//search/")]
        forbidden = await client.post("/v1/exports/", headers=bearer("token-free"))
    assert [r.status_code for r in searches] == [200] * 2 and all("x-request-id" in r.headers for r in searches)
    assert forbidden.status_code == 403 and "export" not in entered
    assert await billing.recorded_units("user_free", "api_calls") == 2


@get("/v1/items/{item_id:int}")
async def item(request: Request[Any, Any, Any]) -> dict[str, int]:
    ENTERED.append("item")
    return {"item": request.path_params["item_id"]}  # as Litestar parsed it


async def test_a_typed_parameter_is_metered_in_every_spelling_litestar_parses(
    billing: LocalBilling, entered: list[str]
) -> None:
    metered = identified_late(
        [item], lambda connection: "user_free", billing, routes={"GET /v1/items/{item_id:int}": "api_calls"}
    )
    assert metered.routes.match("GET", "/v1/items/+5") is not None  # Litestar's app: matched as it parses
    paths = ["/v1/items/5", "/v1/items/+5", "/v1/items/5_0", "/v1/items/%205", "/v1/items/%EF%BC%95"]
    async with serve(metered) as client:
        answers = [await client.get(path) for path in paths]
    assert [answer.json() for answer in answers] == [{"item": 5}] * 2 + [{"item": 50}] + [{"item": 5}] * 2
    assert all("x-request-id" in answer.headers for answer in answers)
    assert await billing.recorded_units("user_free", "api_calls") == 5


@asgi("/reports", is_mount=True, copy_scope=True)
async def reports(scope: Any, receive: Any, send: Any) -> None:
    ENTERED.append(f"reports {scope['path']}")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"paid report"})


@get("/reports-public")
async def reports_public() -> str:
    ENTERED.append("reports-public")
    return "free index"


async def test_every_path_litestar_sends_to_an_asgi_mount_is_metered(billing: LocalBilling, entered: list[str]) -> None:
    """Litestar sends every path starting with a mount's to it, a slash following or not:
    "/reportsX" and "/reports.pdf" were served by the mount at "/reports", ungated and unbilled.
    Not a route of its own it serves first ("/reports-public"), nor an excluded path."""
    metered = identified_late(
        [reports, reports_public, health],
        account_of,
        billing,
        routes={"/reports": "api_calls", "/reports/{p:path}": "api_calls"},
        exclude=["/reports-free/*"],
    )
    paths = ["/reports", "/reports/q1.pdf", "/reportsX", "/reports.pdf", "/reports-q1/q1.pdf"]
    async with serve(metered) as client:
        anonymous = [(await client.get(path)).status_code for path in paths]  # no user: nobody
        free = [await client.get(path) for path in ("/health", "/reports-public", "/reports-free/a")]
    assert anonymous == [401] * 5 and entered == ["health", "reports-public", "reports -free/a/"]
    assert [r.status_code for r in free] == [200] * 3 and not any("x-request-id" in r.headers for r in free)


@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_a_request_target_without_its_leading_slash_is_metered(
    tmp_path: Path, entered: list[str], root_path: str
) -> None:
    """Litestar routes a path as it normalizes it: uvicorn passes "GET v1/search HTTP/1.1" on as the
    path "v1/search" (no leading slash), which Litestar serves as /v1/search: metered the same.
    Under ``--root-path /api`` the path is "/apiv1/search", and Litestar routes what follows "/api"."""
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db")
    try:
        # (h11 takes such a target; httptools, where installed, refuses it with a 400 itself.)
        with serve_in_thread(build(billing), root_path=root_path, http="h11") as base_url:
            answers = [
                await raw_http(
                    base_url,
                    b"GET %s HTTP/1.1\r\nHost: app\r\nAuthorization: Bearer token-free\r\nConnection: close\r\n\r\n"
                    % target,
                )
                for target in (b"v1/search", b"v1/search/", b"v1//search")
            ]
        assert [answer.split(b" ", 2)[1] for answer in answers] == [b"200"] * 3
        assert all(b"\r\nx-request-id: " in answer for answer in answers)
        assert entered == ["search"] * 3
        assert await billing.recorded_units("user_free", "api_calls") == 3
    finally:
        await billing.aclose()


@pytest.mark.parametrize("wrapped", [False, True], ids=["litestar", "inside-another-wrapper"])
async def test_a_root_path_inside_the_path_is_metered_as_litestar_routes_it(
    billing: LocalBilling, entered: list[str], wrapped: bool
) -> None:
    """Litestar routes what follows the root path's first occurrence, wherever it is: from a server
    that leaves the path as requested (Hypercorn, given ``--root-path /api``), "/x/api/v1/search"
    is /v1/search there, so it is metered (and gated) as /v1/search. Litestar is found inside the
    app's own wrappers too."""
    transport = httpx.ASGITransport(app=build(billing, wrapped=wrapped), root_path="/api")  # (the path as requested)
    async with lifespan(transport.app), httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        anonymous = await client.get("/x/api/v1/public")
        searched = await client.get("/x/api/v1/search", headers=bearer("token-free"))
    assert anonymous.status_code == 401 and anonymous.json()["feature"] == "tokens"
    assert searched.status_code == 200 and searched.headers["ratelimit"].startswith('"api_calls";r=9')
    assert entered == ["search"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_what_follows_the_root_path_is_metered_as_litestar_routes_it(
    billing: LocalBilling, entered: list[str]
) -> None:
    """ "/apiv1/exports" under "/api" is /v1/exports to Litestar: gated as that route, not as the
    default feature taking the whole path."""
    transport = httpx.ASGITransport(app=build(billing, default_feature="api_calls"), root_path="/api")
    async with lifespan(transport.app), httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        refused = await client.post("/apiv1/exports", headers=bearer("token-free"))
    assert refused.status_code == 403 and refused.json()["feature"] == "export"
    assert entered == [] and await billing.recorded_units("user_free", "api_calls") == 0


@get("/v1/files")
async def listing() -> dict[str, list[str]]:
    ENTERED.append("listing")
    return {"files": []}


@get("/v1/files/{name:path}")
async def file(request: Request[Any, Any, Any]) -> dict[str, str]:
    ENTERED.append(request.path_params["name"])
    return {"file": request.path_params["name"]}


@get("/v1/notes/{title:str}")
async def note(request: Request[Any, Any, Any]) -> dict[str, str]:
    ENTERED.append(request.path_params["title"])
    return {"note": request.path_params["title"]}


async def test_a_parameter_with_newlines_is_metered_as_litestar_routes_it(
    billing: LocalBilling, entered: list[str]
) -> None:
    """Litestar's path parameters take newlines anywhere ("/v1/files/a%0Ab"), and it collapses the
    slashes before a final one ("/v1/notes//%0A" is the note "\\n"): both reach their handler."""
    metered = identified_late(
        [file, note],
        lambda connection: "user_free",
        billing,
        routes={"GET /v1/files/{name:path}": "api_calls", "GET /v1/notes/{title}": "api_calls"},
    )
    async with serve(metered) as client:
        answers = [await client.get(path) for path in ("/v1/files/a%0Ab", "/v1/notes//%0A", "/v1//notes/%0A%0A")]
    assert [answer.status_code for answer in answers] == [200] * 3
    assert all("x-request-id" in answer.headers for answer in answers)
    assert entered == ["/a\nb", "\n", "\n\n"]
    assert await billing.recorded_units("user_free", "api_calls") == 3
    # "GET v1/notes/%0A HTTP/1.1" (h11 passes it on without its leading slash): the note "\n" too.
    assert metered.routes.match("GET", "v1/notes/\n") is not None


@get("/v1/notes/index")
async def notes_index() -> str:
    ENTERED.append("index")
    return "free index"


@get("/reports/public")
async def reports_public_under_the_mount() -> str:
    ENTERED.append("public")
    return "free index"


async def test_a_final_newline_is_metered_as_the_mount_or_template_litestar_sends_it_to(
    billing: LocalBilling, entered: list[str]
) -> None:
    """Litestar compares a plain route's path as it is: "/reports/public%0A" is no "/reports/public",
    but the mount's around it, and "/v1/notes/index%0A" the note "index\n", not the free index."""
    routes = {
        "/reports": "api_calls",
        "/reports/{p:path}": "api_calls",
        "/reports/public": None,
        "GET /v1/notes/{title}": "api_calls",
        "GET /v1/notes/index": None,
    }
    handlers = [reports, reports_public_under_the_mount, note, notes_index]
    metered = identified_late(handlers, account_of, billing, routes=routes)  # no user: nobody
    async with serve(metered) as client:
        free = [(await client.get(path)).status_code for path in ("/reports/public", "/v1/notes/index")]
        anonymous = [(await client.get(path)).status_code for path in ("/reports/public%0A", "/v1/notes/index%0A")]
    assert (free, anonymous) == ([200, 200], [401, 401])
    assert entered == ["public", "index"]


@pytest.mark.parametrize("resolved_outside", [True, False])
async def test_a_move_to_https_by_litestar_middleware_is_not_billed(
    billing: LocalBilling, resolved_outside: bool
) -> None:
    """Litestar names the route handler before its middleware runs: an https redirect there is still
    the framework's, neither billed nor a success that named no customer."""
    app = Litestar(
        route_handlers=[search],
        middleware=[HTTPSRedirectMiddleware],  # type: ignore[list-item]  # (an ASGI class, as Litestar takes)
        plugins=[BillingPlugin(customer=lambda connection: "user_free")],
        logging_config=None,
    )
    resolver = (lambda request: "user_free") if resolved_outside else None
    metered = BillingMiddleware(app, billing=billing, customer=resolver, routes={"GET /v1/search": "api_calls"})
    async with serve(metered, base_url="http://api.example") as client:
        answer = await client.get("/v1/search")
    assert (answer.status_code, answer.headers["location"]) == (307, "https://api.example/v1/search")
    assert (await billing.recorded_units("user_free", "api_calls"), metered.unidentified) == (0, 0)


async def test_a_prefix_exclusion_leaves_the_route_litestar_serves_a_slash_as_metered(
    billing: LocalBilling, entered: list[str]
) -> None:
    """Litestar serves "/v1/files/" as the listing at /v1/files: excluding the files ("/v1/files/*")
    leaves the listing metered, its slash or not."""
    metered = identified_late(
        [listing, file], account_of, billing, default_feature="api_calls", exclude=["/v1/files/*"]
    )
    async with serve(metered) as client:
        answers = [await client.get(path) for path in ("/v1/files", "/v1/files/", "/v1/files/a.txt")]
    assert [answer.status_code for answer in answers] == [401, 401, 200]
    assert entered == ["/a.txt"]


@pytest.mark.parametrize(
    "customer",
    [lambda connection: connection.user.customer_id, lambda connection: TOKENS[connection.auth]],
    ids=["connection.user", "connection.auth"],
)
@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_a_user_litestars_auth_did_not_set_is_nobody(
    billing: LocalBilling, entered: list[str], on_error: Literal["allow", "deny"], customer: Any
) -> None:
    """Litestar's auth middleware skips OPTIONS: reading connection.user then raises, and a customer
    function that reads it (the README's) failed, on_error deciding: served free, or a 503."""
    app = Litestar(
        route_handlers=[search, broken],
        middleware=[DefineMiddleware(TokenAuth)],
        plugins=[BillingPlugin(customer=customer)],
        logging_config=None,
    )
    metered = BillingMiddleware(app, billing=billing, customer=None, routes=ROUTES, on_error=on_error)
    async with serve(metered) as client:
        options = await client.options("/v1/broken", headers=bearer("token-free"))  # (no Origin: no preflight)
        searched = await client.get("/v1/search", headers=bearer("token-free"))
    assert (options.status_code, options.headers["content-type"]) == (401, "application/problem+json")
    assert searched.status_code == 200 and entered == ["search"]
    assert metered.unidentified == 0


@pytest.mark.parametrize(("on_error", "expected"), [("allow", 200), ("deny", 503)])
async def test_another_setup_error_of_the_customer_function_is_a_failure_on_error_decides(
    billing: LocalBilling, entered: list[str], on_error: Literal["allow", "deny"], expected: int
) -> None:
    """Only a user the auth did not set is nobody: a session read without its middleware is the
    app's failure, logged and decided by on_error, not a silent 401."""
    app = Litestar(
        route_handlers=[search],
        plugins=[BillingPlugin(customer=lambda connection: connection.session.get("customer"))],
        logging_config=None,
    )
    metered = BillingMiddleware(app, billing=billing, customer=None, routes=ROUTES, on_error=on_error)
    async with serve(metered) as client:
        assert (await client.get("/v1/search")).status_code == expected


async def test_a_slash_litestar_serves_from_a_free_route_is_not_metered_as_a_template(
    billing: LocalBilling, entered: list[str]
) -> None:
    """Litestar serves "/v1/files/" as the free listing at /v1/files, not as the metered
    "/v1/files/{name:path}" that the path as requested matched: it was gated and billed."""
    metered = identified_late(
        [listing, file], lambda connection: "user_free", billing, routes={"GET /v1/files/{name:path}": "api_calls"}
    )
    async with serve(metered) as client:
        answers = [await client.get(path) for path in ("/v1/files/", "/v1/files//", "/v1/files//a")]
    assert [answer.status_code for answer in answers] == [200] * 3
    assert ["ratelimit" in answer.headers for answer in answers] == [False, False, True]
    assert entered == ["listing", "listing", "/a"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


@get("/v1/{kind:str}/schema")
async def schema(request: Request[Any, Any, Any]) -> dict[str, str]:
    ENTERED.append(f"schema of {request.path_params['kind']}")
    return {"schema": request.path_params["kind"]}


@get("/v1/items/{item_id:str}")
async def item_by_name(request: Request[Any, Any, Any]) -> dict[str, str]:
    ENTERED.append(f"item {request.path_params['item_id']}")
    return {"item": request.path_params["item_id"]}


async def test_a_literal_segment_takes_a_path_before_a_parameter_as_litestar_routes_it(
    billing: LocalBilling, entered: list[str]
) -> None:
    """Litestar serves "/v1/items/schema" from /v1/items/{item_id} (its tree tries "items" before a
    parameter), whichever the table names first: it was metered as the free /v1/{kind}/schema."""
    routes = {"GET /v1/{kind}/schema": None, "GET /v1/items/{item_id}": "api_calls"}
    metered = identified_late([schema, item_by_name], lambda connection: "user_free", billing, routes=routes)
    async with serve(metered) as client:
        answers = [await client.get(path) for path in ("/v1/items/schema", "/v1/users/schema")]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert ["ratelimit" in answer.headers for answer in answers] == [True, False]
    assert entered == ["item schema", "schema of users"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize("cors", [True, False], ids=["cors_config", "automatic OPTIONS"])
async def test_a_cors_preflight_is_answered_by_litestar_unbilled(
    billing: LocalBilling, entered: list[str], cors: bool
) -> None:
    from litestar.config.cors import CORSConfig

    app = Litestar(
        route_handlers=[search],
        plugins=[BillingPlugin(customer=account_of)],
        cors_config=CORSConfig(allow_origins=["https://app.test"]) if cors else None,
        logging_config=None,
    )
    metered = BillingMiddleware(app, billing=billing, customer=None, default_feature="api_calls")
    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with serve(metered) as client:
        answered = await client.options("/v1/search", headers=preflight)
    assert answered.status_code == 204 and entered == [] and metered.unidentified == 0
    assert answered.headers.get("access-control-allow-origin") == ("https://app.test" if cors else None)


@get("/v1/concurrent")
async def concurrent(request: Request[Any, Any, Any]) -> dict[str, str | None]:
    import anyio

    from billingos_asgi import get_usage_context

    context = get_usage_context()
    assert context is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(context.identify, None)  # nobody: refused inside a task group
    return {"customer": context.customer_id}


async def test_a_refusal_litestar_makes_a_500_of_is_answered_with_its_cors_headers(billing: LocalBilling) -> None:
    """Raised in a task group, the refusal reaches Litestar as an ExceptionGroup (its 500, with the
    CORS headers of its cors_config): answered as the refusal, those headers kept for the page."""
    from litestar.config.cors import CORSConfig

    app = Litestar(
        route_handlers=[concurrent], cors_config=CORSConfig(allow_origins=["https://app.test"]), logging_config=None
    )
    metered = BillingMiddleware(app, billing=billing, customer=None, default_feature="api_calls")
    async with serve(metered) as client:
        answer = await client.get("/v1/concurrent", headers={"origin": "https://app.test"})
    assert (answer.status_code, answer.headers["content-type"]) == (401, "application/problem+json")
    assert answer.headers["access-control-allow-origin"] == "https://app.test"
