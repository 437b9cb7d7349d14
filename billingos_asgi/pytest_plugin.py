"""The pytest plugin (installed with the package): a ``billing`` fixture for testing metered apps offline.

::

    @pytest.fixture
    def billing_plans():
        return {"features": {...}, "plans": {...}, "customers": {"alice": "free"}}

    async def test_search_is_billed(billing):
        app = create_app(billing)          # your app, wrapped by BillingMiddleware
        async with lifespan(app):          # billingos_asgi.testing: startup, then drain on exit
            ...                            # call it (httpx.ASGITransport, TestClient...)
        await assert_recorded(billing, "alice", {"api_calls": 3})

Without a ``billing_plans`` fixture of your own, :data:`DEFAULT_PLANS` applies. The fixture is
synchronous, so it works under pytest-asyncio, anyio's plugin or plain sync tests alike.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from .local import LocalBilling
from .local.plans import parse_plans

__all__ = ["DEFAULT_PLANS", "billing", "billing_plans"]

#: Two plans and two customers: ``customer_free`` (100 api_calls, no export) and ``customer_pro``.
DEFAULT_PLANS: Mapping[str, Any] = {
    "features": {
        "api_calls": {"title": "API calls", "type": "usage_quota"},
        "export": {"title": "Data export", "type": "boolean_flag"},
    },
    "plans": {
        "free": {"name": "Free", "features": {"api_calls": 100}},
        "pro": {"name": "Pro", "features": {"api_calls": "unlimited", "export": True}},
    },
    "customers": {"customer_free": "free", "customer_pro": "pro"},
}


@pytest.fixture
def billing_plans() -> dict[str, Any]:
    """The plans the ``billing`` fixture starts from; override it to use your own.

    A copy of :data:`DEFAULT_PLANS`, so that an override extending it (a customer added) changes
    them for its own tests only, never for the rest of the session.
    """
    return dict(copy.deepcopy(DEFAULT_PLANS))


@pytest.fixture
def billing(billing_plans: Mapping[str, Any]) -> Iterator[LocalBilling]:
    """An in-memory :class:`LocalBilling` with ``billing_plans``, fresh for each test."""
    engine = LocalBilling(parse_plans(billing_plans, source="billing_plans fixture"))  # a fault names it, not "<dict>"
    try:
        yield engine
    finally:
        engine.close()
