"""FastAPI: metering declared as a dependency, gated before the handler, documented, and the usage router."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("fastapi")

from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.middleware.gzip import GZipMiddleware  # noqa: E402
from starlette.routing import Mount  # noqa: E402
from starlette.types import ASGIApp  # noqa: E402

from billingos_asgi import BillingDenied, BillingMiddleware, LocalBilling, Metered, SessionToken, UsageContext  # noqa: E402
from billingos_fastapi import (  # noqa: E402
    Billing,
    BillingSessionToken,
    BillingUsage,
    declared,
    metered,
    usage_router,
)

from ..asgi import serve  # noqa: E402
from ..middleware.support import PLANS, RouteSpec, answer, as_customer, by_header, sweep  # noqa: E402


class SpyBilling(LocalBilling):
    """The real engine, noting whom it mints session tokens for."""

    minted_for: list[str]

    async def create_session_token(self, external_user_id: str, **kwargs: Any) -> SessionToken:
        self.minted_for.append(external_user_id)
        return await super().create_session_token(external_user_id, **kwargs)


@pytest.fixture
async def billing(tmp_path: Path) -> AsyncIterator[SpyBilling]:
    billing = SpyBilling.from_dict(PLANS, tmp_path / "billing.db")
    assert isinstance(billing, SpyBilling)
    billing.minted_for = []
    async with billing:
        yield billing


async def anonymous_then_paid(app: ASGIApp, method: str, path: str) -> tuple[int, int]:
    """The statuses of ``method path`` asked anonymously, then by a customer (user_free)."""
    async with serve(app) as client:
        anonymous = await client.request(method, path)
        paid = await client.request(method, path, headers=as_customer("user_free"))
    return anonymous.status_code, paid.status_code


def as_is(declaration: Any) -> Any:
    """``dependencies=[metered(...)]``: the declaration as :func:`metered` returns it."""
    return declaration


#: Each way of declaring: as metered() returns it, and wrapped again as FastAPI users habitually write.
DECLARED_AS = pytest.mark.parametrize("declare", [as_is, Depends], ids=["metered()", "Depends(metered())"])


def build(billing: LocalBilling, entered: list[str], declare: Callable[[Any], Any] = as_is) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/search", dependencies=[declare(metered("api_calls"))])
    async def search(billing: Billing) -> dict[str, Any]:
        entered.append("search")
        assert billing is not None and billing.entitlement is not None
        return {"request_id": billing.request_id, "limit": billing.entitlement.limit}

    tokens = declare(metered("tokens", quantity=None))  # as a parameter: the handler gets its context

    @app.post("/v1/chat")
    async def chat(billing: UsageContext | None = tokens) -> dict[str, str]:
        entered.append("chat")
        assert billing is not None
        billing.report(7)  # tokens the model used
        return {"answer": "42"}

    exports = APIRouter(prefix="/v1/exports", dependencies=[declare(metered("export"))])

    @exports.post("")
    async def export() -> dict[str, str]:
        entered.append("export")
        return {"export": "started"}

    app.include_router(exports)

    @app.get("/health")
    async def health() -> dict[str, str]:
        entered.append("health")
        return {"status": "ok"}

    app.include_router(usage_router(billing, by_header))
    app.add_middleware(
        BillingMiddleware, billing=billing, customer=by_header, routes=declared(app), flush_interval=0.05
    )
    return app


@DECLARED_AS
async def test_declared_routes_are_gated_before_the_handler_runs(
    billing: SpyBilling, declare: Callable[[Any], Any]
) -> None:
    entered: list[str] = []
    app = build(billing, entered, declare)
    async with serve(app) as client:
        assert (await client.get("/v1/search")).status_code == 401
        assert (await client.post("/v1/exports", headers=as_customer("user_free"))).status_code == 403
        answers = [(await client.get("/v1/search", headers=as_customer("user_free"))).status_code for _ in range(11)]
        first = await client.get("/v1/search", headers=as_customer("user_pro"))
        assert (await client.post("/v1/exports", headers=as_customer("user_pro"))).status_code == 200
        assert (await client.post("/v1/chat", headers=as_customer("user_free"))).status_code == 200
        assert (await client.get("/health")).status_code == 200
    assert answers == [200] * 10 + [429]
    assert first.json()["request_id"] == first.headers["x-request-id"]
    assert entered == ["search"] * 10 + ["search", "export", "chat", "health"]  # never on 401/403/429
    assert await billing.recorded_units("user_free", "api_calls") == 10
    assert await billing.recorded_units("user_free", "tokens") == 7


@DECLARED_AS
async def test_openapi_documents_the_answers_of_metered_routes_only(
    billing: SpyBilling, declare: Callable[[Any], Any]
) -> None:
    app = build(billing, [], declare)
    async with serve(app) as client:
        assert_documented((await client.get("/openapi.json")).json())


@DECLARED_AS
def test_openapi_documents_them_before_the_first_request(billing: SpyBilling, declare: Callable[[Any], Any]) -> None:
    """A script exporting the schema (to generate a client) asks the app before it ever served a request."""
    assert_documented(build(billing, [], declare).openapi())


@pytest.mark.parametrize("mounted", ["plain", "under middleware", "in an included router"])
async def test_a_mounted_apps_schema_documents_them_even_when_asked_before_start_up(
    billing: SpyBilling, mounted: str
) -> None:
    """The mounted app serves a schema of its own, cached by FastAPI from its first call."""
    sub = FastAPI()

    @sub.get("/reports", dependencies=[metered("exports")])
    async def reports() -> dict[str, str]:
        return {}

    app, prefix = FastAPI(), "/sub"
    if mounted == "plain":
        app.mount("/sub", sub)
    elif mounted == "under middleware":
        app.router.routes.append(Mount("/sub", app=sub, middleware=[Middleware(GZipMiddleware)]))
    else:
        router = APIRouter()
        router.mount("/sub", sub)
        app.include_router(router, prefix="/api")
        prefix = "/api/sub"
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    early = sub.openapi()  # a script exporting it, before the app starts
    async with serve(app) as client:
        assert (await client.get(f"{prefix}/reports", headers=as_customer("user_free"))).status_code == 403
        served = (await client.get(f"{prefix}/openapi.json")).json()
    for schema in (early, served):
        assert {"200", "401", "403", "429"} == set(schema["paths"]["/reports"]["get"]["responses"])


async def test_a_preflight_no_cors_layer_answers_is_gated_by_a_declared_route(billing: SpyBilling) -> None:
    """A route declared metered that serves OPTIONS, with no CORS middleware answering preflights
    first: a forged preflight (Origin and Access-Control-Request-Method) ran it ungated, unbilled."""
    app = FastAPI()
    entered: list[str] = []

    @app.api_route("/v1/describe", methods=["GET", "OPTIONS"], dependencies=[metered("api_calls")])
    async def describe() -> dict[str, str]:
        entered.append("describe")
        return {"described": "yes"}

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with serve(app) as client:
        anonymous = await client.options("/v1/describe", headers=preflight)
        named = await client.options("/v1/describe", headers=as_customer("user_free", **preflight))
    assert (anonymous.status_code, named.status_code, entered) == (401, 200, ["describe"])
    assert await billing.recorded_units("user_free", "api_calls") == 1


def test_openapi_keeps_a_routes_own_description_of_an_answer_given_under_a_string_status(billing: SpyBilling) -> None:
    """FastAPI takes ``responses={"401": ...}`` too: ours, added as 401 beside it, won the merge."""
    app = FastAPI()

    @app.get("/v1/search", dependencies=[metered("api_calls")], responses={"401": {"description": "Bad token"}})
    async def search() -> dict[str, str]:
        return {}

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    responses = app.openapi()["paths"]["/v1/search"]["get"]["responses"]
    assert responses["401"]["description"] == "Bad token"
    assert responses["429"]["description"].startswith("The feature's quota")


#: A module-level router, as apps write them, included by an app factory (in each test, each worker...).
SHARED_API = APIRouter()


@SHARED_API.get("/report", dependencies=[metered("api_calls")])
async def shared_report() -> dict[str, str]:
    return {}


@pytest.mark.parametrize("rebuilt_by", ["a second app including the router", "a route added at start-up"])
async def test_openapi_keeps_the_description_an_include_gives_an_answer(billing: SpyBilling, rebuilt_by: str) -> None:
    """``include_router(..., responses={401: ...})``: ours, written into the route's own responses,
    overrode the include's once FastAPI rebuilt the routes it includes."""
    grown = APIRouter()

    @grown.get("/report", dependencies=[metered("api_calls")])
    async def report() -> dict[str, str]:
        return {}

    @asynccontextmanager
    async def grows(app: FastAPI) -> AsyncIterator[None]:
        @grown.get("/later")
        async def later() -> dict[str, str]:
            return {}

        yield

    second_app = rebuilt_by.startswith("a second app")
    descriptions = []
    for _ in range(2 if second_app else 1):
        app, router = (FastAPI(), SHARED_API) if second_app else (FastAPI(lifespan=grows), grown)
        app.include_router(router, prefix="/api", responses={401: {"description": "Bad token"}})
        app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
        async with serve(app) as client:
            responses = (await client.get("/openapi.json")).json()["paths"]["/api/report"]["get"]["responses"]
        descriptions.append(responses["401"]["description"])
        assert responses["429"]["description"].startswith("The feature's quota")
    assert set(descriptions) == {"Bad token"}


def test_also_may_name_a_declared_routes_feature_as_routes_does(billing: SpyBilling) -> None:
    app = FastAPI()

    @app.get("/v1/search", dependencies=[metered("api_calls")])
    async def search() -> dict[str, str]:
        return {}

    same = declared(app, also={"GET /v1/search": "api_calls"})()["GET /v1/search"]
    assert same in ("api_calls", Metered("api_calls"))
    with pytest.raises(ValueError, match="GET /v1/search"):
        declared(app, also={"GET /v1/search": "tokens"})()


def assert_documented(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    for path, method in (("/v1/search", "get"), ("/v1/chat", "post"), ("/v1/exports", "post")):
        responses = paths[path][method]["responses"]
        assert {"401", "403", "429"} <= set(responses), (path, responses)
        assert "application/problem+json" in responses["429"]["content"]
    assert "429" not in paths["/health"]["get"]["responses"]
    assert set(paths["/billing/usage"]["get"]["responses"]) == {"200", "400", "401", "403", "503"}
    assert set(paths["/billing/session-token"]["post"]["responses"]) == {"201", "401", "503"}  # as it answers


async def test_openapi_documents_the_usage_routes_parameter_and_what_they_answer(billing: SpyBilling) -> None:
    app = build(billing, [])
    async with serve(app) as client:
        schema = (await client.get("/openapi.json")).json()
        usage = await client.get("/billing/usage", headers=as_customer("user_free"))
        token = await client.post("/billing/session-token", headers=as_customer("user_free"))
    usage_doc, token_doc = schema["paths"]["/billing/usage"]["get"], schema["paths"]["/billing/session-token"]["post"]
    # Documented for generated clients: the query parameter, and the success answers' shapes.
    assert [(parameter["name"], parameter["in"]) for parameter in usage_doc["parameters"]] == [("feature_key", "query")]
    usage_ref = usage_doc["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    token_ref = token_doc["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    assert (usage_ref, token_ref) == ("#/components/schemas/BillingUsage", "#/components/schemas/BillingSessionToken")
    # The documented shapes are the real answers' (and say which figures may be null: unlimited).
    assert BillingUsage.model_validate(usage.json()).customer_id == "user_free"
    assert BillingSessionToken.model_validate(token.json()).sessionToken == token.json()["sessionToken"]
    assert set(schema["components"]["schemas"]["BillingUsageMetric"]["properties"]) == set(usage.json()["metrics"][0])


def no_middleware(app: FastAPI, billing: SpyBilling) -> None:
    """The middleware forgotten: the route was never collected."""


def a_table_without_it(app: FastAPI, billing: SpyBilling) -> None:
    """Collected, but the middleware's table does not match the request (as a path variant once did)."""
    collect = declared(app)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=lambda: collect() and {})


def a_table_with_another_feature(app: FastAPI, billing: SpyBilling) -> None:
    """The middleware takes the request for another route than the app (as route precedence once did)."""
    collect = declared(app)
    routes = lambda: collect() and {"GET /v1/search": "tokens"}  # noqa: E731
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=routes)


@pytest.mark.parametrize(
    ("misconfigure", "message"),
    [
        (no_middleware, "routes=declared"),
        (a_table_without_it, "reached unmetered"),
        (a_table_with_another_feature, "reached metered as 'tokens'"),
    ],
)
@DECLARED_AS
async def test_a_declared_route_the_middleware_did_not_take_fails_closed(
    billing: SpyBilling,
    misconfigure: Callable[[FastAPI, SpyBilling], None],
    message: str,
    declare: Callable[[Any], Any],
) -> None:
    app = FastAPI()
    entered: list[str] = []

    @app.get("/v1/search", dependencies=[declare(metered("api_calls"))])
    async def search() -> dict[str, str]:
        entered.append("search")
        return {}

    misconfigure(app, billing)
    async with serve(app) as client:
        with pytest.raises(RuntimeError, match=message):
            await client.get("/v1/search", headers=as_customer("user_free"))
    assert entered == []


async def test_the_usage_router_serves_the_signed_in_customer_only(billing: SpyBilling) -> None:
    app = build(billing, [])
    async with serve(app) as client:
        for _ in range(3):
            await client.get("/v1/search", headers=as_customer("user_free"))
        await client.get("/health")  # lets the flush window pass
        anonymous = await client.get("/billing/usage")
        unknown = await client.get("/billing/usage", headers=as_customer("nobody"))
        await _wait_for_units(billing, 3)
        usage = await client.get("/billing/usage", headers=as_customer("user_free"))
        one = await client.get("/billing/usage?feature_key=api_calls", headers=as_customer("user_free"))
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert unknown.status_code == 403
    body = usage.json()
    assert body["customer_id"] == "user_free"
    metrics = {m["feature_key"]: m for m in body["metrics"]}
    assert metrics["api_calls"]["consumed"] == 3 and metrics["api_calls"]["limit"] == 10
    assert [m["feature_key"] for m in one.json()["metrics"]] == ["api_calls"]


async def test_the_session_token_route_never_mints_for_another_customer(billing: SpyBilling) -> None:
    app = build(billing, [])
    async with serve(app) as client:
        anonymous = await client.post("/billing/session-token", json={"externalUserId": "user_pro"})
        minted = await client.post(
            "/billing/session-token", headers=as_customer("user_free"), json={"externalUserId": "user_pro"}
        )
    assert anonymous.status_code == 401
    assert minted.status_code == 201 and minted.json()["sessionToken"].startswith("bos_sess_")
    assert billing.minted_for == ["user_free"]


async def test_a_client_minting_in_a_loop_gets_its_token_again_not_an_upstream_call_each(billing: SpyBilling) -> None:
    app = build(billing, [])
    async with serve(app) as client:
        tokens = [
            (await client.post("/billing/session-token", headers=as_customer(who))).json()["sessionToken"]
            for who in ["user_free"] * 20 + ["user_pro"]
        ]
    assert len(set(tokens[:20])) == 1 and tokens[20] != tokens[0]
    assert billing.minted_for == ["user_free", "user_pro"]


async def _wait_for_units(billing: LocalBilling, units: int) -> None:
    with anyio.fail_after(5):
        while await billing.recorded_units("user_free", "api_calls") < units:  # noqa: ASYNC110 - polls a database
            await anyio.sleep(0.02)


@DECLARED_AS
async def test_late_identification_gates_at_dependency_time_with_the_apps_own_auth(
    billing: SpyBilling, declare: Callable[[Any], Any]
) -> None:
    from fastapi import Header

    tokens = {"token-free": "user_free", "token-pro": "user_pro"}

    async def current_customer(authorization: str = Header("")) -> str | None:
        """The app's own auth dependency: a bearer token mapped to its customer."""
        return tokens.get(authorization.removeprefix("Bearer "))

    app = FastAPI()
    entered: list[str] = []

    @app.get("/v1/search", dependencies=[declare(metered("api_calls", customer=current_customer))])
    async def search(billing: Billing, customer: str | None = Depends(current_customer)) -> dict[str, Any]:
        entered.append(str(customer))
        assert billing is not None and billing.customer_id == customer and billing.entitlement is not None
        return {"customer": billing.customer_id}

    app.add_middleware(
        BillingMiddleware, billing=billing, customer=None, routes=declared(app), flush_interval=0.05
    )  # no resolver
    free, pro = {"authorization": "Bearer token-free"}, {"authorization": "Bearer token-pro"}
    async with serve(app) as client:
        anonymous = await client.get("/v1/search", headers=as_customer("user_pro"))  # a client-sent id is ignored
        answers = [(await client.get("/v1/search", headers=free)).status_code for _ in range(11)]
        assert (await client.get("/v1/search", headers=pro)).json() == {"customer": "user_pro"}
        schema = (await client.get("/openapi.json")).json()
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert answers == [200] * 10 + [429]
    assert entered == ["user_free"] * 10 + ["user_pro"]  # never entered on 401 / 429
    assert {"401", "403", "429"} <= set(schema["paths"]["/v1/search"]["get"]["responses"])
    assert await billing.recorded_units("user_free", "api_calls") == 10
    assert await billing.recorded_units("user_pro", "api_calls") == 1


async def test_metered_inside_a_shared_dependency_and_in_a_mounted_app_are_gated(billing: SpyBilling) -> None:
    entered: list[str] = []

    billed = metered("api_calls")

    def signed_in_and_metered(_: Any = billed) -> None:
        """The app's own shared dependency, with the metering inside it."""

    app = FastAPI()

    @app.get("/v1/search", dependencies=[Depends(signed_in_and_metered)])
    async def search() -> dict[str, str]:
        entered.append("search")
        return {}

    sub = FastAPI()

    @sub.get("/search", dependencies=[metered("api_calls")])
    async def sub_search() -> dict[str, str]:
        entered.append("sub")
        return {}

    app.mount("/sub", sub)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = [(await client.get(path)).status_code for path in ("/v1/search", "/sub/search")]
        paid = [
            (await client.get(path, headers=as_customer("user_free"))).status_code
            for path in ("/v1/search", "/sub/search") * 6
        ]
    assert anonymous == [401, 401]
    assert paid == [200] * 10 + [429, 429]
    assert entered == ["search", "sub"] * 5
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_a_head_only_route_is_metered(billing: SpyBilling) -> None:
    app = FastAPI()

    @app.head("/probe", dependencies=[metered("api_calls")])
    async def probe() -> None:
        return None

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    assert await anonymous_then_paid(app, "HEAD", "/probe") == (401, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_head_on_a_get_only_route_is_answered_by_the_app_not_gated_as_get(billing: SpyBilling) -> None:
    """FastAPI's GET routes answer HEAD 405: the table's HEAD-follows-GET must not refuse it first,
    nor bill it as the GET's feature where another route serves HEAD on the path."""
    app = FastAPI()

    @app.get("/v1/search", dependencies=[metered("api_calls")])
    async def search() -> dict[str, str]:
        return {"found": "nothing"}

    @app.get("/v1/report/{report_id}", dependencies=[metered("export")])
    async def report(report_id: str) -> dict[str, str]:
        return {"report": report_id}

    @app.head("/v1/report/{report_id}")
    async def report_exists(report_id: str) -> None:
        return None

    app.add_middleware(
        BillingMiddleware, billing=billing, customer=by_header, routes=declared(app), default_feature=None
    )
    async with serve(app) as client:
        anonymous = await client.head("/v1/search")
        signed_in = await client.head("/v1/search", headers=as_customer("user_free"))
        exists = await client.head("/v1/report/7", headers=as_customer("user_free"))
        anonymous_exists = await client.head("/v1/report/7")
        paid = await client.get("/v1/search", headers=as_customer("user_free"))
    assert (anonymous.status_code, signed_in.status_code) == (405, 405)
    assert (exists.status_code, anonymous_exists.status_code, paid.status_code) == (200, 200, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1
    assert await billing.recorded_units("user_free", "export") == 0


async def test_the_apps_own_answer_to_a_refusal_stays(billing: SpyBilling) -> None:
    """An app's handler of BillingDenied decides its answer (a 503 here): never replaced."""
    app = FastAPI()

    @app.exception_handler(BillingDenied)
    async def own_answer(request: Any, denied: BillingDenied) -> JSONResponse:
        return JSONResponse({"error": "ours"}, status_code=denied.response.status_code, headers={"x-ours": "1"})

    async def not_an_id() -> Any:
        return 42  # the app's auth dependency's bug: on_error="deny" answers 503

    @app.get("/v1/search", dependencies=[metered("api_calls", customer=not_an_id)])
    async def search() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(BillingMiddleware, billing=billing, customer=None, routes=declared(app), on_error="deny")
    async with serve(app) as client:
        answer = await client.get("/v1/search")
    assert (answer.status_code, answer.headers["x-ours"], answer.json()) == (503, "1", {"error": "ours"})


async def test_the_table_meters_each_request_as_the_fastapi_route_that_serves_it() -> None:
    """Random FastAPI apps of overlapping templates, free and metered, GET routes without HEAD and
    HEAD routes of their own among them: every request the app serves is metered as its route is
    (seeded: a failure reproduces)."""

    def fastapi_app(specs: list[RouteSpec]) -> tuple[Mapping[str, Any], ASGIApp]:
        app = FastAPI()
        for index, (path, methods, feature) in enumerate(specs):
            dependencies = [metered(feature)] if feature else None
            app.add_api_route(path, answer(index), methods=methods, dependencies=dependencies)
        return declared(app)(), app

    methods = [["GET"], ["POST"], ["HEAD"], ["GET", "POST"], ["GET", "HEAD"]]
    checked = await sweep(random.Random(20261203), methods, fastapi_app, apps=500)
    assert checked > 800  # the sweep reaches served requests, not only 404s and 405s


async def test_an_included_routers_starlette_routes_and_mounts_are_gated(billing: SpyBilling) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Match, Route

    from billingos_starlette import metered as metered_endpoint

    entered: list[str] = []

    @metered_endpoint("api_calls")
    async def legacy(request: Request) -> JSONResponse:
        entered.append(request.url.path)
        return JSONResponse({})

    sub = FastAPI()

    @sub.get("/hello", dependencies=[metered("api_calls")])
    async def hello() -> dict[str, str]:
        entered.append("/api/sub/hello")
        return {}

    router = APIRouter()
    router.add_route("/legacy", legacy, methods=["GET"])
    router.mount("/sub", sub)
    router.mount("/starlette", Starlette(routes=[Route("/legacy", legacy)]))
    app = FastAPI()
    app.include_router(router, prefix="/api")
    mounted = {"type": "http", "method": "GET", "path": "/api/starlette/legacy", "root_path": ""}
    if not any(route.matches(mounted)[0] is not Match.NONE for route in app.routes):
        pytest.skip("this FastAPI's include_router leaves a router's mounts out (as 0.115.7 does)")
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    paths = ("/api/legacy", "/api/sub/hello", "/api/starlette/legacy")
    async with serve(app) as client:
        anonymous = [(await client.get(path)).status_code for path in paths]
        paid = [(await client.get(path, headers=as_customer("user_free"))).status_code for path in paths * 4]
    assert anonymous == [401] * 3
    assert paid == [200] * 10 + [429] * 2
    assert entered == [*paths * 3, *paths[:1]]
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_a_path_is_metered_as_the_route_fastapi_serves_it_with_slashes_and_all(billing: SpyBilling) -> None:
    """FastAPI routes a path as requested: "/items" is the free catch-all's where "/items/" is the
    router's metered root, and "//search" is a page's. Compared without their slashes, the free
    page was gated (a 401 for a visitor) and billed, and "/export" billed as "/export/" was."""
    app = FastAPI()
    items = APIRouter(prefix="/items")

    @items.get("/", dependencies=[metered("api_calls")])  # (its path is "/items/")
    async def list_items() -> list[str]:
        return []

    @app.get("/export/", dependencies=[metered("api_calls", quantity=1)])
    async def export_index() -> dict[str, str]:
        return {}

    @app.get("/search", dependencies=[metered("api_calls")])
    async def search() -> dict[str, str]:
        return {}

    @app.get("/{name}", dependencies=[metered("api_calls", quantity=5)])
    async def named(name: str) -> dict[str, str]:
        return {"named": name}

    app.include_router(items)

    @app.get("/{page:path}")  # the front end's pages, free
    async def page(page: str) -> dict[str, str]:
        return {"page": page}

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        visitor = [await client.get(path) for path in ("/items/", "/items/x", "/a/b")]
        paths = ("/items", client.base_url.copy_with(path="//search"), "/export")  # (not a host: "//search")
        served = [await client.get(path, headers=as_customer("user_pro")) for path in paths]
        paid = await client.get("/items/", headers=as_customer("user_pro"))
    assert [answer.status_code for answer in visitor] == [401, 200, 200]
    assert [answer.json() for answer in served] == [{"named": "items"}, {"page": "/search"}, {"named": "export"}]
    assert paid.status_code == 200
    assert await billing.recorded_units("user_pro", "api_calls") == 5 + 5 + 1  # /items and /export as "/{name}"


async def test_routes_the_apps_own_startup_includes_are_gated_too(billing: SpyBilling) -> None:
    """The stack (and the table) is built before the app's lifespan runs: a router its startup
    included (a plugin's) was found on no route, and each of its requests was a 500 (fail closed)."""
    plugin = APIRouter()

    @plugin.get("/v1/search", dependencies=[metered("api_calls")])
    async def search() -> dict[str, str]:
        return {}

    @asynccontextmanager
    async def startup(app: FastAPI) -> AsyncIterator[None]:
        app.include_router(plugin)
        yield

    app = FastAPI(lifespan=startup)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    assert await anonymous_then_paid(app, "GET", "/v1/search") == (401, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_starlettes_metered_decorator_on_a_path_operation_is_honoured(billing: SpyBilling) -> None:
    """FastAPI calls a path operation with its parameters by name (the request only if it asks for
    it): the decorator's check found no request, and every request was a 500."""
    from billingos_starlette import metered as metered_endpoint

    app = FastAPI()

    @app.get("/with-request")
    @metered_endpoint("api_calls")
    async def with_request(request: Request) -> dict[str, str]:
        return {"path": request.url.path}

    @app.get("/without")
    @metered_endpoint("api_calls")
    def without(q: str = "") -> dict[str, str]:  # (sync: run in a worker thread)
        return {"q": q}

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = [(await client.get(path)).status_code for path in ("/with-request", "/without")]
        paid = [
            (await client.get(path, headers=as_customer("user_free"))).status_code
            for path in ("/with-request", "/without?q=x")
        ]
    assert (anonymous, paid) == ([401, 401], [200, 200])
    assert await billing.recorded_units("user_free", "api_calls") == 2


@pytest.mark.parametrize("outside", [False, True], ids=["add_middleware", "wrapped"])
async def test_a_late_refusal_is_answered_however_the_middleware_is_installed(
    billing: SpyBilling, outside: bool
) -> None:
    from fastapi import Header

    async def current_customer(x_token: str = Header("")) -> str | None:
        return {"token-free": "user_free"}.get(x_token)

    app = FastAPI()
    entered: list[str] = []

    @app.get("/v1/search", dependencies=[metered("api_calls", customer=current_customer)])
    async def search() -> dict[str, str]:
        entered.append("search")
        return {}

    @app.post("/v1/exports", dependencies=[metered("export", customer=current_customer)])
    async def export() -> dict[str, str]:
        entered.append("export")
        return {}

    served: Any = app
    if outside:
        served = BillingMiddleware(app, billing=billing, customer=None, routes=declared(app))
    else:
        app.add_middleware(BillingMiddleware, billing=billing, customer=None, routes=declared(app))
    free = {"x-token": "token-free"}
    async with serve(served) as client:
        anonymous = await client.get("/v1/search")
        forbidden = await client.post("/v1/exports", headers=free)
        answers = [(await client.get("/v1/search", headers=free)).status_code for _ in range(10)]
        exhausted = await client.get("/v1/search", headers=free)
    assert (anonymous.status_code, forbidden.status_code, exhausted.status_code) == (401, 403, 429)
    assert {anonymous.headers["content-type"], exhausted.headers["content-type"]} == {"application/problem+json"}
    assert int(exhausted.headers["retry-after"]) > 0 and exhausted.json()["feature"] == "api_calls"
    assert answers == [200] * 10 and entered == ["search"] * 10
    assert await billing.recorded_units("user_free", "api_calls") == 10
    assert await billing.recorded_units("user_free", "export") == 0


@pytest.mark.parametrize("via_router", [False, True], ids=["on_the_app", "in_an_included_router"])
async def test_a_late_refusal_in_a_mounted_app_is_answered_not_a_500(billing: SpyBilling, via_router: bool) -> None:
    """A router's mount too (it escaped as "response already started" after each refusal was sent)."""
    from fastapi import Header

    async def current_customer(x_token: str = Header("")) -> str | None:
        return {"token-free": "user_free", "token-unknown": "nobody"}.get(x_token)

    sub = FastAPI()

    @sub.post("/exports", dependencies=[metered("export", customer=current_customer)])
    async def export() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.add_middleware(BillingMiddleware, billing=billing, customer=None, routes=declared(app))
    if via_router:
        router = APIRouter()
        router.mount("/exports-app", sub)
        app.include_router(router, prefix="/v2")
    else:
        app.mount("/v2/exports-app", sub)  # mounted after declared(): found when the stack is built
    async with serve(app) as client:
        answers = [
            await client.post("/v2/exports-app/exports", headers={"x-token": token})
            for token in ("", "token-unknown", "token-free")
        ]
    assert [answer.status_code for answer in answers] == [401, 403, 403]
    assert {answer.headers["content-type"] for answer in answers} == {"application/problem+json"}


async def test_a_route_the_app_never_reaches_is_not_metered_in_its_place(
    billing: SpyBilling, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.get("/reports/{report_id}", dependencies=[metered("api_calls")])
    async def report(report_id: str, billing: Billing) -> dict[str, str | None]:
        return {"report": report_id, "billed_as": billing.feature if billing else None}

    @app.get("/reports/export", dependencies=[metered("export")])  # shadowed: FastAPI takes the first match
    async def export() -> dict[str, str]:
        return {"export": "started"}

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        answer = await client.get("/reports/export", headers=as_customer("user_free"))
    assert (answer.status_code, answer.json()) == (200, {"report": "export", "billed_as": "api_calls"})
    assert await billing.recorded_units("user_free", "api_calls") == 1
    assert "GET /reports/export: an earlier route answers it first" in caplog.text


async def test_a_free_template_before_a_declared_one_taking_its_paths_is_not_billed_for_it(
    billing: SpyBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI takes the first route that matches: /users/5 is the free profile's, not the metered
    lookup's after it (it was refused 401 anonymous, and billed signed in, as the lookup)."""
    app = FastAPI()

    @app.get("/users/{name}")
    async def profile(name: str, billing: Billing) -> dict[str, Any]:
        return {"profile": name, "metered": billing is not None}

    @app.get("/users/{user_id:int}", dependencies=[metered("api_calls")])  # shadowed by the profile
    async def lookup(user_id: int) -> dict[str, int]:
        return {"user": user_id}

    @app.get("/users/{name}/orders", dependencies=[metered("api_calls")])  # not shadowed
    async def orders(name: str) -> dict[str, str]:
        return {"orders": name}

    @app.get("/users/{name}", dependencies=[metered("api_calls")])  # the same template: never reached
    async def again(name: str) -> dict[str, str]:
        return {"again": name}

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = await client.get("/users/5")
        signed_in = await client.get("/users/5", headers=as_customer("user_free"))
        anonymous_orders = await client.get("/users/5/orders")
        paid_orders = await client.get("/users/5/orders", headers=as_customer("user_free"))
    assert (anonymous.status_code, anonymous.json()) == (200, {"profile": "5", "metered": False})
    assert (signed_in.status_code, signed_in.json()) == (200, {"profile": "5", "metered": False})
    assert (anonymous_orders.status_code, paid_orders.status_code) == (401, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1  # the orders only
    assert "GET /users/{name}: an earlier route answers it first" in caplog.text


async def test_a_customer_dependency_answering_no_customer_id_is_logged_without_its_value(
    billing: SpyBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """FastAPI's HTTPBearer answers the credentials, not a customer id: the log named the type and
    quoted the value, the caller's bearer token with it."""
    from fastapi.security import HTTPBearer

    app = FastAPI()

    @app.get("/v1/search", dependencies=[metered("api_calls", customer=HTTPBearer())])
    async def search() -> dict[str, str]:
        return {}

    app.add_middleware(BillingMiddleware, billing=billing, customer=None, routes=declared(app), on_error="deny")
    async with serve(app) as client:
        answer = await client.get("/v1/search", headers={"authorization": "Bearer tok_alice_0123456789"})
    assert answer.status_code == 503
    assert "returned an object of type HTTPAuthorizationCredentials, not a customer id" in caplog.text
    assert "tok_alice" not in caplog.text


async def test_a_path_excluded_from_a_declared_template_is_served_unmetered(billing: SpyBilling) -> None:
    """``exclude=`` carves a free path out of a metered template: the route's declaration lets it be."""
    app = FastAPI()

    @app.get("/files/{name}", dependencies=[metered("api_calls")])
    async def file(name: str, billing: Billing) -> dict[str, bool]:
        return {"metered": billing is not None}

    app.add_middleware(
        BillingMiddleware, billing=billing, customer=by_header, routes=declared(app), exclude=["/files/public"]
    )
    async with serve(app) as client:
        public = await client.get("/files/public")
        private = await client.get("/files/report", headers=as_customer("user_free"))
        anonymous = await client.get("/files/report")
    assert (public.status_code, public.json()) == (200, {"metered": False}) and "x-request-id" not in public.headers
    assert (private.status_code, private.json()) == (200, {"metered": True}) and anonymous.status_code == 401
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def _websocket_session(app: Any, path: str) -> list[dict[str, Any]]:
    """Connect to ``path`` and disconnect at once; every message the app sent (the error it raised, as is)."""
    inbox: list[dict[str, Any]] = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"app"), (b"x-customer", b"user_free")],
        "client": ("127.0.0.1", 50000),
        "server": ("app", 80),
        "subprotocols": [],
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("late", [False, True], ids=["resolver", "late"])
async def test_a_websocket_route_under_a_metered_router_passes_through(
    billing: SpyBilling, late: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A router's (or app's) metering applies to its websocket routes too: they pass through (SPEC section 5)."""
    from fastapi import Header

    async def current_customer(x_customer: str = Header("")) -> str | None:
        return x_customer or None

    router = APIRouter(
        prefix="/v1/chat", dependencies=[metered("api_calls", customer=current_customer if late else None)]
    )
    entered: list[str] = []

    @router.post("")
    async def chat() -> dict[str, str]:
        entered.append("chat")
        return {}

    @router.websocket("/live")
    async def live(websocket: WebSocket) -> None:
        await websocket.accept()
        entered.append("live")
        await websocket.send_text("hello")
        await websocket.close()

    app = FastAPI()
    app.include_router(router)
    app.add_middleware(BillingMiddleware, billing=billing, customer=None if late else by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = await client.post("/v1/chat")
        paid = await client.post("/v1/chat", headers=as_customer("user_free"))
        sent = await _websocket_session(app, "/v1/chat/live")
    assert (anonymous.status_code, paid.status_code) == (401, 200)
    assert [message["type"] for message in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert entered == ["chat", "live"]
    assert "websocket" in caplog.text and "not metered" in caplog.text
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_router_included_metered_and_free_is_documented_metered_only_where_it_is(
    billing: SpyBilling,
) -> None:
    reports = APIRouter()

    @reports.get("/report")
    async def report() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(reports, prefix="/paid", dependencies=[metered("api_calls")])
    app.include_router(reports, prefix="/internal")
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        paid, internal = await client.get("/paid/report"), await client.get("/internal/report")
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert (paid.status_code, internal.status_code) == (401, 200)
    assert {"401", "403", "429"} <= set(paths["/paid/report"]["get"]["responses"])
    assert set(paths["/internal/report"]["get"]["responses"]) == {"200"}  # served free: no 401/403/429


async def test_a_route_metered_on_its_router_and_on_itself_is_refused_at_start_up_by_its_full_path(
    billing: SpyBilling,
) -> None:
    """Neither declaration wins (one route meters one feature): the app does not start, and says where."""
    exports = APIRouter(prefix="/v1", dependencies=[metered("api_calls")])

    @exports.post("/export", dependencies=[metered("export")])
    async def export() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(exports, prefix="/api")
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    with pytest.raises(RuntimeError, match=r"/api/v1/export: metered twice, as .*'api_calls'.* and .*'export'"):
        async with serve(app):
            pass


async def test_a_frontend_under_a_metered_router_is_metered_and_one_beside_it_stays_free(
    billing: SpyBilling, tmp_path: Path
) -> None:
    """FastAPI's ``frontend()`` files are tried after every other route and take their router's
    dependencies: under a metered router they are gated and billed (not a 500 each), the most
    specific frontend deciding as the app does, while a free frontend and route beside them stay free."""
    if not hasattr(FastAPI, "frontend"):
        pytest.skip("this FastAPI has no frontend() (added after our minimum, 0.115.7)")
    site = tmp_path / "dist"
    site.mkdir()
    (site / "index.html").write_text("<h1>app</h1>")
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    app.frontend("/", directory=site)
    paid = APIRouter(prefix="/app", dependencies=[metered("api_calls")])
    paid.frontend("/", directory=site)
    app.include_router(paid)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = await client.get("/app/index.html")
        answers = [
            await client.get(path, headers=as_customer("user_free"))
            for path in ("/app/index.html", "/app/", "/index.html", "/health")
        ]
    assert anonymous.status_code == 401
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
    assert [answer.text for answer in answers[:3]] == ["<h1>app</h1>"] * 3
    assert ["ratelimit" in answer.headers for answer in answers] == [True, True, False, False]
    assert await billing.recorded_units("user_free", "api_calls") == 2


async def test_a_metered_async_route_waits_for_no_worker_thread(billing: SpyBilling) -> None:
    """FastAPI runs a sync dependency in its thread pool: ``metered()`` and ``Billing`` run on the
    event loop, so a metered async route is served while the app's sync endpoints hold every thread."""
    app = FastAPI()

    @app.get("/v1/search", dependencies=[metered("api_calls")])
    async def search(billing: Billing) -> dict[str, str | None]:
        return {"request_id": None if billing is None else billing.request_id}

    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    answers: list[int] = []
    async with serve(app) as client:
        assert (await client.get("/v1/search", headers=as_customer("user_pro"))).status_code == 200  # (now cached)

        async def search_once() -> None:
            answers.append((await client.get("/v1/search", headers=as_customer("user_pro"))).status_code)

        threads = anyio.to_thread.current_default_thread_limiter()
        total, threads.total_tokens = threads.total_tokens, 1
        busy = object()
        await threads.acquire_on_behalf_of(busy)  # the one worker thread, taken (by a sync endpoint, say)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(search_once)
                await anyio.wait_all_tasks_blocked()
                served_meanwhile = list(answers)
                threads.release_on_behalf_of(busy)
        finally:
            threads.total_tokens = total
    assert served_meanwhile == [200]


async def test_an_included_routers_class_endpoint_is_gated_for_every_method(billing: SpyBilling) -> None:
    """FastAPI copies an included router's Starlette route with ``methods=[]`` for an ``HTTPEndpoint``
    (no methods: every method, to Starlette): it was found with no method at all, a 500 each."""
    from starlette.endpoints import HTTPEndpoint
    from starlette.responses import JSONResponse

    from billingos_starlette import metered as metered_endpoint

    @metered_endpoint("api_calls")
    class Search(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            return JSONResponse({"method": "GET"})

        async def post(self, request: Request) -> JSONResponse:
            return JSONResponse({"method": "POST"})

    router = APIRouter()
    router.add_route("/search", Search)  # type: ignore[arg-type]  # (a class endpoint: Starlette takes one)
    app = FastAPI()
    app.include_router(router, prefix="/v1")
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = [(await client.request(method, "/v1/search")).status_code for method in ("GET", "POST")]
        paid = [
            (await client.request(method, "/v1/search", headers=as_customer("user_free"))).json()
            for method in ("GET", "POST")
        ]
    assert anonymous == [401, 401]
    assert paid == [{"method": "GET"}, {"method": "POST"}]
    assert await billing.recorded_units("user_free", "api_calls") == 2


@pytest.mark.filterwarnings("ignore:The `root_path` parameter is deprecated")  # (since after our minimum FastAPI)
async def test_an_app_with_its_own_root_path_wrapped_from_outside_is_metered_as_it_routes(
    billing: SpyBilling,
) -> None:
    """``FastAPI(root_path="/api")`` sets the root path on each request itself, after an outer
    middleware has seen it: the middleware routes as the app will (it failed closed: a 500)."""
    entered: list[str] = []
    app = FastAPI(root_path="/api")

    @app.get("/v1/search", dependencies=[metered("api_calls")])
    async def search() -> dict[str, str]:
        entered.append("search")
        return {}

    middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes=declared(app))
    async with serve(middleware) as client:
        anonymous = await client.get("/api/v1/search")
        paid = [
            (await client.get(path, headers=as_customer("user_free"))).status_code
            for path in ("/api/v1/search", "/v1/search")  # (the app serves both)
        ]
    assert anonymous.status_code == 401 and paid == [200, 200] and entered == ["search"] * 2
    assert await billing.recorded_units("user_free", "api_calls") == 2


async def test_a_router_serving_its_prefix_with_and_without_the_slash_starts_and_bills_both(
    billing: SpyBilling,
) -> None:
    """``@router.get("")`` and ``@router.get("/")`` under ``prefix="/items"``, metered on the router:
    one route for the table, which refused to start on the two keys ("configured twice")."""
    app = FastAPI()
    items = APIRouter(prefix="/items", dependencies=[metered("api_calls")])

    @items.get("")
    async def listing() -> list[str]:
        return []

    @items.get("/")
    async def listing_slash() -> list[str]:
        return []

    app.include_router(items)
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        answers = [
            (await client.get(path, headers=as_customer("user_free"))).status_code for path in ("/items", "/items/")
        ]
        anonymous = await client.get("/items/")
    assert (answers, anonymous.status_code) == ([200, 200], 401)
    assert await billing.recorded_units("user_free", "api_calls") == 2


@pytest.mark.parametrize(("tags", "expected"), [(None, ["billing"]), ([], []), (["account"], ["account"])])
def test_the_usage_routers_tags_are_as_given(
    billing: LocalBilling, tags: list[str] | None, expected: list[str]
) -> None:
    """An empty list leaves the routes untagged (it was taken for None: tagged "billing")."""
    router = usage_router(billing, by_header, tags=tags)
    assert [route.tags for route in router.routes] == [expected, expected]  # type: ignore[attr-defined]
