"""Typed results of the three billing calls, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

FeatureType = Literal["boolean_flag", "usage_quota", "numeric_limit"]
DenialReason = Literal["no_active_subscription", "subscription_not_active", "quota_exceeded"]

__all__ = [
    "DenialReason",
    "Entitlement",
    "FeatureType",
    "SessionToken",
    "TrackUsageResult",
    "UsageMetric",
    "UsageMetrics",
    "UsageSnapshot",
]


@dataclass(frozen=True, slots=True)
class Entitlement:
    """Whether a customer may use a feature now, and how much of it is left.

    ``limit`` is None for unlimited quotas and boolean flags; ``usage`` and ``remaining`` are
    None where the feature is not counted.
    """

    feature_key: str
    has_access: bool
    reason: str | None = None
    limit: float | None = None
    usage: float | None = None
    remaining: float | None = None
    resets_at: datetime | None = None
    type: str | None = None


@dataclass(frozen=True, slots=True)
class UsageSnapshot:
    """A quota's state right after a track call; ``limit_units`` None means unlimited."""

    consumed_units: float
    limit_units: float | None
    remaining_units: float | None
    period_start: datetime
    period_end: datetime


@dataclass(frozen=True, slots=True)
class TrackUsageResult:
    """The answer to a track call (a replayed idempotency key returns the first call's answer)."""

    success: bool
    feature_key: str
    quantity: float
    recorded_at: datetime
    usage: UsageSnapshot


@dataclass(frozen=True, slots=True)
class UsageMetric:
    """One usage quota of a customer, as shown in a usage widget."""

    feature_key: str
    feature_title: str
    product_name: str
    consumed: float
    limit: float | None
    remaining: float | None
    percentage_used: int
    period_start: datetime
    period_end: datetime
    resets_in_days: int


@dataclass(frozen=True, slots=True)
class UsageMetrics:
    """A customer's usage quotas, one :class:`UsageMetric` each (``get_usage_metrics``' answer)."""

    customer_id: str
    metrics: tuple[UsageMetric, ...]


@dataclass(frozen=True, slots=True)
class SessionToken:
    """A short-lived token the React SDK uses on behalf of one end user."""

    token: str
    expires_at: datetime

    def __repr__(self) -> str:
        # The token is a bearer credential: keep it out of logs and tracebacks.
        return f"SessionToken(token='***', expires_at={self.expires_at!r})"
