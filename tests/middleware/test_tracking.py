"""Exact usage counts after the lifespan drained the tracker, concurrency, request ids, unbilled failures."""

from __future__ import annotations

import decimal
import os
import threading
import warnings
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from billingos_asgi import (
    BillingMiddleware,
    LocalBilling,
    Metered,
    UsageContext,
    ValidationError,
    get_usage_context,
    report_usage,
)
from billingos_asgi.cache import Quota
from billingos_asgi.testing import lifespan
from tests.asgi import serve

from .support import CUSTOMER_HEADER, as_customer, by_header, call_raw, concurrent_statuses, http_scope, recording_app


async def test_n_successful_requests_record_exactly_n_units(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"POST /v1/search": "api_calls"}
    )
    async with serve(middleware) as client:
        statuses = [(await client.post("/v1/search", headers=as_customer("user_pro"))).status_code for _ in range(25)]
        free = [(await client.post("/v1/search", headers=as_customer("user_free"))).status_code for _ in range(7)]
    assert statuses == [200] * 25 and free == [200] * 7
    assert await billing.recorded_units("user_pro", "api_calls") == 25
    assert await billing.recorded_units("user_free", "api_calls") == 7
    metrics = await billing.get_usage_metrics("user_free", "api_calls")
    assert [(m.feature_key, m.consumed, m.remaining) for m in metrics.metrics] == [("api_calls", 7, 3)]
    stats = middleware.tracker.stats
    assert (stats.queued, stats.sent, stats.dead_lettered, stats.rejected, stats.dropped) == (32, 32, 0, 0, 0)


async def test_a_feature_with_a_long_name_is_still_recorded(tmp_path: Path) -> None:
    feature = "f" * 255  # request id + ":" + feature would be longer than upstream's idempotency keys
    plans = {"features": {feature: {"type": "usage_quota"}}, "plans": {"p": {"features": {feature: 5}}}}
    async with LocalBilling.from_dict({**plans, "customers": {"user_a": "p"}}, tmp_path / "b.db") as billing:
        middleware = BillingMiddleware(recording_app([]), billing=billing, customer=by_header, routes={"/x": feature})
        async with serve(middleware) as client:  # one request: its event goes up alone, under its own key
            assert (await client.get("/x", headers=as_customer("user_a"))).status_code == 200
        assert await billing.recorded_units("user_a", feature) == 1 and middleware.tracker.stats.rejected == 0


async def test_fractional_quantity(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"PUT /files/{name}": Metered("storage_gb", quantity=0.25)},
    )
    async with serve(middleware) as client:
        statuses = [(await client.put(f"/files/f{i}", headers=as_customer("user_free"))).status_code for i in range(8)]
    assert statuses == [200] * 6 + [429] * 2  # 6 x 0.25 = the 1.5 GB limit
    assert await billing.recorded_units("user_free", "storage_gb") == 1.5
    metrics = await billing.get_usage_metrics("user_free", "storage_gb")
    assert [(m.consumed, m.remaining) for m in metrics.metrics] == [(1.5, 0)]


async def test_a_quantity_functions_value_is_rounded_as_upstream_stores_it(billing: LocalBilling) -> None:
    """Half a micro-unit is a micro-unit, as every other path rounds it (it was billed nothing)."""
    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"/x": Metered("tokens", quantity=lambda request: float(request.headers["x-units"]))},
    )
    async with serve(middleware) as client:
        for units in ("5e-7", "0.1234565"):
            assert (await client.get("/x", headers=as_customer("user_free", **{"x-units": units}))).status_code == 200
    assert await billing.recorded_units("user_free", "tokens") == 0.123458


async def test_quantity_function_of_the_request(billing: LocalBilling) -> None:
    def from_header(request: Request) -> Decimal:  # (a Decimal as report_usage takes one)
        return Decimal(request.headers["x-units"])

    async def from_query(request: Request) -> float:
        return int(request.query_params["n"])

    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"/h": Metered("tokens", quantity=from_header), "/q": Metered("tokens", quantity=from_query)},
    )
    async with serve(middleware) as client:
        a = await client.get("/h", headers=as_customer("user_free", **{"x-units": "12.5"}))
        b = await client.get("/q", params={"n": "30"}, headers=as_customer("user_free"))
        c = await client.get("/q", params={"n": "58"}, headers=as_customer("user_free"))  # 42.5 + 58 > 100
        d = await client.get("/q", params={"n": "57"}, headers=as_customer("user_free"))
    assert [r.status_code for r in (a, b, c, d)] == [200, 200, 429, 200]
    assert d.headers["ratelimit"].startswith('"tokens";r=0;')
    assert await billing.recorded_units("user_free", "tokens") == 99.5


async def test_quantities_are_rounded_to_upstreams_resolution(billing: LocalBilling) -> None:
    """A quantity in gigabytes of an 11-byte upload is below what upstream can store: free, and
    billed the same whether it travels alone or in a batch; not a rejected event."""

    def gigabytes(request: Request) -> float:
        return float(request.headers["x-bytes"]) / 1e9

    middleware = BillingMiddleware(
        recording_app([]),
        billing=billing,
        customer=by_header,
        routes={"/upload": Metered("tokens", quantity=gigabytes)},
    )
    async with serve(middleware) as client:
        tiny = [await client.get("/upload", headers=as_customer("user_free", **{"x-bytes": "11"})) for _ in range(3)]
        large = await client.get("/upload", headers=as_customer("user_free", **{"x-bytes": "1500000400"}))
    assert [r.status_code for r in (*tiny, large)] == [200] * 4
    assert await billing.recorded_units("user_free", "tokens") == 1.5
    assert (middleware.tracker.stats.sent, middleware.tracker.stats.rejected) == (1, 0)


def reporting(billing: LocalBilling, endpoint: Callable[[Request], Awaitable[Response]]) -> BillingMiddleware:
    """``endpoint`` at /upload, billed the tokens it reports."""
    return BillingMiddleware(
        Starlette(routes=[Route("/upload", endpoint)]),
        billing=billing,
        customer=by_header,
        routes={"/upload": Metered("tokens", quantity=None)},
    )


@pytest.mark.parametrize("chunk", [1500, 1400, 499])
async def test_reports_are_summed_exactly_and_billed_at_upstreams_resolution(billing: LocalBilling, chunk: int) -> None:
    """An upload reported in gigabytes chunk by chunk: each report rounded to 1e-6 billed 10,000
    chunks of 1,500 bytes as 0.02 GB (+33%), of 1,400 as 0.01 GB (-29%), and refused one of 499."""

    async def upload(request: Request) -> Response:
        for _ in range(10_000):
            report_usage(chunk / 1e9)
        return PlainTextResponse("stored")

    async with serve(reporting(billing, upload)) as client:
        assert (await client.get("/upload", headers=as_customer("user_pro"))).status_code == 200
    assert await billing.recorded_units("user_pro", "tokens") == round(10_000 * chunk / 1e9, 6)


async def test_reports_summing_to_half_a_micro_unit_are_billed_as_a_decimal_rounds(billing: LocalBilling) -> None:
    """Their exact sum, 0.0000025, is billed 0.000003: what upstream's DECIMAL(20,6) makes of it."""

    async def upload(request: Request) -> Response:
        report_usage(0.000002)
        for _ in range(5):
            report_usage(1e-7)
        return PlainTextResponse("stored")

    async with serve(reporting(billing, upload)) as client:
        assert (await client.get("/upload", headers=as_customer("user_pro"))).status_code == 200
    assert await billing.recorded_units("user_pro", "tokens") == 0.000003


class Float64(float):
    """A float subclass whose repr names its type, as numpy's float64 does: 'np.float64(1.75)'."""

    def __repr__(self) -> str:
        return f"np.float64({float(self)!r})"


async def test_reports_are_exact_whatever_the_apps_decimals_and_float_types(billing: LocalBilling) -> None:
    """An app's money code lowering the thread's Decimal precision made a report raise (or, in the
    engine's worker thread, which inherits it, recorded 12345.678 units as 12350); a float subclass
    whose repr is not a number (numpy's) raised too."""

    async def upload(request: Request) -> Response:
        with decimal.localcontext() as money:  # the app's own
            money.prec = 4
            report_usage(12345.678)
            report_usage(Float64(1.75))
        return PlainTextResponse("stored")

    async with serve(reporting(billing, upload)) as client:
        assert (await client.get("/upload", headers=as_customer("user_pro"))).status_code == 200
    assert await billing.recorded_units("user_pro", "tokens") == 12347.428
    with decimal.localcontext() as money:  # the engine's worker thread inherits the caller's context
        money.prec = 4
        await billing.track_usage("user_pro", "tokens", 12345.678)
    assert await billing.recorded_units("user_pro", "tokens") == 24693.106


async def test_endpoint_reported_units(billing: LocalBilling) -> None:
    async def via_function(request: Request) -> Response:
        report_usage(7)
        report_usage(0.5)
        return PlainTextResponse("ok")

    async def via_state(request: Request) -> Response:
        request.state.billing.report(11)
        return PlainTextResponse("ok")

    def sync_endpoint(request: Request) -> Response:  # Starlette runs it in a worker thread
        report_usage(3)
        return PlainTextResponse("ok")

    async def nothing(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def fixed_plus_reported(request: Request) -> Response:
        report_usage(4)
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/function", via_function),
            Route("/state", via_state),
            Route("/sync", sync_endpoint),
            Route("/nothing", nothing),
            Route("/both", fixed_plus_reported),
        ]
    )
    tokens = Metered("tokens", quantity=None)
    middleware = BillingMiddleware(
        app,
        billing=billing,
        customer=by_header,
        routes={
            "/function": tokens,
            "/state": tokens,
            "/sync": tokens,
            "/nothing": tokens,
            "/both": Metered("tokens", quantity=2),
        },
    )
    async with serve(middleware) as client:
        for path in ("/function", "/state", "/sync", "/nothing", "/both"):
            response = await client.get(path, headers=as_customer("user_free"))
            assert response.status_code == 200, path
    assert await billing.recorded_units("user_free", "tokens") == 7.5 + 11 + 3 + 0 + 6
    assert middleware.tracker.stats.queued == 4  # nothing reported, nothing billed


async def test_reported_units_from_fastapi_sync_and_async_endpoints(billing: LocalBilling) -> None:
    app = FastAPI()

    @app.get("/sync")
    def sync_endpoint() -> dict[str, str]:
        report_usage(5)
        return {"ok": "sync"}

    @app.get("/async")
    async def async_endpoint(request: FastAPIRequest) -> dict[str, str | None]:
        report_usage(6)
        context = get_usage_context(request)
        return {"request_id": None if context is None else context.request_id}

    app.add_middleware(
        BillingMiddleware, billing=billing, customer=by_header, default_feature=Metered("tokens", quantity=None)
    )
    async with serve(app) as client:
        sync = await client.get("/sync", headers=as_customer("user_free"))
        asynchronous = await client.get("/async", headers=as_customer("user_free"))
    assert sync.status_code == 200 and sync.json() == {"ok": "sync"}
    assert asynchronous.json() == {"request_id": asynchronous.headers["x-request-id"]}
    assert await billing.recorded_units("user_free", "tokens") == 11


async def test_a_report_taking_the_request_past_upstreams_maximum_is_refused(billing: LocalBilling) -> None:
    """Each report valid alone, their sum past what upstream takes in one event: the whole event was
    refused upstream, and the request, fixed unit included, billed nothing."""
    refused: list[str] = []

    async def huge(request: Request) -> Response:
        report_usage(6e13)
        try:
            report_usage(6e13)
        except ValidationError as error:
            refused.append(str(error))
        return PlainTextResponse("ok")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/huge", huge)]), billing=billing, customer=by_header, default_feature="tokens"
    )
    async with serve(middleware) as client:
        assert (await client.get("/huge", headers=as_customer("user_pro"))).status_code == 200
    assert refused == ["report_usage(6e+13): the request's units would reach upstream's bound of 100000000000000"]
    assert await billing.recorded_units("user_pro", "tokens") == 1 + 6e13


async def test_report_usage_outside_a_metered_request_raises() -> None:
    with pytest.raises(LookupError, match="outside a metered request"):
        report_usage(1)


async def test_report_usage_in_a_request_let_through_unmetered_does_nothing(billing: LocalBilling) -> None:
    """Excluded, or let through by a failing resolver with on_error="allow": the handler that
    reports its units is served as on any other request, with no one to bill."""

    def resolver(request: Request) -> str | None:
        if request.headers.get(CUSTOMER_HEADER) == "broken":
            raise ConnectionError("session store unreachable")
        return by_header(request)

    async def upload(request: Request) -> Response:
        report_usage(2)
        with pytest.raises(ValueError, match="quantity"):
            report_usage(-1)  # still checked
        return JSONResponse({"billing": request.state.billing and request.state.billing.feature})

    app = Starlette(
        routes=[Route("/upload", upload, methods=["POST"]), Route("/free/upload", upload, methods=["POST"])]
    )
    app.add_middleware(
        BillingMiddleware,
        billing=billing,
        customer=resolver,
        default_feature=Metered("tokens", quantity=None),
        exclude=["/free/*"],
    )
    async with serve(app) as client:
        answers = [
            await client.post("/free/upload", headers=as_customer("user_free")),
            await client.post("/upload", headers=as_customer("broken")),
            await client.post("/upload", headers=as_customer("user_free")),
        ]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"billing": None})] * 2 + [
        (200, {"billing": "tokens"})
    ]
    assert await billing.recorded_units("user_free", "tokens") == 2  # the metered request's only


# -- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_requests_never_exceed_the_quota(billing: LocalBilling) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, routes={"/x": "api_calls"}
    )
    async with serve(middleware) as client:
        statuses = await concurrent_statuses(client, 100, as_customer("user_37"))
    assert (statuses.count(200), statuses.count(429), len(statuses)) == (37, 63, 100)
    assert len(calls) == 37
    assert await billing.recorded_units("user_37", "api_calls") == 37
    assert middleware.tracker.stats.sent == 37 and middleware.tracker.stats.rejected == 0


async def test_single_flight_cold_requests_check_upstream_once(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"})
    async with serve(middleware) as client:
        statuses = await concurrent_statuses(client, 200, as_customer("user_pro"))
    assert statuses == [200] * 200
    assert middleware.upstream.checks == 1
    assert await billing.recorded_units("user_pro", "api_calls") == 200


# -- not billed -------------------------------------------------------------------------------------


def failing_app(calls: list[str]) -> Starlette:
    async def boom(request: Request) -> Response:
        calls.append("boom")
        raise RuntimeError("endpoint failed")

    async def five_hundred(request: Request) -> Response:
        calls.append("500")
        return PlainTextResponse("no", status_code=500)

    async def not_found(request: Request) -> Response:
        calls.append("404")
        raise HTTPException(404, "no such item")

    async def bad_request(request: Request) -> Response:
        calls.append("400")
        return JSONResponse({"error": "bad"}, status_code=400)

    async def ok(request: Request) -> Response:
        calls.append("ok")
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/boom", boom),
            Route("/500", five_hundred),
            Route("/404", not_found),
            Route("/400", bad_request),
            Route("/ok", ok),
        ]
    )


async def test_failed_requests_are_not_billed_and_release_their_units(billing: LocalBilling) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(failing_app(calls), billing=billing, customer=by_header, default_feature="api_calls")
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
    statuses: list[int] = []
    async with lifespan(middleware), httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for path in ("/boom", "/500", "/404", "/400", "/unrouted") * 3:
            statuses.append((await client.get(path, headers=as_customer("user_free"))).status_code)
        # Every failed request gave its reservation back: the whole quota of 10 is still there.
        for _ in range(11):
            statuses.append((await client.get("/ok", headers=as_customer("user_free"))).status_code)
    assert statuses == [500, 500, 404, 400, 404] * 3 + [200] * 10 + [429]
    assert calls.count("boom") == 3 and calls.count("ok") == 10
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_endpoint_exception_propagates_unbilled(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(failing_app([]), billing=billing, customer=by_header, routes={"/boom": "api_calls"})
    async with serve(middleware) as client:
        try:
            await client.get("/boom", headers=as_customer("user_free"))
        except RuntimeError as exc:
            assert str(exc) == "endpoint failed"
        else:
            raise AssertionError("the app's exception should reach the transport")
    assert middleware.tracker.stats.queued == 0
    assert await billing.recorded_units("user_free", "api_calls") == 0


async def test_background_task_runs_and_request_is_billed_once(billing: LocalBilling) -> None:
    ran: list[str] = []

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("queued", background=BackgroundTask(ran.append, "background"))

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/job", endpoint, methods=["POST"])]),
        billing=billing,
        customer=by_header,
        routes={"POST /job": "api_calls"},
    )
    async with serve(middleware) as client:
        response = await client.post("/job", headers=as_customer("user_free"))
    assert response.status_code == 200 and response.text == "queued"
    assert ran == ["background"]
    assert await billing.recorded_units("user_free", "api_calls") == 1


@pytest.mark.parametrize(("status", "billed"), [(200, 1), (400, 0)])
async def test_a_background_task_failing_after_a_complete_answer_leaves_the_request_billed(
    billing: LocalBilling, status: int, billed: int
) -> None:
    """Billed as answered: a success stays billed, a refusal (400) stays unbilled."""

    def send_email() -> None:
        raise ConnectionError("mail server down")

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("done", status_code=status, background=BackgroundTask(send_email))

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/job", endpoint, methods=["POST"])]),
        billing=billing,
        customer=by_header,
        routes={"POST /job": "api_calls"},
    )
    async with lifespan(middleware):
        transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post("/job", headers=as_customer("user_free"))
    assert response.status_code == status and response.text == "done"
    assert await billing.recorded_units("user_free", "api_calls") == billed


async def test_units_reported_after_the_entry_was_evicted_still_count_against_the_quota(
    billing: LocalBilling,
) -> None:
    """Admitted with 0 units (it reports its own), the request leaves its cache entry nothing to
    keep it by; evicted meanwhile, the entry must still learn the units the request reports."""
    release = anyio.Event()

    async def llm(request: Request) -> Response:
        if request.headers[CUSTOMER_HEADER] == "user_free":
            await release.wait()
        report_usage(100)  # user_free's whole quota of tokens
        return PlainTextResponse("answer")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/llm", llm)]),
        billing=billing,
        customer=by_header,
        routes={"/llm": Metered("tokens", quantity=None)},
        cache_size=1,
        flush_interval=5,  # the units stay unconfirmed: only this process's accounting knows them
    )
    statuses: list[int] = []
    async with serve(middleware) as client:

        async def ask(customer: str) -> None:
            statuses.append((await client.get("/llm", headers=as_customer(customer))).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "user_free")
            await anyio.sleep(0.1)
            await ask("user_pro")  # evicts user_free's entry while its request runs
            release.set()
        await ask("user_free")
    assert statuses == [200, 200, 429]
    assert await billing.recorded_units("user_free", "tokens") == 100


async def test_a_task_outliving_its_request_cannot_report_to_it_or_identify_it(billing: LocalBilling) -> None:
    """Units reported after the request was billed would be lost in silence, and a gate run then
    would hold units of the quota for good: both are refused."""
    contexts: list[UsageContext | None] = []

    async def endpoint(request: Request) -> Response:
        contexts.append(get_usage_context(request))  # as a task the handler starts and leaves running
        return PlainTextResponse("answer")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/llm", endpoint), Route("/late", endpoint)]),
        billing=billing,
        customer=by_header,
        routes={"/llm": Metered("tokens", quantity=None), "/late": Metered("api_calls", late=True)},
    )
    async with serve(middleware) as client:
        for path in ("/llm", "/late"):
            assert (await client.get(path, headers=as_customer("user_free"))).status_code == 200
    reported, late = contexts
    assert reported is not None and late is not None
    with pytest.raises(RuntimeError, match="report_usage\\(\\) after the 'tokens' request it belongs to was billed"):
        reported.report(5)
    with pytest.raises(RuntimeError, match="identify\\(\\) after the 'api_calls' request"):
        await late.identify("user_free")
    assert reported.reported == 0 and late.customer_id is None
    assert await billing.recorded_units("user_free", "api_calls") == 0


# -- without lifespan -------------------------------------------------------------------------------


async def test_without_lifespan_usage_is_sent_inline(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"})
    async with serve(middleware, with_lifespan=False) as client:
        first = await client.get("/x", headers=as_customer("user_free"))
        assert await billing.recorded_units("user_free", "api_calls") == 1
        rest = [await client.get("/x", headers=as_customer("user_free")) for _ in range(11)]
        anonymous = await client.get("/x")
    assert first.status_code == 200 and first.headers["ratelimit"].startswith('"api_calls";r=9;')
    assert [r.status_code for r in rest] == [200] * 9 + [429] * 2
    assert anonymous.status_code == 401
    assert await billing.recorded_units("user_free", "api_calls") == 10
    # Handed to the tracker and sent by the requests' tasks: counted alike, as the counters' identity needs.
    assert (middleware.tracker.stats.queued, middleware.tracker.stats.sent, middleware.tracker.running) == (
        10,
        10,
        False,
    )


async def test_without_lifespan_an_outbox_is_said_to_be_unused_once(
    billing: LocalBilling, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}, outbox=tmp_path / "o.db"
    )
    async with serve(middleware, with_lifespan=False) as client:
        answers = [await client.get("/x", headers=as_customer("user_free")) for _ in range(3)]
    assert [r.status_code for r in answers] == [200] * 3
    assert await billing.recorded_units("user_free", "api_calls") == 3
    unused = [r for r in caplog.records if "is not used: without the ASGI lifespan" in r.getMessage()]
    assert len(unused) == 1 and str(tmp_path / "o.db") in unused[0].getMessage()


async def test_without_lifespan_a_burst_beyond_the_call_budget_is_all_recorded(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(  # the default budget: 90 calls/min, 10 at once
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}
    )
    statuses: list[int] = []
    async with serve(middleware, with_lifespan=False) as client:

        async def one(customer: str) -> None:
            statuses.append((await client.get("/x", headers=as_customer(customer))).status_code)

        async with anyio.create_task_group() as tg:
            for customer in ("user_free", "user_pro", "user_37"):
                for _ in range(10):
                    tg.start_soon(one, customer)
    assert statuses == [200] * 30
    assert [await billing.recorded_units(c, "api_calls") for c in ("user_free", "user_pro", "user_37")] == [10] * 3
    stats = middleware.tracker.stats
    assert (stats.sent, stats.dropped) == (30, 0) and middleware.upstream.tracks < 30


# -- request ids ------------------------------------------------------------------------------------


async def test_client_request_id_is_not_trusted_by_default(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"})
    async with serve(middleware) as client:
        responses = [
            await client.get("/x", headers=as_customer("user_free", **{"x-request-id": "same"})) for _ in range(4)
        ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert [r.status_code for r in responses] == [200] * 4
    assert "same" not in ids and len(set(ids)) == 4
    assert [r.json()["request_id"] for r in responses] == ids
    assert await billing.recorded_units("user_free", "api_calls") == 4


async def test_trusted_request_id_is_the_idempotency_key(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}, trust_request_id=True
    )
    async with serve(middleware) as client:
        repeated = [
            await client.get("/x", headers=as_customer("user_free", **{"x-request-id": "same"})) for _ in range(4)
        ]
        other = await client.get("/x", headers=as_customer("user_free", **{"x-request-id": "other"}))
        generated = await client.get("/x", headers=as_customer("user_free"))
    assert [r.status_code for r in repeated] == [200] * 4
    assert [r.headers["x-request-id"] for r in repeated] == ["same"] * 4
    assert [r.json()["request_id"] for r in repeated] == ["same"] * 4
    assert other.headers["x-request-id"] == "other"
    assert generated.headers["x-request-id"] not in ("same", "other", "")
    assert await billing.recorded_units("user_free", "api_calls") == 3


async def test_a_trusted_duplicate_gives_its_units_back_to_the_quota(billing: LocalBilling) -> None:
    """Billed once, a repeated id holds no units either: kept, each would refuse a paid request
    (user_free has 10 calls: the repeats take one, nine more pass, then the quota is used up)."""
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}, trust_request_id=True
    )
    async with serve(middleware) as client:
        for _ in range(4):
            assert (await client.get("/x", headers=as_customer("user_free", **{"x-request-id": "same"}))).is_success
        answers = [
            (await client.get("/x", headers=as_customer("user_free", **{"x-request-id": f"r{i}"}))).status_code
            for i in range(10)
        ]
    assert answers == [200] * 9 + [429]
    assert await billing.recorded_units("user_free", "api_calls") == 10


async def test_trusted_request_ids_with_colons_never_merge_two_requests(tmp_path: Path) -> None:
    """The key is "id:feature": "r1" on "gpu:hours" and "r1:gpu" on "hours" are two requests."""
    features = {"hours": {"type": "usage_quota"}, "gpu:hours": {"type": "usage_quota"}}
    plans = {"features": features, "plans": {"pro": {"features": dict.fromkeys(features, "unlimited")}}}
    async with LocalBilling.from_dict({**plans, "customers": {"acme": "pro"}}, tmp_path / "billing.db") as billing:
        app = Starlette(routes=[Route("/cpu", recording_app([])), Route("/gpu", recording_app([]))])
        routes = {"/cpu": "hours", "/gpu": "gpu:hours"}
        middleware = BillingMiddleware(app, billing=billing, customer=by_header, routes=routes, trust_request_id=True)
        async with serve(middleware) as client:
            for path, request_id in (("/gpu", "r1"), ("/cpu", "r1:gpu"), ("/gpu", "r1"), ("/cpu", "r1%3Agpu")):
                answer = await client.get(path, headers=as_customer("acme", **{"x-request-id": request_id}))
                assert answer.headers["x-request-id"] == request_id  # as sent: only the key encodes it
        assert await billing.recorded_units("acme", "gpu:hours") == 1  # its id repeated: once
        assert await billing.recorded_units("acme", "hours") == 2


async def test_a_request_with_two_request_ids_gets_a_fresh_one(billing: LocalBilling) -> None:
    """A gateway that appends its id to the client's: the client's, first, must not decide."""
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}, trust_request_id=True
    )
    headers = [("x-customer", "user_free"), ("x-request-id", "client-repeats-me"), ("x-request-id", "gateway-id")]
    async with serve(middleware) as client:
        answers = [await client.get("/x", headers=headers) for _ in range(3)]
    assert len({answer.headers["x-request-id"] for answer in answers} - {"client-repeats-me", "gateway-id"}) == 3
    assert await billing.recorded_units("user_free", "api_calls") == 3


async def test_request_state_request_id_matches_the_response_header(billing: LocalBilling) -> None:
    seen: list[tuple[str, str | None, str, float]] = []

    async def endpoint(request: Request) -> Response:
        state = request.state.billing
        context = get_usage_context()
        assert context is state is not None
        seen.append((state.request_id, state.customer_id, state.feature, state.quantity))
        return PlainTextResponse("ok")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/x", endpoint)]), billing=billing, customer=by_header, routes={"/x": "api_calls"}
    )
    async with serve(middleware) as client:
        responses = [await client.get("/x", headers=as_customer("user_free")) for _ in range(3)]
    assert [s[0] for s in seen] == [r.headers["x-request-id"] for r in responses]
    assert [s[1:] for s in seen] == [("user_free", "api_calls", 1)] * 3


async def test_trusted_request_id_that_is_not_usable_is_replaced(billing: LocalBilling) -> None:
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}, trust_request_id=True
    )
    too_long = "r" * 129
    async with serve(middleware) as client:
        responses = [
            await client.get("/x", headers=as_customer("user_free", **{"x-request-id": too_long})) for _ in range(2)
        ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert too_long not in ids and len(set(ids)) == 2
    assert await billing.recorded_units("user_free", "api_calls") == 2


async def test_request_body_is_left_to_the_app(billing: LocalBilling) -> None:
    async def upload(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"bytes": len(body), "head": body[:4].decode()})

    def size_in_gb(request: Request) -> float:
        return int(request.headers["content-length"]) / 4_000_000

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/upload", upload, methods=["POST"])]),
        billing=billing,
        customer=by_header,
        routes={"POST /upload": Metered("storage_gb", quantity=size_in_gb)},
    )
    payload = b"DATA" + b"x" * 999_996
    async with serve(middleware) as client:
        response = await client.post("/upload", content=payload, headers=as_customer("user_free"))
    assert response.json() == {"bytes": 1_000_000, "head": "DATA"}
    assert await billing.recorded_units("user_free", "storage_gb") == 0.25


async def test_of_reported_units_beyond_the_quota_what_fits_is_recorded_and_the_rest_reported(
    billing: LocalBilling,
) -> None:
    """Upstream refuses (all or nothing) an event that would pass the limit: the part of it that is
    left in the quota is recorded under a key of its own, and the rest is reported as rejected."""
    rejected: list[tuple[str, float, str]] = []

    async def generate(request: Request) -> Response:
        report_usage(150)  # more than the free plan's 100 tokens
        return PlainTextResponse("long answer")

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/generate", generate, methods=["POST"])]),
        billing=billing,
        customer=by_header,
        routes={"POST /generate": Metered("tokens", quantity=None)},
        on_rejected=lambda event, reason: rejected.append((event.customer_id, event.quantity, reason)),
    )
    async with serve(middleware) as client:
        response = await client.post("/generate", headers=as_customer("user_free"))
    assert response.status_code == 200
    assert rejected == [("user_free", 50, "quota_exceeded")]
    assert (middleware.tracker.stats.sent, middleware.tracker.stats.rejected) == (1, 1)
    assert await billing.recorded_units("user_free", "tokens") == 100


def test_request_ids_are_version_4_uuids_that_a_seeded_random_cannot_repeat() -> None:
    import random
    import uuid

    from billingos_asgi.request_ids import new_request_id

    random.seed(7)
    first = [new_request_id() for _ in range(1_000)]
    random.seed(7)  # an app (or its tests) seeding the global generator must not replay ids
    second = [new_request_id() for _ in range(1_000)]
    assert len(set(first + second)) == 2_000
    for text in first + second:
        parsed = uuid.UUID(text)
        assert parsed.hex == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_never_reuses_its_parents_request_ids() -> None:
    from billingos_asgi.request_ids import new_request_id

    new_request_id()  # the parent holds a batch of ids made in advance
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python >= 3.12 warns of fork() beside threads; the child only makes ids
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        os.write(write, " ".join(new_request_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_ids = pipe.read().split()
    os.waitpid(child, 0)
    parent_ids = [new_request_id() for _ in range(100)]
    assert len(child_ids) == 100 and not set(child_ids) & set(parent_ids)


async def test_a_path_an_inner_middleware_excludes_still_reports_to_the_outer_one(billing: LocalBilling) -> None:
    async def llm(request: Request) -> Response:
        assert request.state.billing is None  # the inner one's view: its declared gates expect it
        report_usage(5)
        return PlainTextResponse("answer")

    inner = BillingMiddleware(
        Starlette(routes=[Route("/llm", llm)]), billing=billing, customer=by_header, exclude=["/llm"]
    )
    outer = BillingMiddleware(
        inner, billing=billing, customer=by_header, routes={"/llm": Metered("tokens", quantity=None)}
    )
    async with serve(outer) as client:
        assert (await client.get("/llm", headers=as_customer("user_free"))).status_code == 200
    assert await billing.recorded_units("user_free", "tokens") == 5


@pytest.mark.parametrize("endpoint", ["async", "sync (in a worker thread)"])
async def test_units_a_running_request_reported_are_pending_for_the_requests_admitted_meanwhile(
    billing: LocalBilling, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streaming answer that has reported the whole quota while it runs leaves nothing for a
    request admitted before it ends: zero overshoot counts the units this process knows of."""
    reported = anyio.Event()
    release = anyio.Event()

    async def async_llm(request: Request) -> Response:
        report_usage(100)  # user_free's whole quota of tokens, before the answer is complete
        reported.set()
        await release.wait()
        return PlainTextResponse("answer")

    def sync_llm(request: Request) -> Response:
        report_usage(100)
        anyio.from_thread.run_sync(reported.set)
        anyio.from_thread.run(release.wait)
        return PlainTextResponse("answer")

    llm = async_llm if endpoint == "async" else sync_llm
    holding_threads: list[int] = []  # the quotas are the event loop's: a worker thread hands its units over
    hold = Quota.hold

    def spied_hold(quota: Quota, units: float) -> Quota:
        holding_threads.append(threading.get_ident())
        return hold(quota, units)

    monkeypatch.setattr(Quota, "hold", spied_hold)

    async def one(request: Request) -> Response:
        return PlainTextResponse("one")

    rejected: list[float] = []
    middleware = BillingMiddleware(
        Starlette(routes=[Route("/llm", llm), Route("/one", one)]),
        billing=billing,
        customer=by_header,
        routes={"/llm": Metered("tokens", quantity=None), "/one": Metered("tokens", quantity=1)},
        on_rejected=lambda event, reason: rejected.append(event.quantity),
    )
    statuses: list[int] = []
    async with serve(middleware) as client:

        async def ask(path: str) -> None:
            statuses.append((await client.get(path, headers=as_customer("user_free"))).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "/llm")
            await reported.wait()
            await ask("/one")  # nothing is left: the running request's 100 tokens are pending here
            release.set()
    assert statuses == [429, 200]
    assert rejected == [] and await billing.recorded_units("user_free", "tokens") == 100
    assert holding_threads == [threading.get_ident()]


async def test_reported_units_leave_the_quota_as_billed_whatever_the_answer(billing: LocalBilling) -> None:
    """Units a request reports are held as it reports them, then settled with the request: billed
    when it succeeds, released when it fails; never held on after (user_free has 100 tokens)."""

    async def llm(request: Request) -> Response:
        report_usage(int(request.path_params["tokens"]))
        return PlainTextResponse("answer", status_code=int(request.path_params["status"]))

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/llm/{tokens}/{status}", llm)]),
        billing=billing,
        customer=by_header,
        routes={"/llm/{tokens}/{status}": Metered("tokens", quantity=None)},
    )
    statuses = []
    async with serve(middleware, with_lifespan=False) as client:  # each delivered before its answer returns
        for path in ("/llm/60/500", "/llm/30/200", "/llm/30/200", "/llm/40/200", "/llm/1/200"):
            statuses.append((await client.get(path, headers=as_customer("user_free"))).status_code)
    assert statuses == [500, 200, 200, 200, 429]
    assert await billing.recorded_units("user_free", "tokens") == 100


async def test_a_partly_billed_abort_releases_the_units_it_was_not_billed_for(billing: LocalBilling) -> None:
    """``bill_partial``: a client that leaves mid-stream is billed what was reported (10), not
    the fixed 50 it was admitted for; those 50 are free for the next request again."""

    async def chunks() -> Any:
        report_usage(10)
        yield b"first;"
        yield b"second"

    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks())

    middleware = BillingMiddleware(
        Starlette(routes=[Route("/stream", stream)]),
        billing=billing,
        customer=by_header,
        routes={"/stream": Metered("tokens", quantity=50, bill_partial=True)},
    )
    scope = http_scope("/stream", headers=[(CUSTOMER_HEADER, "user_free")], spec_version="2.4")
    aborted = await call_raw(middleware, scope, raise_on_chunk=2)  # no lifespan: delivered inline
    assert aborted.body == b"first;" and await billing.recorded_units("user_free", "tokens") == 10
    served = await call_raw(middleware, http_scope("/stream", headers=[(CUSTOMER_HEADER, "user_free")]))
    assert served.status == 200 and served.complete  # 10 + 50 + 10 of 100
    assert await billing.recorded_units("user_free", "tokens") == 70
