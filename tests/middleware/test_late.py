"""Late identification (SPEC section 5): the app names the customer where its own auth runs.

The handlers here identify the customer from a bearer token the app itself maps (its own auth);
the middleware still decides (through ``identify``) and tracks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from billingos_asgi import (
    BillingBackend,
    BillingDenied,
    BillingMiddleware,
    BillingOS,
    Entitlement,
    LocalBilling,
    Metered,
    RetryPolicy,
    UsageContext,
    get_usage_context,
    set_customer,
)
from billingos_asgi.testing import lifespan
from tests.asgi import serve
from tests.test_tracker import Around

from .support import as_customer, call_raw, closed_port_url, concurrent_statuses, http_scope, unwrapped

TOKENS = {"token-free": "user_free", "token-pro": "user_pro", "token-37": "user_37", "token-ghost": "user_ghost"}


def signed_in(request: Request) -> str | None:
    """The app's own auth: a bearer token mapped to its customer."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return TOKENS.get(token) if scheme == "Bearer" else None


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def late_app(billing: BillingBackend, entered: list[str], **options: Any) -> Starlette:
    async def search(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None and context.customer_id is None  # nobody named yet
        await context.identify(signed_in(request))
        entered.append(context.customer_id or "?")
        return JSONResponse({"customer": context.customer_id, "request_id": context.request_id})

    async def named(request: Request) -> Response:
        set_customer(request.path_params["customer"])  # no gate: the handler already decided
        return JSONResponse({})

    async def forgetful(request: Request) -> Response:
        return JSONResponse({})  # never names the customer

    async def twice(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        await context.identify("user_pro")
        await context.identify("user_pro")  # the same customer again: nothing happens
        with pytest.raises(ValueError, match="billed to 'user_pro'"):
            await context.identify("user_free")
        with pytest.raises(ValueError, match="billed to 'user_pro'"):
            set_customer("user_free")
        return JSONResponse({})

    async def failing(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        await context.identify(signed_in(request))
        return JSONResponse({"error": "upstream of the app failed"}, 502)

    app = Starlette(
        routes=[
            Route("/v1/search", search),
            Route("/v1/named/{customer}", named),
            Route("/v1/forgetful", forgetful),
            Route("/v1/twice", twice),
            Route("/v1/failing", failing),
        ]
    )
    app.add_middleware(
        BillingMiddleware,
        billing=billing,
        customer=None,
        default_feature="api_calls",
        flush_interval=0.05,
        **options,
    )
    return app


async def test_the_app_names_the_customer_and_the_gate_runs_there(billing: LocalBilling) -> None:
    entered: list[str] = []
    app = late_app(billing, entered)
    async with serve(app) as client:
        anonymous = await client.get("/v1/search")
        ghost = await client.get("/v1/search", headers=bearer("token-ghost"))
        answers = [(await client.get("/v1/search", headers=bearer("token-free"))) for _ in range(11)]
        spoofed = await client.get("/v1/search", headers={**bearer("token-pro"), **as_customer("user_free")})
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert ghost.status_code == 403
    assert [a.status_code for a in answers] == [200] * 10 + [429]
    assert answers[-1].json()["feature"] == "api_calls" and int(answers[-1].headers["retry-after"]) > 0
    assert answers[0].headers["ratelimit"].startswith('"api_calls";r=9')  # the quota headers, as when gated early
    assert answers[0].json()["request_id"] == answers[0].headers["x-request-id"]
    assert len({answer.headers["x-request-id"] for answer in (anonymous, ghost, answers[-1])}) == 3  # refusals too
    assert spoofed.json()["customer"] == "user_pro"
    assert entered == ["user_free"] * 10 + ["user_pro"]  # the handler went no further on 401/403/429
    assert await billing.recorded_units("user_free", "api_calls") == 10
    assert await billing.recorded_units("user_pro", "api_calls") == 1


async def test_a_late_refusal_is_answered_when_the_middleware_wraps_the_app_from_outside(
    billing: LocalBilling,
) -> None:
    """Outside the app, the refusal would meet the app's error middleware first: a 500."""
    entered: list[str] = []
    app = late_app(billing, entered)
    inner = app.user_middleware.pop()  # the same middleware, around the app instead of inside it
    middleware = BillingMiddleware(app, **inner.kwargs)  # type: ignore[arg-type]
    async with serve(middleware) as client:
        anonymous = await client.get("/v1/search")
        answered = await client.get("/v1/search", headers=bearer("token-free"))
    assert (anonymous.status_code, anonymous.headers["content-type"]) == (401, "application/problem+json")
    assert anonymous.headers["x-request-id"] and answered.status_code == 200 and entered == ["user_free"]


async def test_concurrent_late_requests_never_overshoot_the_quota(billing: LocalBilling) -> None:
    app = late_app(billing, [])
    async with serve(app) as client:
        statuses = await concurrent_statuses(client, 100, bearer("token-37"), "/v1/search")
    assert sorted(statuses) == [200] * 37 + [429] * 63
    assert await billing.recorded_units("user_37", "api_calls") == 37


async def test_set_customer_bills_without_a_gate_and_a_failed_answer_is_not_billed(billing: LocalBilling) -> None:
    app = late_app(billing, [])
    async with serve(app) as client:
        assert (await client.get("/v1/named/user_pro")).status_code == 200
        assert (await client.get("/v1/twice")).status_code == 200
        assert (await client.get("/v1/failing", headers=bearer("token-free"))).status_code == 502
        with pytest.raises(ValueError, match="customer_id must not be empty"):  # the app's bug, loudly
            await client.get("/v1/named/%20")
    assert await billing.recorded_units("user_pro", "api_calls") == 2
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_a_request_never_identified_is_counted_and_logged_not_billed(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    app = late_app(billing, [])
    async with serve(app) as client:
        assert (await client.get("/v1/forgetful")).status_code == 200
        assert (await client.get("/v1/nowhere")).status_code == 404  # nothing to bill: not counted
        middleware = app.middleware_stack
        while not isinstance(middleware, BillingMiddleware):
            middleware = middleware.app  # type: ignore[union-attr]
        assert middleware.metrics()["requests_unidentified"] == 1
        assert "billingos_requests_unidentified_total 1" in middleware.prometheus()
    assert "never named its customer" in caplog.text


async def test_a_refusal_once_the_response_started_is_raised_not_answered_twice(billing: LocalBilling) -> None:
    """identify() in a streaming body: the headers are out, so the refusal is the app's error."""

    async def chunks(context: UsageContext) -> AsyncIterator[bytes]:
        yield b"first;"
        await context.identify("user_free")  # whose plan has no export: 403
        yield b"rest"

    async def export(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        return StreamingResponse(chunks(context))

    app = Starlette(routes=[Route("/v1/export", export)])
    middleware = BillingMiddleware(app, billing=billing, customer=None, routes={"/v1/export": "export"})
    exchange = await call_raw(middleware, http_scope("/v1/export"))
    error = unwrapped(exchange.error)
    # The app's handler of the refusal (which the middleware registers) finds the response started:
    # Starlette raises that instead, while handling it.
    denied = error if isinstance(error, BillingDenied) else error.__context__ if error else None
    assert isinstance(denied, BillingDenied) and exchange.status == 200  # one response start only
    assert exchange.body == b"first;" and not exchange.complete


async def test_a_route_marked_late_skips_the_resolver(billing: LocalBilling) -> None:
    resolved: list[str] = []

    def resolver(request: Request) -> str | None:
        resolved.append(request.url.path)
        return "user_free"

    async def endpoint(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        await context.identify("user_pro")
        return JSONResponse({})

    app = Starlette(routes=[Route("/late", endpoint), Route("/early", endpoint)])
    app.add_middleware(
        BillingMiddleware,
        billing=billing,
        customer=resolver,
        routes={"/late": Metered("api_calls", late=True), "/early": "api_calls"},
    )
    async with serve(app) as client:
        assert (await client.get("/late")).status_code == 200
        with pytest.raises(ValueError, match="billed to 'user_free'"):  # resolved early: naming another is refused
            await client.get("/early")
    assert resolved == ["/early"]
    assert await billing.recorded_units("user_pro", "api_calls") == 1
    assert await billing.recorded_units("user_free", "api_calls") == 0


@pytest.mark.parametrize(("on_error", "expected"), [("allow", 200), ("deny", 503)])
async def test_billing_unreachable_at_identification_follows_on_error(
    on_error: str, expected: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)  # the expected warnings are not the point here
    async with BillingOS(
        secret_key="sk_test_x", base_url=closed_port_url(), retry=RetryPolicy(max_retries=0), timeout=1
    ) as unreachable:
        app = late_app(unreachable, [], on_error=on_error, drain_timeout=0.5)  # (its usage cannot go up)
        async with serve(app) as client:
            answer = await client.get("/v1/search", headers=bearer("token-free"))
    assert answer.status_code == expected


def by_app_function(billing: LocalBilling, customer_of: Any, on_error: str) -> Starlette:
    """An adapter's pattern: the app's own function of the request names the customer."""

    async def endpoint(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        await context.identify_by(customer_of, request)
        return JSONResponse({"customer": context.customer_id})

    app = Starlette(routes=[Route("/v1/search", endpoint)])
    app.add_middleware(
        BillingMiddleware,
        billing=billing,
        customer=None,
        default_feature="api_calls",
        on_error=on_error,  # type: ignore[arg-type]
    )
    return app


async def test_identify_by_names_the_customer_with_the_apps_function_sync_or_async(billing: LocalBilling) -> None:
    async def async_signed_in(request: Request) -> str | None:
        return signed_in(request)

    for customer_of in (signed_in, async_signed_in):
        async with serve(by_app_function(billing, customer_of, "deny")) as client:
            paid = await client.get("/v1/search", headers=bearer("token-pro"))
            anonymous = await client.get("/v1/search")
        assert paid.json() == {"customer": "user_pro"} and anonymous.status_code == 401
    assert await billing.recorded_units("user_pro", "api_calls") == 2


def broken(request: Request) -> str | None:
    raise KeyError("session store unreachable")


def answers_an_object(request: Request) -> Any:
    return {"id": "user_pro"}  # a user object instead of its id


async def answers_a_control_character(request: Request) -> str | None:
    return "user\tpro"


@pytest.mark.parametrize("customer_of", [broken, answers_an_object, answers_a_control_character])
@pytest.mark.parametrize(("on_error", "expected"), [("allow", 200), ("deny", 503)])
async def test_a_failing_customer_function_follows_on_error_never_a_500(
    billing: LocalBilling, customer_of: Any, on_error: str, expected: int, caplog: pytest.LogCaptureFixture
) -> None:
    app = by_app_function(billing, customer_of, on_error)
    async with serve(app) as client:
        answer, again = [await client.get("/v1/search", headers=bearer("token-pro")) for _ in range(2)]
    assert answer.status_code == again.status_code == expected
    # Failing alike on every request: one line a second (and the count held back, at shutdown).
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("the customer function")]
    assert len(failures) == 1
    if expected == 200:
        assert answer.json() == {"customer": None}  # let through, unbilled (counted as unidentified)
    else:
        assert answer.headers["content-type"] == "application/problem+json" and answer.headers["retry-after"] == "5"
    assert "the customer function" in caplog.text
    assert await billing.recorded_units("user_pro", "api_calls") == 0


@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_a_blank_answer_of_the_customer_function_is_nobody(billing: LocalBilling, on_error: str) -> None:
    async def answers_blank(request: Request) -> str | None:
        return "   "

    async with serve(by_app_function(billing, answers_blank, on_error)) as client:
        answer = await client.get("/v1/search", headers=bearer("token-pro"))
    assert answer.status_code == 401 and answer.headers["content-type"] == "application/problem+json"


async def test_identify_with_a_blank_id_is_nobody(billing: LocalBilling) -> None:
    async def blank(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        await context.identify(request.query_params["who"])
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/blank", blank)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=None, default_feature="api_calls")
    async with serve(app) as client:
        answers = [await client.get("/v1/blank", params={"who": who}) for who in ("", "   ")]
    assert [(a.status_code, a.headers["content-type"]) for a in answers] == [(401, "application/problem+json")] * 2


@pytest.mark.parametrize("wrapped", ["inside the app", "around the app"])
async def test_a_refusal_raised_in_a_task_group_is_answered_not_a_500(billing: LocalBilling, wrapped: str) -> None:
    """The task group wraps the refusal in an ExceptionGroup, which the app's handlers cannot tell
    for one (around the app, its error middleware answers 500 first): answered all the same."""

    async def concurrent(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(context.identify, signed_in(request))
            tg.start_soon(anyio.sleep, 0)  # the handler's other work
        return JSONResponse({"customer": context.customer_id})

    app = Starlette(routes=[Route("/v1/concurrent", concurrent)])
    options: dict[str, Any] = {"billing": billing, "customer": None, "default_feature": "api_calls"}
    if wrapped == "inside the app":
        app.add_middleware(BillingMiddleware, **options)
        served: Any = app
    else:
        served = BillingMiddleware(app, **options)
    async with serve(served) as client:
        anonymous = await client.get("/v1/concurrent")
        ghost = await client.get("/v1/concurrent", headers=bearer("token-ghost"))
        admitted = await client.get("/v1/concurrent", headers=bearer("token-free"))
    assert [(r.status_code, r.headers["content-type"]) for r in (anonymous, ghost)] == [
        (401, "application/problem+json"),
        (403, "application/problem+json"),
    ]
    assert "x-request-id" in anonymous.headers and admitted.json() == {"customer": "user_free"}
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_500_after_a_refusal_the_app_caught_stays_a_500(billing: LocalBilling) -> None:
    """The app caught the refusal and failed after, for a reason of its own: its 500 is not the refusal's."""

    async def fallback(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        try:
            await context.identify(signed_in(request))
        except BillingDenied:
            raise TypeError("the fallback's own bug") from None
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/fallback", fallback)])
    middleware = BillingMiddleware(app, billing=billing, customer=None, default_feature="api_calls")
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)  # (a server answers the 500)
    async with lifespan(middleware), httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        answer = await client.get("/v1/fallback")
    assert answer.status_code == 500 and "retry-after" not in answer.headers


async def test_identify_outside_the_middleware_is_an_error_and_denial_carries_the_response() -> None:
    with pytest.raises(RuntimeError, match="BillingMiddleware"):
        await UsageContext("r", None, "api_calls", 1.0).identify("user_free")
    with pytest.raises(LookupError):
        set_customer("user_free")
    assert issubclass(BillingDenied, Exception) and not issubclass(BillingDenied, ValueError)


class HeldChecks(Around):
    """Entitlement checks wait until the test lets them through."""

    def __init__(self, billing: LocalBilling) -> None:
        super().__init__(billing)
        self.gate = anyio.Event()

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement:
        await self.gate.wait()
        return await self.billing.check_entitlement(customer_id, feature_key)


async def test_an_identify_still_waiting_when_its_request_is_billed_holds_no_units(billing: LocalBilling) -> None:
    backend = HeldChecks(billing)
    failures: list[BaseException] = []

    async with anyio.create_task_group() as outliving:

        async def identify_later(context: UsageContext) -> None:
            try:
                await context.identify("user_free")
            except RuntimeError as exc:
                failures.append(exc)

        async def endpoint(request: Request) -> Response:
            context = get_usage_context(request)
            assert context is not None
            outliving.start_soon(identify_later, context)  # left running: its check waits
            await anyio.sleep(0.05)
            return JSONResponse({})

        app = Starlette(routes=[Route("/late", endpoint)])
        middleware = BillingMiddleware(
            app, billing=backend, customer=None, routes={"/late": Metered("api_calls", late=True)}
        )
        async with serve(middleware) as client:
            assert (await client.get("/late")).status_code == 200
            backend.gate.set()  # the check answers after the request was billed
    assert [str(failure) for failure in failures] == [
        "identify() after the 'api_calls' request it belongs to was billed"
    ]
    quota = middleware.cache.get("user_free", "api_calls")
    assert quota is not None and quota.local == 0


@pytest.mark.parametrize(("status", "left"), [(200, 4), (500, 10)])
async def test_units_reported_before_the_customer_is_named_count_on_the_quota(
    billing: LocalBilling, status: int, left: int
) -> None:
    """A handler that reports 5 units before its auth names the customer: they are pending from
    then on (billed with its answer, released if it fails), so the quota of 10 admits exactly
    what is left of it while the usage is still on its way (no flush before the drain)."""

    async def early(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        context.report(5)
        await context.identify(signed_in(request))
        return JSONResponse({}, status)

    async def search(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        await context.identify(signed_in(request))
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/early", early), Route("/v1/search", search)])
    app.add_middleware(
        BillingMiddleware, billing=billing, customer=None, default_feature="api_calls", flush_interval=60
    )
    async with serve(app) as client:
        first = await client.get("/v1/early", headers=bearer("token-free"))
        statuses = [(await client.get("/v1/search", headers=bearer("token-free"))).status_code for _ in range(11)]
    assert first.status_code == status
    assert statuses == [200] * left + [429] * (11 - left)
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def customer_after_a_turn(request: Request) -> str:
    """An app's async customer function (a session read): the loop turns before it answers."""
    await anyio.lowlevel.checkpoint()
    return "user_free"


@pytest.mark.parametrize("by_function", [False, True], ids=["identify", "identify_by"])
async def test_two_concurrent_identifications_admit_the_request_once(billing: LocalBilling, by_function: bool) -> None:
    """Two parts of a handler name the customer at once, while the check of a cold cache runs (or,
    the cache warm, while an async customer function answers): the request is admitted once, and
    holds one unit of the quota, not two (identify_by admitted twice, and one unit stayed held for good)."""

    async def both(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                if by_function:
                    tg.start_soon(context.identify_by, customer_after_a_turn, request)
                else:
                    tg.start_soon(context.identify, "user_free")
        return JSONResponse({})

    async def one(request: Request) -> Response:
        context = get_usage_context(request)
        assert context is not None
        await context.identify("user_free")
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/both", both), Route("/v1/one", one)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=None, default_feature="api_calls")
    async with serve(app, with_lifespan=False) as client:  # each delivered before its answer returns
        statuses = [(await client.get("/v1/both")).status_code for _ in range(10)]
        statuses.append((await client.get("/v1/one")).status_code)
    assert statuses == [200] * 10 + [429]
    assert await billing.recorded_units("user_free", "api_calls") == 10
