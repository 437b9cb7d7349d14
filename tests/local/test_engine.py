"""LocalBilling, the embedded engine: the hosted service's semantics on a real SQLite file, with a hand-driven clock."""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest

from billingos_asgi import LocalBilling
from billingos_asgi._exceptions import (
    BillingOSError,
    CustomerNotFoundError,
    NotFoundError,
    QuotaExceededError,
    ServerError,
    ValidationError,
)
from billingos_asgi._models import (
    Entitlement,
    SessionToken,
    TrackUsageResult,
    UsageMetric,
    UsageMetrics,
    UsageSnapshot,
)
from tests.local.conftest import write_locked

START = datetime(2024, 1, 15, 12, 0, tzinfo=timezone.utc)
PERIOD_END = datetime(2024, 2, 15, 12, 0, tzinfo=timezone.utc)
NEXT_PERIOD_END = datetime(2024, 3, 15, 12, 0, tzinfo=timezone.utc)

PLANS: dict[str, Any] = {
    "features": {
        "api_calls": {"title": "API calls", "type": "usage_quota"},
        "storage_gb": {"title": "Storage", "type": "usage_quota"},
        "export": {"title": "Data export", "type": "boolean_flag"},
        "seats": {"title": "Seats", "type": "numeric_limit"},
    },
    "plans": {
        "free": {
            "name": "Free",
            "features": {"api_calls": 10, "storage_gb": 1.5, "seats": 1, "export": False},
        },
        "pro": {
            "name": "Pro",
            "features": {"api_calls": 1000, "storage_gb": "unlimited", "export": True, "seats": "unlimited"},
        },
        "daily": {"name": "Daily", "interval": "day", "features": {"api_calls": 5}},
        "fifty": {"name": "Fifty", "features": {"api_calls": 50}},
    },
    "customers": {"alice": "free", "bob": "pro"},
}


class Clock:
    """A clock the test moves by hand; LocalBilling reads it through ``clock=``."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "billing.db"


@pytest.fixture
async def billing(database: Path, clock: Clock) -> AsyncIterator[LocalBilling]:
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as engine:
        yield engine


async def consumed(billing: LocalBilling, customer: str, feature: str = "api_calls") -> float | None:
    return (await billing.check_entitlement(customer, feature)).usage


# -- check --


async def test_check_boolean_flag_granted(billing: LocalBilling) -> None:
    assert await billing.check_entitlement("bob", "export") == Entitlement(
        "export", has_access=True, type="boolean_flag"
    )


async def test_check_boolean_flag_not_granted(billing: LocalBilling) -> None:
    # export = false in the free plan, and a feature nobody declared: both are "no grant"
    assert await billing.check_entitlement("alice", "export") == Entitlement(
        "export", has_access=False, reason="no_active_subscription"
    )
    assert await billing.check_entitlement("alice", "teleport") == Entitlement(
        "teleport", has_access=False, reason="no_active_subscription"
    )


async def test_check_usage_quota(billing: LocalBilling) -> None:
    assert await billing.check_entitlement("alice", "api_calls") == Entitlement(
        "api_calls",
        has_access=True,
        reason=None,
        limit=10.0,
        usage=0.0,
        remaining=10.0,
        resets_at=PERIOD_END,
        type="usage_quota",
    )
    await billing.track_usage("alice", "api_calls", 4)
    assert await billing.check_entitlement("alice", "api_calls") == Entitlement(
        "api_calls",
        has_access=True,
        limit=10.0,
        usage=4.0,
        remaining=6.0,
        resets_at=PERIOD_END,
        type="usage_quota",
    )


async def test_check_quota_exhausted(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "api_calls", 9.5)
    entitlement = await billing.check_entitlement("alice", "api_calls")
    assert (entitlement.has_access, entitlement.reason, entitlement.remaining) == (True, None, 0.5)

    await billing.track_usage("alice", "api_calls", 0.5)
    assert await billing.check_entitlement("alice", "api_calls") == Entitlement(
        "api_calls",
        has_access=False,
        reason="quota_exceeded",
        limit=10.0,
        usage=10.0,
        remaining=0.0,
        resets_at=PERIOD_END,
        type="usage_quota",
    )


async def test_check_zero_limit_quota_is_exhausted_from_the_start(clock: Clock) -> None:
    plans = {
        "features": {"f": {"type": "usage_quota"}},
        "plans": {"p": {"features": {"f": 0}}},
        "customers": {"c": "p"},
    }
    async with LocalBilling.from_dict(plans, clock=clock) as billing:
        entitlement = await billing.check_entitlement("c", "f")
        assert (entitlement.has_access, entitlement.reason, entitlement.limit, entitlement.remaining) == (
            False,
            "quota_exceeded",
            0.0,
            0.0,
        )
        with pytest.raises(QuotaExceededError):
            await billing.track_usage("c", "f", 0.000001)
        [metric] = (await billing.get_usage_metrics("c")).metrics
        assert (metric.limit, metric.remaining, metric.percentage_used) == (0.0, 0.0, 100)  # (a widget's full bar)


async def test_check_unlimited_quota(billing: LocalBilling) -> None:
    await billing.track_usage("bob", "storage_gb", 7.25)
    await billing.track_usage("bob", "storage_gb", 10_000)
    assert await billing.check_entitlement("bob", "storage_gb") == Entitlement(
        "storage_gb",
        has_access=True,
        reason=None,
        limit=None,
        usage=10_007.25,
        remaining=None,
        resets_at=PERIOD_END,
        type="usage_quota",
    )


async def test_check_numeric_limit(billing: LocalBilling) -> None:
    assert await billing.check_entitlement("alice", "seats") == Entitlement(
        "seats", has_access=True, limit=1.0, type="numeric_limit"
    )
    assert await billing.check_entitlement("bob", "seats") == Entitlement(
        "seats", has_access=True, limit=None, type="numeric_limit"
    )


async def test_check_unknown_customer(billing: LocalBilling) -> None:
    with pytest.raises(CustomerNotFoundError) as excinfo:
        await billing.check_entitlement("nobody", "api_calls")
    assert str(excinfo.value) == "Customer not found: nobody"
    assert excinfo.value.message == "Customer not found: nobody"
    assert excinfo.value.status == 400
    assert isinstance(excinfo.value, NotFoundError)


async def test_check_customer_without_plan(billing: LocalBilling) -> None:
    await billing.set_plan("alice", None)
    for feature in ("api_calls", "seats", "export"):
        assert await billing.check_entitlement("alice", feature) == Entitlement(
            feature, has_access=False, reason="no_active_subscription"
        )


async def test_check_after_cancel(billing: LocalBilling) -> None:
    await billing.cancel_subscription("bob")
    for feature in ("api_calls", "export", "seats"):
        assert await billing.check_entitlement("bob", feature) == Entitlement(
            feature, has_access=False, reason="subscription_not_active"
        )
    # a feature the plan never granted is still "no grant"
    assert (await billing.check_entitlement("bob", "teleport")).reason == "no_active_subscription"
    # alice is untouched
    assert (await billing.check_entitlement("alice", "api_calls")).has_access is True


async def test_cancel_unknown_customer(billing: LocalBilling) -> None:
    with pytest.raises(CustomerNotFoundError) as excinfo:
        await billing.cancel_subscription("nobody")
    assert (str(excinfo.value), excinfo.value.status) == ("Customer not found: nobody", 400)


async def test_set_plan_reactivates_a_canceled_subscription(billing: LocalBilling) -> None:
    await billing.track_usage("bob", "api_calls", 3)
    await billing.cancel_subscription("bob")
    await billing.set_plan("bob", "pro")
    entitlement = await billing.check_entitlement("bob", "api_calls")
    assert (entitlement.has_access, entitlement.usage, entitlement.resets_at) == (True, 3.0, PERIOD_END)


# -- track --


async def test_track_returns_quantity_and_usage_snapshot(billing: LocalBilling, clock: Clock) -> None:
    first = await billing.track_usage("alice", "api_calls", 3)
    assert first == TrackUsageResult(
        success=True,
        feature_key="api_calls",
        quantity=3.0,
        recorded_at=START,
        usage=UsageSnapshot(
            consumed_units=3.0, limit_units=10.0, remaining_units=7.0, period_start=START, period_end=PERIOD_END
        ),
    )
    later = clock.advance(hours=5, seconds=7)
    second = await billing.track_usage("alice", "api_calls", 2, metadata={"endpoint": "/v1/search"})
    assert second == TrackUsageResult(
        success=True,
        feature_key="api_calls",
        quantity=2.0,
        recorded_at=later,
        usage=UsageSnapshot(
            consumed_units=5.0, limit_units=10.0, remaining_units=5.0, period_start=START, period_end=PERIOD_END
        ),
    )
    assert await billing.recorded_units("alice", "api_calls") == 5.0


async def test_track_unlimited_snapshot(billing: LocalBilling) -> None:
    result = await billing.track_usage("bob", "storage_gb", 2.5)
    assert result.usage == UsageSnapshot(
        consumed_units=2.5, limit_units=None, remaining_units=None, period_start=START, period_end=PERIOD_END
    )


async def test_track_fractional_units_are_exact(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "storage_gb", 0.1)
    result = await billing.track_usage("alice", "storage_gb", 0.2)
    assert 0.1 + 0.2 != 0.3  # what float arithmetic would have stored
    assert result.usage.consumed_units == 0.3
    assert result.usage.remaining_units == 1.2
    assert await consumed(billing, "alice", "storage_gb") == 0.3
    assert await billing.recorded_units("alice", "storage_gb") == 0.3

    for _ in range(12):
        await billing.track_usage("alice", "storage_gb", 0.1)
    entitlement = await billing.check_entitlement("alice", "storage_gb")
    assert (entitlement.usage, entitlement.remaining, entitlement.has_access) == (1.5, 0.0, False)


async def test_track_smallest_unit(billing: LocalBilling) -> None:
    result = await billing.track_usage("alice", "storage_gb", 0.000001)
    assert result.quantity == 0.000001
    assert result.usage.consumed_units == 0.000001
    assert result.usage.remaining_units == 1.499999


async def test_half_a_micro_unit_is_rounded_up_as_a_decimal_column_rounds(billing: LocalBilling) -> None:
    """Upstream stores DECIMAL(20,6), which rounds a tie away from zero: 0.0000025 is 0.000003."""
    assert (await billing.track_usage("alice", "storage_gb", 5e-7)).quantity == 0.000001
    assert (await billing.track_usage("alice", "storage_gb", 2.5e-6)).quantity == 0.000003
    assert (await billing.track_usage("alice", "storage_gb", 3.4999e-6)).quantity == 0.000003
    assert await billing.recorded_units("alice", "storage_gb") == 0.000007


async def test_track_over_quota_is_all_or_nothing(billing: LocalBilling, clock: Clock) -> None:
    await billing.track_usage("alice", "api_calls", 8)
    clock.advance(minutes=1)

    with pytest.raises(QuotaExceededError) as excinfo:
        await billing.track_usage("alice", "api_calls", 3)
    assert (str(excinfo.value), excinfo.value.status) == ("quota_exceeded", 400)
    assert await consumed(billing, "alice") == 8.0
    assert await billing.recorded_units("alice", "api_calls") == 8.0

    with pytest.raises(QuotaExceededError):
        await billing.track_usage("alice", "api_calls", 2.000001)
    assert await billing.recorded_units("alice", "api_calls") == 8.0

    landed = await billing.track_usage("alice", "api_calls", 2)  # exactly on the limit
    assert (landed.usage.consumed_units, landed.usage.remaining_units) == (10.0, 0.0)
    assert await billing.recorded_units("alice", "api_calls") == 10.0

    with pytest.raises(QuotaExceededError):
        await billing.track_usage("alice", "api_calls", 0.000001)
    assert await billing.recorded_units("alice", "api_calls") == 10.0


async def test_track_fractional_lands_exactly_on_fractional_limit(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "storage_gb", 0.7)
    result = await billing.track_usage("alice", "storage_gb", 0.8)
    assert (result.usage.consumed_units, result.usage.remaining_units) == (1.5, 0.0)


async def test_a_quantity_finer_than_a_micro_unit_past_the_limit_is_refused(billing: LocalBilling) -> None:
    """0.25 + 1.2500004 is past 1.5: stored in micro-units the quantity is 1.25, which fits, and was
    recorded; refused as sent (consumed + quantity > limit), it records nothing."""
    await billing.track_usage("alice", "storage_gb", 0.25)
    with pytest.raises(QuotaExceededError):
        await billing.track_usage("alice", "storage_gb", 1.2500004)
    assert await billing.recorded_units("alice", "storage_gb") == 0.25
    below = await billing.track_usage("alice", "storage_gb", 1.2499996)  # 1.25 stored: within the limit as sent
    assert (below.quantity, below.usage.consumed_units) == (1.25, 1.5)


async def test_track_feature_not_in_plan(billing: LocalBilling) -> None:
    await billing.set_plan("carol", "daily")  # daily grants api_calls only
    for customer, feature in (("carol", "storage_gb"), ("alice", "teleport")):
        with pytest.raises(NotFoundError) as excinfo:
            await billing.track_usage(customer, feature, 1)
        assert type(excinfo.value) is NotFoundError
        assert (str(excinfo.value), excinfo.value.status) == ("No active subscription with this feature", 404)
        assert await billing.recorded_units(customer, feature) == 0.0


async def test_track_without_plan_or_after_cancel(billing: LocalBilling) -> None:
    await billing.set_plan("alice", None)
    await billing.cancel_subscription("bob")
    for customer in ("alice", "bob"):
        with pytest.raises(NotFoundError) as excinfo:
            await billing.track_usage(customer, "api_calls", 1)
        assert (str(excinfo.value), excinfo.value.status) == ("No active subscription with this feature", 404)
        assert await billing.recorded_units(customer, "api_calls") == 0.0


async def test_track_non_quota_feature(billing: LocalBilling) -> None:
    for feature in ("export", "seats"):
        with pytest.raises(ValidationError) as excinfo:
            await billing.track_usage("bob", feature, 1)
        assert (str(excinfo.value), excinfo.value.status) == ("Feature is not a usage quota type", 400)
        assert await billing.recorded_units("bob", feature) == 0.0


async def test_track_unknown_customer(billing: LocalBilling) -> None:
    with pytest.raises(CustomerNotFoundError) as excinfo:
        await billing.track_usage("nobody", "api_calls", 1)
    assert (str(excinfo.value), excinfo.value.status) == ("Customer not found: nobody", 400)
    assert await billing.recorded_units("nobody", "api_calls") == 0.0


# -- idempotency --


async def test_idempotent_replay_returns_first_result_and_records_nothing(billing: LocalBilling, clock: Clock) -> None:
    first = await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1")
    clock.advance(hours=3)
    second = await billing.track_usage("alice", "api_calls", 5, idempotency_key="req-1")
    assert second == first
    assert (second.recorded_at, second.quantity, second.usage.consumed_units) == (START, 2.0, 2.0)
    assert await consumed(billing, "alice") == 2.0
    assert await billing.recorded_units("alice", "api_calls") == 2.0


async def test_idempotent_replay_is_identical_at_microsecond_precision(database: Path) -> None:
    """With a real clock every time has microseconds; the replay must still be the first call's result."""
    clock = Clock(datetime(2024, 1, 15, 12, 0, 0, 123456, tzinfo=timezone.utc))
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        first = await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1")
        assert first.recorded_at == clock.now
        clock.advance(seconds=1)
        second = await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1")
        assert second.recorded_at == first.recorded_at
        assert second.usage.period_start == first.usage.period_start
        assert second == first


async def test_idempotency_key_is_per_customer(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1")
    for_bob = await billing.track_usage("bob", "api_calls", 3, idempotency_key="req-1")
    assert (for_bob.quantity, for_bob.usage.consumed_units) == (3.0, 3.0)
    assert await billing.recorded_units("alice", "api_calls") == 2.0
    assert await billing.recorded_units("bob", "api_calls") == 3.0


async def test_idempotency_window_is_24_hours(billing: LocalBilling, clock: Clock) -> None:
    first = await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1")

    clock.advance(hours=23, minutes=59, seconds=59)
    assert await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1") == first
    assert await billing.recorded_units("alice", "api_calls") == 2.0

    later = clock.advance(seconds=2)  # 24 h + 1 s after the first call
    again = await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1")
    assert (again.recorded_at, again.usage.consumed_units) == (later, 4.0)
    assert await billing.recorded_units("alice", "api_calls") == 4.0

    # and the key's new window starts from the second recording
    clock.advance(hours=1)
    assert await billing.track_usage("alice", "api_calls", 2, idempotency_key="req-1") == again
    assert await billing.recorded_units("alice", "api_calls") == 4.0


async def test_idempotency_key_of_a_refused_track_is_not_remembered(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "api_calls", 9)
    with pytest.raises(QuotaExceededError):
        await billing.track_usage("alice", "api_calls", 5, idempotency_key="req-9")
    retried = await billing.track_usage("alice", "api_calls", 1, idempotency_key="req-9")
    assert (retried.quantity, retried.usage.consumed_units) == (1.0, 10.0)
    assert await billing.recorded_units("alice", "api_calls") == 10.0


async def test_different_idempotency_keys_both_count(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "api_calls", 1, idempotency_key="req-1")
    await billing.track_usage("alice", "api_calls", 1, idempotency_key="req-2")
    await billing.track_usage("alice", "api_calls", 1)
    await billing.track_usage("alice", "api_calls", 1)
    assert await billing.recorded_units("alice", "api_calls") == 4.0


# -- period rollover --


async def test_period_rollover_resets_usage(billing: LocalBilling, clock: Clock) -> None:
    await billing.track_usage("alice", "api_calls", 10)
    with pytest.raises(QuotaExceededError):
        await billing.track_usage("alice", "api_calls", 1)

    clock.now = PERIOD_END - timedelta(microseconds=1)
    assert (await billing.check_entitlement("alice", "api_calls")).reason == "quota_exceeded"

    clock.now = PERIOD_END  # exactly at the boundary: the new period
    assert await billing.check_entitlement("alice", "api_calls") == Entitlement(
        "api_calls",
        has_access=True,
        limit=10.0,
        usage=0.0,
        remaining=10.0,
        resets_at=NEXT_PERIOD_END,
        type="usage_quota",
    )
    result = await billing.track_usage("alice", "api_calls", 4)
    assert result.usage == UsageSnapshot(4.0, 10.0, 6.0, PERIOD_END, NEXT_PERIOD_END)
    assert await billing.recorded_units("alice", "api_calls") == 14.0  # across both periods

    [metric] = (await billing.get_usage_metrics("alice", "api_calls")).metrics
    assert (metric.period_start, metric.period_end, metric.consumed) == (PERIOD_END, NEXT_PERIOD_END, 4.0)


async def test_period_rollover_many_periods_later(billing: LocalBilling, clock: Clock) -> None:
    await billing.track_usage("alice", "api_calls", 10)
    clock.now = datetime(2026, 7, 20, tzinfo=timezone.utc)
    entitlement = await billing.check_entitlement("alice", "api_calls")
    assert (entitlement.usage, entitlement.has_access) == (0.0, True)
    assert entitlement.resets_at == datetime(2026, 8, 15, 12, tzinfo=timezone.utc)


async def test_daily_plan_rolls_over_each_day(billing: LocalBilling, clock: Clock) -> None:
    await billing.set_plan("carol", "daily")
    await billing.track_usage("carol", "api_calls", 5)
    with pytest.raises(QuotaExceededError):
        await billing.track_usage("carol", "api_calls", 1)
    clock.advance(days=1)
    result = await billing.track_usage("carol", "api_calls", 5)
    assert result.usage == UsageSnapshot(5.0, 5.0, 0.0, START + timedelta(days=1), START + timedelta(days=2))


async def test_resets_in_days_is_ceiling_of_days_left(billing: LocalBilling, clock: Clock) -> None:
    async def resets_in_days() -> int:
        [metric] = (await billing.get_usage_metrics("alice", "api_calls")).metrics
        return metric.resets_in_days

    assert await resets_in_days() == 31  # Jan 15 12:00 -> Feb 15 12:00, exactly 31 days
    clock.advance(seconds=1)
    assert await resets_in_days() == 31  # 30 days 23:59:59 rounds up
    clock.now = datetime(2024, 1, 20, 12, 0, 1, tzinfo=timezone.utc)
    assert await resets_in_days() == 26
    clock.now = datetime(2024, 2, 14, 12, tzinfo=timezone.utc)
    assert await resets_in_days() == 1
    clock.now = PERIOD_END - timedelta(seconds=1)
    assert await resets_in_days() == 1
    clock.now = PERIOD_END
    assert await resets_in_days() == 29  # Feb 15 -> Mar 15, 2024 is a leap year


# -- metrics --


async def test_metrics_lists_usage_quotas_of_the_plan(billing: LocalBilling, clock: Clock) -> None:
    await billing.track_usage("alice", "api_calls", 7)
    await billing.track_usage("alice", "storage_gb", 0.5)
    now = clock.advance(days=10)
    assert await billing.get_usage_metrics("alice") == UsageMetrics(
        customer_id="alice",
        metrics=(
            UsageMetric(
                feature_key="api_calls",
                feature_title="API calls",
                product_name="Free",
                consumed=7.0,
                limit=10.0,
                remaining=3.0,
                percentage_used=70,
                period_start=START,
                period_end=PERIOD_END,
                resets_in_days=math.ceil((PERIOD_END - now) / timedelta(days=1)),
            ),
            UsageMetric(
                feature_key="storage_gb",
                feature_title="Storage",
                product_name="Free",
                consumed=0.5,
                limit=1.5,
                remaining=1.0,
                percentage_used=33,
                period_start=START,
                period_end=PERIOD_END,
                resets_in_days=21,
            ),
        ),
    )


async def test_metrics_percentage_is_rounded_to_an_integer(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "storage_gb", 1.0)  # 66.67 %
    await billing.track_usage("alice", "api_calls", 0.01)  # 0.1 %
    metrics = {m.feature_key: m for m in (await billing.get_usage_metrics("alice")).metrics}
    assert metrics["storage_gb"].percentage_used == 67
    assert metrics["api_calls"].percentage_used == 0
    await billing.track_usage("alice", "api_calls", 9.99)
    [full] = (await billing.get_usage_metrics("alice", "api_calls")).metrics
    assert (full.percentage_used, full.remaining) == (100, 0.0)


async def test_metrics_unlimited_quota(billing: LocalBilling) -> None:
    await billing.track_usage("bob", "storage_gb", 123.5)
    result = await billing.get_usage_metrics("bob")
    assert [m.feature_key for m in result.metrics] == ["api_calls", "storage_gb"]
    storage = result.metrics[1]
    assert (storage.product_name, storage.consumed, storage.limit, storage.remaining, storage.percentage_used) == (
        "Pro",
        123.5,
        None,
        None,
        0,
    )


async def test_metrics_filter_by_feature_key(billing: LocalBilling) -> None:
    await billing.track_usage("alice", "storage_gb", 0.75)
    result = await billing.get_usage_metrics("alice", "storage_gb")
    assert result.customer_id == "alice"
    assert [(m.feature_key, m.consumed, m.percentage_used) for m in result.metrics] == [("storage_gb", 0.75, 50)]
    # a granted feature that is not a quota, and one the plan lacks, give no metrics
    assert await billing.get_usage_metrics("alice", "seats") == UsageMetrics("alice", ())
    assert await billing.get_usage_metrics("alice", "teleport") == UsageMetrics("alice", ())


async def test_metrics_unknown_customer(billing: LocalBilling) -> None:
    with pytest.raises(CustomerNotFoundError) as excinfo:
        await billing.get_usage_metrics("nobody")
    assert (str(excinfo.value), excinfo.value.status) == ("Customer not found: nobody", 400)


async def test_metrics_customer_without_plan_or_canceled(billing: LocalBilling) -> None:
    await billing.set_plan("alice", None)
    assert await billing.get_usage_metrics("alice") == UsageMetrics(customer_id="alice", metrics=())
    await billing.cancel_subscription("bob")
    assert await billing.get_usage_metrics("bob") == UsageMetrics(customer_id="bob", metrics=())


# -- set_plan at run time --


async def test_upgrade_keeps_the_period_usage_and_raises_the_limit(billing: LocalBilling, clock: Clock) -> None:
    await billing.track_usage("alice", "api_calls", 10)
    assert (await billing.check_entitlement("alice", "api_calls")).has_access is False
    clock.advance(days=3)
    await billing.set_plan("alice", "pro")
    assert await billing.check_entitlement("alice", "api_calls") == Entitlement(
        "api_calls",
        has_access=True,
        limit=1000.0,
        usage=10.0,
        remaining=990.0,
        resets_at=PERIOD_END,
        type="usage_quota",
    )
    assert (await billing.check_entitlement("alice", "export")).has_access is True
    result = await billing.track_usage("alice", "api_calls", 5)
    assert result.usage == UsageSnapshot(15.0, 1000.0, 985.0, START, PERIOD_END)


async def test_downgrade_below_usage_blocks_tracking(billing: LocalBilling) -> None:
    await billing.track_usage("bob", "api_calls", 50)
    await billing.set_plan("bob", "free")
    entitlement = await billing.check_entitlement("bob", "api_calls")
    assert (entitlement.has_access, entitlement.reason, entitlement.usage, entitlement.remaining) == (
        False,
        "quota_exceeded",
        50.0,
        0.0,
    )
    with pytest.raises(QuotaExceededError):
        await billing.track_usage("bob", "api_calls", 1)


async def test_set_plan_creates_a_new_customer(billing: LocalBilling, clock: Clock) -> None:
    with pytest.raises(CustomerNotFoundError):
        await billing.check_entitlement("dave", "api_calls")
    joined = clock.advance(days=2, hours=3)
    await billing.set_plan("dave", "free")
    entitlement = await billing.check_entitlement("dave", "api_calls")
    assert (entitlement.has_access, entitlement.limit, entitlement.usage) == (True, 10.0, 0.0)
    assert entitlement.resets_at == datetime(2024, 2, 17, 15, tzinfo=timezone.utc)
    result = await billing.track_usage("dave", "api_calls", 1)
    assert (result.usage.period_start, result.usage.period_end) == (
        joined,
        datetime(2024, 2, 17, 15, tzinfo=timezone.utc),
    )


async def test_set_plan_none_creates_a_customer_without_plan(billing: LocalBilling) -> None:
    await billing.set_plan("erin", None)
    assert (await billing.check_entitlement("erin", "api_calls")).reason == "no_active_subscription"


async def test_a_customer_made_without_a_plan_is_anchored_where_its_first_plan_starts(
    billing: LocalBilling, clock: Clock
) -> None:
    """Registered planless on one day and subscribed ten days later: its periods start with the plan."""
    await billing.set_plan("erin", None)
    subscribed = clock.advance(days=10)
    await billing.set_plan("erin", "free")
    entitlement = await billing.check_entitlement("erin", "api_calls")
    assert entitlement.resets_at == subscribed + (PERIOD_END - START)


async def test_set_plan_unknown_plan(billing: LocalBilling) -> None:
    with pytest.raises(ValidationError) as excinfo:
        await billing.set_plan("erin", "gold")
    assert str(excinfo.value) == "unknown plan 'gold' (known: daily, fifty, free, pro)"
    assert isinstance(excinfo.value, ValueError)
    with pytest.raises(CustomerNotFoundError):  # nothing was created
        await billing.check_entitlement("erin", "api_calls")
    with pytest.raises(ValidationError):
        await billing.set_plan("alice", "gold")
    assert (await billing.check_entitlement("alice", "api_calls")).limit == 10.0  # nothing was changed


async def test_set_plan_started_at_reanchors_the_period(billing: LocalBilling, clock: Clock) -> None:
    clock.now = datetime(2024, 1, 20, tzinfo=timezone.utc)
    await billing.set_plan("alice", "free", started_at=datetime(2023, 12, 1, 9, tzinfo=timezone.utc))
    [metric] = (await billing.get_usage_metrics("alice", "api_calls")).metrics
    assert (metric.period_start, metric.period_end) == (
        datetime(2024, 1, 1, 9, tzinfo=timezone.utc),
        datetime(2024, 2, 1, 9, tzinfo=timezone.utc),
    )
    assert metric.resets_in_days == 13  # Jan 20 00:00 -> Feb 1 09:00 is 12 days 9 hours
    result = await billing.track_usage("alice", "api_calls", 1)
    assert result.usage.period_start == datetime(2024, 1, 1, 9, tzinfo=timezone.utc)


async def test_set_plan_started_at_in_the_future_aligns_the_current_period(billing: LocalBilling, clock: Clock) -> None:
    """Billing on the 1st from next month: this period ends on the 1st, not a month after it."""
    clock.now = datetime(2024, 1, 20, tzinfo=timezone.utc)
    await billing.set_plan("alice", "free", started_at=datetime(2024, 2, 1, tzinfo=timezone.utc))
    result = await billing.track_usage("alice", "api_calls", 10)
    assert (result.usage.period_start, result.usage.period_end) == (
        datetime(2024, 1, 1, tzinfo=timezone.utc),
        datetime(2024, 2, 1, tzinfo=timezone.utc),
    )
    clock.now = datetime(2024, 2, 1, tzinfo=timezone.utc)
    assert (await billing.check_entitlement("alice", "api_calls")).usage == 0.0


async def test_a_plan_of_another_interval_starts_a_new_period(billing: LocalBilling, clock: Clock) -> None:
    """Usage is kept per period start: a daily period starting where a monthly one did must not
    read the month's usage (nor a month the days'), so changing the interval starts a period now."""
    clock.now = datetime(2024, 1, 10, tzinfo=timezone.utc)
    await billing.set_plan("carol", "free")
    clock.now = datetime(2024, 3, 10, 8, tzinfo=timezone.utc)
    await billing.track_usage("carol", "api_calls", 3)
    await billing.set_plan("carol", "fifty")  # the same interval: the period and its usage are kept
    assert (await billing.check_entitlement("carol", "api_calls")).usage == 3
    await billing.set_plan("carol", "daily")
    daily = await billing.check_entitlement("carol", "api_calls")
    assert (daily.usage, daily.resets_at) == (0, datetime(2024, 3, 11, 8, tzinfo=timezone.utc))
    await billing.track_usage("carol", "api_calls", 2)
    clock.now = datetime(2024, 3, 10, 9, tzinfo=timezone.utc)
    await billing.set_plan("carol", "fifty")
    monthly = await billing.check_entitlement("carol", "api_calls")
    assert (monthly.usage, monthly.resets_at) == (0, datetime(2024, 4, 10, 9, tzinfo=timezone.utc))


async def test_set_plan_started_at_must_be_aware(billing: LocalBilling) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await billing.set_plan("alice", "pro", started_at=datetime(2024, 1, 1))
    assert (await billing.check_entitlement("alice", "export")).has_access is False


async def test_set_plan_refuses_a_start_whose_periods_end_past_the_last_datetime(billing: LocalBilling) -> None:
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)  # accepted, it broke every later call
    new_year_in_utc = datetime(9998, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-5)))
    for refused in (last, new_year_in_utc):
        with pytest.raises(ValueError, match=r"started_at must fall between the years 1 and 9999 \(UTC\)"):
            await billing.set_plan("alice", "pro", started_at=refused)
    assert (await billing.check_entitlement("alice", "export")).has_access is False  # nothing assigned
    await billing.set_plan("alice", "pro", started_at=datetime(9998, 12, 31, 23, 59, tzinfo=timezone.utc))
    assert (await billing.check_entitlement("alice", "export")).has_access is True


async def test_set_plan_refuses_a_start_before_the_year_1_in_utc(billing: LocalBilling) -> None:
    """Year 1 at 02:00+05:00 is year 0 in UTC, as it is stored: accepted, no call of the customer's
    could read it back (a 500 on every call of the server's)."""
    with pytest.raises(ValueError, match="started_at must fall between the years 1 and 9999"):
        await billing.set_plan("alice", "pro", started_at=datetime(1, 1, 1, 2, tzinfo=timezone(timedelta(hours=5))))
    assert (await billing.check_entitlement("alice", "export")).has_access is False  # nothing assigned
    await billing.set_plan("alice", "pro", started_at=datetime(1, 1, 1, 2, tzinfo=timezone.utc))
    assert (await billing.check_entitlement("alice", "export")).has_access is True


async def test_another_intervals_plan_after_no_plan_starts_a_new_period(billing: LocalBilling, clock: Clock) -> None:
    """Daily -> no plan -> monthly: the day's usage was read as the month's, the month anchored on
    the day's start (its start seen through "no plan", which has no interval of its own)."""
    await billing.set_plan("carol", "daily")
    await billing.track_usage("carol", "api_calls", 5)
    switched = clock.advance(hours=5)
    await billing.set_plan("carol", None)
    await billing.set_plan("carol", "fifty")
    monthly = await billing.check_entitlement("carol", "api_calls")
    assert (monthly.usage, monthly.resets_at) == (0, switched + (PERIOD_END - START))


async def test_no_plan_and_back_keeps_the_periods_usage(billing: LocalBilling, clock: Clock) -> None:
    """A customer dropped to no plan for a moment (a failed payment) and put back on it gets no fresh
    quota, as after a cancellation: no plan has no interval, so the anchor stays."""
    await billing.track_usage("alice", "api_calls", 10)
    clock.advance(days=3)
    await billing.set_plan("alice", None)
    await billing.set_plan("alice", "free")
    entitlement = await billing.check_entitlement("alice", "api_calls")
    assert (entitlement.has_access, entitlement.usage, entitlement.resets_at) == (False, 10.0, PERIOD_END)
    with pytest.raises(QuotaExceededError):
        await billing.track_usage("alice", "api_calls", 1)


# -- concurrency (real SQLite file) --


async def test_concurrent_tracks_never_exceed_the_limit(billing: LocalBilling) -> None:
    await billing.set_plan("carol", "fifty")
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await billing.track_usage("carol", "api_calls", 1)
        except QuotaExceededError:
            outcomes.append("exceeded")
        else:
            outcomes.append("ok")

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(one)

    assert (outcomes.count("ok"), outcomes.count("exceeded")) == (50, 150)
    [metric] = (await billing.get_usage_metrics("carol", "api_calls")).metrics
    assert (metric.consumed, metric.remaining, metric.percentage_used) == (50.0, 0.0, 100)
    assert await billing.recorded_units("carol", "api_calls") == 50.0


async def test_concurrent_tracks_with_the_same_idempotency_key_count_once(billing: LocalBilling) -> None:
    results: list[TrackUsageResult] = []

    async def one() -> None:
        results.append(await billing.track_usage("bob", "api_calls", 1, idempotency_key="same-request"))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)

    assert len(results) == 20
    assert all(result == results[0] for result in results)
    assert results[0].usage.consumed_units == 1.0
    assert await billing.recorded_units("bob", "api_calls") == 1.0
    assert await consumed(billing, "bob") == 1.0


async def test_two_engines_on_one_file_never_exceed_the_limit(database: Path, clock: Clock) -> None:
    """Two engines (as two worker processes would) share the database: the limit holds across connections."""
    outcomes: list[str] = []
    async with (
        LocalBilling.from_dict(PLANS, database, clock=clock) as first,
        LocalBilling.from_dict(PLANS, database, clock=clock) as second,
    ):
        await first.set_plan("carol", "fifty")

        async def one(engine: LocalBilling) -> None:
            try:
                await engine.track_usage("carol", "api_calls", 1)
            except QuotaExceededError:
                outcomes.append("exceeded")
            else:
                outcomes.append("ok")

        async with anyio.create_task_group() as tg:
            for index in range(120):
                tg.start_soon(one, first if index % 2 else second)

        assert (outcomes.count("ok"), outcomes.count("exceeded")) == (50, 70)
        assert await first.recorded_units("carol", "api_calls") == 50.0
        assert await consumed(second, "carol") == 50.0


# -- durability --


async def test_state_survives_reopening_the_database(database: Path, clock: Clock) -> None:
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        await billing.track_usage("alice", "api_calls", 3, idempotency_key="req-1")
        await billing.track_usage("alice", "storage_gb", 0.25)
        await billing.set_plan("dave", "pro")
        await billing.cancel_subscription("bob")

    clock.advance(hours=20)  # still inside the idempotency window
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        entitlement = await billing.check_entitlement("alice", "api_calls")
        # usage kept, and the catalog customer's period still anchored at the first start
        assert (entitlement.usage, entitlement.remaining, entitlement.resets_at) == (3.0, 7.0, PERIOD_END)
        assert await consumed(billing, "alice", "storage_gb") == 0.25
        assert (await billing.check_entitlement("dave", "export")).has_access is True
        assert (await billing.check_entitlement("bob", "export")).reason == "subscription_not_active"
        # the idempotency key is remembered too
        replay = await billing.track_usage("alice", "api_calls", 3, idempotency_key="req-1")
        assert (replay.recorded_at, replay.usage.consumed_units) == (START, 3.0)
        assert await billing.recorded_units("alice", "api_calls") == 3.0


async def test_a_file_customer_moved_to_a_plan_of_another_interval_starts_a_new_period(
    database: Path, clock: Clock
) -> None:
    """The file's assignment follows set_plan's rule: a daily period starting where the month did
    must not read the month's usage."""
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        await billing.track_usage("alice", "api_calls", 4)
    clock.advance(hours=1)
    async with LocalBilling.from_dict({**PLANS, "customers": {"alice": "daily"}}, database, clock=clock) as billing:
        entitlement = await billing.check_entitlement("alice", "api_calls")
        assert (entitlement.limit, entitlement.usage) == (5.0, 0.0)
        assert entitlement.resets_at == clock.now + timedelta(days=1)


async def test_a_plans_interval_changed_in_the_file_starts_a_new_period_for_customers_assigned_at_run_time(
    database: Path, clock: Clock
) -> None:
    """As for the file's own customers: a yearly period anchored where the month was would read the
    first month's finished usage as the year's."""
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        await billing.set_plan("dave", "free")
        await billing.track_usage("dave", "api_calls", 10)  # the first month used up
        clock.advance(days=40)
        await billing.track_usage("dave", "api_calls", 3)
    yearly = {**PLANS, "plans": {**PLANS["plans"], "free": {**PLANS["plans"]["free"], "interval": "year"}}}
    async with LocalBilling.from_dict(yearly, database, clock=clock) as billing:
        for customer in ("dave", "alice"):
            entitlement = await billing.check_entitlement(customer, "api_calls")
            assert (entitlement.has_access, entitlement.usage) == (True, 0.0)
            assert entitlement.resets_at == clock.now.replace(year=clock.now.year + 1)
        assert (await billing.check_entitlement("bob", "api_calls")).resets_at == NEXT_PERIOD_END  # pro: as it was


async def test_database_file_is_in_wal_mode(billing: LocalBilling, database: Path) -> None:
    await billing.track_usage("alice", "api_calls", 1)
    assert billing.database == str(database)
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_database_locked_by_another_process_is_unavailable_in_time(
    database: Path, clock: Clock, busy_timeout: float
) -> None:
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        with write_locked(database):
            started = time.monotonic()
            with pytest.raises(ServerError) as caught:
                await billing.track_usage("alice", "api_calls", 1)
            assert time.monotonic() - started < 5 * busy_timeout
            assert (caught.value.status, caught.value.retry_after) == (503, 1.0)
            assert caught.value.message == "the billing database is locked by another connection; try again shortly"
            assert await consumed(billing, "alice") == 0.0  # reads still answer (WAL)
        await billing.track_usage("alice", "api_calls", 1)  # and writes do once the lock is gone
        assert await consumed(billing, "alice") == 1.0


async def test_opening_a_database_locked_by_another_process_is_refused(
    database: Path, clock: Clock, busy_timeout: float
) -> None:
    """Seeding the catalog's customers writes: refused like any unusable file, in one line (the CLI prints it)."""
    LocalBilling.from_dict(PLANS, database, clock=clock).close()
    with write_locked(database), pytest.raises(ValueError) as caught:
        LocalBilling.from_dict(PLANS, database, clock=clock)
    assert str(caught.value) == f"{database}: cannot open the billing database: database is locked"


async def test_a_damaged_database_is_unavailable_with_the_reason(database: Path, clock: Clock) -> None:
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        await billing.track_usage("alice", "api_calls", 1)
    with contextlib.closing(sqlite3.connect(database)) as db:
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'usage_totals'").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    with database.open("r+b") as file:  # the usage table's page: the file still opens, then fails on use
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        with pytest.raises(ServerError) as caught:
            await billing.check_entitlement("alice", "api_calls")
    assert (caught.value.status, caught.value.retry_after) == (503, None)
    assert caught.value.message == "the billing database cannot be used: database disk image is malformed"


def test_another_applications_database_is_refused_untouched(database: Path, clock: Clock) -> None:
    """A --db pointed at the wrong file must not get billing tables (nor WAL mode) added to it."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    with pytest.raises(ValueError) as caught:
        LocalBilling.from_dict(PLANS, database, clock=clock)
    assert (
        str(caught.value)
        == f"{database}: cannot open the billing database: it is another application's database (tables: users)"
    )
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_a_database_marked_by_another_application_is_refused(database: Path, clock: Clock) -> None:
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA application_id = 7")
    with pytest.raises(ValueError) as caught:
        LocalBilling.from_dict(PLANS, database, clock=clock)
    assert str(caught.value).endswith(": it is another application's database (application_id 0x7)")


def test_a_database_laid_out_by_a_newer_version_is_refused(database: Path, clock: Clock) -> None:
    LocalBilling.from_dict(PLANS, database, clock=clock).close()
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA user_version = 3")
    with pytest.raises(ValueError) as caught:
        LocalBilling.from_dict(PLANS, database, clock=clock)
    assert str(caught.value) == (
        f"{database}: cannot open the billing database: its layout 3 is from a newer billingos-asgi (this one reads 2)"
    )


LAYOUT_1_SUBSCRIPTIONS = """
CREATE TABLE subscriptions (
    customer_id TEXT PRIMARY KEY, plan_key TEXT, status TEXT NOT NULL DEFAULT 'active', started_at REAL NOT NULL
)"""


async def test_a_database_of_layout_1_is_opened_with_its_subscriptions_and_usage(database: Path, clock: Clock) -> None:
    """Layout 2 adds the interval a subscription's periods follow (kept through "no plan")."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute(LAYOUT_1_SUBSCRIPTIONS)
        db.execute("INSERT INTO subscriptions VALUES ('carol', 'daily', 'active', ?)", (START.timestamp(),))
        db.execute("PRAGMA user_version = 1")
        db.commit()
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        await billing.track_usage("carol", "api_calls", 2)
        await billing.set_plan("carol", None)
        await billing.set_plan("carol", "daily")  # the same interval: the day's usage is kept
        assert (await billing.check_entitlement("carol", "api_calls")).usage == 2
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)


async def test_a_database_from_before_the_mark_is_kept_and_marked(database: Path, clock: Clock) -> None:
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        await billing.track_usage("alice", "api_calls", 3)
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA application_id = 0")
        db.execute("PRAGMA user_version = 0")
        db.execute("ANALYZE")  # SQLite's own sqlite_stat1 is not another application's table
    async with LocalBilling.from_dict(PLANS, database, clock=clock) as billing:
        assert await consumed(billing, "alice") == 3.0
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA application_id").fetchone() != (0,)
        assert db.execute("PRAGMA user_version").fetchone() == (2,)


async def test_memory_database_works(clock: Clock) -> None:
    async with LocalBilling.from_dict(PLANS, ":memory:", clock=clock) as billing:
        await billing.track_usage("alice", "api_calls", 2)
        assert await consumed(billing, "alice") == 2.0


async def test_aclose_via_method(database: Path, clock: Clock) -> None:
    billing = LocalBilling.from_dict(PLANS, database, clock=clock)
    try:
        await billing.track_usage("alice", "api_calls", 1)
    finally:
        await billing.aclose()
    assert repr(billing) == f"LocalBilling(database={str(database)!r}, plans=['daily', 'fifty', 'free', 'pro'])"


async def test_a_closed_engine_refuses_every_call_by_name(database: Path, clock: Clock) -> None:
    """Not SQLite's "Cannot operate on a closed database", and no session token minted as if billing ran."""
    billing = LocalBilling.from_dict(PLANS, database, clock=clock)
    await billing.aclose()
    await billing.aclose()  # twice is fine
    calls = [
        billing.check_entitlement("alice", "api_calls"),
        billing.track_usage("alice", "api_calls", 1),
        billing.get_usage_metrics("alice"),
        billing.create_session_token("alice"),
        billing.set_plan("alice", "pro"),
        billing.recorded_units("alice", "api_calls"),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"LocalBilling\(database=.*\) is closed"):
            await call
    synchronous = LocalBilling.from_dict(PLANS, ":memory:", clock=clock)
    synchronous.close()
    with pytest.raises(RuntimeError, match="is closed"):
        await synchronous.check_entitlement("alice", "api_calls")


async def test_a_call_waiting_for_the_database_when_it_closes_is_refused_by_name(database: Path, clock: Clock) -> None:
    billing = LocalBilling.from_dict(PLANS, database, clock=clock)
    lock = billing._store._lock
    lock.acquire()  # another call holds the database: this one passes the open check, then waits
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            failures: list[BaseException] = []

            async def track() -> None:
                try:
                    await billing.track_usage("alice", "api_calls", 1)
                except BaseException as exc:
                    failures.append(exc)

            group.start_soon(track)
            await anyio.sleep(0.05)
            lock.release()
            billing.close()  # (waits for the lock: the waiting call may take it first, and record)
    assert not failures or isinstance(failures[0], RuntimeError) and "is closed" in str(failures[0]), failures


# -- bad input is refused before any write --


class NotJSON:
    pass


DEEP: list[object] = []
for _ in range(100_000):  # nested deeper than JSON encoding allows
    DEEP = [DEEP]

BAD_TRACKS = [
    pytest.param({"customer_id": ""}, "customer_id must not be empty", id="empty-customer"),
    pytest.param({"customer_id": "   "}, "customer_id must not be empty", id="whitespace-customer"),
    pytest.param(
        {"customer_id": "a" * 256}, "customer_id is 256 characters long; the maximum is 255", id="customer-256-chars"
    ),
    pytest.param({"customer_id": "ali\x00ce"}, "customer_id must not contain control characters", id="customer-nul"),
    pytest.param({"customer_id": "alice\n"}, "customer_id must not contain control characters", id="customer-newline"),
    pytest.param({"customer_id": 42}, "customer_id must be a string, got int", id="customer-int"),
    pytest.param({"feature_key": ""}, "feature_key must not be empty", id="empty-feature"),
    pytest.param({"feature_key": "api\x7fcalls"}, "feature_key must not contain control characters", id="feature-del"),
    pytest.param({"customer_id": "a\ud800"}, "customer_id is not valid Unicode text", id="customer-surrogate"),
    pytest.param({"quantity": 0}, "quantity must be greater than 0, got 0", id="zero"),
    pytest.param({"quantity": 0.0}, "quantity must be greater than 0, got 0.0", id="zero-float"),
    pytest.param({"quantity": -1}, "quantity must be greater than 0, got -1", id="negative"),
    pytest.param({"quantity": math.nan}, "quantity must be a finite number, got nan", id="nan"),
    pytest.param({"quantity": math.inf}, "quantity must be a finite number, got inf", id="inf"),
    pytest.param({"quantity": -math.inf}, "quantity must be a finite number, got -inf", id="minus-inf"),
    pytest.param(
        {"quantity": Decimal("sNaN")}, "quantity must be a finite number, got Decimal('sNaN')", id="signalling-nan"
    ),
    pytest.param({"quantity": True}, "quantity must be a number, got bool", id="bool"),
    pytest.param({"quantity": "5"}, "quantity must be a number, got str", id="string"),
    pytest.param({"quantity": None}, "quantity must be a number, got NoneType", id="none"),
    pytest.param({"quantity": 1e-9}, "quantity 1e-09 is below the resolution of 1e-06 units", id="below-resolution"),
    pytest.param(
        {"quantity": 4.999999e-7}, "quantity 4.999999e-07 is below the resolution of 1e-06 units", id="rounds-to-zero"
    ),
    pytest.param(
        {"quantity": 10**400},
        "quantity is too large: upstream holds quantities below 100000000000000",
        id="int-beyond-float",
    ),
    pytest.param(
        {"quantity": 2e14},
        "quantity 200000000000000.0 is too large: upstream holds quantities below 100000000000000",
        id="huge",
    ),
    pytest.param(
        {"quantity": 10**14},
        "quantity 100000000000000 is too large: upstream holds quantities below 100000000000000",
        id="1e14",
    ),
    pytest.param(
        {"quantity": 1e308},
        "quantity 1e+308 is too large: upstream holds quantities below 100000000000000",
        id="micro-overflows",
    ),
    pytest.param({"metadata": ["a", "b"]}, "metadata must be an object, got list", id="metadata-list"),
    pytest.param({"metadata": "{}"}, "metadata must be an object, got str", id="metadata-str"),
    pytest.param({"metadata": {"x": NotJSON()}}, "metadata must be JSON-serialisable: ", id="metadata-object"),
    pytest.param({"metadata": {"x": math.nan}}, "metadata must be JSON-serialisable: ", id="metadata-nan"),
    pytest.param({"metadata": {"x": DEEP}}, "metadata must be JSON-serialisable: ", id="metadata-too-deep"),
    pytest.param({"metadata": {"x": "y" * 9000}}, "metadata is 9008 bytes as JSON; the maximum is 8192", id="big"),
    pytest.param({"metadata": {"x": "\ud800"}}, "metadata is not valid Unicode text", id="metadata-surrogate"),
    pytest.param({"metadata": {"\udfff": 1}}, "metadata is not valid Unicode text", id="metadata-key-surrogate"),
    pytest.param({"idempotency_key": ""}, "idempotency_key must not be empty", id="empty-idempotency-key"),
    pytest.param(
        {"idempotency_key": "k" * 256},
        "idempotency_key is 256 characters long; the maximum is 255",
        id="idempotency-key-256-chars",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_TRACKS)
async def test_bad_track_input_is_refused_before_any_write(
    billing: LocalBilling, override: dict[str, Any], message: str
) -> None:
    call: dict[str, Any] = {"customer_id": "alice", "feature_key": "api_calls", "quantity": 1}
    call.update(override)
    with pytest.raises(ValidationError) as excinfo:
        await billing.track_usage(**call)
    assert isinstance(excinfo.value, ValueError)
    assert isinstance(excinfo.value, BillingOSError)
    assert str(excinfo.value).startswith(message)
    assert await billing.recorded_units("alice", "api_calls") == 0.0
    assert await consumed(billing, "alice") == 0.0


async def test_id_of_255_chars_is_accepted(billing: LocalBilling) -> None:
    customer = "c" * 255
    await billing.set_plan(customer, "free")
    result = await billing.track_usage(customer, "api_calls", 1)
    assert result.usage.consumed_units == 1.0


async def test_smallest_quantity_is_accepted_on_unlimited_quota(billing: LocalBilling) -> None:
    await billing.track_usage("bob", "storage_gb", 0.000001)
    await billing.track_usage("bob", "storage_gb", 0.000001)
    assert await consumed(billing, "bob", "storage_gb") == 0.000002


@pytest.mark.parametrize("quantity", [99_999_999_999_999, 10_000_000_000_000])
async def test_largest_quantities_are_accepted_on_unlimited_quota(billing: LocalBilling, quantity: int) -> None:
    """Upstream stores DECIMAL(20,6), so 14 integer digits are valid and check_quantity lets them through."""
    result = await billing.track_usage("bob", "storage_gb", quantity)
    assert (result.quantity, result.usage.consumed_units, result.usage.limit_units) == (quantity, quantity, None)
    assert await consumed(billing, "bob", "storage_gb") == quantity


@pytest.mark.parametrize(
    "customer_id", ["", " \t ", "x" * 256, "bad\x1fid", None], ids=["empty", "blank", "long", "control", "none"]
)
async def test_bad_customer_id_refused_by_every_call(billing: LocalBilling, customer_id: Any) -> None:
    with pytest.raises(ValidationError):
        await billing.check_entitlement(customer_id, "api_calls")
    with pytest.raises(ValidationError):
        await billing.get_usage_metrics(customer_id)
    with pytest.raises(ValidationError):
        await billing.set_plan(customer_id, "free")
    with pytest.raises(ValidationError):
        await billing.cancel_subscription(customer_id)


async def test_bad_feature_key_refused_by_check_and_metrics(billing: LocalBilling) -> None:
    with pytest.raises(ValidationError, match="feature_key must not be empty"):
        await billing.check_entitlement("alice", " ")
    with pytest.raises(ValidationError, match="feature_key must not contain control characters"):
        await billing.get_usage_metrics("alice", "api\ncalls")


# -- session tokens --


async def test_session_token(billing: LocalBilling, clock: Clock) -> None:
    now = clock.advance(minutes=30)
    token = await billing.create_session_token("user_1", expires_in=600)
    assert isinstance(token, SessionToken)
    assert token.expires_at == now + timedelta(seconds=600)
    assert isinstance(token.token, str) and len(token.token) >= 32
    assert token.token not in repr(token)
    assert repr(token) == f"SessionToken(token='***', expires_at={now + timedelta(seconds=600)!r})"

    other = await billing.create_session_token(
        "user_1",
        external_organization_id="org_9",
        allowed_operations=["read_usage"],
        metadata={"plan": "free"},
    )
    assert other.token != token.token
    assert other.expires_at == now + timedelta(seconds=3600)  # the default


@pytest.mark.parametrize("expires_in", [60, 86400])
async def test_session_token_bounds_accepted(billing: LocalBilling, expires_in: int) -> None:
    token = await billing.create_session_token("user_1", expires_in=expires_in)
    assert token.expires_at == START + timedelta(seconds=expires_in)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"expires_in": 59}, "expiresIn must be between 60 and 86400 seconds, got 59"),
        ({"expires_in": 86401}, "expiresIn must be between 60 and 86400 seconds, got 86401"),
        ({"expires_in": 0}, "expiresIn must be between 60 and 86400 seconds, got 0"),
        ({"expires_in": True}, "expiresIn must be an integer number of seconds, got bool"),
        ({"expires_in": 600.0}, "expiresIn must be an integer number of seconds, got float"),
        ({"expires_in": "600"}, "expiresIn must be an integer number of seconds, got str"),
        ({"external_user_id": ""}, "externalUserId must not be empty"),
        ({"external_organization_id": "o\x00"}, "externalOrganizationId must not contain control characters"),
        ({"allowed_operations": "read_usage"}, "allowedOperations must be a list of strings"),
        ({"allowed_operations": ["ok", ""]}, "allowedOperations[] must not be empty"),
        ({"metadata": [1]}, "metadata must be an object, got list"),
        ({"metadata": {"a": "\ud800"}}, "metadata is not valid Unicode text (a lone surrogate)"),
    ],
)
async def test_session_token_bad_input(billing: LocalBilling, kwargs: dict[str, Any], message: str) -> None:
    call: dict[str, Any] = {"external_user_id": "user_1", **kwargs}
    with pytest.raises(ValidationError) as excinfo:
        await billing.create_session_token(call.pop("external_user_id"), **call)
    assert str(excinfo.value) == message


@pytest.mark.parametrize("limit", [12_345_678_901_233, 99_999_999_999_999, 98_765_432_109_876.5])
async def test_a_large_quota_can_be_used_exactly_to_its_limit(clock: Clock, limit: float) -> None:
    """Micro-units are exact for every quantity of DECIMAL(20,6): 14 digits times 10**6 is beyond a
    float's 53 bits, so a float product would round past the limit and refuse a track that lands on it."""
    plans = {"features": {"tokens": {"type": "usage_quota"}}, "plans": {"big": {"features": {"tokens": limit}}}}
    async with LocalBilling.from_dict({**plans, "customers": {"carol": "big"}}, clock=clock) as billing:
        result = await billing.track_usage("carol", "tokens", limit)
        assert (result.usage.consumed_units, result.usage.remaining_units) == (limit, 0)
        assert await billing.recorded_units("carol", "tokens") == limit


async def test_the_largest_quantities_upstream_holds_are_taken() -> None:
    """DECIMAL(20,6) holds up to 99999999999999.999999: a float just below 10**14 fits, 10**14 does not."""
    plans = {
        "features": {"storage_gb": {"type": "usage_quota"}},
        "plans": {"pro": {"features": {"storage_gb": 99_999_999_999_999.5}}},
        "customers": {"bob": "pro"},
    }
    async with LocalBilling.from_dict(plans) as billing:
        result = await billing.track_usage("bob", "storage_gb", 99_999_999_999_999.5)
        assert (result.quantity, result.usage.remaining_units) == (99_999_999_999_999.5, 0)
        with pytest.raises(ValidationError, match="too large"):
            await billing.track_usage("bob", "storage_gb", 1e14)
