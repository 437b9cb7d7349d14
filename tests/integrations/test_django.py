"""Django (ASGI): Django's own session auth names the customer, the view runs only once admitted.

Django is configured once for this module (settings are process-wide): real ``contrib.auth`` and
sessions over a SQLite file, users signed in through Django's test client. The middleware wraps
Django's ASGI handler with no ``customer=``; ``IdentifyCustomerMiddleware`` identifies inside Django.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("django")

import django  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.http import Http404, HttpRequest, HttpResponseRedirect, JsonResponse  # noqa: E402
from django.test import override_settings  # noqa: E402
from django.urls import path  # noqa: E402

from billingos_asgi import BillingMiddleware, LocalBilling, Metered, report_usage  # noqa: E402
from billingos_asgi.testing import lifespan  # noqa: E402
from billingos_django import metered  # noqa: E402

from ..asgi import serve  # noqa: E402
from ..middleware.support import CUSTOMER_HEADER, as_customer, by_header, call_raw, http_scope  # noqa: E402

ENTERED: list[str] = []  # the views a request reached, in order


async def search(request: HttpRequest) -> JsonResponse:
    ENTERED.append("search")
    return JsonResponse({"results": []})


async def export(request: HttpRequest) -> JsonResponse:
    ENTERED.append("export")
    return JsonResponse({"export": "started"})


async def broken(request: HttpRequest) -> JsonResponse:
    ENTERED.append("broken")
    return JsonResponse({"error": "bad input"}, status=400)


async def any_method(request: HttpRequest) -> JsonResponse:  # a function view: every method, OPTIONS too
    ENTERED.append(f"any {request.method}")
    return JsonResponse({"results": []})


def pages(request: Any) -> float:
    return float(request.query_params.get("pages", "1"))


async def health(request: HttpRequest) -> JsonResponse:
    ENTERED.append("health")
    return JsonResponse({"status": "ok"})


def tokens(request: HttpRequest) -> JsonResponse:  # a sync view: Django runs it in asgiref's thread pool
    ENTERED.append("tokens")
    report_usage(7)
    return JsonResponse({"tokens": 7})


async def doc(request: HttpRequest, name: str) -> JsonResponse:
    ENTERED.append(f"doc {name!r}")
    return JsonResponse({"doc": name})


async def item(request: HttpRequest, item_id: int) -> JsonResponse:
    ENTERED.append(f"item {item_id}")
    if item_id != 1:
        raise Http404("no such item")
    return JsonResponse({"item": item_id})


async def note(request: HttpRequest, title: str) -> JsonResponse:
    ENTERED.append(title)
    return JsonResponse({"note": title})


async def form(request: HttpRequest) -> HttpResponseRedirect:  # Post/Redirect/Get, to a next page the form names
    ENTERED.append("form")
    return HttpResponseRedirect(request.POST.get("next", "/v1/done"))


@metered("api_calls")
async def declared(request: HttpRequest) -> JsonResponse:
    ENTERED.append("declared")
    return JsonResponse({"results": []})


@metered("export")
def mislabelled(request: HttpRequest) -> JsonResponse:  # a sync view
    ENTERED.append("mislabelled")
    return JsonResponse({"export": "started"})


urlpatterns = [
    path("v1/search", search),
    path("v1/exports", export),
    path("v1/broken", broken),
    path("v1/declared", declared),
    path("v1/mislabelled", mislabelled),
    path("v1/tokens", tokens),
    path("v1/any", any_method),
    path("v1/convert", any_method),
    path("v1/form", form),
    path("health", health),
    path("v1/notes/<str:title>/", note),
    path("v1/docs/index", health),
    path("v1/docs/<str:name>", doc),
]
ROUTES: dict[str, str | Metered | None] = {
    "GET /v1/search": "api_calls",
    "POST /v1/exports": "export",
    "/v1/broken": "api_calls",
    "/v1/any": "api_calls",
    "/v1/convert": Metered("api_calls", quantity=pages),
    "GET /v1/declared": "api_calls",
    "GET /v1/mislabelled": "api_calls",
    "GET /v1/tokens": Metered("tokens", quantity=None),
    "POST /v1/form": "api_calls",
}


async def by_username(request: HttpRequest) -> str | None:
    """A ``BILLINGOS_CUSTOMER`` of the app's own: the user's name, prefixed."""
    user = await request.auser()
    return f"user_{user.get_username()}" if user.is_authenticated else None


def signed_in_pk(request: HttpRequest) -> str | None:
    """A sync ``BILLINGOS_CUSTOMER`` reading ``request.user``: a database query, which Django refuses
    on the event loop (SynchronousOnlyOperation), so that on_error let signed-in users through free."""
    return str(request.user.pk) if request.user.is_authenticated else None


class ByUsername:
    """A ``BILLINGOS_CUSTOMER`` that is an object, its ``__call__`` async."""

    async def __call__(self, request: HttpRequest) -> str | None:
        return await by_username(request)


by_username_object = ByUsername()


def _sync_wrapper(function: Any) -> Any:
    """A plain decorator of the app's, which hides that the function it wraps is async."""

    def wrapper(request: HttpRequest) -> Any:
        return function(request)

    return wrapper


by_username_behind_a_sync_wrapper = _sync_wrapper(by_username)


def session_store_down(request: HttpRequest) -> str | None:
    """A ``BILLINGOS_CUSTOMER`` that fails (the app's bug or outage, not a refusal)."""
    raise ConnectionError("session store unreachable")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, str]]]:
    """Django set up once; per user, the default customer id (the pk) and a signed-in session cookie."""
    settings.configure(
        SECRET_KEY="test-only",
        ALLOWED_HOSTS=["app"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path_factory.mktemp("django") / "db.sqlite3"),
            }
        },
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "billingos_django.IdentifyCustomerMiddleware",
        ],
    )
    django.setup()
    from django.contrib.auth.models import User  # models exist once Django is set up
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    signed_in = {}
    for name in ("free", "pro", "37"):
        user = User.objects.create_user(name)
        client = Client()
        client.force_login(user)
        signed_in[name] = (str(user.pk), {"cookie": f"sessionid={client.cookies['sessionid'].value}"})
    return signed_in


@pytest.fixture
def entered() -> Iterator[list[str]]:
    ENTERED.clear()
    yield ENTERED


@pytest.fixture
async def pro(billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]]) -> tuple[str, dict[str, str]]:
    """The signed-in user on the pro plan: their customer id and session headers."""
    customer, headers = sessions["pro"]
    await billing.set_plan(customer, "pro")
    return customer, headers


def build(billing: LocalBilling, **options: Any) -> BillingMiddleware:
    return BillingMiddleware(get_asgi_application(), billing=billing, customer=None, routes=ROUTES, **options)


async def test_the_signed_in_user_pays_and_views_run_only_once_admitted(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], entered: list[str]
) -> None:
    (free, as_free), (pro, as_pro) = sessions["free"], sessions["pro"]
    await billing.set_plan(free, "free")
    await billing.set_plan(pro, "pro")
    async with serve(build(billing)) as client:
        anonymous = await client.get("/v1/search")
        searches = [await client.get("/v1/search", headers=as_free) for _ in range(11)]
        forbidden = await client.post("/v1/exports", headers=as_free)
        exported = await client.post("/v1/exports", headers=as_pro)
        healthy = await client.get("/health")
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert [r.status_code for r in searches] == [200] * 10 + [429]
    refused = searches[-1]
    assert refused.json()["feature"] == "api_calls" and int(refused.headers["retry-after"]) > 0
    assert refused.headers["content-type"] == "application/problem+json"
    assert searches[0].headers["ratelimit"].startswith('"api_calls";r=9')
    assert forbidden.status_code == 403 and forbidden.json()["detail"] == "your plan does not include export"
    assert exported.status_code == 200 and "x-request-id" in exported.headers
    assert healthy.status_code == 200 and "x-request-id" not in healthy.headers
    assert entered == ["search"] * 10 + ["export", "health"]
    assert await billing.recorded_units(free, "api_calls") == 10


async def test_a_forced_script_name_is_routed_as_django_routes_it(
    billing: LocalBilling, pro: tuple[str, dict[str, str]], entered: list[str]
) -> None:
    """With ``FORCE_SCRIPT_NAME = "/api"`` (an app behind a proxy's path), Django serves
    "/api/v1/search" as its "v1/search", the script name set aside as a root path is: metered as
    "GET /v1/search", not served free and ungated."""
    pro_id, as_pro = pro
    with override_settings(FORCE_SCRIPT_NAME="/api"):
        async with serve(build(billing)) as client:
            anonymous = await client.get("/api/v1/search")
            searched = await client.get("/api/v1/search", headers=as_pro)
    assert anonymous.status_code == 401 and anonymous.json()["feature"] == "api_calls"
    assert searched.status_code == 200 and "x-request-id" in searched.headers
    assert entered == ["search"]
    assert await billing.recorded_units(pro_id, "api_calls") == 1


class Logged:
    """An app's own pure ASGI middleware around Django's handler, inside ours (``.app``, or as
    other wrappers keep it: ``.wrapped``)."""

    def __init__(self, app: Any, attribute: str = "app") -> None:
        self.attribute = attribute
        setattr(self, attribute, app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await getattr(self, self.attribute)(scope, receive, send)


@pytest.mark.parametrize("attribute", ["app", "wrapped", "__wrapped__"])
async def test_a_forced_script_name_is_seen_through_the_apps_own_wrappers(
    billing: LocalBilling, pro: tuple[str, dict[str, str]], entered: list[str], attribute: str
) -> None:
    """Django's handler inside another wrapper: the script name was looked for on the wrapper only,
    and "/api/v1/search" served free and ungated."""
    pro_id, as_pro = pro
    with override_settings(FORCE_SCRIPT_NAME="/api"):
        wrapped = Logged(get_asgi_application(), attribute)
        app = BillingMiddleware(wrapped, billing=billing, customer=None, routes=ROUTES)
        async with serve(app) as client:
            anonymous = await client.get("/api/v1/search")
            searched = await client.get("/api/v1/search", headers=as_pro)
    assert anonymous.status_code == 401 and searched.status_code == 200
    assert entered == ["search"]
    assert await billing.recorded_units(pro_id, "api_calls") == 1


async def test_a_cors_preflight_to_a_view_that_answers_it_is_gated_there(
    billing: LocalBilling, pro: tuple[str, dict[str, str]], entered: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A function view answers OPTIONS as any method: the preflight's two headers must not take a
    request past the gate, free. Identified there (none: a 401), it is gated and billed as any."""
    pro_id, as_pro = pro
    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with serve(build(billing)) as client:
        anonymous = await client.options("/v1/any", headers=preflight)
        signed_in = await client.options("/v1/any", headers={**preflight, **as_pro})
    assert anonymous.status_code == 401 and anonymous.json()["feature"] == "api_calls"
    assert signed_in.status_code == 200 and entered == ["any OPTIONS"]
    assert await billing.recorded_units(pro_id, "api_calls") == 1
    assert "never named its customer" not in caplog.text


async def test_a_forged_preflight_is_sized_by_the_quantity_function_as_any_request(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], entered: list[str]
) -> None:
    free, as_free = sessions["free"]
    await billing.set_plan(free, "free")  # 10 api_calls
    preflight = {"origin": "https://app.test", "access-control-request-method": "GET"}
    async with serve(build(billing)) as client:
        refused = await client.options("/v1/convert?pages=500", headers={**preflight, **as_free})
        served = await client.options("/v1/convert?pages=3", headers={**preflight, **as_free})
    assert (refused.status_code, served.status_code) == (429, 200) and entered == ["any OPTIONS"]
    assert await billing.recorded_units(free, "api_calls") == 3


async def test_a_failing_answer_is_not_billed(
    billing: LocalBilling, pro: tuple[str, dict[str, str]], entered: list[str]
) -> None:
    pro_id, as_pro = pro
    async with serve(build(billing)) as client:
        failed = await client.get("/v1/broken", headers=as_pro)
        succeeded = await client.get("/v1/search", headers=as_pro)
    assert (failed.status_code, succeeded.status_code) == (400, 200)
    assert entered == ["broken", "search"]
    assert await billing.recorded_units(pro_id, "api_calls") == 1


@pytest.mark.parametrize("customer", ["by_username", "by_username_object", "by_username_behind_a_sync_wrapper"])
async def test_the_customer_setting_names_who_pays(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], customer: str
) -> None:
    pk, as_37 = sessions["37"]
    with override_settings(BILLINGOS_CUSTOMER=f"{__name__}.{customer}"):
        app = build(billing)  # the handler reads its middleware settings when built
    async with serve(app) as client:
        answers = [(await client.get("/v1/search", headers=as_37)).status_code for _ in range(38)]
    assert answers == [200] * 37 + [429]  # user_37's plan: 37 calls
    assert await billing.recorded_units("user_37", "api_calls") == 37
    assert await billing.recorded_units(pk, "api_calls") == 0


async def test_a_sync_customer_setting_may_read_the_user(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]]
) -> None:
    pk, as_37 = sessions["37"]
    await billing.set_plan(pk, "free")
    with override_settings(BILLINGOS_CUSTOMER=f"{__name__}.signed_in_pk"):
        app = build(billing)
    async with serve(app) as client:
        answers = [(await client.get("/v1/search", headers=as_37)).status_code for _ in range(11)]
        anonymous = await client.get("/v1/search")
    assert (answers, anonymous.status_code) == ([200] * 10 + [429], 401)
    assert await billing.recorded_units(pk, "api_calls") == 10
    assert app.unidentified == 0


@pytest.mark.parametrize(
    "middleware",
    [
        ["billingos_django.IdentifyCustomerMiddleware"],
        [
            "django.contrib.sessions.middleware.SessionMiddleware",
            "billingos_django.IdentifyCustomerMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
    ],
    ids=["no auth middleware", "auth after ours"],
)
async def test_without_django_auth_before_it_every_metered_request_is_answered_401(
    billing: LocalBilling,
    pro: tuple[str, dict[str, str]],
    entered: list[str],
    middleware: list[str],
) -> None:
    """No request.user: the default customer function failed, and on_error="allow" served everyone free."""
    pro_id, as_pro = pro
    with override_settings(MIDDLEWARE=middleware):
        app = build(billing)
    async with serve(app) as client:
        answers = [(await client.get("/v1/search", headers=headers)).status_code for headers in (as_pro, {})]
    assert answers == [401, 401] and entered == []
    assert await billing.recorded_units(pro_id, "api_calls") == 0


@pytest.mark.parametrize(("on_error", "expected"), [("allow", 200), ("deny", 503)])
async def test_a_failing_customer_setting_follows_on_error_not_a_500(
    billing: LocalBilling,
    pro: tuple[str, dict[str, str]],
    entered: list[str],
    on_error: str,
    expected: int,
) -> None:
    pro_id, as_pro = pro
    with override_settings(BILLINGOS_CUSTOMER=f"{__name__}.session_store_down"):
        app = build(billing, on_error=on_error)
    async with serve(app) as client:
        answer = await client.get("/v1/search", headers=as_pro)
    assert answer.status_code == expected
    assert entered == (["search"] if expected == 200 else [])  # let through unbilled, or refused before the view
    assert await billing.recorded_units(pro_id, "api_calls") == 0


def test_a_customer_setting_that_names_no_function_is_refused_at_start_up(
    sessions: dict[str, tuple[str, dict[str, str]]],
) -> None:
    """It failed on every metered request, which on_error="allow" then served unbilled to anyone."""
    with (
        override_settings(BILLINGOS_CUSTOMER=f"{__name__}.ROUTES"),
        pytest.raises(ImproperlyConfigured, match="ROUTES"),
    ):
        get_asgi_application()  # Django builds its middleware here, at start-up
    with (
        override_settings(BILLINGOS_CUSTOMER={"key_alice": "user_123"}),  # a key store: its keys never quoted
        pytest.raises(ImproperlyConfigured, match="BILLINGOS_CUSTOMER must be a function of the request, got dict$"),
    ):
        get_asgi_application()


async def test_the_middleware_answers_the_lifespan_django_refuses(
    billing: LocalBilling, pro: tuple[str, dict[str, str]]
) -> None:
    pro_id, as_pro = pro
    with pytest.raises(RuntimeError, match="not lifespan"):  # Django alone
        async with lifespan(get_asgi_application()):  # type: ignore[arg-type]  # Django types its scopes its own way
            pass
    async with serve(build(billing, flush_interval=30)) as client:
        for _ in range(3):
            assert (await client.get("/v1/search", headers=as_pro)).status_code == 200
        assert await billing.recorded_units(pro_id, "api_calls") == 0  # queued in the running tracker's window
    assert await billing.recorded_units(pro_id, "api_calls") == 3  # drained at shutdown


async def test_a_metered_view_the_middleware_did_not_meter_as_declared_fails_closed(
    billing: LocalBilling, pro: tuple[str, dict[str, str]], entered: list[str]
) -> None:
    pro_id, as_pro = pro
    async with serve(build(billing)) as client:
        metered_get = await client.get("/v1/declared", headers=as_pro)
        unmetered_post = await client.post("/v1/declared", headers=as_pro)  # the key names GET only
        mislabelled = await client.get("/v1/mislabelled", headers=as_pro)  # routes= says api_calls
    assert (metered_get.status_code, unmetered_post.status_code, mislabelled.status_code) == (200, 500, 500)
    assert entered == ["declared"]
    assert await billing.recorded_units(pro_id, "api_calls") == 1


async def test_a_metered_view_fails_closed_where_no_middleware_identified_the_customer(
    billing: LocalBilling, pro: tuple[str, dict[str, str]], entered: list[str]
) -> None:
    """Without IdentifyCustomerMiddleware in MIDDLEWARE nothing gates the request: @metered refuses to run free."""
    pro_id, as_pro = pro
    without = [name for name in settings.MIDDLEWARE if name != "billingos_django.IdentifyCustomerMiddleware"]
    with override_settings(MIDDLEWARE=without):
        app = build(billing)  # the handler reads its middleware settings when built
    async with serve(app) as client:
        declared_view = await client.get("/v1/declared", headers=as_pro)
        plain_view = await client.get("/v1/search", headers=as_pro)  # not declared: let through, with a warning
    assert (declared_view.status_code, plain_view.status_code) == (500, 200)
    assert entered == ["search"]
    assert await billing.recorded_units(pro_id, "api_calls") == 0


async def test_units_reported_from_a_sync_view_are_counted_on_the_event_loop(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], counted_in: list[int]
) -> None:
    """The quotas belong to the event loop: a sync view's report reaches them there, not from asgiref's thread."""
    free, as_free = sessions["free"]
    await billing.set_plan(free, "free")
    async with serve(build(billing)) as client:
        answers = [(await client.get("/v1/tokens", headers=as_free)).status_code for _ in range(3)]
    assert answers == [200] * 3
    assert counted_in == [threading.get_ident()] * 3  # this test's event loop thread
    assert await billing.recorded_units(free, "tokens") == 21


async def test_a_slash_redirect_of_common_middleware_is_not_billed_the_request_after_it_is(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], entered: list[str]
) -> None:
    """APPEND_SLASH: Django answers "/v1/notes/café" with a 301 to "/v1/notes/caf%C3%A9/", a path
    (no host) and quoted; the framework's redirect to the canonical path, not the view's answer."""
    with override_settings(MIDDLEWARE=["django.middleware.common.CommonMiddleware"]):
        app = BillingMiddleware(
            get_asgi_application(), billing=billing, customer=by_header, routes={"/v1/notes/{title}": "api_calls"}
        )
    async with serve(app, follow_redirects=True) as client:
        answer = await client.get("/v1/notes/café", headers=as_customer("user_free"))
    assert answer.status_code == 200 and [r.status_code for r in answer.history] == [301]
    assert answer.history[0].headers["location"] == "/v1/notes/caf%C3%A9/" and entered == ["café"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_views_own_redirect_to_its_url_with_a_slash_is_billed(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], entered: list[str]
) -> None:
    """A form's next page, even its own path with a slash added ("/v1/form/"), is the view's answer
    after its work: billed, unlike CommonMiddleware's redirect to the slashed URL."""
    free, as_free = sessions["free"]
    await billing.set_plan(free, "free")
    async with serve(build(billing)) as client:
        answers = [
            await client.post("/v1/form", data={"next": target}, headers=as_free)
            for target in ("/v1/done", "/v1/form/")
        ]
    assert [(a.status_code, a.headers["location"]) for a in answers] == [(302, "/v1/done"), (302, "/v1/form/")]
    assert entered == ["form", "form"]
    assert await billing.recorded_units(free, "api_calls") == 2


async def test_a_redirect_django_makes_of_a_404_outside_the_adapter_is_not_billed(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], entered: list[str]
) -> None:
    """LocaleMiddleware answers "/v1/search", which only "/en/v1/search" serves, with a 302 there:
    made of the 404 Django's routing answered the adapter with, it was billed, and the request
    after it too (two units for one search)."""
    from types import ModuleType

    from django.conf.urls.i18n import i18n_patterns

    free, as_free = sessions["free"]
    await billing.set_plan(free, "free")
    localized = ModuleType("localized_urls")  # a URLconf: Django caches resolvers by it
    localized.urlpatterns = i18n_patterns(path("v1/search", search))  # type: ignore[attr-defined]
    middleware = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.middleware.locale.LocaleMiddleware",
        "billingos_django.IdentifyCustomerMiddleware",
    ]
    languages = [("en", "English"), ("fr", "French")]
    with override_settings(MIDDLEWARE=middleware, ROOT_URLCONF=localized, USE_I18N=True, LANGUAGES=languages):
        app = BillingMiddleware(get_asgi_application(), billing=billing, customer=None, default_feature="api_calls")
        async with serve(app) as client:  # (httpx drops a Cookie header on a redirect: followed by hand)
            redirect = await client.get("/v1/search", headers=as_free)
            answer = await client.get(redirect.headers["location"], headers=as_free)
    assert (redirect.status_code, redirect.headers["location"], answer.status_code) == (302, "/en/v1/search", 200)
    assert entered == ["search"]
    assert await billing.recorded_units(free, "api_calls") == 1


async def test_a_slash_redirect_keeping_a_raw_utf8_query_is_not_billed(
    billing: LocalBilling, sessions: dict[str, tuple[str, dict[str, str]]], entered: list[str]
) -> None:
    """curl sends "?q=é" as raw UTF-8 bytes; Django's redirect quotes them ("?q=%C3%A9"), which the
    query read as Latin-1 ("q=Ã©") did not match: the redirect was billed, and the request after it."""
    with override_settings(MIDDLEWARE=["django.middleware.common.CommonMiddleware"]):
        app = BillingMiddleware(
            get_asgi_application(), billing=billing, customer=by_header, routes={"/v1/notes/{title}": "api_calls"}
        )
    scope = http_scope("/v1/notes/hello", headers=[(CUSTOMER_HEADER, "user_free")], query="q=é".encode())
    async with lifespan(app):
        redirect = await call_raw(app, scope)
    assert (redirect.status, redirect.header("location")) == (301, "/v1/notes/hello/?q=%C3%A9") and entered == []
    assert await billing.recorded_units("user_free", "api_calls") == 0


@pytest.mark.parametrize(
    "options",
    [
        {"routes": {"GET /v1/docs/index": None, "GET /v1/docs/{name}": "api_calls"}},
        {"default_feature": "api_calls", "exclude": ["/v1/docs/index"]},
    ],
)
async def test_a_final_newline_is_routed_to_the_template_as_django_routes_it(
    billing: LocalBilling, sessions: object, entered: list[str], options: dict[str, Any]
) -> None:
    """Django's path() patterns end at the path's end: "/v1/docs/index%0A" is the metered
    <str:name> "index\n", not the free index. Taken for the index, it ran that view ungated, unbilled."""
    app = BillingMiddleware(get_asgi_application(), billing=billing, customer=by_header, **options)
    async with serve(app) as client:
        anonymous = await client.get("/v1/docs/index%0A")
        named = await client.get("/v1/docs/index%0A", headers=as_customer("user_free"))
        free = await client.get("/v1/docs/index")
    assert (anonymous.status_code, named.status_code, free.status_code) == (401, 200, 200)
    assert entered == ["doc 'index\\n'", "health"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


def home(request: HttpRequest, exception: Exception) -> HttpResponseRedirect:
    return HttpResponseRedirect("/")  # every unknown URL goes to the home page


async def test_a_404_the_urlconfs_handler_redirects_is_not_billed(
    billing: LocalBilling, sessions: object, entered: list[str]
) -> None:
    """No view serves "/v1/nothing"; the URLconf's handler404 answers with a redirect home, inside the
    adapter, which saw a success: it was billed. A view's page served by a middleware (a cache) still is."""
    from types import ModuleType

    urls = ModuleType("urls_with_handler404")  # a URLconf: Django caches resolvers by it
    urls.urlpatterns = [path("v1/search", search), path("v1/items/<int:item_id>", item)]  # type: ignore[attr-defined]
    urls.handler404 = home  # type: ignore[attr-defined]
    with override_settings(ROOT_URLCONF=urls, MIDDLEWARE=["billingos_django.IdentifyCustomerMiddleware"]):
        app = BillingMiddleware(
            get_asgi_application(), billing=billing, customer=by_header, default_feature="api_calls"
        )
        async with serve(app) as client:
            missing = await client.get("/v1/nothing", headers=as_customer("user_free"))
            raised = await client.get("/v1/items/2", headers=as_customer("user_free"))  # the view's own Http404
            found = await client.get("/v1/search", headers=as_customer("user_free"))
    assert [r.status_code for r in (missing, raised, found)] == [302, 302, 200]
    assert entered == ["item 2", "search"]
    assert await billing.recorded_units("user_free", "api_calls") == 1
