"""The one exception tree of billingos-asgi.

::

    BillingOSError
    ├── AuthenticationError        401/403: missing, malformed or unknown secret key
    ├── ValidationError            bad input (also a ValueError): raised before any network call,
    │                              or a 400/422 answer from the service
    ├── NotFoundError              404 "No active subscription with this feature"
    │   └── CustomerNotFoundError  400 "Customer not found: <id>"
    ├── QuotaExceededError         400 "quota_exceeded": nothing was recorded
    ├── RateLimitError             429, with ``retry_after`` seconds when the service sent one
    │   └── BudgetExhaustedError   not sent: this process's upstream call budget is used up for now
    ├── ServerError                5xx
    ├── NetworkError               connection failures and timeouts (no answer at all, or a 408)
    │   └── CircuitOpenError       not sent: calls are paused after repeated failures
    └── InvalidResponseError       an answer that is not the JSON the protocol promises (a 404 from
                                   no such route too: a wrong base URL)

Every error carries ``status`` (None when no HTTP answer was involved), ``message``, ``body``
(the decoded response body, or its text when it was not JSON) and ``retry_after`` (the seconds to wait
before trying again, when known: a 429, 408 or 5xx answer's ``Retry-After``, or, for a call not
sent, the budget's or the breaker's wait; else None).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "BillingOSError",
    "BudgetExhaustedError",
    "CircuitOpenError",
    "CustomerNotFoundError",
    "InvalidResponseError",
    "NetworkError",
    "NotFoundError",
    "QuotaExceededError",
    "RateLimitError",
    "ServerError",
    "ValidationError",
]


class BillingOSError(Exception):
    """Base of every error raised by billingos-asgi's backends."""

    def __init__(
        self, message: str, *, status: int | None = None, body: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(message={self.message!r}, status={self.status!r})"


class AuthenticationError(BillingOSError):
    """The secret key is missing, malformed or unknown."""


class ValidationError(BillingOSError, ValueError):
    """The request was refused as invalid; nothing was recorded."""


class NotFoundError(BillingOSError):
    """The customer has no active subscription granting the feature."""


class CustomerNotFoundError(NotFoundError):
    """The billing service does not know the customer."""


class QuotaExceededError(BillingOSError):
    """Recording the quantity would push usage past the limit; nothing was recorded."""


class RateLimitError(BillingOSError):
    """The service throttled the call; ``retry_after`` is the wait it asked for, in seconds."""


class BudgetExhaustedError(RateLimitError):
    """Not sent: the process's upstream call budget has no token for it within the wait allowed."""


class ServerError(BillingOSError):
    """The service failed (5xx); the call may be retried."""


class NetworkError(BillingOSError):
    """No answer: the connection failed or timed out."""


class InvalidResponseError(BillingOSError):
    """The service answered, but not with the JSON the protocol promises."""


class CircuitOpenError(NetworkError):
    """Not sent: after repeated failures, calls to billing pause for a cool-down (``retry_after``)."""
