"""The test kit: ``lifespan`` with apps that support lifespan, ignore it, or fail it; ``assert_recorded``."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from billingos_asgi import BillingMiddleware, LocalBilling
from billingos_asgi.testing import assert_recorded, lifespan


class LifespanApp:
    """Answers the lifespan as told, noting the messages it receives."""

    def __init__(self, startup: str = "lifespan.startup.complete") -> None:
        self.startup = startup
        self.received: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message: Message = await receive()
            self.received.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": self.startup})
                if self.startup != "lifespan.startup.complete":
                    return
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return


async def test_startup_and_shutdown_run_around_the_block() -> None:
    app = LifespanApp()
    async with lifespan(app):
        assert app.received == ["lifespan.startup"]
    assert app.received == ["lifespan.startup", "lifespan.shutdown"]


async def test_an_app_without_lifespan_support_runs_the_block_without_it() -> None:
    entered = False

    async def http_only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # what the ASGI spec allows: the server goes on without lifespan

    async with lifespan(http_only):
        entered = True
    assert entered


async def test_a_failed_startup_is_a_runtime_error() -> None:
    async def refuses(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("only http")

    with pytest.raises(RuntimeError, match="startup failed") as caught:
        async with lifespan(refuses):
            pytest.fail("the block ran")
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(RuntimeError, match="lifespan.startup.failed"):
        async with lifespan(LifespanApp(startup="lifespan.startup.failed")):
            pytest.fail("the block ran")


async def test_an_error_in_the_block_comes_out_as_it_is_after_shutdown() -> None:
    app = LifespanApp()
    with pytest.raises(KeyError):
        async with lifespan(app):
            raise KeyError("the test's own failure")
    assert app.received == ["lifespan.startup", "lifespan.shutdown"]


async def test_an_app_that_returns_after_startup_ends_the_block_without_failure() -> None:
    async def no_shutdown(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})  # then returns: as uvicorn takes it, nothing failed

    entered = False
    async with lifespan(no_shutdown):
        entered = True
    assert entered


async def test_a_failed_shutdown_is_a_runtime_error_with_the_app_s_message() -> None:
    async def shutdown_fails(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.failed", "message": "database gone"})

    with pytest.raises(RuntimeError, match="shutdown failed.*database gone"):
        async with lifespan(shutdown_fails):
            pass


def metered_search(billing: LocalBilling) -> BillingMiddleware:
    async def search(request: object) -> PlainTextResponse:
        return PlainTextResponse("results")

    return BillingMiddleware(
        Starlette(routes=[Route("/search", search)]),
        billing=billing,
        customer=lambda request: "customer_free",
        default_feature="api_calls",
    )


async def test_assert_recorded_inside_the_lifespan_is_refused_rather_than_pass_before_the_drain(
    billing: LocalBilling,
) -> None:
    app = metered_search(billing)
    async with lifespan(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/search")).status_code == 200
        with pytest.raises(RuntimeError, match="inside `async with lifespan.app.`.*assert after the block"):
            await assert_recorded(billing, "customer_free", {"api_calls": 0})  # still queued: would pass
    await assert_recorded(billing, "customer_free", {"api_calls": 1})


@pytest.mark.parametrize(
    ("expected", "fault"),
    [
        ({}, "must name units by feature"),
        ({"api_calls": float("nan")}, "'api_calls' must be a finite number >= 0, got nan"),
        ({"api_calls": -1}, "must be a finite number >= 0, got -1"),
        ({"api_calls": "1"}, "must be a finite number >= 0, got '1'"),
        ({"api_calls": True}, "must be a finite number >= 0, got True"),
        ({"api_calls": 10**400}, "must be a finite number >= 0, got 1000"),
        ({"api_calls": Decimal("sNaN")}, r"must be a finite number >= 0, got Decimal\('sNaN'\)"),
        ({"api_calls": Decimal("-1")}, r"must be a finite number >= 0, got Decimal\('-1'\)"),
    ],
)
async def test_assert_recorded_refuses_an_expectation_that_no_usage_could_fail(
    billing: LocalBilling, expected: dict[str, object], fault: str
) -> None:
    await billing.track_usage("customer_free", "api_calls", 1)
    with pytest.raises(ValueError, match=fault):
        await assert_recorded(billing, "customer_free", expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tracked", "expected", "difference"),
    [
        (1234567, 1234568, "recorded 1234567, expected 1234568$"),
        (100000.5, 100000, "recorded 100000.5, expected 100000$"),
        (0.000001, 0.0000012, "recorded 1e-06, expected 1.2e-06$"),
    ],
)
async def test_assert_recorded_says_the_units_exactly_so_that_the_difference_shows(
    billing: LocalBilling, tracked: float, expected: float, difference: str
) -> None:
    await billing.track_usage("customer_pro", "api_calls", tracked)
    with pytest.raises(AssertionError, match=difference):
        await assert_recorded(billing, "customer_pro", {"api_calls": expected})


async def test_assert_recorded_refuses_a_feature_that_never_records_usage(billing: LocalBilling) -> None:
    await billing.track_usage("customer_pro", "api_calls", 1)
    with pytest.raises(ValueError, match="'export' is a boolean_flag feature: only usage_quota features record usage"):
        await assert_recorded(billing, "customer_pro", {"api_calls": 1, "export": 0})  # 0 whatever the app did


async def test_assert_recorded_takes_units_as_a_decimal_as_track_usage_does(billing: LocalBilling) -> None:
    await billing.track_usage("customer_pro", "api_calls", Decimal("1.5"))  # type: ignore[arg-type]
    await assert_recorded(billing, "customer_pro", {"api_calls": Decimal("1.5")})
    with pytest.raises(AssertionError, match="recorded 1.5, expected 2.5$"):
        await assert_recorded(billing, "customer_pro", {"api_calls": Decimal("2.5")})
