"""The decision table of SPEC section 5, one row at a time, with a real LocalBilling on SQLite."""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from datetime import datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from billingos_asgi import BillingMiddleware, BillingOS, Denial, LocalBilling, Metered, RetryPolicy
from billingos_asgi._wire import entitlement_from_json
from billingos_asgi.responses import problem_response, quota_headers
from billingos_asgi.tracker import IN_DOUBT
from tests.asgi import serve

from .support import (
    PROBLEM,
    as_customer,
    by_header,
    call_raw,
    closed_port_url,
    http_scope,
    now,
    recording_app,
    seconds_until,
)

RATE_LIMIT = re.compile(r'^"api_calls";r=(\d+);t=(\d+)$')


def problem(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def deterministic_app() -> Starlette:
    """An app whose answers are byte-for-byte reproducible, to compare with and without the middleware."""

    async def health(request: Request) -> Response:
        response = PlainTextResponse("ok\n", headers={"x-app": "health", "cache-control": "no-store"})
        response.set_cookie("session", "abc", httponly=True)
        return response

    async def search(request: Request) -> Response:
        return JSONResponse({"method": request.method, "q": request.query_params.get("q")}, headers={"x-app": "s"})

    async def static(request: Request) -> Response:
        return Response(b"\x00\x01binary", media_type="application/octet-stream")

    async def docs(request: Request) -> Response:
        return Response(status_code=204, headers={"x-page": request.path_params["page"]})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/search", search, methods=["GET", "POST"]),
            Route("/static/{path:path}", static),
            Route("/docs/{page}", docs),
        ]
    )


async def answers(app: Any, requests: list[tuple[str, str]]) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    found = []
    async with serve(app) as client:
        for method, path in requests:
            response = await client.request(method, path, headers=as_customer("user_free"))
            found.append((response.status_code, list(response.headers.raw), response.content))
    return found


class CountingResolver:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request: Request) -> str | None:
        self.calls += 1
        return by_header(request)


# -- route not metered / excluded: untouched -----------------------------------------------------


async def test_unmetered_routes_pass_through_byte_for_byte(billing: LocalBilling) -> None:
    requests = [("GET", "/health"), ("GET", "/v1/search?q=x"), ("GET", "/missing"), ("PUT", "/v1/search")]
    resolver = CountingResolver()
    middleware = BillingMiddleware(
        deterministic_app(), billing=billing, customer=resolver, routes={"POST /v1/search": "api_calls"}
    )
    expected = await answers(deterministic_app(), requests)
    got = await answers(middleware, requests)
    assert got == expected
    assert [status for status, _, _ in got] == [200, 200, 404, 405]
    assert all(name != b"x-request-id" for _, headers, _ in got for name, _ in headers)
    assert resolver.calls == 0
    assert middleware.upstream.checks == 0
    assert middleware.tracker.stats.queued == 0
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_excluded_routes_pass_through_byte_for_byte(billing: LocalBilling) -> None:
    requests = [("GET", "/health"), ("GET", "/static/js/app.js"), ("GET", "/docs/intro"), ("HEAD", "/health")]
    resolver = CountingResolver()
    middleware = BillingMiddleware(
        deterministic_app(),
        billing=billing,
        customer=resolver,
        default_feature="api_calls",
        exclude=["/health", "/static/*", "/docs/{page}"],
    )
    expected = await answers(deterministic_app(), requests)
    got = await answers(middleware, requests)
    assert got == expected
    assert [status for status, _, _ in got] == [200, 200, 204, 200]
    assert all(name != b"x-request-id" for _, headers, _ in got for name, _ in headers)
    assert resolver.calls == 0
    assert middleware.upstream.checks == 0
    assert await billing.recorded_units("user_free", "api_calls") == 0


# -- 401 ----------------------------------------------------------------------------------------


async def test_no_customer_answers_401_problem_without_entering_the_handler(billing: LocalBilling) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, routes={"/v1/search": "api_calls"}
    )
    async with serve(middleware) as client:
        response = await client.get("/v1/search")
    assert response.status_code == 401
    body = problem(response)
    assert {k: v for k, v in body.items() if k != "detail"} == {
        "type": PROBLEM + "unauthenticated",
        "title": "Authentication required",
        "status": 401,
        "feature": "api_calls",
        "limit": None,
        "usage": None,
        "resets_at": None,
    }
    assert len(response.headers["x-request-id"]) == 32  # every answer on a metered route has its id (SPEC section 5)
    assert calls == []
    assert middleware.upstream.checks == 0
    assert await billing.recorded_units("user_free", "api_calls") == 0


# -- 403 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer", "feature"),
    [
        ("user_free", "export"),  # a boolean flag the free plan does not grant
        ("user_pro", "storage_gb"),  # a usage quota the pro plan does not include
        ("user_nobody", "api_calls"),  # billing does not know the customer ("Customer not found")
        ("user_cancelled", "api_calls"),  # the subscription was cancelled
    ],
)
async def test_no_access_answers_403_without_entering_the_handler(
    billing: LocalBilling, customer: str, feature: str
) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(recording_app(calls), billing=billing, customer=by_header, routes={"/x": feature})
    async with serve(middleware) as client:
        first = await client.get("/x", headers=as_customer(customer))
        second = await client.get("/x", headers=as_customer(customer))
    assert first.headers["x-request-id"] != second.headers["x-request-id"]  # each refusal its own id
    for response in (first, second):
        assert response.status_code == 403
        body = problem(response)
        assert (body["type"], body["title"], body["status"], body["feature"]) == (
            PROBLEM + "no-access",
            "Feature not included in your plan",
            403,
            feature,
        )
        assert "upgrade_url" not in body
        # SPEC section 5: the period's end when the feature has one (nothing to wait for otherwise).
        if body["resets_at"] is None:
            assert "retry-after" not in response.headers
        else:
            resets_at = datetime.fromisoformat(body["resets_at"].replace("Z", "+00:00")).timestamp()
            assert 0 < int(response.headers["retry-after"]) <= math.ceil(resets_at - time.time()) + 1
    assert calls == []
    assert middleware.upstream.checks == 1  # the refusal is cached too
    assert middleware.tracker.stats.queued == 0
    if customer != "user_nobody":
        assert await billing.recorded_units(customer, feature) == 0


def test_refusals_say_when_to_retry_where_there_is_something_to_wait_for() -> None:
    request = Request({"type": "http", "headers": []})
    in_an_hour = time.time() + 3_600
    assert Denial(429, "used up", request, "api_calls", resets_at=in_an_hour).retry_after in (3_599, 3_600, 3_601)
    assert Denial(403, "not in plan", request, "api_calls", resets_at=in_an_hour).retry_after in (3_599, 3_600, 3_601)
    assert Denial(429, "used up", request, "api_calls", resets_at=time.time() - 5).retry_after == 1  # ended: soon
    assert Denial(403, "unknown customer", request, "api_calls").retry_after is None  # no period: nothing to await
    assert Denial(401, "sign in", request, "api_calls", resets_at=in_an_hour).retry_after is None
    assert Denial(503, "billing down", request, "api_calls").retry_after == 5


@pytest.mark.parametrize("period_end", ["9999-12-31T23:59:59-05:00", "9999-12-31T23:59:59.999999Z"])
def test_a_period_end_at_the_end_of_time_is_answered_not_a_500(period_end: str) -> None:
    """A period end past what a datetime holds in UTC (an offset beyond year 9999, or a float
    timestamp rounding past it) is shown as the last second there is."""
    request = Request({"type": "http", "headers": []})
    entitlement = entitlement_from_json(
        {
            "feature_key": "api_calls",
            "has_access": False,
            "reason": "quota_exceeded",
            "limit": 10,
            "usage": 10,
            "metadata": {"remaining": 0, "resets_at": period_end, "type": "usage_quota"},
        }
    )
    assert entitlement.resets_at is not None
    denial = Denial(
        429, "used up", request, "api_calls", limit=10, usage=10, resets_at=entitlement.resets_at.timestamp()
    )
    response = problem_response(denial)
    assert response.status_code == 429 and json.loads(bytes(response.body))["resets_at"] == "9999-12-31T23:59:59Z"


async def test_403_details_tell_the_reasons_apart(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls", "/e": "export"}
    )
    async with serve(middleware) as client:
        cancelled = problem(await client.get("/x", headers=as_customer("user_cancelled")))
        unknown = problem(await client.get("/x", headers=as_customer("user_nobody")))
        flag = problem(await client.get("/e", headers=as_customer("user_free")))
    assert len({cancelled["detail"], unknown["detail"], flag["detail"]}) == 3
    assert "not active" in cancelled["detail"]


@pytest.mark.parametrize(
    ("feature", "customer"),
    [("export", "user_pro"), ("seats", "user_free")],  # a flag; a ceiling of 1 seat, not consumed by requests
    ids=["boolean_flag", "numeric_limit"],
)
async def test_a_flag_or_numeric_limit_in_plan_passes_and_is_never_tracked(
    billing: LocalBilling, feature: str, customer: str
) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(recording_app(calls), billing=billing, customer=by_header, routes={"/e": feature})
    async with serve(middleware) as client:
        responses = [await client.get("/e", headers=as_customer(customer)) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all("ratelimit" not in r.headers and "ratelimit-policy" not in r.headers for r in responses)
    assert all(r.headers["x-request-id"] == r.json()["request_id"] for r in responses)
    assert calls == ["GET /e"] * 3
    assert middleware.tracker.stats.queued == 0
    assert middleware.upstream.checks == 1


# -- 429 ----------------------------------------------------------------------------------------


async def test_exhausted_quota_answers_429_with_retry_after_and_quota_headers(billing: LocalBilling) -> None:
    await billing.track_usage("user_free", "api_calls", 10)
    resets_at = (await billing.check_entitlement("user_free", "api_calls")).resets_at
    assert resets_at is not None
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, routes={"/v1/search": "api_calls"}
    )
    async with serve(middleware) as client:
        before = now()
        response = await client.get("/v1/search", headers=as_customer("user_free"))
        after = now()
    assert response.status_code == 429
    low, high = seconds_until(resets_at.timestamp(), before, after)
    retry_after = int(response.headers["retry-after"])
    assert retry_after > 0 and low <= retry_after <= high
    assert response.headers["ratelimit-policy"] == '"api_calls";q=10'
    match = RATE_LIMIT.match(response.headers["ratelimit"])
    assert match is not None, response.headers["ratelimit"]
    assert int(match[1]) == 0 and low <= int(match[2]) <= high
    body = problem(response)
    assert (body["type"], body["title"], body["status"], body["feature"]) == (
        PROBLEM + "quota-exceeded",
        "Usage quota exhausted",
        429,
        "api_calls",
    )
    assert (body["limit"], body["usage"]) == (10, 10)
    assert abs(datetime.fromisoformat(body["resets_at"].replace("Z", "+00:00")) - resets_at) < timedelta(milliseconds=1)
    assert calls == []
    assert middleware.tracker.stats.queued == 0
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_a_refusal_carries_the_request_id_the_gateway_set_when_trusted(billing: LocalBilling) -> None:
    await billing.track_usage("user_free", "api_calls", 10)
    app = recording_app([])
    routes = {"/v1/search": "api_calls"}
    trusting = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes, trust_request_id=True)
    wary = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes)
    gateway_id = {**as_customer("user_free"), "x-request-id": "gw-7f3a"}
    async with serve(trusting) as client:
        trusted = await client.get("/v1/search", headers=gateway_id)
    async with serve(wary) as client:
        ignored = await client.get("/v1/search", headers=gateway_id)
    assert (trusted.status_code, trusted.headers["x-request-id"]) == (429, "gw-7f3a")
    assert ignored.status_code == 429 and len(ignored.headers["x-request-id"]) == 32


async def test_quota_used_up_by_requests_then_429(billing: LocalBilling) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, routes={"/v1/search": "api_calls"}
    )
    async with serve(middleware) as client:
        responses = [await client.get("/v1/search", headers=as_customer("user_free")) for _ in range(12)]
    assert [r.status_code for r in responses] == [200] * 10 + [429] * 2
    remaining = [int(RATE_LIMIT.match(r.headers["ratelimit"])[1]) for r in responses[:10]]  # type: ignore[index]
    assert remaining == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert problem(responses[10])["usage"] == 10
    assert len(calls) == 10
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_whole_units_left_after_fractional_requests_are_counted_whole(billing: LocalBilling) -> None:
    """30 requests of 0.1 of a quota of 10 leave 7 units: summed in floats, 6.999999999999998."""
    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"/v1/search": Metered("api_calls", quantity=0.1)},
        flush_interval=60,  # every unit still pending here when the last answer is made
    )
    async with serve(middleware) as client:
        responses = [await client.get("/v1/search", headers=as_customer("user_free")) for _ in range(30)]
    remaining = [int(RATE_LIMIT.match(r.headers["ratelimit"])[1]) for r in responses]  # type: ignore[index]
    assert remaining[9::10] == [9, 8, 7] and remaining[10] == 8  # 8.9 left: 8 whole units
    assert quota_headers("api_calls", 10, 0.9999994, None)[1] == (b"ratelimit", b'"api_calls";r=0')


# -- success ------------------------------------------------------------------------------------


async def test_success_carries_request_id_and_quota_headers(billing: LocalBilling) -> None:
    resets_at = (await billing.check_entitlement("user_free", "api_calls")).resets_at
    assert resets_at is not None
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, routes={"/v1/search": "api_calls"}
    )
    async with serve(middleware) as client:
        before = now()
        response = await client.get("/v1/search", headers=as_customer("user_free"))
        after = now()
    assert response.status_code == 200
    assert response.json() == {"path": "/v1/search", "request_id": response.headers["x-request-id"]}
    assert response.headers["x-app"] == "yes"
    assert response.headers["ratelimit-policy"] == '"api_calls";q=10'
    match = RATE_LIMIT.match(response.headers["ratelimit"])
    assert match is not None, response.headers["ratelimit"]
    low, high = seconds_until(resets_at.timestamp(), before, after)
    assert int(match[1]) == 9 and low <= int(match[2]) <= high
    assert calls == ["GET /v1/search"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_a_fractional_quota_is_given_in_whole_units_in_its_headers(billing: LocalBilling) -> None:
    # RateLimit's q and r are sf-integers: "q=1.5" is not one, so a strict parser drops the field.
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/v1/upload": Metered("storage_gb", 0.5)}
    )
    async with serve(middleware) as client:
        answers = [await client.get("/v1/upload", headers=as_customer("user_free")) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert {a.headers["ratelimit-policy"] for a in answers} == {'"storage_gb";q=1'}
    assert [a.headers["ratelimit"].split(";")[1] for a in answers] == ["r=1", "r=0", "r=0"]
    assert await billing.recorded_units("user_free", "storage_gb") == 1.5


async def test_unlimited_quota_success_has_no_rate_limit_headers(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"})
    async with serve(middleware) as client:
        response = await client.get("/x", headers=as_customer("user_pro"))
    assert response.status_code == 200
    assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers
    assert response.headers["x-request-id"]
    assert await billing.recorded_units("user_pro", "api_calls") == 1


async def test_upgrade_url_in_403_and_429_bodies(billing: LocalBilling) -> None:
    await billing.track_usage("user_free", "api_calls", 10)
    url = "https://example.com/upgrade"
    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"/x": "api_calls", "/e": "export"},
        upgrade_url=url,
    )
    async with serve(middleware) as client:
        forbidden = await client.get("/e", headers=as_customer("user_free"))
        exhausted = await client.get("/x", headers=as_customer("user_free"))
        anonymous = await client.get("/x")
    assert (forbidden.status_code, exhausted.status_code, anonymous.status_code) == (403, 429, 401)
    assert problem(forbidden)["upgrade_url"] == url
    assert problem(exhausted)["upgrade_url"] == url
    assert "upgrade_url" not in problem(anonymous)


# -- billing unreachable with nothing cached ----------------------------------------------------


async def test_unreachable_billing_allow_lets_requests_through() -> None:
    calls: list[str] = []
    async with BillingOS(secret_key="sk_test_x", base_url=closed_port_url(), retry=RetryPolicy(max_retries=0)) as down:
        rejected: list[tuple[str, str]] = []
        middleware = BillingMiddleware(
            recording_app(calls),
            billing=down,
            customer=by_header,
            routes={"/x": "api_calls"},
            drain_timeout=0.5,
            on_rejected=lambda event, reason: rejected.append((event.customer_id, reason)),
        )
        async with serve(middleware) as client:
            response = await client.get("/x", headers=as_customer("user_free"))
        assert response.status_code == 200
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert "ratelimit" not in response.headers
        assert calls == ["GET /x"]
        # Allowed requests are tracked: the event was retried until the shutdown deadline, then
        # counted and reported as in doubt (no outbox configured), never lost silently.
        stats = middleware.tracker.stats
        assert (stats.queued, stats.sent, stats.in_doubt) == (1, 0, 1)
        assert middleware.upstream.tracks >= 1 and stats.retried >= 1
        assert rejected == [("user_free", f"shutdown deadline passed during its delivery ({IN_DOUBT})")]


async def test_unreachable_billing_deny_answers_503() -> None:
    calls: list[str] = []
    async with BillingOS(secret_key="sk_test_x", base_url=closed_port_url(), retry=RetryPolicy(max_retries=0)) as down:
        middleware = BillingMiddleware(
            recording_app(calls), billing=down, customer=by_header, routes={"/x": "api_calls"}, on_error="deny"
        )
        async with serve(middleware) as client:
            response = await client.get("/x", headers=as_customer("user_free"))
        assert response.status_code == 503
        body = problem(response)
        assert (body["type"], body["status"], body["feature"]) == (PROBLEM + "billing-unavailable", 503, "api_calls")
        assert int(response.headers["retry-after"]) > 0
        assert calls == []
        assert middleware.tracker.stats.queued == 0


class Hanging:
    """A billing service that accepts calls and never answers them."""

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Any:
        await anyio.sleep_forever()

    async def track_usage(self, *args: Any, **kwargs: Any) -> Any:
        await anyio.sleep_forever()


@pytest.mark.parametrize(("on_error", "status"), [("allow", 200), ("deny", 503)])
async def test_a_hanging_billing_check_is_decided_by_on_error_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch, on_error: Any, status: int
) -> None:
    # Without a deadline of its own, the request waited on the client's retries (40 s and more).
    monkeypatch.setattr("billingos_asgi.cache.CHECK_TIMEOUT", 0.2)
    middleware = BillingMiddleware(
        recording_app([]),
        billing=Hanging(),  # type: ignore[arg-type]
        customer=by_header,
        routes={"/x": "api_calls"},
        on_error=on_error,
        drain_timeout=0.1,
    )
    async with serve(middleware) as client:
        with anyio.fail_after(5):
            response = await client.get("/x", headers=as_customer("user_free"))
    assert response.status_code == status
    assert middleware.upstream.breaker.failures >= 1


def test_on_error_must_be_allow_or_deny(billing: LocalBilling) -> None:
    with pytest.raises(ValueError):
        BillingMiddleware(recording_app([]), billing=billing, customer=by_header, on_error="maybe")  # type: ignore[arg-type]


# -- hooks ----------------------------------------------------------------------------------------


async def test_problem_factory_replaces_the_answer(billing: LocalBilling) -> None:
    await billing.track_usage("user_free", "api_calls", 10)
    seen: list[Denial] = []

    def factory(denial: Denial) -> Response:
        seen.append(denial)
        return JSONResponse(
            {"error": denial.status, "customer": denial.customer_id, "limit": denial.limit, "usage": denial.usage},
            status_code=denial.status,
            headers={"x-custom": "1"},
        )

    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, routes={"/x": "api_calls"}, problem_factory=factory
    )
    async with serve(middleware) as client:
        exhausted = await client.get("/x", headers=as_customer("user_free"))
        anonymous = await client.get("/x")
    assert exhausted.status_code == 429 and anonymous.status_code == 401
    assert exhausted.headers["content-type"] == "application/json" and exhausted.headers["x-custom"] == "1"
    # The factory writes the body: when to come back is still said (it was lost with the default's body).
    assert int(exhausted.headers["retry-after"]) > 0 and ";r=0;" in exhausted.headers["ratelimit"]
    assert "retry-after" not in anonymous.headers
    assert exhausted.json() == {"error": 429, "customer": "user_free", "limit": 10, "usage": 10}
    assert anonymous.json() == {"error": 401, "customer": None, "limit": None, "usage": None}
    assert [(d.status, d.feature) for d in seen] == [(429, "api_calls"), (401, "api_calls")]
    assert calls == []


async def test_a_problem_factorys_one_response_for_every_refusal_is_left_as_it_was(billing: LocalBilling) -> None:
    """Refusal headers go on a copy: on the user's own response, a 429's Retry-After stayed on the next 403."""
    await billing.track_usage("user_free", "api_calls", 10)
    refused = JSONResponse({"error": "refused"}, status_code=402)
    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"/x": "api_calls"},
        problem_factory=lambda _: refused,
    )
    async with serve(middleware) as client:
        exhausted = await client.get("/x", headers=as_customer("user_free"))
        unknown = await client.get("/x", headers=as_customer("nobody"))
    assert exhausted.status_code == unknown.status_code == 402
    assert "retry-after" in exhausted.headers and "retry-after" not in unknown.headers
    assert [name for name, _ in refused.raw_headers] == [b"content-length", b"content-type"]


def broken_factory(denial: Denial) -> Response:
    raise RuntimeError("broken hook")


def streaming_factory(denial: Denial) -> Response:
    return StreamingResponse(iter([b"no"]), denial.status)  # no body for an adapter to copy


def not_a_response_factory(denial: Denial) -> Any:
    return {"error": denial.detail}


@pytest.mark.parametrize("factory", [broken_factory, streaming_factory, not_a_response_factory])
async def test_problem_factory_that_fails_falls_back_to_the_default_problem(
    billing: LocalBilling, factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, routes={"/x": "api_calls"}, problem_factory=factory
    )
    async with serve(middleware) as client:
        with caplog.at_level("ERROR", logger="billingos_asgi"):
            anonymous = await client.get("/x")
            forbidden = await client.get("/x", headers=as_customer("user_cancelled"))
    # Failing alike for every refusal (a 429 storm): a traceback each flooded the log; one a second.
    failures = [record.getMessage() for record in caplog.records if "problem_factory failed" in record.getMessage()]
    assert failures[0] == "problem_factory failed on a 401 for api_calls; answering with the default problem response"
    assert len(failures) == 2 and failures[1].startswith("1 similar lines held back")  # said at shutdown
    assert anonymous.status_code == 401 and problem(anonymous)["type"] == PROBLEM + "unauthenticated"
    assert forbidden.status_code == 403 and problem(forbidden)["type"] == PROBLEM + "no-access"
    assert calls == []


async def test_a_problem_factory_handing_back_a_coroutine_has_it_closed(billing: LocalBilling) -> None:
    """A sync factory calling an async one: the default answer, and the coroutine closed, not left for
    Python to warn at some later collection that it was never awaited."""
    returned: list[Any] = []

    async def answer(denial: Denial) -> Response:
        return JSONResponse({"error": denial.detail}, denial.status)

    def factory(denial: Denial) -> Any:
        returned.append(answer(denial))
        return returned[-1]

    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}, problem_factory=factory
    )
    async with serve(middleware) as client:
        anonymous = await client.get("/x")
    assert anonymous.status_code == 401 and problem(anonymous)["type"] == PROBLEM + "unauthenticated"
    assert len(returned) == 1 and inspect.getcoroutinestate(returned[0]) == inspect.CORO_CLOSED


def raising_resolver(request: Request) -> str | None:
    raise RuntimeError("auth backend down")


async def async_raising_resolver(request: Request) -> str | None:
    raise RuntimeError("auth backend down")


@pytest.mark.parametrize(
    "resolver",
    [
        raising_resolver,
        async_raising_resolver,
        lambda request: 42,
        lambda request: b"user_free",
        lambda request: "user\tfree",
        lambda request: "u" * 256,
    ],
    ids=["raises", "async-raises", "int", "bytes", "control-character", "too-long"],
)
async def test_failing_customer_resolver_follows_on_error(billing: LocalBilling, resolver: Any) -> None:
    allowed_calls: list[str] = []
    denied_calls: list[str] = []
    allow = BillingMiddleware(
        recording_app(allowed_calls), billing=billing, customer=resolver, routes={"/x": "api_calls"}
    )
    deny = BillingMiddleware(
        recording_app(denied_calls), billing=billing, customer=resolver, routes={"/x": "api_calls"}, on_error="deny"
    )
    async with serve(allow) as client:
        allowed = await client.get("/x", headers=as_customer("user_free"))
    async with serve(deny) as client:
        denied = await client.get("/x", headers=as_customer("user_free"))
    assert allowed.status_code == 200 and allowed_calls == ["GET /x"]
    assert denied.status_code == 503 and denied_calls == []
    assert problem(denied)["type"] == PROBLEM + "billing-unavailable"
    assert allow.tracker.stats.queued == 0 and deny.tracker.stats.queued == 0
    assert await billing.recorded_units("user_free", "api_calls") == 0


@pytest.mark.parametrize("blank", ["", " ", "\t"])
@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_a_blank_customer_id_is_nobody(billing: LocalBilling, blank: str, on_error: Any) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls),
        billing=billing,
        customer=lambda request: blank,
        routes={"/x": "api_calls"},
        on_error=on_error,
    )
    async with serve(middleware) as client:
        answer = await client.get("/x")
    assert answer.status_code == 401 and problem(answer)["type"] == PROBLEM + "unauthenticated"
    assert calls == []


async def test_a_resolver_cannot_take_the_body_from_the_app(billing: LocalBilling) -> None:
    async def reads_the_body(request: Request) -> str | None:
        customer: str | None = (await request.json())["customer"]
        return customer  # SPEC section 5: the body is the app's, never ours

    async def echo(request: Request) -> Response:
        return Response(await request.body())

    app = Starlette(routes=[Route("/x", echo, methods=["POST"])])
    middleware = BillingMiddleware(app, billing=billing, customer=reads_the_body, routes={"/x": "api_calls"})
    async with serve(middleware) as client:
        answer = await client.post("/x", json={"customer": "user_free"})
    assert answer.status_code == 200 and answer.json() == {"customer": "user_free"}  # intact, for the app
    assert await billing.recorded_units("user_free", "api_calls") == 0  # a failed resolver: let through unbilled


def raising_quantity(request: Request) -> float:
    raise ValueError("no size")


async def async_raising_quantity(request: Request) -> float:
    raise ValueError("no size")


@pytest.mark.parametrize(
    "quantity",
    [
        raising_quantity,
        async_raising_quantity,
        lambda request: -1,
        lambda request: "3",
        lambda request: float("nan"),
        lambda request: 10**15,  # past upstream's maximum: served, then rejected upstream unbilled
        lambda request: int("1" + "0" * 400),  # no float holds it: the admission crashed (a bare 500)
    ],
    ids=["raises", "async-raises", "negative", "string", "nan", "past-the-maximum", "beyond-a-float"],
)
async def test_failing_quantity_function_follows_on_error(billing: LocalBilling, quantity: Any) -> None:
    allowed_calls: list[str] = []
    denied_calls: list[str] = []
    routes = {"/x": Metered("api_calls", quantity=quantity)}
    allow = BillingMiddleware(recording_app(allowed_calls), billing=billing, customer=by_header, routes=routes)
    deny = BillingMiddleware(
        recording_app(denied_calls), billing=billing, customer=by_header, routes=routes, on_error="deny"
    )
    async with serve(allow) as client:
        allowed = await client.get("/x", headers=as_customer("user_free"))
    async with serve(deny) as client:
        denied = await client.get("/x", headers=as_customer("user_free"))
    assert allowed.status_code == 200 and allowed_calls == ["GET /x"]
    assert denied.status_code == 503 and denied_calls == []
    assert problem(denied)["status"] == 503
    assert await billing.recorded_units("user_free", "api_calls") == 0


def test_customer_must_be_callable(billing: LocalBilling) -> None:
    with pytest.raises(ValueError):
        BillingMiddleware(recording_app([]), billing=billing, customer="user_free")  # type: ignore[arg-type]


async def test_an_entry_evicted_while_an_async_quantity_runs_never_lets_the_limit_pass(
    billing: LocalBilling,
) -> None:
    """The quantity function ran between the lookup and the admission: the entry evicted meanwhile
    (a full cache), the request was admitted on the lost object and a new entry admitted the limit
    besides. The quantity comes first now: the lookup and the admission have no await between."""
    release, entered = anyio.Event(), anyio.Event()

    async def slow_quantity(request: Request) -> float:
        entered.set()
        await release.wait()
        return 1

    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"/slow": Metered("api_calls", quantity=slow_quantity), "/x": "api_calls", "/e": "export"},
        cache_size=1,
    )
    headers = list(as_customer("user_free").items())
    assert (await call_raw(middleware, http_scope("/x", headers=headers))).status == 200  # 1 of 10 used
    statuses: list[int] = []

    async def slow() -> None:
        statuses.append((await call_raw(middleware, http_scope("/slow", headers=headers))).status)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await entered.wait()
        assert (await call_raw(middleware, http_scope("/e", headers=headers))).status == 403  # evicts the entry
        for _ in range(9):
            statuses.append((await call_raw(middleware, http_scope("/x", headers=headers))).status)
        release.set()
    assert sorted(statuses) == [200] * 9 + [429]  # 10 in all: the limit holds
    assert await billing.recorded_units("user_free", "api_calls") == 10


def test_a_feature_key_outside_printable_ascii_is_a_valid_structured_field_string() -> None:
    """An sf-string holds printable ASCII only, with \\" and \\\\ escaped: JSON's "\\u00e9" made a strict
    parser drop the field."""
    headers = dict(quota_headers("crédits", 5, 4, None))
    assert headers[b"ratelimit-policy"] == b'"cr%C3%A9dits";q=5'
    assert headers[b"ratelimit"] == b'"cr%C3%A9dits";r=4'
    assert dict(quota_headers('say "hi"', 5, 4, None))[b"ratelimit"] == b'"say \\"hi\\"";r=4'
