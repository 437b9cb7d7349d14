"""Shared fixtures: plans, and the real local BillingOS server under uvicorn on a loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from billingos_asgi import LocalBilling
from billingos_asgi.local.background import serve_in_thread
from billingos_asgi.local.server import create_app

SECRET_KEY = "sk_test_local"

#: A test's scenario, run by :func:`on_each_loop`.
Scenario = Callable[[], Awaitable[object]]

PLANS: dict[str, Any] = {
    "features": {
        "api_calls": {"title": "API calls", "type": "usage_quota"},
        "storage_gb": {"title": "Storage", "type": "usage_quota"},
        "export": {"title": "Data export", "type": "boolean_flag"},
        "seats": {"title": "Seats", "type": "numeric_limit"},
    },
    "plans": {
        "free": {"name": "Free", "features": {"api_calls": 10, "storage_gb": 1.5, "seats": 1}},
        "pro": {"name": "Pro", "features": {"api_calls": "unlimited", "export": True, "seats": 10}},
    },
    "customers": {"user_free": "free", "user_pro": "pro"},
}


@dataclass
class RunningServer:
    base_url: str
    billing: LocalBilling
    database: Path


@contextlib.contextmanager
def running_server(plans: dict[str, Any], database: Path) -> Iterator[RunningServer]:
    """The local BillingOS API with ``plans`` over a fresh SQLite file, on a real socket."""
    billing = LocalBilling.from_dict(plans, database)
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY)) as base_url:
        yield RunningServer(base_url, billing, database)


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(PLANS, tmp_path / "billing.db") as server:
        yield server


@pytest.fixture(params=["asyncio", "trio"])
def on_each_loop(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    """Runs a scenario on asyncio, then (as a test of its own) on trio, which delivers cancellation
    otherwise (at every checkpoint of a cancelled scope). pytest-asyncio runs async tests on asyncio only."""

    def run(scenario: Scenario) -> None:
        anyio.run(scenario, backend=request.param)

    return run
