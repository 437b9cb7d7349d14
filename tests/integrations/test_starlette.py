"""Starlette: ``@metered`` endpoints (mounts included) gated before they run, and the usage routes."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Host, Mount, Route, Router
from starlette.types import Receive, Scope, Send

from billingos_asgi import (
    BillingMiddleware,
    LocalBilling,
    Metered,
    get_usage_context,
)
from billingos_asgi.discovery import declared_routes
from billingos_asgi.routes import UNDECLARED
from billingos_starlette import declared, metered, usage_routes

from ..asgi import serve
from ..middleware.support import PLANS, as_customer, by_header


def build(billing: LocalBilling, entered: list[str]) -> Starlette:
    @metered("api_calls")
    async def search(request: Request) -> JSONResponse:
        entered.append("search")
        return JSONResponse({"ok": True})

    @metered("export")
    async def export(request: Request) -> JSONResponse:
        entered.append("export")
        return JSONResponse({"export": "started"})

    async def health(request: Request) -> JSONResponse:
        entered.append("health")
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/health", health),
            Mount("/v1", routes=[Route("/search", search), Route("/exports/{kind}", export, methods=["POST"])]),
            usage_routes(billing, by_header),
        ]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    return app


def test_declarations_are_found_through_mounts(billing: LocalBilling) -> None:
    app = build(billing, [])
    assert declared_routes(app.routes) == {
        "GET /v1/search": Metered("api_calls"),
        "HEAD /v1/search": Metered("api_calls"),  # (Starlette serves HEAD beside GET)
        "POST /v1/exports/{kind}": Metered("export"),
    }


async def test_metered_endpoints_are_gated_before_they_run(billing: LocalBilling) -> None:
    entered: list[str] = []
    app = build(billing, entered)
    async with serve(app) as client:
        assert (await client.get("/v1/search")).status_code == 401
        assert (await client.post("/v1/exports/csv", headers=as_customer("user_free"))).status_code == 403
        answers = [(await client.get("/v1/search", headers=as_customer("user_free"))).status_code for _ in range(11)]
        assert (await client.post("/v1/exports/csv", headers=as_customer("user_pro"))).status_code == 200
        assert (await client.get("/health")).status_code == 200
        usage = await client.get("/billing/usage", headers=as_customer("user_free"))
        anonymous = await client.get("/billing/usage")
    assert answers == [200] * 10 + [429]
    assert entered == ["search"] * 10 + ["export", "health"]
    assert await billing.recorded_units("user_free", "api_calls") == 10
    assert usage.status_code == 200 and usage.json()["customer_id"] == "user_free"
    assert anonymous.status_code == 401


def test_a_path_declared_two_ways_is_refused(billing: LocalBilling) -> None:
    app = build(billing, [])
    with pytest.raises(ValueError, match="GET /v1/search"):
        declared(app, also={"GET /v1/search": "tokens"})()
    assert declared(app, also={"GET /v1/search": Metered("api_calls"), "/other": "x"})()["/other"] == "x"
    same = declared(app, also={"GET /v1/search": "api_calls"})()["GET /v1/search"]
    assert same in ("api_calls", Metered("api_calls"))


async def test_a_mounted_fastapi_apps_metered_routes_are_found(billing: LocalBilling) -> None:
    """A FastAPI app mounted in a Starlette one declares with dependencies: they were missed, and every
    request to its metered routes failed closed (a 500 saying declared(app) was not given)."""
    from fastapi import FastAPI

    from billingos_fastapi import metered as fastapi_metered

    entered: list[str] = []
    sub = FastAPI()

    @sub.get("/reports", dependencies=[fastapi_metered("api_calls")])
    async def reports() -> dict[str, str]:
        entered.append("reports")
        return {}

    app = Starlette(routes=[Mount("/api", app=sub)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        named = await client.get("/api/reports", headers=as_customer("user_free"))
        anonymous = await client.get("/api/reports")
        schema = (await client.get("/api/openapi.json")).json()
    assert (named.status_code, anonymous.status_code, entered) == (200, 401, ["reports"])
    assert {"401", "403", "429"} <= set(schema["paths"]["/reports"]["get"]["responses"])
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_mounted_app_with_a_middleware_of_its_own_is_metered_by_both_as_configured(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """Each BillingMiddleware meters what its table says: here each on its own backend, each gating."""

    async def reports(request: Request) -> JSONResponse:
        return JSONResponse({})

    async with LocalBilling.from_dict(PLANS, tmp_path / "inner.db") as inner:
        sub = Starlette(routes=[Route("/reports", reports)])
        sub.add_middleware(BillingMiddleware, billing=inner, customer=by_header, routes={"GET /reports": "api_calls"})
        app = Starlette(routes=[Mount("/api", app=sub)])
        app.add_middleware(
            BillingMiddleware, billing=billing, customer=by_header, routes={"GET /api/reports": "api_calls"}
        )
        await inner.track_usage("user_free", "api_calls", 9)
        async with serve(app) as client:
            answers = [
                (await client.get("/api/reports", headers=as_customer("user_free"))).status_code for _ in range(2)
            ]
        assert answers == [200, 429]  # the mounted app's quota, on its backend, refuses the second
        assert await inner.recorded_units("user_free", "api_calls") == 10
        assert await billing.recorded_units("user_free", "api_calls") == 1  # the outer's refusal-free first only


async def test_a_parameter_name_a_mount_and_its_route_share_is_metered_as_served(billing: LocalBilling) -> None:
    """Starlette matches a mount and its route each on its own: both may name a parameter ``id``."""
    entered: list[str] = []

    @metered("api_calls")
    async def post(request: Request) -> JSONResponse:
        entered.append(request.path_params["id"])
        return JSONResponse(request.path_params)

    app = Starlette(routes=[Mount("/users/{id}", routes=[Route("/posts/{id}", post), Mount("/x/{id}", routes=[])])])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = await client.get("/users/1/posts/2")
        served = await client.get("/users/1/posts/2", headers=as_customer("user_free"))
    assert (anonymous.status_code, served.status_code, entered) == (401, 200, ["2"])
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_declared_path_with_a_space_is_metered(billing: LocalBilling) -> None:
    @metered("api_calls")
    async def listing(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/my files", listing)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = await client.get("/my files")
        served = await client.get("/my%20files", headers=as_customer("user_free"))
    assert (anonymous.status_code, served.status_code) == (401, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_class_endpoint_is_gated_for_every_method_and_a_hosts_routes_too(billing: LocalBilling) -> None:
    entered: list[str] = []

    @metered("api_calls")
    class Search(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            entered.append("GET")
            return JSONResponse({"ok": True})

        async def post(self, request: Request) -> JSONResponse:
            entered.append("POST")
            return JSONResponse({"ok": True})

    @metered("api_calls")
    async def hosted(request: Request) -> JSONResponse:
        entered.append("host")
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/search", Search), Host("api.example.com", Router([Route("/hosted", hosted)]))])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app, base_url="http://api.example.com") as client:
        anonymous = [(await client.request(method, "/search")).status_code for method in ("GET", "POST", "PUT")]
        anonymous.append((await client.get("/hosted")).status_code)
        posts = [(await client.post("/search", headers=as_customer("user_free"))).status_code for _ in range(11)]
        hosted_answer = await client.get("/hosted", headers=as_customer("user_free"))
    assert anonymous == [401, 401, 401, 401]
    assert posts == [200] * 10 + [429] and hosted_answer.status_code == 429
    assert entered == ["POST"] * 10
    assert await billing.recorded_units("user_free", "api_calls") == 10


PREFLIGHT = {"origin": "https://app.test", "access-control-request-method": "GET"}


async def test_a_preflight_no_cors_layer_answers_is_gated_by_a_declared_endpoint(billing: LocalBilling) -> None:
    """The middleware lets a CORS preflight on unidentified, for the app's CORS layer to answer;
    reaching a declared endpoint that serves OPTIONS, it does the endpoint's work: gated, billed."""
    entered: list[str] = []

    @metered("api_calls")
    async def described(request: Request) -> JSONResponse:
        entered.append("async")
        return JSONResponse({"ok": True})

    @metered("api_calls")
    def described_sync(request: Request) -> JSONResponse:
        entered.append("sync")
        return JSONResponse({"ok": True})

    @metered("api_calls")
    class Described(HTTPEndpoint):
        async def options(self, request: Request) -> JSONResponse:
            entered.append("class")
            return JSONResponse({"ok": True})

    paths = ["/async", "/sync", "/class"]
    app = Starlette(
        routes=[
            Route("/async", described, methods=["GET", "OPTIONS"]),
            Route("/sync", described_sync, methods=["GET", "OPTIONS"]),
            Route("/class", Described),
        ]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = [(await client.options(path, headers=PREFLIGHT)).status_code for path in paths]
        named = [(await client.options(path, headers=as_customer("user_free", **PREFLIGHT))) for path in paths]
    assert anonymous == [401] * 3
    assert [answer.status_code for answer in named] == [200] * 3 and entered == ["async", "sync", "class"]
    assert all("x-request-id" in answer.headers for answer in named)
    assert await billing.recorded_units("user_free", "api_calls") == 3


async def test_a_preflight_is_left_to_an_asgi_endpoints_own_cors_layer(billing: LocalBilling) -> None:
    async def graphql(scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({})(scope, receive, send)

    endpoint = metered("api_calls")(CORSMiddleware(graphql, allow_origins=["https://app.test"], allow_methods=["*"]))
    app = Starlette(routes=[Route("/graphql", endpoint)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        preflight = await client.options("/graphql", headers=PREFLIGHT)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.test"


async def test_a_late_routes_preflight_is_identified_by_the_route_not_the_middleware(billing: LocalBilling) -> None:
    @metered("api_calls", late=True)
    async def export(request: Request) -> JSONResponse:
        context = get_usage_context(request)
        assert context is not None
        await context.identify(request.headers.get("x-org"))  # the route's own auth
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/exports", export, methods=["POST", "OPTIONS"])])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    headers = {**PREFLIGHT, "x-customer": "user_free", "x-org": "user_pro"}  # (the resolver would say user_free)
    async with serve(app) as client:
        answers = [
            (await client.request(method, "/v1/exports", headers=headers)).status_code for method in ("POST", "OPTIONS")
        ]
    assert answers == [200, 200]
    assert await billing.recorded_units("user_pro", "api_calls") == 2


async def test_the_usage_routes_answer_a_failing_resolver_with_a_problem(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: Request) -> Any:  # anything but a customer id
        header = request.headers.get("x-session", "")
        if header == "down":
            raise ConnectionError("session store unreachable")
        return {"control": "user\tfree", "long": "u" * 300, "int": 7}[header]

    app = Starlette(routes=[usage_routes(billing, broken)])
    async with serve(app) as client:
        with caplog.at_level("ERROR", logger="billingos_asgi"):
            answers = [
                await client.request(method, path, headers={"x-session": session})
                for session in ("down", "control", "long", "int")
                for method, path in (("GET", "/billing/usage"), ("POST", "/billing/session-token"))
            ]
    # A front end polling with a broken resolver: one line a second, not one a poll.
    failures = [record.getMessage() for record in caplog.records]
    assert len(failures) == 1 and failures[0].startswith("customer resolver failed on /billing/usage: ConnectionError")
    assert {(answer.status_code, answer.headers["content-type"]) for answer in answers} == {
        (503, "application/problem+json")
    }
    assert {answer.json()["detail"] for answer in answers} == {"the customer resolver failed"}


async def test_the_usage_routes_answers_are_stored_by_no_browser_or_shared_cache(billing: LocalBilling) -> None:
    app = Starlette(routes=[usage_routes(billing, by_header)])
    async with serve(app) as client:
        usage = await client.get("/billing/usage", headers=as_customer("user_free"))
        token = await client.post("/billing/session-token", headers=as_customer("user_free"))
    # A CDN keeping one customer's usage, or anyone's session token, would hand it to the next caller.
    assert (usage.status_code, token.status_code) == (200, 201)
    assert usage.headers["cache-control"] == token.headers["cache-control"] == "no-store"


async def test_the_usage_cache_never_answers_one_customer_with_anothers_metrics(billing: LocalBilling) -> None:
    app = Starlette(routes=[usage_routes(billing, by_header)])
    async with serve(app) as client:
        own = await client.get("/billing/usage?customer_id=user_pro", headers=as_customer("user_free"))  # now cached
        # Ids differing only in case or spaces are other customers (unknown here), never user_free's cache entry.
        others = [await client.get("/billing/usage", headers=as_customer(who)) for who in ("USER_FREE", "user_free ")]
        pro = await client.get("/billing/usage", headers=as_customer("user_pro"))
    assert own.json()["customer_id"] == "user_free"  # the query's customer_id is no one's say
    assert [answer.status_code for answer in others] == [403, 403]
    assert pro.json()["customer_id"] == "user_pro"
    assert {m["feature_key"] for m in pro.json()["metrics"]} != {m["feature_key"] for m in own.json()["metrics"]}


async def test_a_feature_key_that_is_no_feature_key_is_refused_by_name(billing: LocalBilling) -> None:
    app = Starlette(routes=[usage_routes(billing, by_header)])
    async with serve(app) as client:
        refused = [
            await client.get("/billing/usage", params={"feature_key": key}, headers=as_customer("user_free"))
            for key in ("x" * 10_240, "api\tcalls")
        ]
        empty = await client.get("/billing/usage?feature_key=", headers=as_customer("user_free"))
        anonymous = await client.get("/billing/usage", params={"feature_key": "x" * 10_240})
    assert [(answer.status_code, answer.headers["content-type"]) for answer in refused] == [
        (400, "application/problem+json")
    ] * 2
    assert [answer.json()["detail"] for answer in refused] == [
        "feature_key is 10240 characters long; the maximum is 255",
        "feature_key must not contain control characters",
    ]
    assert {m["feature_key"] for m in empty.json()["metrics"]} >= {"api_calls", "tokens"}  # as upstream: every one
    assert anonymous.status_code == 401  # nobody learns anything before signing in


async def test_a_backend_failing_otherwise_than_billingoserror_is_a_503_not_a_500(billing: LocalBilling) -> None:
    app = Starlette(routes=[usage_routes(billing, by_header)])
    await billing.aclose()  # the app closed it early: sqlite3 raises ProgrammingError
    async with serve(app) as client:
        usage = await client.get("/billing/usage", headers=as_customer("user_free"))
    assert (usage.status_code, usage.json()["detail"]) == (503, "billing is unavailable")
    assert usage.headers["retry-after"] == "5"


def usage_app(billing: LocalBilling, entered: list[str]) -> Starlette:
    """An export (a flag: checked, never tracked) and the usage routes, for a middleware to wrap."""

    @metered("export")
    async def export(request: Request) -> JSONResponse:
        entered.append("export")
        return JSONResponse({"export": "started"})

    return Starlette(routes=[Route("/v1/export", export), usage_routes(billing, by_header)])


async def test_the_usage_routes_call_within_the_middlewares_budget_leaving_its_checks_their_reserve(
    billing: LocalBilling,
) -> None:
    # Upstream's limits are per secret key: a usage widget polling for every customer must not
    # spend the calls the middleware needs, nor keep a request waiting on its check.
    entered: list[str] = []
    app = usage_app(billing, entered)
    middleware = BillingMiddleware(  # two tokens, one of them the checks' reserve; none more for 100 s
        app, billing=billing, customer=by_header, routes=declared(app), calls_per_minute=0.6, call_burst=2
    )
    async with serve(middleware) as client:
        usage = [await client.get("/billing/usage", headers=as_customer(who)) for who in ("user_free", "user_pro")]
        token = await client.post("/billing/session-token", headers=as_customer("user_free"))
        export = await client.get("/v1/export", headers=as_customer("user_pro"))
    assert [answer.status_code for answer in (*usage, token, export)] == [200, 503, 503, 200]
    assert usage[1].json()["detail"] == "billing is unavailable" and usage[1].headers["retry-after"] == "5"
    assert entered == ["export"]
    metrics = middleware.metrics()
    assert (metrics["endpoint_calls"], metrics["check_calls"], metrics["checks_refused_by_budget"]) == (1, 1, 0)
    assert 'billingos_upstream_calls_total{call="endpoint"} 1' in middleware.prometheus()


@dataclass
class Delegating:
    """A user's own backend, as a dataclass writes it: ``eq=True`` sets ``__hash__ = None``."""

    inner: LocalBilling

    def __getattr__(self, name: str) -> Any:  # every call, LocalBilling's
        return getattr(self.inner, name)


async def test_the_usage_routes_of_an_unhashable_backend_call_within_the_middlewares_budget_too(
    billing: LocalBilling,
) -> None:
    backend = Delegating(billing)
    app = Starlette(routes=[usage_routes(backend, by_header)])
    # Two tokens, one of them the checks' reserve; none more for 100 s.
    middleware = BillingMiddleware(app, billing=backend, customer=by_header, calls_per_minute=0.6, call_burst=2)
    async with serve(middleware) as client:
        usage = [await client.get("/billing/usage", headers=as_customer(who)) for who in ("user_free", "user_pro")]
    assert [answer.status_code for answer in usage] == [200, 503]
    assert middleware.metrics()["endpoint_calls"] == 1


async def test_the_usage_routes_are_answered_at_once_while_the_middlewares_breaker_is_open(
    billing: LocalBilling,
) -> None:
    app = usage_app(billing, [])
    middleware = BillingMiddleware(
        app, billing=billing, customer=by_header, routes=declared(app), breaker_threshold=1, breaker_cooldown=60
    )
    await billing.aclose()  # every call fails now: the first opens the breaker
    async with serve(middleware) as client:
        answers = [await client.get("/billing/usage", headers=as_customer(who)) for who in ("user_free", "user_pro")]
        answers.append(await client.post("/billing/session-token", headers=as_customer("user_pro")))
    assert [(answer.status_code, answer.json()["detail"]) for answer in answers] == [
        (503, "billing is unavailable")
    ] * 3
    metrics = middleware.metrics()
    assert (metrics["endpoint_calls"], metrics["breaker_state"], metrics["breaker_opened"]) == (1, "open", 1)


class SlowBilling:
    """The billing backend, its usage and token calls counted and answered after 50 ms."""

    def __init__(self, billing: LocalBilling) -> None:
        self.billing = billing
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.billing, name)

    async def get_usage_metrics(self, customer_id: str, feature_key: str | None = None) -> Any:
        self.calls.append("usage")
        await anyio.sleep(0.05)
        return await self.billing.get_usage_metrics(customer_id, feature_key)

    async def create_session_token(self, external_user_id: str, **options: Any) -> Any:
        self.calls.append("token")
        await anyio.sleep(0.05)
        return await self.billing.create_session_token(external_user_id, **options)


async def test_requests_missing_the_usage_cache_together_share_one_upstream_call(billing: LocalBilling) -> None:
    """A page of widgets (or a user's tabs) polling at once each called upstream, and the calls past
    the budget's burst were answered 503, though the first answer was cached 50 ms later."""
    backend = SlowBilling(billing)
    app = Starlette(routes=[usage_routes(backend, by_header)])
    answers: list[httpx.Response] = []

    async def ask(client: httpx.AsyncClient, method: str, path: str) -> None:
        answers.append(await client.request(method, path, headers=as_customer("user_free")))

    async with serve(app) as client:
        for method, path in (("GET", "/billing/usage"), ("POST", "/billing/session-token")):
            async with anyio.create_task_group() as group:
                for _ in range(12):
                    group.start_soon(ask, client, method, path)
    assert [answer.status_code for answer in answers] == [200] * 12 + [201] * 12
    assert len({answer.json()["sessionToken"] for answer in answers[12:]}) == 1
    assert backend.calls == ["usage", "token"]


def test_a_mappings_method_is_refused_as_the_usage_routes_customer(billing: LocalBilling) -> None:
    keys = {"key-1": "user_free"}
    with pytest.raises(ValueError, match="from_api_key"):
        usage_routes(billing, keys.get)  # type: ignore[arg-type]  # called with the request: a 401 for everyone


async def test_usage_routes_without_a_middleware_keep_within_a_budget_of_their_own(billing: LocalBilling) -> None:
    app = Starlette(routes=[usage_routes(billing, by_header)])
    statuses: list[int] = []

    async def ask(client: httpx.AsyncClient, who: str) -> None:
        statuses.append((await client.get("/billing/usage", headers=as_customer(who))).status_code)

    async with serve(app) as client:  # unknown customers: each a call, none cached
        started = time.monotonic()
        async with anyio.create_task_group() as group:
            for n in range(30):
                group.start_soon(ask, client, f"stranger_{n}")
        elapsed = time.monotonic() - started
    # The default budget: a burst of 10, half of it kept for checks, then 1.5 calls a second;
    # what cannot have a call within 1 s is refused.
    calls = statuses.count(403)
    assert sorted(set(statuses)) == [403, 503] and calls + statuses.count(503) == 30
    assert 5 <= calls <= 5 + 1.5 * elapsed + 1, (calls, elapsed)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("cache_size", 0),  # every request raised "value too large": a 500
        ("token_lifetime", 30),  # below upstream's 60 s: every token request a 503
        ("token_lifetime", 2 * 86400),  # above its 86,400 s
        ("token_lifetime", 1800.5),  # not whole seconds
        ("usage_ttl", -1),
        ("usage_ttl", float("inf")),  # never refreshed
    ],
)
async def test_the_usage_routes_refuse_a_bad_option_when_built_not_at_each_request(
    billing: LocalBilling, option: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=option):
        usage_routes(billing, by_header, **{option: value})


async def test_a_head_only_route_is_metered(billing: LocalBilling) -> None:
    @metered("api_calls")
    async def probe(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/probe", probe, methods=["HEAD"])])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = await client.head("/probe")
        paid = await client.head("/probe", headers=as_customer("user_free"))
    assert declared_routes(app.routes) == {"HEAD /probe": Metered("api_calls")}
    assert (anonymous.status_code, paid.status_code) == (401, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_static_route_an_earlier_route_answers_is_left_out(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    @metered("api_calls")
    async def report(request: Request) -> JSONResponse:
        return JSONResponse({"report": request.path_params["report_id"]})

    @metered("export")
    async def export(request: Request) -> JSONResponse:
        return JSONResponse({"export": "started"})

    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"item": request.path_params["item_id"]})

    @metered("export")
    class Special(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            return JSONResponse({"special": True})

        async def post(self, request: Request) -> JSONResponse:
            return JSONResponse({"special": True})

    app = Starlette(
        routes=[
            Route("/reports/{report_id}", report),
            Route("/reports/export", export),  # never reached: the route above takes it
            Route("/reports/export", export, methods=["POST"]),  # reached: the routes above answer GET only
            Route("/items/{item_id}", item),  # not metered, and first
            Route("/items/special", Special),  # reached by every method but GET and HEAD
            Mount("/files", routes=[]),
            Route("/files/export", export),  # never reached: the mount answers all of /files (404)
        ]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    calls = [("POST", "/reports/export", "user_free"), ("GET", "/items/special", ""), ("POST", "/items/special", "")]
    calls.append(("GET", "/files/export", ""))
    async with serve(app) as client:
        report_answer = await client.get("/reports/export", headers=as_customer("user_free"))
        statuses = [(await client.request(m, path, headers=as_customer(who))).status_code for m, path, who in calls]
    others = ("CONNECT", "DELETE", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
    assert declared_routes(app.routes) == {
        "GET /reports/{report_id}": Metered("api_calls"),
        "HEAD /reports/{report_id}": Metered("api_calls"),
        "POST /reports/export": Metered("export"),
        **{f"{method} /items/special": Metered("export") for method in others},
    }
    assert (report_answer.status_code, report_answer.json()) == (200, {"report": "export"})
    assert statuses == [403, 200, 401, 404]
    assert await billing.recorded_units("user_free", "api_calls") == 1
    assert "GET,HEAD /reports/export: an earlier route answers it first" in caplog.text
    assert "GET,HEAD /items/special: an earlier route answers it first" in caplog.text


@pytest.mark.parametrize("outside", [False, True], ids=["add_middleware", "wrapped"])
async def test_a_late_refusal_is_answered_however_the_middleware_is_installed(
    billing: LocalBilling, outside: bool
) -> None:
    entered: list[str] = []

    @metered("export", late=True)
    async def export(request: Request) -> JSONResponse:
        context = get_usage_context(request)
        assert context is not None
        await context.identify(by_header(request))  # the app's own auth names the customer here
        entered.append("export")
        return JSONResponse({"export": "started"})

    app = Starlette(routes=[Route("/v1/exports", export, methods=["POST"])])
    served: Any = app
    if outside:
        served = BillingMiddleware(app, billing=billing, customer=None, routes=declared(app))
    else:
        app.add_middleware(BillingMiddleware, billing=billing, customer=None, routes=declared(app))
    async with serve(served) as client:
        anonymous = await client.post("/v1/exports")
        forbidden = await client.post("/v1/exports", headers=as_customer("user_free"))
        exported = await client.post("/v1/exports", headers=as_customer("user_pro"))
    assert (anonymous.status_code, forbidden.status_code, exported.status_code) == (401, 403, 200)
    assert forbidden.headers["content-type"] == "application/problem+json" and entered == ["export"]


async def test_a_hosts_routes_do_not_hide_later_routes_from_other_hosts(billing: LocalBilling) -> None:
    async def admin_page(request: Request) -> JSONResponse:
        return JSONResponse({"admin": True})

    @metered("api_calls")
    async def search(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Host("admin.example.com", Router(routes=[Route("/{page}", admin_page)])), Route("/search", search)]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app, base_url="http://api.example.com") as client:
        anonymous = await client.get("/search")
        paid = await client.get("/search", headers=as_customer("user_free"))
    assert (anonymous.status_code, paid.status_code) == (401, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_free_static_route_before_a_metered_template_stays_free(billing: LocalBilling) -> None:
    @metered("api_calls")
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"item": request.path_params["item_id"]})

    async def featured(request: Request) -> JSONResponse:
        return JSONResponse({"featured": True})

    @metered("export")
    async def report(request: Request) -> JSONResponse:
        return JSONResponse({"report": request.path_params["report_id"]})

    app = Starlette(
        routes=[
            Route("/items/featured", featured),  # free, and the app serves it first
            Route("/items/{item_id}", item),
            Route("/reports/{report_id}", report),
            Route("/reports/featured", featured),  # never reached: the metered template above serves it
            Route("/{section}/{name}", item),
        ]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        free = [
            (await client.get("/items/featured", headers=as_customer(who))).status_code for who in ("", "user_free")
        ]
        anonymous_item = await client.get("/items/7")
        anonymous_report = await client.get("/reports/featured")
    assert declared_routes(app.routes) == {
        "GET /items/featured": UNDECLARED,  # metered as default_feature (none here)
        "HEAD /items/featured": UNDECLARED,
        "GET /items/{item_id}": Metered("api_calls"),
        "HEAD /items/{item_id}": Metered("api_calls"),
        "GET /reports/{report_id}": Metered("export"),
        "HEAD /reports/{report_id}": Metered("export"),
        "GET /{section}/{name}": Metered("api_calls"),
        "HEAD /{section}/{name}": Metered("api_calls"),
    }
    assert free == [200, 200] and await billing.recorded_units("user_free", "api_calls") == 0
    assert (anonymous_item.status_code, anonymous_report.status_code) == (401, 401)


async def test_an_undeclared_route_before_a_declared_template_is_metered_by_the_default(billing: LocalBilling) -> None:
    """With default_feature, an undeclared route is metered as the default: also where a declared template
    after it would take its path (it was served free to anyone, as if excluded)."""

    @metered("tokens")
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"item": request.path_params["item_id"]})

    async def featured(request: Request) -> JSONResponse:
        return JSONResponse({"featured": True})

    app = Starlette(routes=[Route("/items/featured", featured), Route("/items/{item_id}", item)])
    app.add_middleware(
        BillingMiddleware, billing=billing, customer=by_header, routes=declared(app), default_feature="api_calls"
    )
    async with serve(app) as client:
        anonymous = await client.get("/items/featured")
        paid = await client.get("/items/featured", headers=as_customer("user_free"))
        item_answer = await client.get("/items/7", headers=as_customer("user_pro"))
    assert (anonymous.status_code, paid.status_code, item_answer.status_code) == (401, 200, 200)
    assert await billing.recorded_units("user_free", "api_calls") == 1
    assert await billing.recorded_units("user_pro", "tokens") == 1


async def test_a_metered_endpoint_the_middleware_could_not_see_fails_closed(billing: LocalBilling) -> None:
    """In a mounted app wrapped in middleware, declared() sees no routes: the endpoint raises
    rather than serve the request free."""

    @metered("api_calls")
    async def search(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @metered("export")
    class Export(HTTPEndpoint):
        async def post(self, request: Request) -> JSONResponse:
            return JSONResponse({"export": "started"})

    hidden = Starlette(routes=[Route("/search", search), Route("/export", Export)])
    app = Starlette(routes=[Route("/v1/search", search), Mount("/v2", app=GZipMiddleware(hidden))])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        assert (await client.get("/v1/search")).status_code == 401
        with pytest.raises(RuntimeError, match="metered\\('api_calls'\\) endpoint .*search reached unmetered"):
            await client.get("/v2/search", headers=as_customer("user_free"))
        with pytest.raises(RuntimeError, match="metered\\('export'\\) endpoint .*Export reached unmetered"):
            await client.post("/v2/export", headers=as_customer("user_pro"))
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_metered_takes_a_method_of_the_apps_own_class(billing: LocalBilling) -> None:
    """Route calls a bound method with the request: the check found the instance in its place (a TypeError, a 500)."""

    class Search:
        def __init__(self, index: list[str]) -> None:
            self.index = index

        @metered("api_calls")
        async def search(self, request: Request) -> JSONResponse:
            return JSONResponse({"results": self.index})

        @metered("api_calls")
        def count(self, request: Request) -> JSONResponse:  # a sync one: Starlette runs it in a thread
            return JSONResponse({"count": len(self.index)})

    endpoints = Search(["a", "b"])
    app = Starlette(routes=[Route("/search", endpoints.search), Route("/count", endpoints.count)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = [(await client.get(path)).status_code for path in ("/search", "/count")]
        paid = [(await client.get(path, headers=as_customer("user_free"))).json() for path in ("/search", "/count")]
    assert anonymous == [401, 401]
    assert paid == [{"results": ["a", "b"]}, {"count": 2}]
    assert await billing.recorded_units("user_free", "api_calls") == 2


def test_a_path_metered_on_one_host_and_free_on_another_is_warned_about(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    @metered("api_calls")
    async def api_search(request: Request) -> JSONResponse:
        return JSONResponse({"results": []})

    async def site_search(request: Request) -> JSONResponse:
        return JSONResponse({"page": "search"})

    routes = [Host("api.example.com", Router(routes=[Route("/search", api_search)])), Route("/search", site_search)]
    assert declared_routes(routes) == {"GET /search": Metered("api_calls"), "HEAD /search": Metered("api_calls")}
    assert "/search: metered on a Host's route, and served unmetered by another" in caplog.text


def test_a_path_free_on_a_host_and_metered_after_it_is_warned_about(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """The Host's route takes its host's requests first, unmetered by the app, and the table (which has
    no host) meters them all the same: said at start-up. After the metered route, it is never reached."""

    async def status_page(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @metered("api_calls")
    async def api_status(request: Request) -> JSONResponse:
        return JSONResponse({"detail": "paid"})

    host = Host("status.example.com", Router(routes=[Route("/status", status_page)]))
    declared_routes([host, Route("/status", api_status)])
    assert "/status: metered, and served unmetered by an earlier Host's route" in caplog.text
    caplog.clear()
    declared_routes([Route("/status", api_status), host])
    assert "Host" not in caplog.text


async def test_metered_takes_every_endpoint_a_route_takes(billing: LocalBilling) -> None:
    """A partial, an ASGI app (keeping its Route name), and HTTPEndpoint subclasses metered otherwise
    than their base: inheriting its dispatch, or overriding it and calling the base's (checked too,
    for the request's own class)."""

    async def greet(greeting: str, request: Request) -> JSONResponse:
        return JSONResponse({"greeting": greeting})

    class Raw:  # an ASGI app instance: Route calls it as one
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await JSONResponse({"raw": True})(scope, receive, send)

    @metered("api_calls")
    class Base(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            return JSONResponse({"class": type(self).__name__})

    @metered("tokens")
    class Child(Base):
        pass

    @metered("tokens")
    class Override(Base):
        async def dispatch(self) -> None:
            await super().dispatch()

    app = Starlette(
        routes=[
            Route("/hello", metered("api_calls")(functools.partial(greet, "hello"))),
            Route("/raw", metered("api_calls")(Raw())),
            Route("/base", Base),
            Route("/child", Child),
            Route("/override", Override),
        ]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = [(await client.get(path)).status_code for path in ("/hello", "/raw", "/base", "/child")]
        free = [(await client.get(path, headers=as_customer("user_free"))) for path in ("/hello", "/raw", "/base")]
        child = await client.get("/child", headers=as_customer("user_pro"))
        override = await client.get("/override", headers=as_customer("user_free"))
    assert anonymous == [401] * 4
    assert [answer.json() for answer in free] == [{"greeting": "hello"}, {"raw": True}, {"class": "Base"}]
    assert child.json() == {"class": "Child"} and override.json() == {"class": "Override"}
    assert await billing.recorded_units("user_free", "api_calls") == 3
    assert await billing.recorded_units("user_pro", "tokens") == 1
    assert await billing.recorded_units("user_free", "tokens") == 1
    assert [route.name for route in app.routes if isinstance(route, Route)][1] == "Raw"  # as without us


async def test_a_partial_of_a_metered_endpoint_is_found_and_given_its_keywords(billing: LocalBilling) -> None:
    """``Route`` takes a partial (``functools.partial(search, index=...)``): declared() looks through it,
    and the endpoint gets the partial's keywords (it failed closed, and the check dropped them: a 500)."""

    @metered("api_calls")
    async def search(request: Request, index: str = "") -> JSONResponse:
        return JSONResponse({"index": index})

    @metered("api_calls")
    def count(request: Request, items: int = 0) -> JSONResponse:
        return JSONResponse({"count": items})

    app = Starlette(
        routes=[
            Route("/search", functools.partial(search, index="docs")),
            Route("/count", functools.partial(count, items=3)),
        ]
    )
    app.add_middleware(BillingMiddleware, billing=billing, customer=by_header, routes=declared(app))
    async with serve(app) as client:
        anonymous = [(await client.get(path)).status_code for path in ("/search", "/count")]
        paid = [(await client.get(path, headers=as_customer("user_free"))).json() for path in ("/search", "/count")]
    assert anonymous == [401, 401]
    assert paid == [{"index": "docs"}, {"count": 3}]
    assert await billing.recorded_units("user_free", "api_calls") == 2
