"""Billing periods: ``[start, end)`` anchored at the subscription start, for each interval."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from billingos_asgi.local.periods import current_period


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=timezone.utc)


# -- fixed intervals --


def test_day() -> None:
    anchor = utc(2024, 3, 10, 8, 30)
    assert current_period(anchor, "day", utc(2024, 3, 10, 8, 30)) == (anchor, utc(2024, 3, 11, 8, 30))
    assert current_period(anchor, "day", utc(2024, 3, 12, 7, 0)) == (utc(2024, 3, 11, 8, 30), utc(2024, 3, 12, 8, 30))
    assert current_period(anchor, "day", utc(2024, 3, 12, 8, 29, 59, 999999)) == (
        utc(2024, 3, 11, 8, 30),
        utc(2024, 3, 12, 8, 30),
    )


def test_week() -> None:
    anchor = utc(2024, 1, 3, 12)  # a Wednesday noon: weeks run Wednesday noon to Wednesday noon
    assert current_period(anchor, "week", utc(2024, 1, 3, 12)) == (anchor, utc(2024, 1, 10, 12))
    assert current_period(anchor, "week", utc(2024, 1, 17, 11, 59)) == (utc(2024, 1, 10, 12), utc(2024, 1, 17, 12))
    assert current_period(anchor, "week", utc(2024, 1, 20)) == (utc(2024, 1, 17, 12), utc(2024, 1, 24, 12))


def test_month() -> None:
    anchor = utc(2024, 1, 15, 12)
    assert current_period(anchor, "month", utc(2024, 1, 15, 12)) == (anchor, utc(2024, 2, 15, 12))
    assert current_period(anchor, "month", utc(2024, 2, 1)) == (anchor, utc(2024, 2, 15, 12))
    assert current_period(anchor, "month", utc(2024, 2, 15, 11, 59, 59)) == (anchor, utc(2024, 2, 15, 12))
    assert current_period(anchor, "month", utc(2024, 3, 1)) == (utc(2024, 2, 15, 12), utc(2024, 3, 15, 12))
    # across a year end
    assert current_period(anchor, "month", utc(2025, 1, 2)) == (utc(2024, 12, 15, 12), utc(2025, 1, 15, 12))


def test_month_time_of_day_matters_on_the_anchor_day() -> None:
    anchor = utc(2024, 1, 15, 12)
    # Feb 15 at 06:00 is still before the anchor's noon: the January period has not ended yet.
    assert current_period(anchor, "month", utc(2024, 2, 15, 6)) == (anchor, utc(2024, 2, 15, 12))


def test_year() -> None:
    anchor = utc(2023, 6, 1)
    assert current_period(anchor, "year", utc(2023, 6, 1)) == (anchor, utc(2024, 6, 1))
    assert current_period(anchor, "year", utc(2024, 5, 31, 23, 59)) == (anchor, utc(2024, 6, 1))
    assert current_period(anchor, "year", utc(2024, 6, 1)) == (utc(2024, 6, 1), utc(2025, 6, 1))
    assert current_period(anchor, "year", utc(2025, 1, 1)) == (utc(2024, 6, 1), utc(2025, 6, 1))


# -- month-end anchors clamp without drifting --


def test_month_anchored_jan_31_non_leap_year() -> None:
    anchor = utc(2023, 1, 31)
    assert current_period(anchor, "month", utc(2023, 2, 10)) == (anchor, utc(2023, 2, 28))
    assert current_period(anchor, "month", utc(2023, 2, 28)) == (utc(2023, 2, 28), utc(2023, 3, 31))
    assert current_period(anchor, "month", utc(2023, 3, 30)) == (utc(2023, 2, 28), utc(2023, 3, 31))
    assert current_period(anchor, "month", utc(2023, 3, 31)) == (utc(2023, 3, 31), utc(2023, 4, 30))
    assert current_period(anchor, "month", utc(2023, 5, 1)) == (utc(2023, 4, 30), utc(2023, 5, 31))


def test_month_anchored_jan_31_leap_year() -> None:
    anchor = utc(2024, 1, 31)
    assert current_period(anchor, "month", utc(2024, 2, 28)) == (anchor, utc(2024, 2, 29))
    assert current_period(anchor, "month", utc(2024, 2, 29)) == (utc(2024, 2, 29), utc(2024, 3, 31))
    assert current_period(anchor, "month", utc(2024, 3, 31)) == (utc(2024, 3, 31), utc(2024, 4, 30))


def test_month_anchored_jan_31_with_time_of_day() -> None:
    anchor = utc(2024, 1, 31, 12)
    assert current_period(anchor, "month", utc(2024, 2, 29, 6)) == (anchor, utc(2024, 2, 29, 12))
    assert current_period(anchor, "month", utc(2024, 2, 29, 12)) == (utc(2024, 2, 29, 12), utc(2024, 3, 31, 12))


def test_year_anchored_feb_29() -> None:
    anchor = utc(2024, 2, 29)
    assert current_period(anchor, "year", utc(2024, 12, 31)) == (anchor, utc(2025, 2, 28))
    assert current_period(anchor, "year", utc(2025, 2, 28)) == (utc(2025, 2, 28), utc(2026, 2, 28))
    assert current_period(anchor, "year", utc(2028, 3, 1)) == (utc(2028, 2, 29), utc(2029, 2, 28))


# -- boundaries and long spans --


@pytest.mark.parametrize(
    ("interval", "anchor", "end"),
    [
        ("day", utc(2024, 1, 1, 9), utc(2024, 1, 2, 9)),
        ("week", utc(2024, 1, 1, 9), utc(2024, 1, 8, 9)),
        ("month", utc(2024, 1, 31, 9), utc(2024, 2, 29, 9)),
        ("year", utc(2024, 1, 1, 9), utc(2025, 1, 1, 9)),
    ],
)
def test_now_exactly_at_the_boundary_starts_the_new_period(interval: str, anchor: datetime, end: datetime) -> None:
    just_before = end - timedelta(microseconds=1)
    assert current_period(anchor, interval, just_before) == (anchor, end)
    start, next_end = current_period(anchor, interval, end)
    assert start == end
    assert next_end > end
    assert current_period(anchor, interval, next_end - timedelta(microseconds=1)) == (end, next_end)


def test_now_equal_to_anchor_is_the_first_period() -> None:
    anchor = utc(2024, 5, 5, 5, 5, 5, 5)
    assert current_period(anchor, "day", anchor) == (anchor, anchor + timedelta(days=1))
    assert current_period(anchor, "month", anchor) == (anchor, utc(2024, 6, 5, 5, 5, 5, 5))


def test_far_future_day() -> None:
    anchor = utc(2000, 1, 1, 6)
    now = utc(2100, 7, 4, 3)  # 36708 days and 21 hours later
    assert current_period(anchor, "day", now) == (utc(2100, 7, 3, 6), utc(2100, 7, 4, 6))


def test_far_future_week() -> None:
    anchor = utc(2024, 1, 1)  # a Monday
    now = utc(2124, 1, 9, 23)  # a Sunday night a century later
    start, end = current_period(anchor, "week", now)
    assert (start, end) == (utc(2124, 1, 3), utc(2124, 1, 10))
    assert start.weekday() == 0


def test_far_future_month_keeps_the_anchor_day() -> None:
    anchor = utc(2024, 1, 31, 23, 59)
    assert current_period(anchor, "month", utc(2124, 5, 10)) == (utc(2124, 4, 30, 23, 59), utc(2124, 5, 31, 23, 59))
    assert current_period(anchor, "month", utc(2123, 2, 28, 23, 59)) == (
        utc(2123, 2, 28, 23, 59),
        utc(2123, 3, 31, 23, 59),
    )


def test_far_future_year() -> None:
    anchor = utc(2020, 7, 15, 12)
    assert current_period(anchor, "year", utc(2519, 7, 15, 11)) == (utc(2518, 7, 15, 12), utc(2519, 7, 15, 12))
    assert current_period(anchor, "year", utc(2519, 7, 15, 12)) == (utc(2519, 7, 15, 12), utc(2520, 7, 15, 12))


@pytest.mark.parametrize("interval", ["day", "week", "month", "year"])
def test_consecutive_periods_tile_without_gaps(interval: str) -> None:
    anchor = utc(2024, 1, 31, 17, 45)
    now = anchor
    previous_end = anchor
    for _ in range(30):
        start, end = current_period(anchor, interval, now)
        assert start == previous_end
        assert start <= now < end
        previous_end, now = end, end
