"""Unit tests of the async HTTP client ``BillingOS`` against an ``httpx.MockTransport``.

Every request the transport sees is recorded, and ``billingos_asgi.client._sleep`` is replaced so
that retries never really sleep and their delays can be asserted.
"""

from __future__ import annotations

import json
import logging
import math
import re
import types
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

import billingos_asgi._logging as _logging
import billingos_asgi.client as client_module
from billingos_asgi import (
    AuthenticationError,
    BillingOS,
    BillingOSError,
    CustomerNotFoundError,
    Entitlement,
    InvalidResponseError,
    NetworkError,
    NotFoundError,
    QuotaExceededError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    SessionToken,
    TrackUsageResult,
    UsageMetric,
    UsageMetrics,
    UsageSnapshot,
    ValidationError,
)
from billingos_asgi._wire import track_result_to_json

SECRET = "sk_test_abc"
BASE_URL = "http://billing.test"
UTC = timezone.utc

Answer = Callable[[httpx.Request], httpx.Response]


# -- fake server --------------------------------------------------------------------------------


def respond(status: int = 200, json_body: Any = None, *, text: str | None = None, headers: Any = None) -> Answer:
    """An answer that builds a fresh response for every request."""

    def answer(request: httpx.Request) -> httpx.Response:
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=json_body, headers=headers)

    return answer


def fail_with(exc_type: type[httpx.TransportError], message: str = "boom") -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise exc_type(message, request=request)

    return answer


class FakeServer:
    """Plays a script of answers (the last one repeats) and records every request."""

    def __init__(self, *answers: Answer) -> None:
        assert answers
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        index = min(len(self.requests), len(self.answers) - 1)
        self.requests.append(request)
        return self.answers[index](request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    @property
    def bodies(self) -> list[Any]:
        return [json.loads(request.content) for request in self.requests]

    @property
    def attempts(self) -> int:
        return len(self.requests)


def make_client(server: FakeServer, retry: RetryPolicy | None = None, **kwargs: Any) -> BillingOS:
    kwargs.setdefault("secret_key", SECRET)
    kwargs.setdefault("base_url", BASE_URL)
    return BillingOS(transport=server.transport, retry=retry or RetryPolicy(), **kwargs)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BILLINGOS_SECRET_KEY", raising=False)
    monkeypatch.delenv("BILLINGOS_API_URL", raising=False)


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(client_module, "_sleep", fake_sleep)
    return recorded


# -- canned bodies ------------------------------------------------------------------------------

TRACK_BODY: dict[str, Any] = {
    "success": True,
    "feature_key": "api_calls",
    "quantity": 5,
    "recorded_at": "2025-01-15T10:30:00.123Z",
    "usage": {
        "consumed_units": 15,
        "limit_units": 100,
        "remaining_units": 85,
        "period_start": "2025-01-01T00:00:00.000Z",
        "period_end": "2025-02-01T00:00:00.000Z",
    },
}

TRACK_RESULT = TrackUsageResult(
    success=True,
    feature_key="api_calls",
    quantity=5.0,
    recorded_at=datetime(2025, 1, 15, 10, 30, 0, 123000, tzinfo=UTC),
    usage=UsageSnapshot(
        consumed_units=15.0,
        limit_units=100.0,
        remaining_units=85.0,
        period_start=datetime(2025, 1, 1, tzinfo=UTC),
        period_end=datetime(2025, 2, 1, tzinfo=UTC),
    ),
)

CHECK_BODY = {
    "feature_key": "api_calls",
    "has_access": True,
    "limit": 100,
    "usage": 15,
    "metadata": {"remaining": 85, "resets_at": "2025-02-01T00:00:00.000Z", "type": "usage_quota"},
}

METRIC_ITEM = {
    "feature_key": "api_calls",
    "feature_title": "API calls",
    "product_name": "Free",
    "consumed": 15,
    "limit": 100,
    "remaining": 85,
    "percentage_used": 15,
    "period_start": "2025-01-01T00:00:00.000Z",
    "period_end": "2025-02-01T00:00:00.000Z",
    "resets_in_days": 17,
}

METRICS_BODY = {"metrics": [METRIC_ITEM], "customer_id": "user_123"}

SESSION_BODY = {"sessionToken": "st_abcdef", "expiresAt": "2025-01-15T11:30:00.000Z"}


def nest_error(status: int, message: Any, error: str = "Bad Request") -> dict[str, Any]:
    return {"statusCode": status, "message": message, "error": error}


def with_changes(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**body, **changes}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


# -- wire format --------------------------------------------------------------------------------


async def test_track_sends_post_with_json_body_and_bearer_auth() -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        result = await billing.track_usage(
            "user_123", "api_calls", 5, idempotency_key="req-1:api_calls", metadata={"route": "/v1/search"}
        )
    assert server.attempts == 1
    request = server.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "http://billing.test/v1/usage/track"
    assert request.headers["Authorization"] == "Bearer sk_test_abc"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert server.bodies[0] == {
        "customer_id": "user_123",
        "feature_key": "api_calls",
        "quantity": 5,
        "idempotency_key": "req-1:api_calls",
        "metadata": {"route": "/v1/search"},
    }
    assert result == TRACK_RESULT


async def test_track_without_metadata_omits_it() -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        await billing.track_usage("user_123", "storage_gb", 2.5, idempotency_key="k1")
    assert server.bodies[0] == {
        "customer_id": "user_123",
        "feature_key": "storage_gb",
        "quantity": 2.5,
        "idempotency_key": "k1",
    }


async def test_track_sends_decimal_quantity_as_json_number() -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        await billing.track_usage("user_123", "storage_gb", Decimal("1.25"), idempotency_key="k1")  # type: ignore[arg-type]
    assert server.bodies[0]["quantity"] == 1.25
    assert b'"quantity":1.25' in server.requests[0].content.replace(b" ", b"")


async def test_track_sends_metadata_given_as_any_mapping() -> None:
    """The signature takes a Mapping: a read-only one is not refused as "not JSON-serialisable"."""
    server = FakeServer(respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        metadata = types.MappingProxyType({"route": "/v1/search"})
        await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k1", metadata=metadata)
    assert server.bodies[0]["metadata"] == {"route": "/v1/search"}


async def test_track_without_idempotency_key_generates_a_unique_one() -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        await billing.track_usage("user_123", "api_calls", 1)
        await billing.track_usage("user_123", "api_calls", 1)
    first, second = (body["idempotency_key"] for body in server.bodies)
    assert isinstance(first, str) and isinstance(second, str)
    assert len(first) >= 16
    assert first != second


async def test_check_sends_get_with_query_params() -> None:
    server = FakeServer(respond(200, CHECK_BODY))
    async with make_client(server) as billing:
        entitlement = await billing.check_entitlement("user_123", "api_calls")
    request = server.requests[0]
    assert request.method == "GET"
    assert request.url.path == "/v1/usage/check"
    assert dict(request.url.params) == {"customer_id": "user_123", "feature_key": "api_calls"}
    assert request.headers["Authorization"] == "Bearer sk_test_abc"
    assert request.content == b""
    assert entitlement == Entitlement(
        feature_key="api_calls",
        has_access=True,
        reason=None,
        limit=100.0,
        usage=15.0,
        remaining=85.0,
        resets_at=datetime(2025, 2, 1, tzinfo=UTC),
        type="usage_quota",
    )


async def test_check_encodes_special_characters_in_query() -> None:
    server = FakeServer(respond(200, CHECK_BODY))
    async with make_client(server) as billing:
        await billing.check_entitlement("user 1&feature_key=x", "api/calls?")
    params = server.requests[0].url.params
    assert params.get_list("customer_id") == ["user 1&feature_key=x"]
    assert params.get_list("feature_key") == ["api/calls?"]


async def test_check_denied_with_null_metadata() -> None:
    body = {"feature_key": "export", "has_access": False, "reason": "no_active_subscription", "limit": None}
    body |= {"usage": None, "metadata": None}
    server = FakeServer(respond(200, body))
    async with make_client(server) as billing:
        entitlement = await billing.check_entitlement("user_123", "export")
    assert entitlement == Entitlement(feature_key="export", has_access=False, reason="no_active_subscription")


async def test_check_parses_numbers_given_as_strings() -> None:
    body = {
        "feature_key": "storage_gb",
        "has_access": True,
        "limit": "10.000000",
        "usage": "2.500000",
        "metadata": {"remaining": "7.500000", "resets_at": "2025-02-01T00:00:00Z", "type": "usage_quota"},
    }
    server = FakeServer(respond(200, body))
    async with make_client(server) as billing:
        entitlement = await billing.check_entitlement("user_123", "storage_gb")
    assert entitlement.limit == 10.0
    assert entitlement.usage == 2.5
    assert entitlement.remaining == 7.5
    assert entitlement.resets_at == datetime(2025, 2, 1, tzinfo=UTC)


async def test_timestamps_past_the_first_or_last_utc_datetime_are_clamped_to_it() -> None:
    """An offset hours past either end of time: no UTC datetime holds it, and whatever formatted it
    next failed (the usage endpoints answered 500, and cached the answer that made them)."""
    body = with_changes(
        TRACK_BODY,
        recorded_at="0001-01-01T00:00:00+01:00",
        usage=with_changes(TRACK_BODY["usage"], period_end="9999-12-31T23:59:59-23:59"),
    )
    server = FakeServer(respond(201, body))
    async with make_client(server) as billing:
        result = await billing.track_usage("user_123", "api_calls", 5, idempotency_key="k")
    first, last = datetime.min.replace(tzinfo=timezone.utc), datetime.max.replace(tzinfo=timezone.utc)
    assert (result.recorded_at, result.usage.period_end) == (first, last)
    assert track_result_to_json(result)["recorded_at"] == "0001-01-01T00:00:00.000Z"  # (strftime: "1-01-01...")
    assert track_result_to_json(result)["usage"]["period_end"] == "9999-12-31T23:59:59.999Z"


async def test_track_parses_string_numbers_and_z_timestamps_as_aware_utc() -> None:
    body = with_changes(
        TRACK_BODY,
        quantity="5.000000",
        usage={
            "consumed_units": "15.000000",
            "limit_units": None,
            "remaining_units": None,
            "period_start": "2025-01-01T00:00:00Z",
            "period_end": "2025-02-01T00:00:00.000Z",
        },
    )
    server = FakeServer(respond(201, body))
    async with make_client(server) as billing:
        result = await billing.track_usage("user_123", "api_calls", 5, idempotency_key="k")
    assert result.quantity == 5.0
    assert result.usage.consumed_units == 15.0
    assert result.usage.limit_units is None
    assert result.usage.remaining_units is None
    for moment in (result.recorded_at, result.usage.period_start, result.usage.period_end):
        assert moment.tzinfo is not None
        assert moment.utcoffset() == timedelta(0)
    assert result.recorded_at == datetime(2025, 1, 15, 10, 30, 0, 123000, tzinfo=UTC)


async def test_metrics_sends_get_without_feature_key() -> None:
    server = FakeServer(respond(200, METRICS_BODY))
    async with make_client(server) as billing:
        metrics = await billing.get_usage_metrics("user_123")
    request = server.requests[0]
    assert request.method == "GET"
    assert request.url.path == "/v1/usage/metrics"
    assert dict(request.url.params) == {"customer_id": "user_123"}
    assert metrics == UsageMetrics(
        customer_id="user_123",
        metrics=(
            UsageMetric(
                feature_key="api_calls",
                feature_title="API calls",
                product_name="Free",
                consumed=15.0,
                limit=100.0,
                remaining=85.0,
                percentage_used=15,
                period_start=datetime(2025, 1, 1, tzinfo=UTC),
                period_end=datetime(2025, 2, 1, tzinfo=UTC),
                resets_in_days=17,
            ),
        ),
    )


async def test_metrics_sends_feature_key_and_parses_string_numbers() -> None:
    item = with_changes(
        METRIC_ITEM, consumed="1.500000", limit=None, remaining=None, percentage_used="0", resets_in_days="3"
    )
    server = FakeServer(respond(200, {"metrics": [item], "customer_id": "user_123"}))
    async with make_client(server) as billing:
        metrics = await billing.get_usage_metrics("user_123", feature_key="storage_gb")
    assert dict(server.requests[0].url.params) == {"customer_id": "user_123", "feature_key": "storage_gb"}
    (metric,) = metrics.metrics
    assert metric.consumed == 1.5
    assert metric.limit is None
    assert metric.remaining is None
    assert metric.percentage_used == 0
    assert isinstance(metric.percentage_used, int)
    assert metric.resets_in_days == 3
    assert isinstance(metric.resets_in_days, int)


async def test_metrics_empty_list() -> None:
    server = FakeServer(respond(200, {"metrics": [], "customer_id": "user_9"}))
    async with make_client(server) as billing:
        metrics = await billing.get_usage_metrics("user_9")
    assert metrics == UsageMetrics(customer_id="user_9", metrics=())


async def test_session_token_minimal_payload() -> None:
    server = FakeServer(respond(201, SESSION_BODY))
    async with make_client(server) as billing:
        token = await billing.create_session_token("ext_user_1")
    request = server.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "http://billing.test/v1/session-tokens"
    assert request.headers["Authorization"] == "Bearer sk_test_abc"
    assert server.bodies[0] == {"externalUserId": "ext_user_1", "expiresIn": 3600}
    assert token == SessionToken(token="st_abcdef", expires_at=datetime(2025, 1, 15, 11, 30, tzinfo=UTC))
    assert "st_abcdef" not in repr(token)


async def test_session_token_full_payload() -> None:
    server = FakeServer(respond(201, SESSION_BODY))
    async with make_client(server) as billing:
        await billing.create_session_token(
            "ext_user_1",
            external_organization_id="org_1",
            expires_in=60,
            allowed_operations=("read", "track"),
            metadata={"plan": "pro"},
        )
    assert server.bodies[0] == {
        "externalUserId": "ext_user_1",
        "expiresIn": 60,
        "externalOrganizationId": "org_1",
        "allowedOperations": ["read", "track"],
        "metadata": {"plan": "pro"},
    }


@pytest.mark.parametrize("expires_in", [60, 86400])
async def test_session_token_expires_in_bounds_accepted(expires_in: int) -> None:
    server = FakeServer(respond(201, SESSION_BODY))
    async with make_client(server) as billing:
        await billing.create_session_token("ext_user_1", expires_in=expires_in)
    assert server.bodies[0]["expiresIn"] == expires_in


# -- retries ------------------------------------------------------------------------------------


async def test_503_then_200_retries_with_same_generated_idempotency_key(sleeps: list[float]) -> None:
    server = FakeServer(
        respond(503, nest_error(503, "Service Unavailable", "Service Unavailable")), respond(201, TRACK_BODY)
    )
    async with make_client(server) as billing:
        result = await billing.track_usage("user_123", "api_calls", 5)
    assert result == TRACK_RESULT
    assert server.attempts == 2
    first, second = server.bodies
    assert first == second
    assert first["idempotency_key"] == second["idempotency_key"]
    assert len(sleeps) == 1


async def test_a_408_is_a_timeout_retried_under_the_same_key(sleeps: list[float]) -> None:
    server = FakeServer(respond(408, nest_error(408, "Request Timeout", "Request Timeout")), respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        assert await billing.track_usage("user_123", "api_calls", 5) == TRACK_RESULT
    first, second = server.bodies
    assert server.attempts == 2 and first["idempotency_key"] == second["idempotency_key"]


async def test_a_body_that_does_not_decode_is_an_invalid_response() -> None:
    server = FakeServer(respond(201, text="not gzip at all", headers={"content-encoding": "gzip"}))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError, match="does not decode"):
            await billing.track_usage("user_123", "api_calls", 5)


@pytest.mark.parametrize("field", ["customer_id", "feature_key", "idempotency_key"])
async def test_a_lone_surrogate_in_an_id_is_refused_before_any_call(field: str) -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    arguments: dict[str, Any] = {
        "customer_id": "user_123",
        "feature_key": "api_calls",
        "idempotency_key": "k1",
        field: "a\ud800",
    }
    async with make_client(server) as billing:
        with pytest.raises(ValidationError, match=f"{field} is not valid Unicode"):
            await billing.track_usage(quantity=1, **arguments)
    assert server.attempts == 0


@pytest.mark.parametrize("metadata", [{"route": "a\ud800"}, {"\udc80": 1}, {"nested": ["\udfff"]}])
async def test_a_lone_surrogate_in_metadata_is_refused_before_any_call(metadata: dict[str, Any]) -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        with pytest.raises(ValidationError, match="metadata is not valid Unicode"):
            await billing.track_usage("user_123", "api_calls", 1, metadata=metadata)
        with pytest.raises(ValidationError, match="metadata is not valid Unicode"):
            await billing.create_session_token("user_123", metadata=metadata)
    assert server.attempts == 0


DEEP_JSON = "[" * 100_000 + "]" * 100_000


async def test_a_success_body_nested_too_deeply_is_an_invalid_response() -> None:
    server = FakeServer(respond(200, text=DEEP_JSON))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert caught.value.status == 200 and caught.value.body == DEEP_JSON[:2000]


async def test_an_error_body_nested_too_deeply_keeps_its_text(sleeps: list[float]) -> None:
    server = FakeServer(respond(400, text=DEEP_JSON))
    async with make_client(server) as billing:
        with pytest.raises(ValidationError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert caught.value.status == 400 and caught.value.message == "BillingOS answered 400 Bad Request"
    assert caught.value.body == DEEP_JSON[:2000]


async def test_retry_keeps_caller_idempotency_key() -> None:
    server = FakeServer(respond(500, nest_error(500, "oops", "Internal Server Error")), respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        await billing.track_usage("user_123", "api_calls", 5, idempotency_key="evt-42")
    assert [body["idempotency_key"] for body in server.bodies] == ["evt-42", "evt-42"]


@pytest.mark.parametrize(("value", "seconds"), [("7", 7.0), (" 7 ", 7.0), ("2.5", 2.5)])
async def test_429_with_retry_after_seconds_sleeps_exactly_that(
    sleeps: list[float], value: str, seconds: float
) -> None:
    server = FakeServer(
        respond(429, nest_error(429, "Too Many Requests", "Too Many Requests"), headers={"Retry-After": value}),
        respond(200, CHECK_BODY),
    )
    async with make_client(server) as billing:
        entitlement = await billing.check_entitlement("user_123", "api_calls")
    assert entitlement.has_access is True
    assert server.attempts == 2
    assert sleeps == [seconds]


async def test_a_retry_after_repeated_by_a_proxy_is_honoured(sleeps: list[float]) -> None:
    """httpx joins repeated headers ("7, 7"), which read as no Retry-After: retried in a second."""
    repeated = httpx.Headers([("Retry-After", "7"), ("Retry-After", "7")])
    server = FakeServer(respond(429, nest_error(429, "Too Many Requests"), headers=repeated), respond(200, CHECK_BODY))
    async with make_client(server) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert sleeps == [7.0]


async def test_a_servers_long_error_message_is_cut_as_a_text_body_is() -> None:
    """A JSON message of megabytes was kept whole, and logged whole with every retry."""
    server = FakeServer(respond(400, nest_error(400, "x" * 1_000_000)))
    async with make_client(server) as billing:
        with pytest.raises(BillingOSError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert len(caught.value.message) == 2000


async def test_an_oserror_past_a_custom_transport_is_a_network_error_retried_and_masked(sleeps: list[float]) -> None:
    """An app's own transport may raise the socket's or TLS's OSError itself, past httpx: it escaped
    raw, after one attempt, with whatever it quoted (the key included)."""

    def answer(request: httpx.Request) -> httpx.Response:
        raise ConnectionResetError(f"reset while sending {request.headers['authorization']}")

    server = FakeServer(answer)
    async with make_client(server) as billing:
        with pytest.raises(NetworkError) as caught:
            await billing.track_usage("user_123", "api_calls", 1)
    assert server.attempts == 4 and SECRET not in str(caught.value) and "ConnectionResetError" in str(caught.value)


async def test_429_with_http_date_retry_after_is_honoured(sleeps: list[float]) -> None:
    moment = datetime.now(UTC) + timedelta(seconds=30)
    server = FakeServer(
        respond(
            429, nest_error(429, "Too Many Requests"), headers={"Retry-After": format_datetime(moment, usegmt=True)}
        ),
        respond(200, CHECK_BODY),
    )
    async with make_client(server) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 2
    assert len(sleeps) == 1
    assert 27.0 <= sleeps[0] <= 30.5


@pytest.mark.parametrize("value", ["0", "-5", "-inf", "Wed, 21 Oct 2015 07:28:00 GMT"])
async def test_a_retry_after_of_no_wait_still_waits_the_backoff(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], value: str
) -> None:
    """Zero, negative or a date already past: never back-to-back retries, but the jittered backoff."""
    monkeypatch.setattr(client_module, "random", types.SimpleNamespace(uniform=lambda a, b: b))
    server = FakeServer(
        respond(429, nest_error(429, "Too Many Requests"), headers={"Retry-After": value}), respond(200, CHECK_BODY)
    )
    async with make_client(server, RetryPolicy(backoff_base=0.5)) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 2
    assert sleeps == [0.5]


@pytest.mark.parametrize("value", ["nan", "inf", "1e999", "1e3", "1_000", "+5", "5s", "0x10"])
async def test_a_retry_after_that_is_not_delta_seconds_is_ignored(sleeps: list[float], value: str) -> None:
    """RFC 9110's delta-seconds are digits: what float() reads besides ("1_000", a thousand seconds,
    beyond max_retry_after) would turn a retryable answer into a failure at once."""
    server = FakeServer(
        respond(429, nest_error(429, "Too Many Requests"), headers={"Retry-After": value}), respond(200, CHECK_BODY)
    )
    async with make_client(server) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 2
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.25  # the first backoff step, as without the header


@pytest.mark.parametrize(
    "value", ["Fri, 99999999999999999999 Dec 2024 07:28:00 GMT", "Fri, 31 Dec 2024 99999999999999999999:00:00 GMT"]
)
async def test_a_date_retry_after_with_an_out_of_range_number_is_ignored(sleeps: list[float], value: str) -> None:
    """email.utils raises OverflowError on such a date: it is a header to ignore, not a crash of the call."""
    server = FakeServer(
        respond(429, nest_error(429, "Too Many Requests"), headers={"Retry-After": value}), respond(200, CHECK_BODY)
    )
    async with make_client(server) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 2
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.25  # the first backoff step, as without the header


@pytest.mark.parametrize("value", ["9" * 400, "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_an_infinite_retry_after_is_too_long_to_wait(sleeps: list[float], value: str) -> None:
    server = FakeServer(
        respond(429, nest_error(429, "Too Many Requests"), headers={"Retry-After": value}), respond(200, CHECK_BODY)
    )
    async with make_client(server) as billing:
        with pytest.raises(RateLimitError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 1 and sleeps == []
    assert caught.value.retry_after == 365 * 24 * 3600  # a year: still a number user code can use


async def test_retry_after_above_max_fails_at_once(sleeps: list[float]) -> None:
    body = nest_error(429, "Too Many Requests", "Too Many Requests")
    server = FakeServer(respond(429, body, headers={"Retry-After": "120"}), respond(200, CHECK_BODY))
    async with make_client(server, RetryPolicy(max_retries=3, max_retry_after=60)) as billing:
        with pytest.raises(RateLimitError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 1
    assert sleeps == []
    assert caught.value.retry_after == 120.0
    assert caught.value.status == 429
    assert caught.value.body == body
    assert caught.value.message == "Too Many Requests"


async def test_429_every_time_gives_up_with_rate_limit_error(sleeps: list[float]) -> None:
    server = FakeServer(respond(429, nest_error(429, "Too Many Requests"), headers={"Retry-After": "2"}))
    async with make_client(server, RetryPolicy(max_retries=2)) as billing:
        with pytest.raises(RateLimitError) as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert server.attempts == 3
    assert sleeps == [2.0, 2.0]
    assert caught.value.retry_after == 2.0


async def test_a_budgeted_client_leaves_a_429_to_its_budget_and_retries_a_503(sleeps: list[float]) -> None:
    """Under the middleware's budget the 429 goes up at once (the budget pauses every call for
    it); a 5xx is still retried here, after the budget's hook."""
    hooked: list[str] = []

    async def before_retry(path: str) -> None:
        hooked.append(path)

    throttled = respond(429, nest_error(429, "Too Many Requests"), headers={"Retry-After": "2"})
    server = FakeServer(throttled, respond(503, nest_error(503, "Service Unavailable")), respond(200, CHECK_BODY))
    async with make_client(server) as billing:
        budgeted = billing.budgeted(before_retry)
        with pytest.raises(RateLimitError) as caught:
            await budgeted.check_entitlement("user_123", "api_calls")
        assert (server.attempts, sleeps, hooked, caught.value.retry_after) == (1, [], [], 2.0)
        await budgeted.check_entitlement("user_123", "api_calls")
    assert server.attempts == 3 and hooked == ["/v1/usage/check"] and len(sleeps) == 1


async def test_a_reason_phrase_echoing_the_key_is_masked(sleeps: list[float], caplog: pytest.LogCaptureFixture) -> None:
    """A proxy that echoes the Authorization header in its status line: no body message to use."""
    reason = {"reason_phrase": f"Bearer {SECRET}".encode()}
    server = FakeServer(lambda request: httpx.Response(502, content=b"", extensions=reason))
    async with make_client(server, RetryPolicy(max_retries=1)) as billing:
        with pytest.raises(ServerError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert caught.value.message == "BillingOS answered 502 Bearer sk_***"
    assert SECRET not in repr(caught.value) and SECRET not in caplog.text


async def test_429_without_retry_after_uses_backoff(sleeps: list[float]) -> None:
    server = FakeServer(respond(429, nest_error(429, "Too Many Requests")), respond(200, CHECK_BODY))
    async with make_client(server, RetryPolicy(max_retries=3, backoff_base=0.5, backoff_max=8)) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 2
    assert len(sleeps) == 1
    assert 0.0 <= sleeps[0] <= 0.5


async def test_503_with_retry_after_is_honoured(sleeps: list[float]) -> None:
    """RFC 9110 and SPEC section 6: Retry-After is honoured on 5xx (503) too, not just 429."""
    server = FakeServer(
        respond(503, nest_error(503, "Service Unavailable"), headers={"Retry-After": "4"}),
        respond(200, CHECK_BODY),
    )
    async with make_client(server) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 2
    assert sleeps == [4.0]


async def test_timeout_on_every_attempt_raises_network_error(sleeps: list[float]) -> None:
    server = FakeServer(fail_with(httpx.ReadTimeout, "read timed out"))
    async with make_client(server, RetryPolicy(max_retries=3)) as billing:
        with pytest.raises(NetworkError) as caught:
            await billing.track_usage("user_123", "api_calls", 3)
    assert server.attempts == 4
    assert len(sleeps) == 3
    keys = {body["idempotency_key"] for body in server.bodies}
    assert len(keys) == 1
    assert len(server.bodies) == 4
    assert caught.value.status is None
    assert "timed out (ReadTimeout)" in str(caught.value)


async def test_timeout_then_success_returns_result() -> None:
    server = FakeServer(fail_with(httpx.ConnectTimeout), respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        result = await billing.track_usage("user_123", "api_calls", 5, idempotency_key="k")
    assert result == TRACK_RESULT
    assert server.attempts == 2


async def test_connect_error_raises_network_error(sleeps: list[float]) -> None:
    server = FakeServer(fail_with(httpx.ConnectError, "connection refused"))
    async with make_client(server, RetryPolicy(max_retries=2)) as billing:
        with pytest.raises(NetworkError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 3
    assert len(sleeps) == 2
    assert caught.value.status is None
    assert "ConnectError" in str(caught.value)


@pytest.mark.parametrize("exc_type", [httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError])
async def test_other_transport_errors_raise_network_error(
    sleeps: list[float], exc_type: type[httpx.TransportError]
) -> None:
    server = FakeServer(fail_with(exc_type, "connection reset"))
    async with make_client(server, RetryPolicy(max_retries=1)) as billing:
        with pytest.raises(NetworkError) as caught:
            await billing.get_usage_metrics("user_123")
    assert server.attempts == 2
    assert len(sleeps) == 1
    assert f"{exc_type.__name__}: connection reset" in str(caught.value)
    assert caught.value.__cause__ is None  # a transport error's text may quote the request's headers


async def test_non_json_502_every_attempt_raises_server_error(sleeps: list[float]) -> None:
    server = FakeServer(respond(502, text="<html>bad gateway</html>"))
    async with make_client(server, RetryPolicy(max_retries=3)) as billing:
        with pytest.raises(ServerError) as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert server.attempts == 4
    assert len(sleeps) == 3
    assert caught.value.status == 502
    assert caught.value.body == "<html>bad gateway</html>"
    assert "502" in caught.value.message


async def test_max_retries_zero_means_one_attempt(sleeps: list[float]) -> None:
    server = FakeServer(respond(503, nest_error(503, "down")))
    async with make_client(server, RetryPolicy(max_retries=0)) as billing:
        with pytest.raises(ServerError):
            await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 1
    assert sleeps == []


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "Feature is not a usage quota type"), (401, "Invalid API key"), (404, "No active subscription"), (422, "x")],
)
async def test_client_errors_are_never_retried(sleeps: list[float], status: int, message: str) -> None:
    server = FakeServer(respond(status, nest_error(status, message)), respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        with pytest.raises(BillingOSError):
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert server.attempts == 1
    assert sleeps == []


async def test_backoff_delays_use_full_jitter_bounds(monkeypatch: pytest.MonkeyPatch, sleeps: list[float]) -> None:
    calls: list[tuple[float, float]] = []

    def upper(a: float, b: float) -> float:
        calls.append((a, b))
        return b

    monkeypatch.setattr(client_module, "random", types.SimpleNamespace(uniform=upper))
    server = FakeServer(respond(503, nest_error(503, "down")))
    policy = RetryPolicy(max_retries=5, backoff_base=0.5, backoff_max=3.0)
    async with make_client(server, policy) as billing:
        with pytest.raises(ServerError):
            await billing.check_entitlement("user_123", "api_calls")
    assert calls == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 3.0), (0, 3.0)]
    assert sleeps == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert server.attempts == 6


async def test_backoff_delays_are_random_within_bounds(sleeps: list[float]) -> None:
    server = FakeServer(respond(500, nest_error(500, "down")))
    policy = RetryPolicy(max_retries=8, backoff_base=0.25, backoff_max=2.0)
    async with make_client(server, policy) as billing:
        for _ in range(5):
            with pytest.raises(ServerError):
                await billing.check_entitlement("user_123", "api_calls")
    assert len(sleeps) == 40
    bounds = [min(2.0, 0.25 * 2**retry) for retry in range(8)] * 5
    for delay, bound in zip(sleeps, bounds, strict=True):
        assert 0.0 <= delay <= bound
    assert len(set(sleeps)) > 1  # jittered, not a constant


def test_retry_policy_refuses_negative_values() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(backoff_base=-0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backoff_max": math.nan},  # every retry's sleep would be NaN: anyio refuses it with a bare ValueError
        {"backoff_base": math.inf, "backoff_max": math.inf},  # a retry would sleep forever
        {"max_retry_after": math.nan},  # would wait out any Retry-After, a year included
        {"max_retries": 2.5},
        {"max_retries": True},
    ],
)
def test_retry_policy_refuses_values_that_are_not_finite_numbers(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)


# -- error mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected_type", "expected_message"),
    [
        (400, nest_error(400, "quota_exceeded"), QuotaExceededError, "quota_exceeded"),
        (400, nest_error(400, "Customer not found: x"), CustomerNotFoundError, "Customer not found: x"),
        (
            404,
            nest_error(404, "No active subscription with this feature", "Not Found"),
            NotFoundError,
            "No active subscription with this feature",
        ),
        (
            400,
            nest_error(400, "Feature is not a usage quota type"),
            ValidationError,
            "Feature is not a usage quota type",
        ),
        (
            400,
            nest_error(400, ["customer_id must be a string", "quantity must be a positive number"]),
            ValidationError,
            "customer_id must be a string; quantity must be a positive number",
        ),
        (401, nest_error(401, "Invalid API key", "Unauthorized"), AuthenticationError, "Invalid API key"),
        (403, nest_error(403, "Forbidden resource", "Forbidden"), AuthenticationError, "Forbidden resource"),
        (422, nest_error(422, "Unprocessable", "Unprocessable Entity"), ValidationError, "Unprocessable"),
    ],
)
async def test_error_mapping(
    status: int, body: dict[str, Any], expected_type: type[BillingOSError], expected_message: str
) -> None:
    server = FakeServer(respond(status, body))
    async with make_client(server) as billing:
        with pytest.raises(BillingOSError) as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    error = caught.value
    assert type(error) is expected_type
    assert error.status == status
    assert error.body == body
    assert error.message == expected_message
    assert str(error) == expected_message
    assert server.attempts == 1


async def test_customer_not_found_is_a_not_found_error() -> None:
    server = FakeServer(respond(400, nest_error(400, "Customer not found: ghost")))
    async with make_client(server) as billing:
        with pytest.raises(NotFoundError) as caught:
            await billing.check_entitlement("ghost", "api_calls")
    assert isinstance(caught.value, CustomerNotFoundError)
    assert caught.value.status == 400


async def test_plain_404_is_not_customer_not_found() -> None:
    server = FakeServer(respond(404, nest_error(404, "No active subscription with this feature", "Not Found")))
    async with make_client(server) as billing:
        with pytest.raises(NotFoundError) as caught:
            await billing.track_usage("user_123", "export", 1, idempotency_key="k")
    assert not isinstance(caught.value, CustomerNotFoundError)


@pytest.mark.parametrize(
    "answer",
    [
        respond(404, nest_error(404, "Cannot POST /billing/v1/usage/track", "Not Found")),  # NestJS: no such route
        respond(404, text="<html><h1>404 Not Found</h1></html>"),  # a proxy's page
        respond(404, {"message": "no Route matched with those values"}),  # an API gateway's JSON (Kong)
        respond(404, {"message": "Not Found"}),  # another's (AWS API Gateway)
        respond(404, nest_error(404, "Not Found", "Not Found")),  # NestJS-shaped, but not the protocol's
    ],
)
async def test_a_404_from_no_such_route_says_the_base_url_is_wrong_not_that_the_customer_lacks_the_feature(
    answer: Answer, sleeps: list[float]
) -> None:
    server = FakeServer(answer)
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError) as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert not isinstance(caught.value, NotFoundError) and caught.value.status == 404
    assert "no route POST /v1/usage/track" in caught.value.message and "is the base URL right?" in caught.value.message
    assert server.attempts == 1 and sleeps == []  # (the tracker keeps its events and retries: not the client)


async def test_validation_error_from_server_is_a_value_error() -> None:
    server = FakeServer(respond(400, nest_error(400, "customer_id, feature_key, and quantity are required")))
    async with make_client(server) as billing:
        with pytest.raises(ValueError) as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert isinstance(caught.value, ValidationError)


async def test_400_without_message_gets_a_generic_message() -> None:
    server = FakeServer(respond(400, text=""))
    async with make_client(server) as billing:
        with pytest.raises(ValidationError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert caught.value.message == "BillingOS answered 400 Bad Request"
    assert caught.value.status == 400
    assert caught.value.body == ""


async def test_500_maps_to_server_error_with_status_and_body(sleeps: list[float]) -> None:
    body = nest_error(500, "Internal server error", "Internal Server Error")
    server = FakeServer(respond(500, body))
    async with make_client(server, RetryPolicy(max_retries=1)) as billing:
        with pytest.raises(ServerError) as caught:
            await billing.get_usage_metrics("user_123")
    assert caught.value.status == 500
    assert caught.value.body == body
    assert caught.value.message == "Internal server error"
    assert server.attempts == 2


# -- malformed answers --------------------------------------------------------------------------


async def test_200_non_json_is_invalid_response_not_retried(sleeps: list[float]) -> None:
    server = FakeServer(respond(200, text="<html>hello</html>"), respond(200, CHECK_BODY))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 1
    assert sleeps == []
    assert caught.value.status == 200
    assert caught.value.body == "<html>hello</html>"


async def test_201_non_json_track_is_invalid_response() -> None:
    server = FakeServer(respond(201, text="Created"))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError) as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert caught.value.status == 201
    assert server.attempts == 1


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "ok",
        {},
        without(CHECK_BODY, "has_access"),
        without(CHECK_BODY, "feature_key"),
        without(CHECK_BODY, "limit"),  # a quota's: null is unlimited, missing is no answer (was: unlimited)
        with_changes(CHECK_BODY, has_access="yes"),
        with_changes(CHECK_BODY, has_access=1),
        with_changes(CHECK_BODY, limit="lots"),
        with_changes(CHECK_BODY, limit=10**400),  # too large for a float
        with_changes(CHECK_BODY, usage=[1]),
        with_changes(CHECK_BODY, reason=3),
        with_changes(CHECK_BODY, metadata="nope"),
        with_changes(CHECK_BODY, metadata={"remaining": 1, "resets_at": "not a date", "type": "usage_quota"}),
        with_changes(CHECK_BODY, metadata={"remaining": 1, "resets_at": 1738368000, "type": "usage_quota"}),
        with_changes(CHECK_BODY, metadata={"remaining": True, "resets_at": None, "type": "usage_quota"}),
    ],
)
async def test_malformed_check_answer_is_invalid_response(body: Any) -> None:
    server = FakeServer(respond(200, body))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError):
            await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 1


@pytest.mark.parametrize(
    "body",
    [
        None,
        {},
        with_changes(TRACK_BODY, usage="not an object"),
        with_changes(TRACK_BODY, usage=None),
        with_changes(TRACK_BODY, usage=[1, 2]),
        without(TRACK_BODY, "usage"),
        without(TRACK_BODY, "recorded_at"),
        without(TRACK_BODY, "success"),
        with_changes(TRACK_BODY, recorded_at="yesterday"),
        with_changes(TRACK_BODY, quantity="five"),
        with_changes(TRACK_BODY, quantity="NaN"),
        with_changes(TRACK_BODY, feature_key=7),
        with_changes(TRACK_BODY, usage=without(TRACK_BODY["usage"], "period_end")),
        with_changes(TRACK_BODY, usage=with_changes(TRACK_BODY["usage"], consumed_units=None)),
    ],
)
async def test_malformed_track_answer_is_invalid_response(body: Any) -> None:
    server = FakeServer(respond(201, body))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError):
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert server.attempts == 1


async def test_a_malformed_answer_carries_its_status_and_body() -> None:
    """SPEC 4: every error carries status, message and the response body."""
    server = FakeServer(respond(201, {"success": True}))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError) as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert (caught.value.status, caught.value.body) == (201, {"success": True})


@pytest.mark.parametrize("success", ["false", "yes", 1, None])
async def test_track_success_of_wrong_type_is_invalid_response(success: Any) -> None:
    """``success`` must be a JSON boolean; the string "false" must not be read as True."""
    server = FakeServer(respond(201, with_changes(TRACK_BODY, success=success)))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError):
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")


async def test_a_track_answered_2xx_with_success_false_is_an_invalid_response() -> None:
    """A proxy's 2xx saying ``success: false`` is not a recording: taken for one, the usage would go
    unbilled and never be resent; as an error, the tracker resends it under the same key."""
    body = with_changes(TRACK_BODY, success=False)
    server = FakeServer(respond(201, body))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError, match="'success' is false") as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert (caught.value.status, caught.value.body) == (201, body)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"metrics": {}, "customer_id": "user_123"},
        {"metrics": "api_calls", "customer_id": "user_123"},
        {"metrics": None, "customer_id": "user_123"},
        {"metrics": [], "customer_id": None},
        {"metrics": []},
        {"metrics": ["api_calls"], "customer_id": "user_123"},
        {"metrics": [without(METRIC_ITEM, "feature_title")], "customer_id": "user_123"},
        {"metrics": [with_changes(METRIC_ITEM, period_start="31/01/2025")], "customer_id": "user_123"},
        {"metrics": [with_changes(METRIC_ITEM, percentage_used="half")], "customer_id": "user_123"},
    ],
)
async def test_malformed_metrics_answer_is_invalid_response(body: Any) -> None:
    server = FakeServer(respond(200, body))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError):
            await billing.get_usage_metrics("user_123")
    assert server.attempts == 1


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"sessionToken": "st_x"},
        {"expiresAt": "2025-01-15T11:30:00.000Z"},
        {"sessionToken": 123, "expiresAt": "2025-01-15T11:30:00.000Z"},
        {"sessionToken": "st_x", "expiresAt": 1736940600},
        {"sessionToken": "st_x", "expiresAt": "soon"},
    ],
)
async def test_malformed_session_token_answer_is_invalid_response(body: Any) -> None:
    server = FakeServer(respond(201, body))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError):
            await billing.create_session_token("ext_user_1")
    assert server.attempts == 1


# -- input validation ---------------------------------------------------------------------------

LONG_ID = "x" * 256


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [
        # identifiers
        ("check_entitlement", ("", "api_calls"), {}),
        ("check_entitlement", ("   ", "api_calls"), {}),
        ("check_entitlement", (LONG_ID, "api_calls"), {}),
        ("check_entitlement", ("user_123", ""), {}),
        ("check_entitlement", ("user\n123", "api_calls"), {}),
        ("check_entitlement", (None, "api_calls"), {}),
        ("check_entitlement", (123, "api_calls"), {}),
        ("track_usage", ("", "api_calls", 1), {}),
        ("track_usage", (" \t ", "api_calls", 1), {}),
        ("track_usage", (LONG_ID, "api_calls", 1), {}),
        ("track_usage", ("user_123", LONG_ID, 1), {}),
        ("track_usage", ("user_123", "api_calls", 1), {"idempotency_key": ""}),
        ("track_usage", ("user_123", "api_calls", 1), {"idempotency_key": LONG_ID}),
        ("get_usage_metrics", ("",), {}),
        ("get_usage_metrics", ("   ",), {}),
        ("get_usage_metrics", (LONG_ID,), {}),
        ("get_usage_metrics", ("user_123",), {"feature_key": ""}),
        ("create_session_token", ("",), {}),
        ("create_session_token", ("   ",), {}),
        ("create_session_token", (LONG_ID,), {}),
        ("create_session_token", ("u",), {"external_organization_id": ""}),
        # quantities
        ("track_usage", ("user_123", "api_calls", 0), {}),
        ("track_usage", ("user_123", "api_calls", 0.0), {}),
        ("track_usage", ("user_123", "api_calls", -1), {}),
        ("track_usage", ("user_123", "api_calls", -0.5), {}),
        ("track_usage", ("user_123", "api_calls", math.nan), {}),
        ("track_usage", ("user_123", "api_calls", math.inf), {}),
        ("track_usage", ("user_123", "api_calls", -math.inf), {}),
        ("track_usage", ("user_123", "api_calls", True), {}),
        ("track_usage", ("user_123", "api_calls", False), {}),
        ("track_usage", ("user_123", "api_calls", "5"), {}),
        ("track_usage", ("user_123", "api_calls", None), {}),
        ("track_usage", ("user_123", "api_calls", Decimal("NaN")), {}),
        ("track_usage", ("user_123", "api_calls", Decimal("sNaN")), {}),
        ("track_usage", ("user_123", "api_calls", 1e-9), {}),
        ("track_usage", ("user_123", "api_calls", 10**15), {}),
        ("track_usage", ("user_123", "api_calls", 1e303), {}),  # times 10**6 overflows to inf
        # metadata
        ("track_usage", ("user_123", "api_calls", 1), {"metadata": "route=/x"}),
        ("track_usage", ("user_123", "api_calls", 1), {"metadata": [("route", "/x")]}),
        ("track_usage", ("user_123", "api_calls", 1), {"metadata": 5}),
        ("track_usage", ("user_123", "api_calls", 1), {"metadata": {"obj": object()}}),
        ("track_usage", ("user_123", "api_calls", 1), {"metadata": {"x": math.nan}}),
        ("create_session_token", ("u",), {"metadata": ["a"]}),
        # session token
        ("create_session_token", ("u",), {"expires_in": 59}),
        ("create_session_token", ("u",), {"expires_in": 0}),
        ("create_session_token", ("u",), {"expires_in": -60}),
        ("create_session_token", ("u",), {"expires_in": 86401}),
        ("create_session_token", ("u",), {"expires_in": 3600.0}),
        ("create_session_token", ("u",), {"expires_in": True}),
        ("create_session_token", ("u",), {"expires_in": "3600"}),
        ("create_session_token", ("u",), {"allowed_operations": "read"}),
        ("create_session_token", ("u",), {"allowed_operations": ["read", ""]}),
    ],
)
async def test_invalid_input_is_refused_before_any_request(method: str, args: tuple[Any, ...], kwargs: Any) -> None:
    server = FakeServer(respond(200, {}))
    async with make_client(server) as billing:
        with pytest.raises(ValidationError) as caught:
            await getattr(billing, method)(*args, **kwargs)
    assert isinstance(caught.value, ValueError)
    assert caught.value.status is None
    assert server.attempts == 0


async def test_boundary_inputs_are_accepted() -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    async with make_client(server) as billing:
        await billing.track_usage("u" * 255, "api_calls", 0.000001, idempotency_key="k" * 255)
    assert server.attempts == 1
    assert server.bodies[0]["customer_id"] == "u" * 255
    assert server.bodies[0]["quantity"] == 0.000001


# -- secrets ------------------------------------------------------------------------------------


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it carries as ``__cause__`` or ``__context__``, suppressed or not."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(inner)
    return chain


@pytest.mark.parametrize(
    "answer",
    [
        respond(201, text="not gzip at all", headers={"content-encoding": "gzip"}),  # DecodingError: .request
        respond(200, text="{oops: sk_test_supersecret123"),  # JSONDecodeError: .doc, the text unmasked
    ],
    ids=["undecodable", "non-json"],
)
async def test_a_malformed_answer_carries_no_httpx_error_holding_the_key(answer: Answer) -> None:
    """httpx's error holds the request (its Authorization header), a JSONDecodeError the raw text: kept
    as a suppressed ``__context__``, either was one attribute away from the key."""
    secret = "sk_test_supersecret123"
    async with make_client(FakeServer(answer), secret_key=secret) as billing:
        with pytest.raises(InvalidResponseError) as caught:
            await billing.track_usage("user_123", "api_calls", 5, idempotency_key="k")
    assert _chain(caught.value) == [caught.value]
    assert secret not in str(caught.value) and secret not in str(caught.value.body)


async def test_secret_never_in_repr_exceptions_or_logs(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sk_test_supersecret123"
    monkeypatch.setattr(_logging, "INTERVAL", 0.0)  # every retry's line written, to be read here
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="billingos_asgi")
    scenarios: list[tuple[FakeServer, RetryPolicy]] = [
        (FakeServer(respond(401, nest_error(401, "Invalid API key", "Unauthorized"))), RetryPolicy()),
        (FakeServer(respond(503, nest_error(503, "down"))), RetryPolicy(max_retries=2)),
        (FakeServer(respond(502, text="<html>bad gateway</html>")), RetryPolicy(max_retries=2)),
        (FakeServer(fail_with(httpx.ReadTimeout, "timed out")), RetryPolicy(max_retries=2)),
        (FakeServer(fail_with(httpx.ConnectError, "refused")), RetryPolicy(max_retries=2)),
        (
            FakeServer(respond(429, nest_error(429, "slow down"), headers={"Retry-After": "1"})),
            RetryPolicy(max_retries=2),
        ),
        (FakeServer(respond(429, nest_error(429, "slow down"), headers={"Retry-After": "999"})), RetryPolicy()),
        (FakeServer(respond(400, nest_error(400, "quota_exceeded"))), RetryPolicy()),
        (FakeServer(respond(200, text="not json")), RetryPolicy()),
        (FakeServer(respond(201, {"success": True})), RetryPolicy()),
    ]
    errors: list[BaseException] = []
    for server, policy in scenarios:
        async with make_client(server, policy, secret_key=secret) as billing:
            assert secret not in repr(billing)
            assert secret not in str(billing)
            with pytest.raises(BillingOSError) as caught:
                await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
            errors.append(caught.value)
            with pytest.raises(ValidationError) as caught_input:
                await billing.track_usage("user_123", "api_calls", -1)
            errors.append(caught_input.value)
        assert server.requests[0].headers["Authorization"] == f"Bearer {secret}"
    assert len(errors) == 2 * len(scenarios)
    for error in errors:
        assert _chain(error) == [error]
        assert secret not in str(error)
        assert secret not in repr(error)
        assert "supersecret" not in str(error)
    retry_logs = [record for record in caplog.records if record.name == "billingos_asgi"]
    assert len(retry_logs) >= 10  # 2 per retried scenario: the logging really happened
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in str(record.args)
    assert secret not in caplog.text


async def test_retry_warnings_are_one_line_a_second(sleeps: list[float], caplog: pytest.LogCaptureFixture) -> None:
    """Billing down, every call's retries failing alike: a line each flooded the log."""
    server = FakeServer(*[respond(503, nest_error(503, "down"))] * 8)
    with caplog.at_level(logging.WARNING, logger="billingos_asgi"):
        async with make_client(server, RetryPolicy(max_retries=3)) as billing:
            for _ in range(2):
                with pytest.raises(ServerError):
                    await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 8 and len(sleeps) == 6
    assert [record.getMessage() for record in caplog.records] == [
        f"BillingOS GET /v1/usage/check failed (down); retry 1 in {sleeps[0]:.2f}s"
    ]


def test_missing_secret_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BILLINGOS_SECRET_KEY", raising=False)
    with pytest.raises(ValidationError) as caught:
        BillingOS(base_url=BASE_URL, transport=FakeServer(respond(200, {})).transport)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "timeout",
    [float("nan"), float("inf"), 0, -1, True, "5", httpx.Timeout(5.0, connect=float("nan")), httpx.Timeout(-1.0)],
)
def test_a_timeout_that_is_no_finite_number_of_seconds_is_refused(timeout: Any) -> None:
    """NaN was taken: every call then failed with anyio's bare ValueError, which the tracker retried forever."""
    with pytest.raises(ValidationError, match="timeout must be a finite number of seconds > 0"):
        BillingOS(SECRET, base_url=BASE_URL, timeout=timeout)


async def test_a_timeout_may_be_a_number_or_httpx_s_with_parts_unset() -> None:
    for timeout in (2, 0.5, httpx.Timeout(5.0, pool=None)):
        async with make_client(FakeServer(respond(200, CHECK_BODY)), timeout=timeout) as billing:
            assert (await billing.check_entitlement("user_123", "api_calls")).has_access


def test_empty_secret_key_is_refused() -> None:
    with pytest.raises(ValidationError):
        BillingOS(secret_key="", base_url=BASE_URL, transport=FakeServer(respond(200, {})).transport)


@pytest.mark.parametrize(
    "key",
    [
        "pk_test_hushhush",
        "hushhush",
        "SK_test_hushhush",
        "sk_test_hush hush",
        "sk_test_hush\x00hush",
        "sk_tëst_hushhush",
    ],
)
def test_key_without_sk_prefix_is_refused_without_echoing_it(key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        BillingOS(secret_key=key, base_url=BASE_URL, transport=FakeServer(respond(200, {})).transport)
    assert "hushhush" not in str(caught.value)
    assert "hushhush" not in repr(caught.value)
    assert isinstance(caught.value, ValueError) and "(secret_key=)" in str(caught.value)


async def test_a_key_read_with_its_final_newline_is_used_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_SECRET_KEY", SECRET + "\n")
    server = FakeServer(respond(200, CHECK_BODY))
    async with BillingOS(base_url=BASE_URL, transport=server.transport) as billing:
        await billing.check_entitlement("user_123", "api_calls")
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"


def test_key_without_sk_prefix_from_env_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_SECRET_KEY", "rk_live_hushhush")
    with pytest.raises(ValidationError) as caught:
        BillingOS(base_url=BASE_URL, transport=FakeServer(respond(200, {})).transport)
    assert "hushhush" not in str(caught.value)
    assert str(caught.value) == "the BillingOS secret key (BILLINGOS_SECRET_KEY) must start with 'sk_'"


def test_unknown_key_kind_without_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as caught:
        BillingOS(secret_key="sk_other_hushhush", transport=FakeServer(respond(200, {})).transport)
    assert "hushhush" not in str(caught.value)


# -- base URL and key resolution ----------------------------------------------------------------


async def _first_url(billing: BillingOS, server: FakeServer) -> str:
    async with billing:
        await billing.check_entitlement("user_123", "api_calls")
    return str(server.requests[0].url.copy_with(query=None))


async def test_explicit_base_url_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_API_URL", "http://env.test")
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(secret_key="sk_live_abc", base_url="http://arg.test/", transport=server.transport)
    assert billing.base_url == "http://arg.test"
    assert await _first_url(billing, server) == "http://arg.test/v1/usage/check"


async def test_env_api_url_wins_over_key_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_API_URL", "http://env.test:8787/")
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(secret_key="sk_test_abc", transport=server.transport)
    assert billing.base_url == "http://env.test:8787"
    assert await _first_url(billing, server) == "http://env.test:8787/v1/usage/check"


async def test_test_key_uses_sandbox_url() -> None:
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(secret_key="sk_test_abc", transport=server.transport)
    assert billing.base_url == "https://sandbox-api.billingos.dev"
    assert await _first_url(billing, server) == "https://sandbox-api.billingos.dev/v1/usage/check"


async def test_live_key_uses_live_url() -> None:
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(secret_key="sk_live_abc", transport=server.transport)
    assert billing.base_url == "https://api.billingos.dev"
    assert await _first_url(billing, server) == "https://api.billingos.dev/v1/usage/check"


async def test_trailing_slash_dropped_and_path_prefix_kept() -> None:
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(secret_key=SECRET, base_url="http://gateway.test/billing/", transport=server.transport)
    assert billing.base_url == "http://gateway.test/billing"
    assert await _first_url(billing, server) == "http://gateway.test/billing/v1/usage/check"


async def test_env_secret_key_used_when_no_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_SECRET_KEY", "sk_live_fromenv")
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(transport=server.transport)
    assert billing.base_url == "https://api.billingos.dev"
    await _first_url(billing, server)
    assert server.requests[0].headers["Authorization"] == "Bearer sk_live_fromenv"


async def test_explicit_secret_key_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_SECRET_KEY", "sk_live_fromenv")
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(secret_key="sk_test_arg", transport=server.transport)
    assert billing.base_url == "https://sandbox-api.billingos.dev"
    await _first_url(billing, server)
    assert server.requests[0].headers["Authorization"] == "Bearer sk_test_arg"


async def test_a_base_url_read_with_surrounding_whitespace_is_used_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLINGOS_API_URL", " http://env.test:8787/\n")
    server = FakeServer(respond(200, CHECK_BODY))
    billing = BillingOS(secret_key=SECRET, transport=server.transport)
    assert billing.base_url == "http://env.test:8787"
    assert await _first_url(billing, server) == "http://env.test:8787/v1/usage/check"


def base_url_given(monkeypatch: pytest.MonkeyPatch, setting: str, url: str) -> dict[str, Any]:
    """BillingOS's arguments for ``url`` given by ``setting``: the argument, or the environment variable."""
    if setting == "base_url":
        return {"base_url": url}
    monkeypatch.setenv("BILLINGOS_API_URL", url)
    return {}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "is not a valid URL: Invalid port"),
        ("http://billing.test/a\tb", "is not a valid URL: Invalid non-printable"),
        ("ftp://billing.test", "must be an http(s) URL with a host"),
        ("http://", "must be an http(s) URL with a host"),
        ("localhost:8787", "must be an http(s) URL with a host"),
        ("http://billing test/", "is not a valid URL (a space in it, or a port out of range)"),
        ("http://billing.test:99999", "is not a valid URL (a space in it, or a port out of range)"),
        ("http://billing.test:0", "is not a valid URL (a space in it, or a port out of range)"),
        # A query or fragment swallowed every call's path; a user:password replaced the key with Basic auth.
        ("http://billing.test/?region=eu", "must not carry a user, password, query or fragment"),
        ("http://billing.test/billing?", "must not carry a user, password, query or fragment"),
        ("http://billing.test/#v1", "must not carry a user, password, query or fragment"),
        ("http://gateway:hunter2@billing.test/", "must not carry a user, password, query or fragment"),
        ("ftp://gateway:hunter2@billing.test:99999/", "must not carry a user, password, query or fragment"),
    ],
)
@pytest.mark.parametrize("setting", ["base_url", "BILLINGOS_API_URL"])
def test_a_bad_base_url_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, setting: str, url: str, message: str
) -> None:
    arguments = base_url_given(monkeypatch, setting, url)
    with pytest.raises(ValidationError, match=rf"^{setting} {re.escape(message)}") as caught:
        BillingOS(secret_key=SECRET, transport=FakeServer(respond(200, {})).transport, **arguments)
    assert isinstance(caught.value, ValueError)
    assert "hunter2" not in str(caught.value)
    assert caught.value.__context__ is None  # not even httpx's error, quoting the URL, behind it


@pytest.mark.parametrize(
    "url",
    [SECRET, f"{SECRET}\n", "sk_live_other", f"ftp://{SECRET}", f"http://billing.test:99999/{SECRET}", "http://[sk_x]"],
)
@pytest.mark.parametrize("setting", ["base_url", "BILLINGOS_API_URL"])
def test_a_secret_key_given_as_the_base_url_is_never_shown(
    monkeypatch: pytest.MonkeyPatch, setting: str, url: str
) -> None:
    """The two settings swapped (in a .env file, say): the refusal names the setting, not the key it holds."""
    arguments = base_url_given(monkeypatch, setting, url)
    with pytest.raises(ValidationError, match=rf"^{setting} ") as caught:
        BillingOS(secret_key=SECRET, transport=FakeServer(respond(200, {})).transport, **arguments)
    assert "sk_" not in str(caught.value).replace("sk_***", "")


@pytest.mark.parametrize(
    "key", ["sk_live_ab-cd.ef", "sk_live_ab~cd+ef=", "sk_live_ab$cd!ef", "sk_live_ab/cd+ef=", "sk_live_ab?cd@ef#"]
)
def test_a_key_given_as_the_base_url_is_masked_whole(key: str) -> None:
    """Keys need only be printable ASCII: one with a dash or a dot was masked up to it, the rest shown."""
    with pytest.raises(ValidationError) as caught:
        BillingOS(secret_key=SECRET, base_url=key, transport=FakeServer(respond(200, {})).transport)
    assert "ab" not in str(caught.value).replace("sk_***", "") and "ef" not in str(caught.value)


def test_repr_shows_base_url() -> None:
    billing = BillingOS(secret_key=SECRET, base_url=BASE_URL, transport=FakeServer(respond(200, {})).transport)
    assert repr(billing) == "BillingOS(base_url='http://billing.test')"


# -- lifecycle ----------------------------------------------------------------------------------


async def test_async_with_closes_the_client() -> None:
    server = FakeServer(respond(200, CHECK_BODY))
    billing = make_client(server)
    async with billing as entered:
        assert entered is billing
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 1
    with pytest.raises((RuntimeError, BillingOSError)):
        await billing.check_entitlement("user_123", "api_calls")
    assert server.attempts == 1


async def test_aclose_closes_the_client() -> None:
    server = FakeServer(respond(201, TRACK_BODY))
    billing = make_client(server)
    await billing.aclose()
    with pytest.raises((RuntimeError, BillingOSError)):
        await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert server.attempts == 0


async def test_a_key_echoed_by_the_server_is_masked() -> None:
    secret = "sk_test_echoed999"
    server = FakeServer(respond(400, nest_error(400, f"bad key {secret}"), headers=None))
    async with make_client(server, RetryPolicy(), secret_key=secret) as billing:
        with pytest.raises(ValidationError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert secret not in str(caught.value) and secret not in json.dumps(caught.value.body)
    assert caught.value.message == "bad key sk_***"


async def test_a_key_echoed_in_a_success_answer_is_masked() -> None:
    """A base URL pointed at an echoing proxy: the 2xx answer is malformed, and its body travels in the error."""
    secret = "sk_test_echoed999"

    def echo_headers(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"headers": dict(request.headers)})

    def echo_text(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="x" * 1980 + request.headers["authorization"])

    def echo_as_key(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={request.headers["authorization"]: "seen"})

    for answer in (echo_headers, echo_text, echo_as_key):
        async with make_client(FakeServer(answer), secret_key=secret) as billing:
            with pytest.raises(InvalidResponseError) as caught:
                await billing.check_entitlement("user_123", "api_calls")
        assert "sk_test_echo" not in json.dumps(caught.value.body)  # masked before the text is cut
        assert "sk_***" in json.dumps(caught.value.body)


async def test_an_error_text_is_masked_before_it_is_cut() -> None:
    secret = "sk_test_echoed999"
    server = FakeServer(respond(400, text="x" * 1995 + secret))
    async with make_client(server, secret_key=secret) as billing:
        with pytest.raises(ValidationError) as caught:
            await billing.check_entitlement("user_123", "api_calls")
    assert caught.value.body == "x" * 1995 + "sk_**"


def test_a_policy_of_thousands_of_retries_keeps_its_backoff_bounded() -> None:
    policy = RetryPolicy(max_retries=5_000, backoff_base=0.25, backoff_max=8.0)
    delays = [policy.delay(retry, None) for retry in (0, 1_100, 4_999)]
    assert all(delay is not None and 0 <= delay <= 8.0 for delay in delays)
    assert policy.delay(5_000, None) is None


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_names_where_it_points_not_a_body_problem(sleeps: list[float], status: int) -> None:
    """A base URL on http:// that the API sends to https:// (a POST is not followed: it could become a GET)."""
    target = "https://api.example.test/v1/usage/track"
    server = FakeServer(respond(status, text="", headers={"Location": target}))
    async with make_client(server) as billing:
        with pytest.raises(InvalidResponseError, match=r"redirect \(\d+\) to 'https://api\.example\.test/") as caught:
            await billing.track_usage("user_123", "api_calls", 1, idempotency_key="k")
    assert caught.value.status == status and "base URL" in caught.value.message
    assert server.attempts == 1 and sleeps == []
