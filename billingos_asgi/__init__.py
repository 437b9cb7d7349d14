"""billingos-asgi: usage-based billing with BillingOS for any ASGI app."""

from ._exceptions import (
    AuthenticationError,
    BillingOSError,
    CustomerNotFoundError,
    InvalidResponseError,
    NetworkError,
    NotFoundError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from ._models import Entitlement, SessionToken, TrackUsageResult, UsageMetric, UsageMetrics, UsageSnapshot
from .backend import BillingBackend
from .client import BillingOS, RetryPolicy
from .local import LocalBilling, PlansError

__all__ = [
    "AuthenticationError",
    "BillingBackend",
    "BillingOS",
    "BillingOSError",
    "CustomerNotFoundError",
    "Entitlement",
    "InvalidResponseError",
    "LocalBilling",
    "NetworkError",
    "NotFoundError",
    "PlansError",
    "QuotaExceededError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "SessionToken",
    "TrackUsageResult",
    "UsageMetric",
    "UsageMetrics",
    "UsageSnapshot",
    "ValidationError",
]
__version__ = "0.1.0"
