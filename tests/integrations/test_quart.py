"""Quart, through its own test client and lifespan: its auth hook names the customer, the Billing
extension's hook gates before the view runs, the middleware around ``asgi_app`` records the usage."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

pytest.importorskip("quart")

from quart import Blueprint, Quart, Request, abort, g, redirect, request  # noqa: E402

from billingos_asgi import BillingMiddleware, LocalBilling, Metered, from_api_key, report_usage  # noqa: E402
from billingos_quart import Billing, CustomerOf  # noqa: E402

from ..middleware.support import call_raw, http_scope  # noqa: E402

TOKENS = {"token-free": "user_free", "token-pro": "user_pro"}
ROUTES: dict[str, str | Metered] = {
    "GET /v1/search": "api_calls",
    "POST /v1/exports": "export",
    "/v1/broken": "api_calls",
    "GET /v1/items/{item_id:int}": "api_calls",
    "POST /v1/tokens": Metered("tokens", quantity=None),
}


@dataclass
class Account:
    customer_id: str


def account_of(request: Request) -> str | None:
    account: Account | None = g.get("account")
    return None if account is None else account.customer_id


def build(
    billing: LocalBilling, customer: CustomerOf = account_of, resolver: Any = None, **options: Any
) -> tuple[Quart, list[str]]:
    """The app, the middleware around its ``asgi_app`` (``resolver``: its ``customer=``), and its log
    of the views entered."""
    app = Quart(__name__)
    entered: list[str] = []

    @app.before_request
    async def authenticate() -> None:  # the app's own auth, registered before Billing's hook
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        customer_id = TOKENS.get(token) if scheme == "Bearer" else None
        g.account = None if customer_id is None else Account(customer_id)

    Billing(app, customer=customer)

    @app.get("/v1/search")
    async def search() -> dict[str, list[str]]:
        entered.append("search")
        return {"results": []}

    @app.post("/v1/exports")
    async def export() -> tuple[dict[str, str], int]:
        entered.append("export")
        return {"export": "started"}, 201

    @app.get("/v1/broken")
    async def broken() -> tuple[dict[str, str], int]:
        entered.append("broken")
        return {"error": "bad input"}, 400

    @app.get("/v1/items/<int:item_id>")
    async def item(item_id: int) -> dict[str, int]:
        entered.append("item")
        return {"item": item_id}

    @app.post("/v1/tokens")
    def complete() -> dict[str, str]:  # a sync view: Quart runs it in an executor thread
        entered.append("tokens")
        report_usage(7)
        return {"completion": "..."}

    @app.get("/health")
    async def health() -> dict[str, str]:
        entered.append("health")
        return {"status": "ok"}

    middleware = BillingMiddleware(app.asgi_app, billing=billing, customer=resolver, routes=ROUTES, **options)
    app.asgi_app = middleware  # type: ignore[assignment,method-assign]
    return app, entered


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_the_signed_in_account_pays_and_views_run_only_once_admitted(billing: LocalBilling) -> None:
    app, entered = build(billing)
    async with app.test_app() as test_app:  # the lifespan: the tracker starts, and drains on exit
        client = test_app.test_client()
        anonymous = await client.get("/v1/search")
        searches = [await client.get("/v1/search", headers=bearer("token-free")) for _ in range(11)]
        forbidden = await client.post("/v1/exports", headers=bearer("token-free"))
        exported = await client.post("/v1/exports", headers=bearer("token-pro"))
        healthy = await client.get("/health", headers=bearer("token-free"))
    assert anonymous.status_code == 401 and anonymous.content_type == "application/problem+json"
    assert (await anonymous.get_json())["feature"] == "api_calls"
    assert [r.status_code for r in searches] == [200] * 10 + [429]
    refused = searches[-1]
    assert refused.content_type == "application/problem+json" and int(refused.headers["retry-after"]) > 0
    assert (await refused.get_json())["feature"] == "api_calls"
    assert refused.headers["ratelimit"].startswith('"api_calls";r=0')
    assert searches[0].headers["ratelimit"].startswith('"api_calls";r=9')
    assert forbidden.status_code == 403
    assert (await forbidden.get_json())["detail"] == "your plan does not include export"
    assert exported.status_code == 201 and "x-request-id" in exported.headers
    assert healthy.status_code == 200 and "x-request-id" not in healthy.headers
    assert entered == ["search"] * 10 + ["export", "health"]
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_a_failing_answer_is_not_billed_and_a_typed_parameter_is_metered(billing: LocalBilling) -> None:
    app, entered = build(billing)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        failed = await client.get("/v1/broken", headers=bearer("token-pro"))
        item = await client.get("/v1/items/5", headers=bearer("token-pro"))
        unknown = await client.get("/v1/items/x", headers=bearer("token-pro"))  # Quart's 404: not metered
    assert (failed.status_code, item.status_code, unknown.status_code) == (400, 200, 404)
    assert await item.get_json() == {"item": 5} and "x-request-id" in item.headers
    assert entered == ["broken", "item"]
    assert await billing.recorded_units("user_pro", "api_calls") == 1


async def test_a_typed_parameter_in_any_digits_werkzeug_takes_is_metered(billing: LocalBilling) -> None:
    """Werkzeug's ``<int:...>`` takes every Unicode digit ("/v1/items/٥" is item 5): gated as the route."""
    app, entered = build(billing)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        anonymous = await client.get("/v1/items/\u0665")
        paid = [
            await client.get(path, headers=bearer("token-free")) for path in ("/v1/items/\u0665", "/v1/items/\uff15")
        ]
    assert anonymous.status_code == 401 and [r.status_code for r in paid] == [200, 200]
    assert [await r.get_json() for r in paid] == [{"item": 5}] * 2 and entered == ["item"] * 2
    assert await billing.recorded_units("user_free", "api_calls") == 2


def typed_beside_slug(billing: LocalBilling, kind: str, metered: str, slug_first: bool) -> tuple[Quart, list[str]]:
    """An app serving ``/v1/items/<kind:value>`` and ``/v1/items/<slug>`` to anonymous callers (a
    metered request is a 401), the ``metered`` one ("typed" or "slug") metered, the table naming
    the slug's key first or last; and its log of the views entered."""
    app = Quart(__name__)
    entered: list[str] = []
    Billing(app, customer=lambda request: None)

    @app.get(f"/v1/items/<{kind}:value>")
    async def typed(value: float) -> dict[str, float]:
        entered.append("typed")
        return {"value": value}

    @app.get("/v1/items/<slug>")
    async def by_slug(slug: str) -> dict[str, str]:
        entered.append("slug")
        return {"slug": slug}

    keys: list[tuple[str, str | None]] = [
        (f"GET /v1/items/{{value:{kind}}}", "api_calls" if metered == "typed" else None),
        ("GET /v1/items/{slug}", "api_calls" if metered == "slug" else None),
    ]
    routes = dict(reversed(keys) if slug_first else keys)
    app.asgi_app = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)  # type: ignore[assignment,method-assign]
    return app, entered


@pytest.mark.parametrize("slug_first", [False, True])
async def test_a_typed_parameter_takes_any_digits_before_a_free_one_beside_it(
    billing: LocalBilling, slug_first: bool
) -> None:
    """Werkzeug tries ``<int:...>`` (any script's digits) before ``<slug>``, whatever the table's
    order: "/v1/items/٥" was metered as the free slug's and served by the metered view, ungated;
    "+5" and " 5" are the slug's (Werkzeug's int takes digits only)."""
    app, entered = typed_beside_slug(billing, "int", "typed", slug_first)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answers = [
            await client.get(path) for path in ("/v1/items/\u0665", "/v1/items/5", "/v1/items/+5", "/v1/items/x")
        ]
    assert [answer.status_code for answer in answers] == [401, 401, 200, 200]
    assert entered == ["slug", "slug"]


@pytest.mark.parametrize(
    ("root_path", "target"), [("", "/v1/dir"), ("", "v1/dir"), ("", "http://app/v1/dir"), ("/api", "/apiv1/dir")]
)
async def test_werkzeugs_slash_redirect_is_not_billed_however_the_target_is_spelt(
    billing: LocalBilling, root_path: str, target: str
) -> None:
    """The redirect to "/v1/dir/" is compared with the path Quart routed, not only the path as sent."""
    app = Quart(__name__)
    Billing(app, customer=lambda request: "user_free")

    @app.get("/v1/dir/")
    async def listing() -> dict[str, str]:
        return {"ok": "yes"}

    middleware = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes={"GET /v1/dir/": "api_calls"})
    app.asgi_app = middleware  # type: ignore[assignment,method-assign]
    scope = http_scope(target)
    scope["root_path"] = root_path
    async with app.test_app():
        redirect = await call_raw(middleware, scope)
    assert redirect.status == 308
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_a_views_own_redirect_to_its_url_with_a_slash_is_billed(billing: LocalBilling) -> None:
    """A form's next page, even its own path with a slash added: the view's answer, unlike Werkzeug's 308."""
    app = Quart(__name__)
    Billing(app, customer=lambda request: "user_free")

    @app.post("/v1/form")
    async def form() -> Any:
        return redirect((await request.form).get("next", "/v1/done"))

    routes = {"POST /v1/form": "api_calls"}
    app.asgi_app = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)  # type: ignore[assignment,method-assign]
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answers = [await client.post("/v1/form", form={"next": target}) for target in ("/v1/done", "/v1/form/")]
    assert [(a.status_code, a.headers["location"]) for a in answers] == [(302, "/v1/done"), (302, "/v1/form/")]
    assert await billing.recorded_units("user_free", "api_calls") == 2


@pytest.mark.parametrize("slug_first", [False, True])
async def test_a_float_parameter_ranked_first_takes_a_plain_number_werkzeug_gives_the_slug(
    billing: LocalBilling, slug_first: bool
) -> None:
    """Werkzeug's <float> takes digits with a point only: "/v1/items/5" is the metered <slug>'s."""
    app, entered = typed_beside_slug(billing, "float", "slug", slug_first)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answer = await client.get("/v1/items/5")
    assert (answer.status_code, entered) == (401, []), (answer.status_code, entered)


async def test_a_final_newline_is_metered_as_the_parameter_werkzeug_gives_it_to(billing: LocalBilling) -> None:
    """Werkzeug compares a static segment as it is: "/v1/docs/index%0A" is the metered <name>
    "index\n"'s, not the free index's (a pattern's "$", as Starlette's, would take it for the index)."""
    app = Quart(__name__)
    entered: list[str] = []
    Billing(app, customer=lambda request: None)  # nobody signed in

    @app.get("/v1/docs/index")
    async def index() -> str:
        entered.append("index")
        return "free"

    @app.get("/v1/docs/<name>")
    async def doc(name: str) -> str:
        entered.append(name)
        return "paid"

    routes = {"GET /v1/docs/index": None, "GET /v1/docs/{name}": "api_calls"}
    app.asgi_app = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)  # type: ignore[assignment,method-assign]
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answers = [(await client.get(path)).status_code for path in ("/v1/docs/index", "/v1/docs/index%0A")]
    assert (answers, entered) == ([200, 401], ["index"])


async def test_what_follows_the_root_path_is_metered_as_quart_routes_it(billing: LocalBilling) -> None:
    """Quart routes what follows the root path, slash or not ("/apiv1/exports" under "/api" is
    /v1/exports): gated as that route, not as the default feature taking the whole path."""
    app, entered = build(billing, default_feature="api_calls")
    async with app.test_app():  # (the lifespan)
        transport = httpx.ASGITransport(app=app, root_path="/api")  # type: ignore[arg-type]  # (the path as requested)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            refused = await client.post("/apiv1/exports", headers=bearer("token-free"))
            exported = await client.post("/apiv1/exports", headers=bearer("token-pro"))
    assert (refused.status_code, exported.status_code) == (403, 201)
    assert refused.json()["feature"] == "export" and entered == ["export"]
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_an_absolute_form_target_is_metered_as_the_path_quart_routes(billing: LocalBilling) -> None:
    """Hypercorn (and h11) pass "POST http://host/v1/exports HTTP/1.1" on with the whole target as the
    path; Quart routes its path: the view ran ungated and unbilled."""
    app, entered = build(billing)
    async with app.test_app():  # (the lifespan)
        answers = [
            await call_raw(
                app.asgi_app,  # type: ignore[arg-type]  # (the middleware, put in its place by build())
                http_scope(path, method="POST", headers=[("authorization", "Bearer token-free")]),
            )
            for path in ("http://app/v1/exports", "x:/v1/exports", "http://app/v1/exports;x", "v1/exports;x")
        ]
        # (and one without its leading slash, whose "?" the server decoded from "%3F": cut off too)
        answers.append(await call_raw(app.asgi_app, http_scope("v1/search?x")))  # type: ignore[arg-type]
    assert [exchange.status for exchange in answers] == [403, 403, 403, 403, 401] and entered == []


async def test_a_problem_factorys_content_type_given_as_a_header_is_kept(billing: LocalBilling) -> None:
    from starlette.responses import Response as StarletteResponse

    def problem(denial: Any) -> StarletteResponse:
        return StarletteResponse(
            b'{"error": "sign in"}', denial.status, headers={"content-type": "application/vnd.acme+json"}
        )

    app, _ = build(billing, problem_factory=problem)
    async with app.test_app() as test_app:
        anonymous = await test_app.test_client().get("/v1/search")
    assert (anonymous.status_code, anonymous.content_type) == (401, "application/vnd.acme+json")


async def test_a_subclass_of_quart_is_routed_as_quart_routes(billing: LocalBilling) -> None:
    """An app of the app's own ``class App(Quart)`` was not taken for Quart's: "/v1/items/٥" (Werkzeug's
    item 5) went through ungated."""

    class App(Quart):
        pass

    app = App(__name__)

    @app.get("/v1/items/<int:item_id>")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    app.asgi_app = BillingMiddleware(  # type: ignore[assignment,method-assign]
        app.asgi_app, billing=billing, customer=None, routes=ROUTES
    )
    Billing(app, customer=account_of)
    async with app.test_app() as test_app:
        anonymous = await test_app.test_client().get("/v1/items/\u0665")
    assert anonymous.status_code == 401


async def test_a_cors_preflight_quart_answers_itself_passes_unbilled(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """Quart's automatic OPTIONS answers a preflight without a view: not gated (a browser sends it
    without credentials), not billed; an ordinary OPTIONS to a route keyed without a method is."""
    app, entered = build(billing)
    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answered = await client.options("/v1/broken", headers=preflight)
        anonymous = await client.options("/v1/broken")
        paid = await client.options("/v1/broken", headers=bearer("token-pro"))
    assert (answered.status_code, anonymous.status_code, paid.status_code) == (200, 401, 200)
    assert "GET" in answered.headers["allow"] and entered == []
    assert await billing.recorded_units("user_pro", "api_calls") == 1
    assert "never named its customer" not in caplog.text


async def test_a_cors_preflight_a_view_answers_itself_is_not_refused(billing: LocalBilling) -> None:
    """quart-cors' ``route_cors`` answers the preflight in the view: no credentials, never a 401."""
    app, entered = build(billing, default_feature="api_calls")

    @app.route("/v1/cors", methods=["GET", "OPTIONS"])
    async def cors() -> tuple[str, int, dict[str, str]]:
        entered.append(request.method)
        return "", 200, {"access-control-allow-origin": "https://app.test"}

    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with app.test_app() as test_app:
        answered = await test_app.test_client().options("/v1/cors", headers=preflight)
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://app.test"


async def test_units_reported_from_a_sync_view_are_counted_on_the_event_loop(
    billing: LocalBilling, counted_in: list[int]
) -> None:
    """The quotas belong to the event loop: a sync view's report reaches them there, not from Quart's executor."""
    app, entered = build(billing)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answers = [await client.post("/v1/tokens", headers=bearer("token-free")) for _ in range(16)]
    # 100 tokens: 14 views reported 7 each (98); the 15th, admitted with 2 left, reported 7 (the 2
    # that fit are recorded, 5 rejected); the 16th was refused before its view ran.
    assert [r.status_code for r in answers] == [200] * 15 + [429]
    assert entered == ["tokens"] * 15
    assert await billing.recorded_units("user_free", "tokens") == 100
    assert set(counted_in) == {threading.get_ident()}  # this test's event loop thread


async def test_a_sync_views_report_is_counted_on_the_event_loop_with_no_adapter_hook_too(
    billing: LocalBilling, counted_in: list[int]
) -> None:
    """An API key needs no adapter: with no Billing hook to hand the loop over, a sync view's report
    changed the quota from Quart's executor thread, racing the loop."""
    app = Quart(__name__)

    @app.post("/v1/tokens")
    def complete() -> dict[str, str]:
        report_usage(7)
        return {"completion": "..."}

    app.asgi_app = BillingMiddleware(  # type: ignore[assignment,method-assign]
        app.asgi_app,
        billing=billing,
        customer=from_api_key(TOKENS.get),
        routes={"POST /v1/tokens": Metered("tokens", quantity=None)},
    )
    async with app.test_app() as test_app:
        answer = await test_app.test_client().post("/v1/tokens", headers={"x-api-key": "token-free"})
    assert answer.status_code == 200 and counted_in == [threading.get_ident()]
    assert await billing.recorded_units("user_free", "tokens") == 7


async def test_a_404_the_apps_handler_redirects_is_neither_gated_nor_billed(billing: LocalBilling) -> None:
    """No view serves "/v1/nothing": the hook gated it, and the app's 404 handler's redirect home was billed."""
    app, entered = build(billing, default_feature="api_calls")

    @app.errorhandler(404)
    async def home(error: Exception) -> Any:
        return redirect("/")

    async with app.test_app() as test_app:
        client = test_app.test_client()
        named = await client.get("/v1/nothing", headers=bearer("token-free"))
        anonymous = await client.get("/v1/nothing")
    assert [(r.status_code, r.headers["location"]) for r in (named, anonymous)] == [(302, "/")] * 2
    assert entered == []
    assert await billing.recorded_units("user_free", "api_calls") == 0


@pytest.mark.parametrize("on_blueprint", [False, True])
async def test_a_view_that_raised_is_not_billed_whatever_the_apps_handler_answers(
    billing: LocalBilling, on_blueprint: bool
) -> None:
    """SPEC: the app raised, not billed; here a view's abort(404) the app answers with a redirect home
    (Billing on the app, or on the blueprint serving the view)."""
    app = Quart(__name__)
    served = Blueprint("items", __name__)
    entered: list[int] = []
    Billing(served if on_blueprint else app, customer=lambda request: TOKENS.get(request.headers.get("x-token", "")))

    @app.errorhandler(404)
    async def home(error: Exception) -> Any:
        return redirect("/")

    @served.get("/v1/items/<int:item_id>")
    async def item(item_id: int) -> dict[str, int]:
        entered.append(item_id)
        if item_id != 1:
            abort(404)
        return {"item": item_id}

    app.register_blueprint(served)
    routes = {"GET /v1/items/{item_id:int}": "api_calls"}
    app.asgi_app = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)  # type: ignore[assignment,method-assign]
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answers = [await client.get(f"/v1/items/{i}", headers={"x-token": "token-free"}) for i in (2, 1)]
    assert [answer.status_code for answer in answers] == [302, 200] and entered == [2, 1]
    assert await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize(("kind", "paths"), [("int", ["/v1/items/+5", "/v1/items/5_0"]), ("float", ["/v1/items/5"])])
async def test_a_spelling_werkzeug_gives_a_free_route_not_in_the_table_is_not_billed(
    billing: LocalBilling, kind: str, paths: list[str]
) -> None:
    """Werkzeug's numbers are digits (a float's with its point), not what int() or float() parse: those
    are the free <slug>'s beside the metered route, gated (401) and billed as the metered one's."""
    app = Quart(__name__)
    entered: list[str] = []
    Billing(app, customer=lambda request: TOKENS.get(request.headers.get("x-token", "")))

    @app.get(f"/v1/items/<{kind}:item_id>")
    async def item(item_id: float) -> dict[str, float]:
        entered.append("item")
        return {"item": item_id}

    @app.get("/v1/items/<slug>")
    async def by_slug(slug: str) -> dict[str, str]:  # free: not in the table
        entered.append("slug")
        return {"slug": slug}

    routes = {f"GET /v1/items/{{item_id:{kind}}}": "api_calls"}
    app.asgi_app = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)  # type: ignore[assignment,method-assign]
    async with app.test_app() as test_app:
        client = test_app.test_client()
        anonymous = [(await client.get(path)).status_code for path in paths]
        named = [(await client.get(path, headers={"x-token": "token-free"})).status_code for path in paths]
    assert (anonymous, named, entered) == ([200] * len(paths), [200] * len(paths), ["slug"] * 2 * len(paths))
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_a_failing_customer_function_follows_on_error_not_a_500(billing: LocalBilling) -> None:
    def broken_customer(request: Request) -> str | None:
        raise RuntimeError("the session store is down")

    for on_error, expected in (("allow", 200), ("deny", 503)):
        app, entered = build(billing, customer=broken_customer, on_error=on_error)
        async with app.test_app() as test_app:
            answer = await test_app.test_client().get("/v1/search", headers=bearer("token-free"))
        assert answer.status_code == expected
        assert entered == (["search"] if expected == 200 else [])
    assert await billing.recorded_units("user_free", "api_calls") == 0  # served unbilled, as on_error says


async def test_a_customer_resolved_before_quart_is_left_alone(billing: LocalBilling) -> None:
    asked: list[str] = []

    def not_expected(request: Request) -> str | None:
        asked.append(request.path)
        return None

    keys = {"key-pro": "user_pro"}
    app, entered = build(billing, customer=not_expected, resolver=from_api_key(keys.get))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answers = [(await client.get("/v1/search", headers={"x-api-key": key})).status_code for key in ("key-pro", "x")]
    assert answers == [200, 401]
    assert asked == [] and entered == ["search"]
    assert await billing.recorded_units("user_pro", "api_calls") == 1


def with_blueprint(billing: LocalBilling, api: Blueprint, routes: dict[str, str]) -> tuple[Quart, list[str]]:
    """An app serving ``api`` (its ``GET /api/export`` view added here), metered by ``routes``, and
    its log of the views entered."""
    app = Quart(__name__)
    entered: list[str] = []

    @api.get("/export")
    async def export() -> dict[str, str]:
        entered.append("export")
        return {"export": "started"}

    app.register_blueprint(api)
    app.asgi_app = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)  # type: ignore[assignment,method-assign]
    return app, entered


async def authenticate() -> None:
    """The app's auth, as a ``before_request`` hook of an app or a blueprint."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    g.account = Account(TOKENS[token]) if scheme == "Bearer" and token in TOKENS else None


async def test_a_refusal_is_answered_past_a_blueprints_catch_all_error_handler(billing: LocalBilling) -> None:
    """Quart asks a blueprint's error handlers before the app's: one of every Exception would take a
    refusal raised by the hook and answer its own 500. The hook answers it instead."""
    api = Blueprint("api", __name__, url_prefix="/api")

    @api.errorhandler(Exception)
    async def internal_error(error: Exception) -> tuple[dict[str, str], int]:
        return {"error": "internal"}, 500

    app, entered = with_blueprint(billing, api, {"GET /api/export": "export"})
    app.before_request(authenticate)
    Billing(app, customer=account_of)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        anonymous = await client.get("/api/export")
        free = await client.get("/api/export", headers=bearer("token-free"))
        pro = await client.get("/api/export", headers=bearer("token-pro"))
    assert (anonymous.status_code, free.status_code, pro.status_code) == (401, 403, 200)
    assert anonymous.content_type == free.content_type == "application/problem+json"
    assert (await free.get_json())["detail"] == "your plan does not include export"
    assert entered == ["export"]


async def test_billing_on_a_blueprint_gates_after_the_blueprints_own_auth(billing: LocalBilling) -> None:
    """An app's before_request hooks run before its blueprints', whatever the order they were made
    in: where a blueprint authenticates, Billing goes on the blueprint."""
    api = Blueprint("api", __name__, url_prefix="/api")
    api.before_request(authenticate)
    Billing(api, customer=account_of)
    app, entered = with_blueprint(billing, api, {"GET /api/export": "api_calls"})
    async with app.test_app() as test_app:
        client = test_app.test_client()
        answers = [await client.get("/api/export", headers=bearer("token-free")) for _ in range(11)]
        anonymous = await client.get("/api/export")
    assert [r.status_code for r in answers] == [200] * 10 + [429]
    assert anonymous.status_code == 401 and anonymous.content_type == "application/problem+json"
    assert entered == ["export"] * 10
    assert await billing.recorded_units("user_free", "api_calls") == 10


def test_a_customer_that_is_no_function_is_refused_at_start_up() -> None:
    with pytest.raises(ValueError, match="customer must be a function"):
        Billing(Quart(__name__), customer="myapp.billing.customer_of")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="customer must be a function of the request, got dict$"):
        Billing(Quart(__name__), customer=TOKENS)  # type: ignore[arg-type]  # (its keys are never quoted)
