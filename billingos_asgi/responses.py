"""Refusals as RFC 9457 problem details (the middleware's, the usage endpoints'), and the quota headers."""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from .discovery import mounted_apps

__all__ = [
    "REFUSAL_STATUSES",
    "BillingDenied",
    "Denial",
    "ProblemFactory",
    "answer_refusal",
    "answer_refusals",
    "problem_response",
    "refusal_headers",
    "refusal_in",
    "with_refusal_headers",
]

PROBLEM_TYPE = "https://docs.billingos.dev/problems/"
#: The last second a datetime holds in UTC: upstream may name a period end past it ("9999-12-31T23:59:59-05:00").
_LAST_SECOND = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
_TITLES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthenticated", "Authentication required"),
    403: ("no-access", "Feature not included in your plan"),
    429: ("quota-exceeded", "Usage quota exhausted"),
    503: ("billing-unavailable", "Billing service unavailable"),
}
#: What the middleware answers in the app's stead (SPEC section 5); 400 is the usage endpoints'.
REFUSAL_STATUSES = (401, 403, 429, 503)


@dataclass(frozen=True, slots=True)
class Denial:
    """Why the middleware answered instead of the app; what a custom response factory receives."""

    status: int
    detail: str
    request: Request
    feature: str
    customer_id: str | None = None
    limit: float | None = None
    usage: float | None = None
    resets_at: float | None = None  # Unix time of the period's end
    upgrade_url: str | None = None

    @property
    def retry_after(self) -> int | None:
        """Seconds until the billing period ends (429 and 403, when the feature has a period; SPEC
        section 5), or a short wait when billing is unavailable (503)."""
        if self.status == 503:
            return 5
        if self.resets_at is not None and self.status in (403, 429):
            return max(1, math.ceil(self.resets_at - time.time()))
        return None


#: Makes the answer to a refusal: a ``Response`` with its body (the Django and Litestar adapters
#: copy ``body`` and headers into their own response types); anything else, like a failure, is
#: logged and answered with the default problem response.
ProblemFactory = Callable[[Denial], Response]


class BillingDenied(Exception):
    """Raised by :meth:`UsageContext.identify` when the gate refuses a late-identified request.

    Let it propagate: the middleware answers with ``response`` (the problem details, or what the
    ``problem_factory`` made). A framework that turns exceptions into 500s converts it itself.
    """

    def __init__(self, denial: Denial, response: Response) -> None:
        super().__init__(f"{denial.status}: {denial.detail}")
        self.denial = denial
        self.response = response

    @property
    def headers(self) -> dict[str, str]:
        """The answer's headers as text, for a framework that builds its own response from them."""
        return {name.decode("latin-1"): value.decode("latin-1") for name, value in self.response.raw_headers}

    @property
    def media_type(self) -> str | None:
        """The answer's Content-Type (a ``problem_factory``'s response may give it as a header only)."""
        return self.response.media_type or self.headers.get("content-type")


async def answer_refusal(request: Request, denied: Exception) -> Response:
    """A Starlette exception handler for :class:`BillingDenied`: the refusal's own answer. An app
    the middleware wraps from outside needs it: its error middleware would make the refusal a 500
    before the middleware saw it."""
    if not isinstance(denied, BillingDenied):
        raise denied  # registered for BillingDenied only
    return denied.response


def refusal_in(exc: BaseException | None) -> BillingDenied | None:
    """``exc`` if a refusal, or the first refusal of a group (a task group's) of nothing else."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and inner:
        found = [refusal_in(each) for each in inner]
        return found[0] if all(found) else None
    return exc if isinstance(exc, BillingDenied) else None


def answer_refusals(app: Any) -> None:
    """Register :func:`answer_refusal` on a Starlette (or FastAPI) ``app`` and on the apps mounted
    in it, each of which answers its own routes' errors; an app's own handler, if any, decides.
    (An app's handlers are read when its middleware stack is built: on its first call.)"""
    for each in (app, *mounted_apps(app)):
        handlers = getattr(each, "exception_handlers", None)
        if isinstance(handlers, dict) and BillingDenied not in handlers:
            each.add_exception_handler(BillingDenied, answer_refusal)


#: Kept as they are when a feature key is percent-encoded: every printable ASCII character but "%".
_PRINTABLE_ASCII = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")


@functools.lru_cache(maxsize=1024)
def _policy(feature: str, limit: float) -> tuple[bytes, bytes]:
    """The feature as an sf-string, and the ``RateLimit-Policy`` value (a few per plan: cached).

    Its quota ``q`` is an sf-integer, as ``r`` is: a fractional limit (1.5 GB) is given whole units."""
    name = _sf_string(feature)
    return name, b"%s;q=%d" % (name, int(limit) if limit > 0 else 0)


def _sf_string(text: str) -> bytes:
    """``text`` as an RFC 8941 sf-string, which holds printable ASCII only (``\\"`` and ``\\\\`` escaped):
    other characters percent-encoded as UTF-8 ("crédits" is "cr%C3%A9dits")."""
    if not (text.isascii() and text.isprintable()):
        text = quote(text, safe=_PRINTABLE_ASCII)
    return b'"%s"' % text.replace("\\", "\\\\").replace('"', '\\"').encode()


_HALF_LAST_DECIMAL = 5e-7  # of upstream's DECIMAL(20,6) quantities


def quota_headers(feature: str, limit: float, remaining: float, resets_at: float | None) -> list[tuple[bytes, bytes]]:
    """IETF ``RateLimit-Policy`` and ``RateLimit`` fields (raw ASGI headers) for a feature's quota."""
    name, policy = _policy(feature, limit)
    # Whole units left: a sum of fractional units in floats falls short of a whole number (30 x 0.1
    # is 3.0000000000000004), so within half of upstream's last decimal it counts as that number.
    # An int: %d of a float costs twice as much.
    left_units = int(remaining + _HALF_LAST_DECIMAL) if remaining > 0 else 0
    if resets_at is None:
        value = b"%s;r=%d" % (name, left_units)
    else:
        left = math.ceil(resets_at - time.time())
        value = b"%s;r=%d;t=%d" % (name, left_units, left if left > 0 else 0)
    return [(b"ratelimit-policy", policy), (b"ratelimit", value)]


def _utc_iso(timestamp: float) -> str:
    """``timestamp`` as an ISO-8601 UTC time ("...Z"), the last one a datetime holds at most."""
    return datetime.fromtimestamp(min(timestamp, _LAST_SECOND), timezone.utc).isoformat().replace("+00:00", "Z")


def problem_response(denial: Denial) -> Response:
    """The default answer: ``application/problem+json`` with the quota's figures as extension members."""
    slug, title = _TITLES.get(denial.status, ("error", "Request refused"))
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + slug,
        "title": title,
        "status": denial.status,
        "detail": denial.detail,
        "feature": denial.feature,
        "limit": denial.limit,
        "usage": denial.usage,
        "resets_at": None if denial.resets_at is None else _utc_iso(denial.resets_at),
    }
    if denial.upgrade_url and denial.status in (403, 429):
        body["upgrade_url"] = denial.upgrade_url
    return Response(
        json.dumps(body, allow_nan=False),
        denial.status,
        headers=refusal_headers(denial),
        media_type="application/problem+json",
    )


def with_refusal_headers(response: Response, denial: Denial) -> Response:
    """``response`` (a user's answer to ``denial``) with the :func:`refusal_headers` it does not set
    itself: when to come back. A copy, as it may be one response the user hands out every time."""
    present = {name.lower() for name, _ in response.raw_headers}
    headers = refusal_headers(denial).items()
    extra = [(raw, value.encode()) for name, value in headers if (raw := name.lower().encode()) not in present]
    if not extra:
        return response
    answer = copy.copy(response)
    answer.raw_headers = [*response.raw_headers, *extra]
    vars(answer).pop("_headers", None)  # (the original's, cached by Response.headers)
    return answer


def refusal_headers(denial: Denial) -> dict[str, str]:
    """``Retry-After`` and the quota fields of a refusal, whoever writes its body."""
    headers: dict[str, str] = {}
    retry_after = denial.retry_after
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if denial.limit is not None and denial.usage is not None:
        remaining = denial.limit - denial.usage
        for name, value in quota_headers(denial.feature, denial.limit, remaining, denial.resets_at):
            headers[name.decode()] = value.decode()
    return headers
