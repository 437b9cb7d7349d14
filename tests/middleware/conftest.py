"""Fixtures of the middleware tests: a real LocalBilling over a SQLite file in the test's tmp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from billingos_asgi import LocalBilling

from .support import PLANS


@pytest.fixture
async def billing(tmp_path: Path) -> AsyncIterator[LocalBilling]:
    billing = LocalBilling.from_dict(PLANS, tmp_path / "billing.db")
    await billing.cancel_subscription("user_cancelled")
    async with billing:
        yield billing
