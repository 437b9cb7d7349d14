"""``BillingOS``: the async HTTP client for the hosted BillingOS API.

The only module that imports httpx. It owns authentication, retries and the translation of every
failure into the :mod:`billingos_asgi._exceptions` tree.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, TypeVar

import httpx
from anyio import sleep as _sleep

from . import _wire
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
from ._logging import Throttled
from ._models import Entitlement, SessionToken, TrackUsageResult, UsageMetrics
from ._validation import check_expires_in, check_id, check_metadata, check_operations, check_quantity

__all__ = ["BillingOS", "RetryPolicy"]

T = TypeVar("T")

#: The entitlement check's path: its retries (see :meth:`BillingOS.budgeted`) are told apart by it.
CHECK_PATH = "/v1/usage/check"

SANDBOX_URL = "https://sandbox-api.billingos.dev"
LIVE_URL = "https://api.billingos.dev"
DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
_USER_AGENT = "billingos-asgi/0.1"
_MAX_ERROR_TEXT = 2000
_MASK = "sk_***"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for network errors (a 408 too), 5xx and 429 only.

    ``max_retries`` counts retries after the first attempt. A ``Retry-After`` longer than
    ``max_retry_after`` is not waited for: the call fails at once with its error
    (:class:`RateLimitError` for a 429, :class:`ServerError` for a 503); a shorter one is waited
    for, but never less than the backoff.
    """

    max_retries: int = 3
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        # NaN passes any comparison (a NaN sleep fails each retry, a NaN cap waits out any Retry-After),
        # and an infinite backoff sleeps forever; an infinite max_retry_after is "always wait".
        for name, value, finite in (
            ("backoff_base", self.backoff_base, True),
            ("backoff_max", self.backoff_max, True),
            ("max_retry_after", self.max_retry_after, False),
        ):
            if math.isnan(value) or value < 0 or (finite and math.isinf(value)):
                kind = "a finite number" if finite else "a number"
                raise ValueError(f"{name} must be {kind} >= 0, got {value!r}")

    def delay(self, retry: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number ``retry`` (0-based), or None to give up."""
        if retry >= self.max_retries:
            return None
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        backoff = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** min(retry, 64)))  # no overflow
        # A Retry-After of 0 (or a date already past) must not turn into back-to-back retries.
        return backoff if retry_after is None else max(retry_after, backoff)


def _resolve_secret_key(secret_key: str | None) -> str:
    key = secret_key if secret_key is not None else os.environ.get("BILLINGOS_SECRET_KEY")
    if not key:
        raise ValidationError("no BillingOS secret key: pass secret_key= or set BILLINGOS_SECRET_KEY")
    if not isinstance(key, str):
        raise ValidationError("the BillingOS secret key must be a string")
    where = "secret_key=" if secret_key is not None else "BILLINGOS_SECRET_KEY"  # which one to fix
    key = key.strip()  # read from a file or an env var, it often ends in a newline
    if not key.startswith("sk_"):
        raise ValidationError(f"the BillingOS secret key ({where}) must start with 'sk_'")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValidationError(f"the BillingOS secret key ({where}) must be printable ASCII without spaces")
    return key


#: Anything shaped like a secret key, masked in what a bad setting is told with: up to a space or a
#: quote, what follows it in a URL too (a key need only be printable ASCII: "/", "@" or "?" may be in it).
_KEY_LIKE = re.compile(r"sk_[^\s'\"]+")


def _resolve_base_url(base_url: str | None, secret_key: str) -> str:
    setting = "base_url" if base_url else "BILLINGOS_API_URL"
    url = base_url or os.environ.get("BILLINGOS_API_URL")
    if not url:
        if secret_key.startswith("sk_test_"):
            return SANDBOX_URL
        if secret_key.startswith("sk_live_"):
            return LIVE_URL
        raise ValidationError("cannot tell the API URL from this key: pass base_url= or set BILLINGOS_API_URL")
    if not isinstance(url, str):
        raise ValidationError(f"{setting} must be a string, got {type(url).__name__}")
    url = url.strip()  # read from a file or an env var, it often ends in a newline
    # The two settings swapped (in a .env file, say) put a key here: the refusals below must not show it.
    shown = _KEY_LIKE.sub(_MASK, url)
    try:
        parsed: httpx.URL | None = httpx.URL(url)
    except httpx.InvalidURL as exc:  # checked here, or the client's constructor raises it unexplained
        parsed, fault = None, _KEY_LIKE.sub(_MASK, str(exc))
    if parsed is None:  # raised out of the except block: httpx's error, which may quote a key, not its context
        raise ValidationError(f"{setting} is not a valid URL: {fault}")
    # A query or fragment would swallow every call's path; a user:password would replace the key
    # with Basic auth (and show in repr and in the messages below).
    if parsed.userinfo or "?" in url or "#" in url:
        if parsed.userinfo:
            shown = _KEY_LIKE.sub(_MASK, str(parsed.copy_with(userinfo=b"***")))
        raise ValidationError(f"{setting} must not carry a user, password, query or fragment, got {shown!r}")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValidationError(f"{setting} must be an http(s) URL with a host, got {shown!r}")
    port = parsed.port
    if any(char.isspace() for char in url) or not (port is None or 0 < port < 65536):
        raise ValidationError(f"{setting} is not a valid URL (a space in it, or a port out of range): {shown!r}")
    return url.rstrip("/")


#: The longest ``Retry-After`` kept, in seconds (a year): an error's ``retry_after`` stays a finite number.
_LONGEST_WAIT = 365 * 24 * 3600.0


#: delta-seconds as RFC 9110 has them (ASCII digits), a fraction allowed as some limiters send one ("0.5").
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date; repeated (by a proxy: httpx
    joins them with commas, "30, 30"), the longest of its delta-seconds."""
    if not value:
        return None
    if "," in value and not value.rstrip().endswith("GMT"):  # (an HTTP date holds a comma too)
        waits = [_parse_retry_after(part) for part in value.split(",")]
        return max((wait for wait in waits if wait is not None), default=None)
    if _DELTA_SECONDS.fullmatch(value.strip()):  # (not float()'s "1_000", "1e3", "+5", "inf": garbage, ignored)
        return min(float(value), _LONGEST_WAIT)  # a wait too long to make (RetryPolicy gives up on it), kept finite
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a day or hour too large for a C long
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return min(max(0.0, (moment - datetime.now(timezone.utc)).total_seconds()), _LONGEST_WAIT)


def _json_body(response: httpx.Response, secret: str) -> Any:
    """The body as JSON with ``secret`` masked; ValueError or RecursionError (nested too deeply) if it is not."""
    return _redact(response.json(), secret)


def _text_body(response: httpx.Response, secret: str) -> str:
    """The body's text, masked before it is cut (a cut could leave part of the key)."""
    return response.text.replace(secret, _MASK)[:_MAX_ERROR_TEXT]


def _redact(value: Any, secret: str) -> Any:
    """``value`` with ``secret`` masked, should a server (or an echoing proxy) ever send the key back."""
    if isinstance(value, str):
        return value.replace(secret, _MASK)
    if isinstance(value, dict):
        return {_redact(key, secret): _redact(item, secret) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact(item, secret) for item in value]
    return value


def _error_for(response: httpx.Response, secret: str) -> BillingOSError:
    """Translate an HTTP error answer into the matching exception."""
    status = response.status_code
    try:
        body = _json_body(response, secret)
    except (ValueError, RecursionError):
        body = _text_body(response, secret)
    raw = body.get("message") if isinstance(body, dict) else None
    if isinstance(raw, list):  # NestJS validation pipes answer with a list of messages
        raw = "; ".join(str(item) for item in raw)
    reason = _redact(response.reason_phrase, secret)  # (an echoing proxy's status line too)
    # (Cut as a text body is: a server's message is logged with each retry.)
    message = str(raw)[:_MAX_ERROR_TEXT] if raw else f"BillingOS answered {status} {reason}".rstrip()
    retry_after = _parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        return RateLimitError(message, status=status, body=body, retry_after=retry_after)
    if status == 408:  # the server gave up waiting for the request: a timeout, as transient as ours
        return NetworkError(message, status=status, body=body, retry_after=retry_after)
    if status >= 500:
        return ServerError(message, status=status, body=body, retry_after=retry_after)
    if status in (401, 403):
        return AuthenticationError(message, status=status, body=body)
    if message == "quota_exceeded" or message.startswith("quota_exceeded"):
        return QuotaExceededError(message, status=status, body=body)
    if message.startswith("Customer not found"):
        return CustomerNotFoundError(message, status=status, body=body)
    if status == 404:
        if message.startswith("No active subscription"):  # the protocol's only 404 (SPEC section 2)
            return NotFoundError(message, status=status, body=body)
        # NestJS's "Cannot POST /x" (no such route), a proxy's or an API gateway's page (JSON too): the
        # base URL is wrong, or the service is mid-deploy. Not the customer's fault: nothing of theirs
        # is refused for it.
        route = f"{response.request.method} {response.request.url.path}"
        return InvalidResponseError(
            f"BillingOS has no route {route} (404: {message}): is the base URL right?", status=status, body=body
        )
    return ValidationError(message, status=status, body=body)


def _retryable(error: BillingOSError, budgeted: bool) -> bool:
    """Whether the client retries ``error`` itself. Budgeted, not a 429: its caller pauses every
    call for the ``Retry-After``, where a retry sleeping here would leave the others calling (and a
    request waiting for its check the whole time)."""
    return isinstance(error, (NetworkError, ServerError)) or (isinstance(error, RateLimitError) and not budgeted)


def _check_timeout(timeout: object) -> None:
    """A timeout in seconds (or an ``httpx.Timeout`` of them), finite and > 0: NaN was taken, and
    failed every call with a bare ValueError from deep in the network code, which was retried forever."""
    seconds: list[object] = [timeout]
    if isinstance(timeout, httpx.Timeout):
        seconds = [timeout.connect, timeout.read, timeout.write, timeout.pool]
    for value in seconds:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf
        ):
            raise ValidationError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")


class BillingOS:
    """Async client for the hosted BillingOS API (one pooled connection set; use ``async with``).

    The secret key comes from ``secret_key`` or ``BILLINGOS_SECRET_KEY``; the base URL from
    ``base_url``, ``BILLINGOS_API_URL``, or the key's prefix (``sk_test_`` sandbox, ``sk_live_``
    live). The key never appears in ``repr``, logs or exception messages.
    """

    def __init__(
        self,
        secret_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        limits: httpx.Limits = DEFAULT_LIMITS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        _check_timeout(timeout)
        key = _resolve_secret_key(secret_key)
        self.base_url = _resolve_base_url(base_url, key)
        self.retry = retry or RetryPolicy()
        self._secret_key = key
        self._before_retry: Callable[[str], Awaitable[None]] | None = None
        self._log = Throttled().log  # retries of every call alike while billing is down: one line a second
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": _USER_AGENT, "Accept": "application/json"},
            timeout=timeout,
            limits=limits,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"BillingOS(base_url={self.base_url!r})"

    async def __aenter__(self) -> BillingOS:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def budgeted(self, before_retry: Callable[[str], Awaitable[None]]) -> BillingOS:
        """This client (its connection pool and key) awaiting ``before_retry(path)`` before each retry
        of a call to ``path``: a caller with a call budget takes a token there, so that every attempt
        is a call it counted. A 429 is raised at once, not retried: the caller's budget honours it.
        Closing either closes both."""
        twin = copy.copy(self)
        twin._before_retry = before_retry
        return twin

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement:
        params = {
            "customer_id": check_id("customer_id", customer_id),
            "feature_key": check_id("feature_key", feature_key),
        }
        return await self._request("GET", CHECK_PATH, _wire.entitlement_from_json, params=params)

    async def track_usage(
        self,
        customer_id: str,
        feature_key: str,
        quantity: float,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TrackUsageResult:
        """Record usage. Without ``idempotency_key`` one is generated before the first attempt,
        so that retries of this call can never count twice."""
        if idempotency_key is None:
            idempotency_key = uuid.uuid4().hex
        payload: dict[str, Any] = {
            "customer_id": check_id("customer_id", customer_id),
            "feature_key": check_id("feature_key", feature_key),
            "quantity": _wire.format_number(check_quantity(quantity)),
            "idempotency_key": check_id("idempotency_key", idempotency_key),
        }
        checked_metadata = check_metadata(metadata)
        if checked_metadata is not None:
            payload["metadata"] = checked_metadata
        return await self._request("POST", "/v1/usage/track", _wire.track_result_from_json, json=payload)

    async def get_usage_metrics(self, customer_id: str, feature_key: str | None = None) -> UsageMetrics:
        params = {"customer_id": check_id("customer_id", customer_id)}
        if feature_key is not None:
            params["feature_key"] = check_id("feature_key", feature_key)
        return await self._request("GET", "/v1/usage/metrics", _wire.metrics_from_json, params=params)

    async def create_session_token(
        self,
        external_user_id: str,
        *,
        external_organization_id: str | None = None,
        expires_in: int = 3600,
        allowed_operations: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SessionToken:
        """Mint a session token for one end user of the React SDK."""
        payload: dict[str, Any] = {
            "externalUserId": check_id("externalUserId", external_user_id),
            "expiresIn": check_expires_in(expires_in),
        }
        if external_organization_id is not None:
            payload["externalOrganizationId"] = check_id("externalOrganizationId", external_organization_id)
        operations = check_operations(allowed_operations)
        if operations is not None:
            payload["allowedOperations"] = operations
        checked_metadata = check_metadata(metadata)
        if checked_metadata is not None:
            payload["metadata"] = checked_metadata
        return await self._request("POST", "/v1/session-tokens", _wire.session_token_from_json, json=payload)

    async def _request(
        self,
        method: str,
        path: str,
        decode: Callable[[Any], T],
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
    ) -> T:
        """Send one call, retrying transient failures, and decode its answer with ``decode``.

        The payload (and its idempotency key) never changes between attempts.
        """
        retry = 0
        while True:
            try:
                response = await self._http.request(method, path, params=params, json=json)
            # Every error is raised below, out of its except block: not even as a suppressed __context__
            # does httpx's error travel with it (its request holds the key, its text may quote headers).
            except httpx.TimeoutException as exc:
                error: BillingOSError = NetworkError(f"BillingOS {method} {path} timed out ({type(exc).__name__})")
            # (An OSError: raised past httpx by a transport of the app's, a socket's or TLS's.)
            except (httpx.TransportError, OSError) as exc:
                detail = _redact(str(exc), self._secret_key)
                error = NetworkError(f"cannot reach BillingOS for {method} {path}: {type(exc).__name__}: {detail}")
            except httpx.DecodingError as exc:  # a body its Content-Encoding does not decode
                error = InvalidResponseError(
                    f"BillingOS answered {method} {path} with a body that does not decode: {type(exc).__name__}"
                )
            else:
                if response.status_code >= 400:
                    error = _error_for(response, self._secret_key)
                elif response.is_redirect:  # not followed: a POST would be resent as a GET, or not at all
                    location = _redact(response.headers.get("location", ""), self._secret_key)
                    error = InvalidResponseError(
                        f"BillingOS answered {method} {path} with a redirect ({response.status_code}) to "
                        f"{location!r}: is the base URL {self.base_url!r} right (https)?",
                        status=response.status_code,
                    )
                else:
                    # Masked too: a malformed answer's body travels in InvalidResponseError.
                    try:
                        body = _json_body(response, self._secret_key)
                    except (ValueError, RecursionError):  # (a JSONDecodeError holds the unmasked text)
                        error = InvalidResponseError(
                            f"BillingOS answered {response.status_code} to {method} {path} with a non-JSON body",
                            status=response.status_code,
                            body=_text_body(response, self._secret_key),
                        )
                    else:
                        try:
                            return decode(body)
                        except InvalidResponseError as exc:
                            exc.status = response.status_code  # the decoder sees the body only
                            raise
            retryable = _retryable(error, self._before_retry is not None)
            delay = self.retry.delay(retry, error.retry_after) if retryable else None
            if delay is None:
                raise error
            retry += 1
            self._log(
                logging.WARNING,
                "BillingOS %s %s failed (%s); retry %d in %.2fs",
                method,
                path,
                error.message,
                retry,
                delay,
            )
            await _sleep(delay)
            if self._before_retry is not None:
                await self._before_retry(path)
