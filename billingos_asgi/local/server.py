"""The local BillingOS API server: SPEC section 2 over :class:`LocalBilling`, as a Starlette app.

It answers with the reference service's status codes and NestJS-style error bodies
(``{"statusCode", "message", "error"}``), so the HTTP client, the examples and the tests talk to
it exactly as they would to the hosted API. Bad input is always a 4xx naming the fault, never a
500, and is never recorded.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import _wire
from .._exceptions import BillingOSError, ValidationError
from .._validation import MAX_ID_LENGTH, content_length
from .engine import LocalBilling

__all__ = ["RateLimiter", "create_app"]

logger = logging.getLogger("billingos_asgi")

DEFAULT_SECRET_KEY = "sk_test_local"
THROTTLED = "ThrottlerException: Too Many Requests"
MAX_BODY_BYTES = 64 * 1024

Endpoint = Callable[[Request], Awaitable[Response]]


#: NestJS's names where Python's differ (or changed: 413 is "Content Too Large" from Python 3.13 on).
_NEST_PHRASES = {413: "Payload Too Large"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    phrase = _NEST_PHRASES.get(status) or HTTPStatus(status).phrase
    return JSONResponse({"statusCode": status, "message": message, "error": phrase}, status, headers=headers)


#: The most windows a rate limiter holds: past it (ids made up faster than windows end), the oldest goes.
MAX_WINDOWS = 10_000


class RateLimiter:
    """Fixed one-minute windows, one per key, like the hosted throttling: one key for every
    authenticated call (the global tier), or one per customer (its limit on tracks). At most
    :data:`MAX_WINDOWS`: a caller naming a new customer every call (any id: the limit comes before
    the customer is looked up) lets go of the oldest window, never grows the process."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError(f"rate limit must be at least 1 request/min, got {per_minute}")
        self.per_minute = per_minute
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # key -> start, calls; in the order they started

    def hit(self, key: str = "") -> tuple[bool, dict[str, str]]:
        """Count one call of ``key``; return whether it is allowed and the ``X-RateLimit-*`` headers."""
        now = self._clock()
        while self._windows:  # the windows that ended, oldest first: a key is held a minute at most
            oldest = next(iter(self._windows))
            if now - self._windows[oldest][0] < 60:
                break
            del self._windows[oldest]
        start, count = self._windows.get(key, (now, 0))
        if count == 0 and len(self._windows) >= MAX_WINDOWS:
            del self._windows[next(iter(self._windows))]
        reset = max(1, math.ceil(60 - (now - start)))  # (not start + 60 - now: its rounding made 61 of a new window)
        allowed = count < self.per_minute
        if allowed:
            count += 1
        self._windows[key] = (start, count)
        headers = {
            "X-RateLimit-Limit": str(self.per_minute),
            "X-RateLimit-Remaining": str(self.per_minute - count),
            "X-RateLimit-Reset": str(reset),
        }
        if not allowed:
            headers["Retry-After"] = str(reset)
        return allowed, headers


def _reject_constant(name: str) -> Any:
    raise ValidationError(f"Invalid JSON: {name} is not a valid number")


def _expires_in(value: Any) -> Any:
    """``expiresIn`` as the reference service reads it: null is absent (NestJS's @IsOptional), and
    JavaScript does not tell 3600.0 from 3600; anything else is left to LocalBilling to check."""
    if value is None:
        return 3600
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


async def _json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, read with a size cap (empty unless sent as JSON).

    Too large is a billing error like any other bad input, so its 413 carries the rate-limit headers too."""
    too_large = ValidationError(f"Request body is larger than {MAX_BODY_BYTES} bytes", status=413)
    declared = request.headers.get("content-length")
    length = None if declared is None else content_length(declared)  # (none readable: the read is capped)
    if length is not None and length > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
    except ClientDisconnect:  # bad input like any other: nobody reads the answer, nor a traceback in the log
        raise ValidationError("The client disconnected before sending the whole body") from None
    if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
        return {}  # the reference service parses JSON bodies only: another reaches its handler empty
    if not body:
        return {}  # as its body parser (Express's) takes an empty JSON body: a common client mistake
    try:  # UTF-8 (a BOM dropped) as Express reads it by default: json.loads would guess UTF-16 and -32 too
        data = json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ValidationError("Invalid JSON body: not UTF-8") from None
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError(f"Invalid JSON body: {exc}") from None
    except RecursionError:
        raise ValidationError("Invalid JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValidationError("Request body must be a JSON object")
    return data


def _missing(value: object) -> bool:
    """Missing as the reference server tests it (``!value`` in JavaScript): absent, null, "", 0 or
    false; an empty list or object is there (and refused for its type)."""
    return not value and not isinstance(value, list | dict)


def _query(request: Request, name: str) -> str | None:
    """A query parameter given at most once: a repeated one is an array to the reference service,
    refused as not a string (taking one of them would act on a customer the caller may not mean).

    Bytes that are not UTF-8 once percent-decoded (``%ff``) are refused too: Starlette would turn
    them into U+FFFD and look up a customer nobody named."""
    query = request.scope["query_string"].decode("utf-8", "surrogateescape")
    pairs = parse_qsl(query, keep_blank_values=True, errors="surrogateescape")
    values: list[str] = [value for key, value in pairs if key == name]
    if len(values) > 1:
        raise ValidationError(f"{name} must be a string, given {len(values)} times")
    if not values:
        return None
    try:
        values[0].encode()
    except UnicodeEncodeError:  # the surrogates that stand for bytes that are not UTF-8
        raise ValidationError(f"{name} is not UTF-8 text once percent-decoded") from None
    return values[0]


def _original_url(request: Request) -> str:
    """The request target as sent, percent-encoded and with its query: Express's ``originalUrl``,
    which NestJS names in its 404 message."""
    path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    query: bytes = request.scope["query_string"]
    return (path + b"?" + query if query else path).decode("latin-1")


class _OneTrailingSlash:
    """Route ``/v1/usage/check/`` as ``/v1/usage/check``, as Express (so NestJS) does by default,
    where Starlette would answer a bare 307 redirect that an HTTP client does not follow."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path[:-1]}
        await self.app(scope, receive, send)


def create_app(
    billing: LocalBilling,
    *,
    secret_key: str = DEFAULT_SECRET_KEY,
    rate_limit: int | None = None,
    track_rate_limit: int | None = None,
) -> Starlette:
    """A Starlette app answering the BillingOS API for ``billing``, accepting only ``secret_key``.

    ``rate_limit``: calls a minute in all, as the hosted global tier; ``track_rate_limit``: tracks
    a minute per customer, as its limit on ``POST /v1/usage/track``. A call either refuses is
    answered 429 with its ``X-RateLimit-*`` headers; one both allow, with the global tier's.
    """
    if not secret_key.startswith("sk_"):
        raise ValueError("secret_key must start with 'sk_'")
    expected = f"Bearer {secret_key}".encode()
    limiter = None if rate_limit is None else RateLimiter(rate_limit)
    track_limiter = None if track_rate_limit is None else RateLimiter(track_rate_limit)

    def endpoint(handler: Endpoint) -> Endpoint:
        """Authenticate, throttle, and turn billing errors into NestJS-style answers."""

        async def wrapped(request: Request) -> Response:
            header = request.headers.get("authorization", "")
            if not header.startswith("Bearer sk_"):
                return error_response(401, "Missing or invalid authorization header")
            if not hmac.compare_digest(header.encode(), expected):
                return error_response(401, "Invalid API key")
            headers: dict[str, str] = {}
            if limiter is not None:
                allowed, headers = limiter.hit()
                if not allowed:
                    return error_response(429, THROTTLED, headers)
            try:
                response = await handler(request)
            except BillingOSError as exc:
                status = exc.status or 400
                if status >= 500:  # the billing database failed: the operator needs to know why
                    logger.warning("local BillingOS server: %s %s: %s", request.method, request.url.path, exc.message)
                retry = {} if exc.retry_after is None else {"Retry-After": str(math.ceil(exc.retry_after))}
                response = error_response(status, exc.message, retry)
            if response.status_code != 429:  # (a customer's refusal keeps its own tier's headers)
                # The global tier's, else a track's customer's: on its error answers too (it was counted).
                response.headers.update(headers or getattr(request.state, "customer_limits", {}))
            return response

        return wrapped

    @endpoint
    async def track(request: Request) -> Response:
        data = await _json_object(request)
        customer = data.get("customer_id")
        if track_limiter is not None and isinstance(customer, str) and len(customer) <= MAX_ID_LENGTH:  # (a guard)
            allowed, limits = track_limiter.hit(customer)  # (a longer id is refused below, and held in no window)
            if not allowed:
                return error_response(429, THROTTLED, limits)
            request.state.customer_limits = limits
        if any(_missing(data.get(key)) for key in ("customer_id", "feature_key", "quantity")):
            raise ValidationError("customer_id, feature_key, and quantity are required")
        # LocalBilling checks every field's type and range before anything is recorded.
        result = await billing.track_usage(
            data["customer_id"],
            data["feature_key"],
            data["quantity"],
            idempotency_key=data.get("idempotency_key"),
            metadata=data.get("metadata"),
        )
        return JSONResponse(_wire.track_result_to_json(result), 201)

    @endpoint
    async def check(request: Request) -> Response:
        customer_id = _query(request, "customer_id")
        feature_key = _query(request, "feature_key")
        if not customer_id or not feature_key:
            raise ValidationError("customer_id and feature_key are required")
        entitlement = await billing.check_entitlement(customer_id, feature_key)
        return JSONResponse(_wire.entitlement_to_json(entitlement))

    @endpoint
    async def metrics(request: Request) -> Response:
        customer_id = _query(request, "customer_id")
        if not customer_id:
            raise ValidationError("customer_id is required")
        feature_key = _query(request, "feature_key") or None
        return JSONResponse(_wire.metrics_to_json(await billing.get_usage_metrics(customer_id, feature_key)))

    @endpoint
    async def session_token(request: Request) -> Response:
        data = await _json_object(request)
        if data.get("externalUserId") is None:
            raise ValidationError("externalUserId is required")
        token = await billing.create_session_token(
            data["externalUserId"],
            external_organization_id=data.get("externalOrganizationId"),
            expires_in=_expires_in(data.get("expiresIn")),
            allowed_operations=data.get("allowedOperations"),
            metadata=data.get("metadata"),
        )
        return JSONResponse(_wire.session_token_to_json(token), 201)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        if status in (404, 405):  # NestJS answers an unknown method or path the same way
            return error_response(404, f"Cannot {request.method} {_original_url(request)}")
        return error_response(status, str(getattr(exc, "detail", "")))

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("local BillingOS server failed on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await billing.aclose()

    app = Starlette(
        routes=[
            Route("/v1/usage/track", track, methods=["POST"]),
            Route("/v1/usage/check", check, methods=["GET"]),
            Route("/v1/usage/metrics", metrics, methods=["GET"]),
            Route("/v1/session-tokens", session_token, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=[Middleware(_OneTrailingSlash)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a second trailing slash is unknown to Express too: 404
    return app
