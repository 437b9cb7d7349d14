"""The test kit as a user meets it: a fresh pytest run of a user's test file, using the ``billing`` fixture."""

from __future__ import annotations

import pytest
import starlette.exceptions

pytest_plugins = ["pytester"]

USER_TESTS = """
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from billingos_asgi import BillingMiddleware, LocalBilling
from billingos_asgi.pytest_plugin import DEFAULT_PLANS
from billingos_asgi.testing import assert_recorded, lifespan


def create_app(billing):
    async def search(request):
        return PlainTextResponse("results")

    app = Starlette(routes=[Route("/search", search)])
    app.add_middleware(
        BillingMiddleware, billing=billing, customer=lambda r: r.headers.get("x-user"), default_feature="api_calls"
    )
    return app


async def call(app, user, times):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return [(await client.get("/search", headers={"x-user": user})).status_code for _ in range(times)]


@pytest.mark.asyncio
async def test_default_plans(billing):
    app = create_app(billing)
    async with lifespan(app):
        assert await call(app, "customer_free", 3) == [200, 200, 200]
    await assert_recorded(billing, "customer_free", {"api_calls": 3})


@pytest.mark.asyncio
async def test_a_wrong_expectation_names_the_difference(billing):
    app = create_app(billing)
    async with lifespan(app):
        await call(app, "customer_pro", 2)
    with pytest.raises(AssertionError, match="api_calls: recorded 2, expected 5$"):
        await assert_recorded(billing, "customer_pro", {"api_calls": 5})


APP_AT_IMPORT = create_app(LocalBilling.from_dict(DEFAULT_PLANS))  # an app module billing its own engine


@pytest.mark.asyncio
async def test_an_app_billing_another_engine_is_named_as_the_likely_cause(billing):
    async with lifespan(APP_AT_IMPORT):
        assert await call(APP_AT_IMPORT, "customer_free", 1) == [200]
    with pytest.raises(AssertionError, match="recorded 0, expected 1 .nothing at all: does the app bill this"):
        await assert_recorded(billing, "customer_free", {"api_calls": 1})


@pytest.mark.asyncio
async def test_a_misspelt_customer_or_feature_fails_rather_than_pass_as_nothing_recorded(billing):
    with pytest.raises(AssertionError, match="unknown customer 'customer_fre'"):
        await assert_recorded(billing, "customer_fre", {"api_calls": 0})
    with pytest.raises(AssertionError, match="unknown features .'api_cals'."):
        await assert_recorded(billing, "customer_free", {"api_cals": 0})


class TestOwnPlans:
    @pytest.fixture
    def billing_plans(self):
        return {
            "features": {"api_calls": {"type": "usage_quota"}},
            "plans": {"tiny": {"features": {"api_calls": 2}}},
            "customers": {"bob": "tiny"},
        }

    @pytest.mark.asyncio
    async def test_quota_of_my_plan(self, billing):
        app = create_app(billing)
        async with lifespan(app):
            assert await call(app, "bob", 3) == [200, 200, 429]
        await assert_recorded(billing, "bob", {"api_calls": 2})
"""


def test_a_user_tests_their_metered_app_with_the_billing_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user_app=USER_TESTS)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=5)


def test_the_plugin_listed_by_its_module_too_is_the_same_plugin(pytester: pytest.Pytester) -> None:
    """As a conftest or -p lists it: registered under another name, it aborted the run."""
    pytester.makeconftest('pytest_plugins = ["billingos_asgi.pytest_plugin"]\n')
    pytester.makepyfile(test_user_app=USER_TESTS)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "billingos_asgi.pytest_plugin", "-W", "error"
    )
    result.assert_outcomes(passed=5)


EXTENDING_THE_DEFAULT_PLANS = """
import pytest

from billingos_asgi.testing import assert_recorded


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


class TestWithCarol:
    @pytest.fixture
    def billing_plans(self, billing_plans):
        billing_plans["customers"]["carol"] = "pro"  # the defaults, plus a customer of this class's own
        return billing_plans

    @pytest.mark.anyio
    async def test_carol_is_a_customer(self, billing):
        await assert_recorded(billing, "carol", {"api_calls": 0})


@pytest.mark.anyio
async def test_carol_is_not_a_customer_of_the_defaults(billing):
    with pytest.raises(AssertionError, match="unknown customer 'carol'"):
        await assert_recorded(billing, "carol", {"api_calls": 0})
"""


def test_a_test_extending_the_default_plans_leaves_them_as_they_are_for_the_next(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user_plans=EXTENDING_THE_DEFAULT_PLANS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error")
    result.assert_outcomes(passed=4)


BAD_PLANS = """
import pytest


@pytest.fixture
def billing_plans():
    return {"features": {"api_calls": {"type": "usage_quota"}}, "plans": {}, "customers": {"bob": "tiny"}}


def test_uses_billing(billing):
    pass
"""


def test_bad_plans_fail_the_setup_naming_the_fixture_key_and_fault(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user_plans=BAD_PLANS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*PlansError: billing_plans fixture: customers.bob: unknown plan 'tiny'"])


SYNC_TESTS_AND_INLINE_PLANS = """
import anyio
import pytest
from starlette.testclient import TestClient

from billingos_asgi.testing import assert_recorded
from test_user_app import create_app


def test_a_sync_test_asserts_after_the_test_client_drains(billing):
    app = create_app(billing)
    with TestClient(app) as client:  # the app runs in the client's own thread and event loop
        assert [client.get("/search", headers={"x-user": "customer_free"}).status_code for _ in range(3)] == [200] * 3
    anyio.run(assert_recorded, billing, "customer_free", {"api_calls": 3})


@pytest.mark.parametrize(
    "billing_plans",
    [{"features": {"api_calls": {"type": "usage_quota"}}, "plans": {"one": {"features": {"api_calls": 1}}},
      "customers": {"dan": "one"}}],
)
def test_plans_given_inline(billing):
    with TestClient(create_app(billing)) as client:
        assert [client.get("/search", headers={"x-user": "dan"}).status_code for _ in range(2)] == [200, 429]
    anyio.run(assert_recorded, billing, "dan", {"api_calls": 1})
"""


def test_a_sync_test_with_starlette_s_test_client_and_plans_given_inline(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user_app=USER_TESTS, test_user_sync=SYNC_TESTS_AND_INLINE_PLANS)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    # Starlette 1.x's TestClient asks for the httpx2 fork over plain httpx; the warning is not ours
    # (and its category is not there to name in an earlier Starlette, whose TestClient does not warn).
    ignored = (
        ["-W", "ignore::starlette.exceptions.StarletteDeprecationWarning"]
        if hasattr(starlette.exceptions, "StarletteDeprecationWarning")
        else []
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error", *ignored, "test_user_sync.py")
    result.assert_outcomes(passed=2)
