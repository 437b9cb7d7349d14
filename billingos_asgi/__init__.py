"""billingos-asgi: usage-based billing with BillingOS for any ASGI app."""

from ._exceptions import (
    AuthenticationError,
    BillingOSError,
    BudgetExhaustedError,
    CircuitOpenError,
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
from .context import UsageContext, get_usage_context, report_usage, set_customer
from .customers import ScopeResolver, from_api_key, from_state, from_user
from .events import UsageEvent
from .local import LocalBilling, PlansError
from .middleware import BillingMiddleware
from .responses import BillingDenied, Denial
from .routes import Metered
from .tracker import TrackerStats

__all__ = [
    "AuthenticationError",
    "BillingBackend",
    "BillingDenied",
    "BillingMiddleware",
    "BillingOS",
    "BillingOSError",
    "BudgetExhaustedError",
    "CircuitOpenError",
    "CustomerNotFoundError",
    "Denial",
    "Entitlement",
    "InvalidResponseError",
    "LocalBilling",
    "Metered",
    "NetworkError",
    "NotFoundError",
    "PlansError",
    "QuotaExceededError",
    "RateLimitError",
    "RetryPolicy",
    "ScopeResolver",
    "ServerError",
    "SessionToken",
    "TrackUsageResult",
    "TrackerStats",
    "UsageContext",
    "UsageEvent",
    "UsageMetric",
    "UsageMetrics",
    "UsageSnapshot",
    "ValidationError",
    "from_api_key",
    "from_state",
    "from_user",
    "get_usage_context",
    "report_usage",
    "set_customer",
]
__version__ = "0.1.0"
