"""The integrations' tests use the middleware tests' real LocalBilling fixture."""

import threading
from decimal import Decimal

import pytest

from billingos_asgi.context import UsageContext

from ..middleware.conftest import billing

__all__ = ["billing", "counted_in"]


@pytest.fixture
def counted_in(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread each reported unit count was added in: the quotas are the event loop's."""
    threads: list[int] = []
    add = UsageContext._add

    def spy(context: UsageContext, units: Decimal) -> bool:
        threads.append(threading.get_ident())
        return add(context, units)

    monkeypatch.setattr(UsageContext, "_add", spy)
    return threads
