"""Billing periods anchored at the subscription start (a plan's interval: day, week, month, year)."""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta

_FIXED = {"day": timedelta(days=1), "week": timedelta(weeks=1)}
_MONTHS = {"month": 1, "year": 12}


def _add_months(anchor: datetime, months: int) -> datetime:
    """``anchor`` moved by whole months, its day clamped to the target month (Jan 31 -> Feb 28)."""
    index = anchor.month - 1 + months
    year, month = anchor.year + index // 12, index % 12 + 1
    return anchor.replace(year=year, month=month, day=min(anchor.day, calendar.monthrange(year, month)[1]))


def current_period(anchor: datetime, interval: str, now: datetime) -> tuple[datetime, datetime]:
    """The ``[start, end)`` period of the subscription started at ``anchor`` that contains ``now``."""
    step = _FIXED.get(interval)
    if step is not None:
        start = anchor + step * ((now - anchor) // step)
        return start, start + step
    months = _MONTHS[interval]
    count = ((now.year - anchor.year) * 12 + now.month - anchor.month) // months
    while _add_months(anchor, count * months) > now:
        count -= 1
    while _add_months(anchor, (count + 1) * months) <= now:
        count += 1
    return _add_months(anchor, count * months), _add_months(anchor, (count + 1) * months)
