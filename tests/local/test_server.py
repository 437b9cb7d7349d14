"""The BillingOS client against the local server over a real loopback socket (SPEC section 2)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from billingos_asgi import (
    AuthenticationError,
    BillingOS,
    CustomerNotFoundError,
    LocalBilling,
    NotFoundError,
    QuotaExceededError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    ValidationError,
)
from billingos_asgi._wire import format_time
from billingos_asgi.local.background import serve_in_thread
from billingos_asgi.local.server import RateLimiter, create_app
from tests.asgi import scripted
from tests.conftest import PLANS, SECRET_KEY, RunningServer, running_server
from tests.local.conftest import write_locked

AUTH = {"Authorization": f"Bearer {SECRET_KEY}"}
TRACK_JSON = b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1}'


@pytest.fixture
async def client(local_server: RunningServer) -> AsyncIterator[BillingOS]:
    async with BillingOS(SECRET_KEY, base_url=local_server.base_url, retry=RetryPolicy(max_retries=0)) as client:
        yield client


@pytest.fixture
async def raw(local_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=local_server.base_url) as raw:
        yield raw


async def test_track_check_metrics_round_trip(client: BillingOS) -> None:
    before = await client.check_entitlement("user_free", "api_calls")
    assert (before.has_access, before.limit, before.usage, before.remaining, before.type) == (
        True,
        10,
        0,
        10,
        "usage_quota",
    )
    result = await client.track_usage("user_free", "api_calls", 4, metadata={"route": "/x"})
    assert result.success and result.feature_key == "api_calls" and result.quantity == 4
    assert (result.usage.consumed_units, result.usage.limit_units, result.usage.remaining_units) == (4, 10, 6)
    assert result.recorded_at.tzinfo is not None and result.usage.period_end == before.resets_at
    after = await client.check_entitlement("user_free", "api_calls")
    assert (after.usage, after.remaining) == (4, 6)
    metrics = await client.get_usage_metrics("user_free")
    assert metrics.customer_id == "user_free"
    by_key = {m.feature_key: m for m in metrics.metrics}
    assert set(by_key) == {"api_calls", "storage_gb"}
    assert (by_key["api_calls"].consumed, by_key["api_calls"].percentage_used, by_key["api_calls"].product_name) == (
        4,
        40,
        "Free",
    )
    only = await client.get_usage_metrics("user_free", "storage_gb")
    assert [m.feature_key for m in only.metrics] == ["storage_gb"]


async def test_fractional_units_and_unlimited(client: BillingOS) -> None:
    await client.track_usage("user_free", "storage_gb", 0.1)
    result = await client.track_usage("user_free", "storage_gb", 0.2)
    assert result.usage.consumed_units == pytest.approx(0.3, abs=1e-9)
    assert result.usage.remaining_units == pytest.approx(1.2, abs=1e-9)
    unlimited = await client.track_usage("user_pro", "api_calls", 1_000_000)
    assert unlimited.usage.limit_units is None and unlimited.usage.remaining_units is None
    flag = await client.check_entitlement("user_pro", "export")
    assert (flag.has_access, flag.type, flag.limit) == (True, "boolean_flag", None)
    denied = await client.check_entitlement("user_free", "export")
    assert (denied.has_access, denied.reason) == (False, "no_active_subscription")


async def test_idempotent_replay_counts_once(client: BillingOS, local_server: RunningServer) -> None:
    first = await client.track_usage("user_free", "api_calls", 2, idempotency_key="req-1")
    again = await client.track_usage("user_free", "api_calls", 2, idempotency_key="req-1")
    assert again.usage.consumed_units == first.usage.consumed_units == 2
    assert again.recorded_at == first.recorded_at
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 2


async def test_quota_exceeded_records_nothing(client: BillingOS, local_server: RunningServer) -> None:
    await client.track_usage("user_free", "api_calls", 8)
    with pytest.raises(QuotaExceededError) as caught:
        await client.track_usage("user_free", "api_calls", 3)
    assert caught.value.status == 400 and caught.value.body["message"] == "quota_exceeded"
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 8
    await client.track_usage("user_free", "api_calls", 2)  # exactly up to the limit is fine
    exhausted = await client.check_entitlement("user_free", "api_calls")
    assert (exhausted.has_access, exhausted.reason, exhausted.remaining) == (False, "quota_exceeded", 0)


async def test_error_answers(client: BillingOS) -> None:
    with pytest.raises(CustomerNotFoundError, match="Customer not found: ghost"):
        await client.track_usage("ghost", "api_calls", 1)
    with pytest.raises(CustomerNotFoundError):
        await client.check_entitlement("ghost", "api_calls")
    with pytest.raises(CustomerNotFoundError):
        await client.get_usage_metrics("ghost")
    with pytest.raises(NotFoundError, match="No active subscription with this feature") as caught:
        await client.track_usage("user_free", "export", 1)
    assert caught.value.status == 404
    with pytest.raises(ValidationError, match="Feature is not a usage quota type"):
        await client.track_usage("user_pro", "export", 1)


async def test_percent_encoded_utf8_query_values_are_decoded(raw: httpx.AsyncClient) -> None:
    query = "customer%5Fid=user%5Ffree&feature_key=api%5Fcalls"
    assert (await raw.get(f"/v1/usage/check?{query}", headers=AUTH)).json()["has_access"] is True
    unknown = await raw.get("/v1/usage/check?customer_id=%C3%A9+x&feature_key=api_calls", headers=AUTH)
    assert unknown.json()["message"] == "Customer not found: \u00e9 x"


#: JavaScript's ``toISOString()``, as the reference service writes every time.
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


async def test_times_are_iso_8601_utc_strings(raw: httpx.AsyncClient) -> None:
    """SPEC section 2: every time on the wire is an ISO-8601 UTC string."""
    track = (
        await raw.post("/v1/usage/track", content=TRACK_JSON, headers={**AUTH, "Content-Type": "application/json"})
    ).json()
    params = {"customer_id": "user_free", "feature_key": "api_calls"}
    check = (await raw.get("/v1/usage/check", params=params, headers=AUTH)).json()
    metric = (await raw.get("/v1/usage/metrics", params=params, headers=AUTH)).json()["metrics"][0]
    token = (await raw.post("/v1/session-tokens", json={"externalUserId": "u"}, headers=AUTH)).json()
    times = [
        track["recorded_at"],
        track["usage"]["period_start"],
        track["usage"]["period_end"],
        check["metadata"]["resets_at"],
        metric["period_start"],
        metric["period_end"],
        token["expiresAt"],
    ]
    assert all(ISO_UTC.match(moment) for moment in times), times
    assert check["metadata"]["resets_at"] == track["usage"]["period_end"] == metric["period_end"]


def test_a_time_in_another_zone_is_written_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    assert format_time(datetime(2025, 1, 1, 0, 30, 0, 123999, tzinfo=paris)) == "2024-12-31T23:30:00.123Z"


async def test_session_token(client: BillingOS) -> None:
    token = await client.create_session_token("user_free", expires_in=120, allowed_operations=["read_usage"])
    assert token.token.startswith("bos_sess_") and token.expires_at.tzinfo == timezone.utc


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "sk_test_local"}, {"Authorization": "Bearer pk_test_local"}, {"Authorization": "Basic x"}],
)
async def test_missing_or_malformed_auth_is_401(raw: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await raw.get(
        "/v1/usage/check", params={"customer_id": "user_free", "feature_key": "x"}, headers=headers
    )
    assert response.status_code == 401
    assert response.json() == {
        "statusCode": 401,
        "message": "Missing or invalid authorization header",
        "error": "Unauthorized",
    }


async def test_unknown_key_is_401(local_server: RunningServer) -> None:
    async with BillingOS("sk_test_wrong", base_url=local_server.base_url) as wrong:
        with pytest.raises(AuthenticationError, match="Invalid API key") as caught:
            await wrong.track_usage("user_free", "api_calls", 1)
    assert caught.value.status == 401
    assert "sk_test_wrong" not in repr(caught.value) and "sk_test_wrong" not in str(caught.value)
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 0


BAD_TRACK_BODIES = [
    (b"{not json", "Invalid JSON body"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": NaN}', "NaN is not a valid number"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": Infinity}', "Infinity"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1e999}', "finite"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1e308}', "too large"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b"", "customer_id, feature_key, and quantity are required"),  # Express reads an empty JSON body as {}
    (b'{"feature_key": "api_calls", "quantity": 1}', "customer_id, feature_key, and quantity are required"),
    (
        b'{"customer_id": "user_free", "feature_key": "api_calls"}',
        "customer_id, feature_key, and quantity are required",
    ),
    (b'{"customer_id": 5, "feature_key": "api_calls", "quantity": 1}', "customer_id must be a string"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": "1"}', "quantity must be a number"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": true}', "quantity must be a number"),
    # The reference server tests them as JavaScript does (!value): 0, "" and false are missing.
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 0}', "quantity are required"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": false}', "quantity are required"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": -3}', "greater than 0"),
    (b'{"customer_id": "' + b"u" * 5000 + b'", "feature_key": "api_calls", "quantity": 1}', "maximum is 255"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1, "metadata": [1]}', "metadata"),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1, "idempotency_key": 7}', "string"),
    (b'{"customer_id": "user_free", "feature_key": "", "quantity": 1}', "quantity are required"),
    (b'{"customer_id": [], "feature_key": "api_calls", "quantity": 1}', "customer_id must be a string"),
    (b'{"customer_id": "u\\ud800", "feature_key": "api_calls", "quantity": 1}', "customer_id is not valid Unicode"),
    (
        b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1, "idempotency_key": "\\udfff"}',
        "idempotency_key is not valid Unicode",
    ),
    (b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1' + b"0" * 400 + b"}", "too large"),
    (
        b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1, "metadata": '
        + b"[" * 30_000
        + b"]" * 30_000
        + b"}",
        "nested too deeply",
    ),
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    (
        b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1, "metadata": {"a": "\\ud800"}}',
        "metadata is not valid Unicode",
    ),
    (
        b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1, "metadata": {"\\udfff": 1}}',
        "metadata is not valid Unicode",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_TRACK_BODIES)
async def test_bad_track_bodies_are_400_and_record_nothing(
    raw: httpx.AsyncClient, local_server: RunningServer, body: bytes, message: str
) -> None:
    response = await raw.post("/v1/usage/track", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["statusCode"] == 400 and payload["error"] == "Bad Request"
    assert message in payload["message"]
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 0


@pytest.mark.parametrize(
    "headers",
    [{}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}],
    ids=["none", "text", "form"],
)
async def test_a_body_not_sent_as_json_is_read_empty_as_upstream_does_and_records_nothing(
    raw: httpx.AsyncClient, local_server: RunningServer, headers: dict[str, str]
) -> None:
    response = await raw.post("/v1/usage/track", content=TRACK_JSON, headers={**AUTH, **headers})
    assert response.status_code == 400
    assert response.json()["message"] == "customer_id, feature_key, and quantity are required"
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 0


async def test_a_client_gone_mid_body_is_no_server_failure(caplog: pytest.LogCaptureFixture) -> None:
    """A client that hangs up during its upload (its own timeout, say) is not logged as a server
    error with a traceback, and nothing is recorded."""
    billing = LocalBilling.from_dict(PLANS)
    receive, send, sent = scripted(
        [{"type": "http.request", "body": TRACK_JSON[:20], "more_body": True}, {"type": "http.disconnect"}]
    )

    headers = [(b"authorization", AUTH["Authorization"].encode()), (b"content-type", b"application/json")]
    scope = {"type": "http", "method": "POST", "path": "/v1/usage/track", "query_string": b"", "headers": headers}
    await create_app(billing, secret_key=SECRET_KEY)(scope, receive, send)
    assert sent[0]["status"] == 400
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
    assert await billing.recorded_units("user_free", "api_calls") == 0
    await billing.aclose()


@pytest.mark.parametrize(
    ("length", "status"), [(b"\xb2", 201), (b"1" * 5_000, 413), (b"0" * 5_000 + b"52", 201), (b"65537", 413)]
)
async def test_a_content_length_int_cannot_read_is_no_server_failure(length: bytes, status: int) -> None:
    """A digit int() refuses ("²"), or more digits than it reads (uvicorn refuses both itself; another
    server may not): too large when it says so, else the body as read."""
    billing = LocalBilling.from_dict(PLANS)
    receive, send, sent = scripted([{"type": "http.request", "body": TRACK_JSON}])

    headers = [
        (b"authorization", AUTH["Authorization"].encode()),
        (b"content-type", b"application/json"),
        (b"content-length", length),
    ]
    scope = {"type": "http", "method": "POST", "path": "/v1/usage/track", "query_string": b"", "headers": headers}
    await create_app(billing, secret_key=SECRET_KEY)(scope, receive, send)
    assert sent[0]["status"] == status
    assert await billing.recorded_units("user_free", "api_calls") == (1 if status == 201 else 0)
    await billing.aclose()


async def test_a_json_content_type_with_parameters_is_read(raw: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Content-Type": "Application/JSON; charset=utf-8"}
    assert (await raw.post("/v1/usage/track", content=TRACK_JSON, headers=headers)).status_code == 201


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
async def test_a_json_body_not_in_utf8_is_refused(
    raw: httpx.AsyncClient, local_server: RunningServer, codec: str
) -> None:
    """As the reference service's parser reads it (UTF-8 by default): json.loads alone would guess the codec."""
    headers = {**AUTH, "Content-Type": "application/json"}
    response = await raw.post("/v1/usage/track", content=TRACK_JSON.decode().encode(codec), headers=headers)
    assert response.status_code == 400 and response.json()["message"].startswith("Invalid JSON body: ")
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 0


async def test_a_json_body_after_a_utf8_bom_is_read(raw: httpx.AsyncClient) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    assert (await raw.post("/v1/usage/track", content=b"\xef\xbb\xbf" + TRACK_JSON, headers=headers)).status_code == 201


async def test_oversized_body_is_413(raw: httpx.AsyncClient, local_server: RunningServer) -> None:
    body = b'{"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1, "pad": "' + b"x" * 70_000 + b'"}'
    response = await raw.post("/v1/usage/track", content=body, headers=AUTH)
    assert response.status_code == 413
    assert response.json() == {
        "statusCode": 413,
        "message": "Request body is larger than 65536 bytes",
        "error": "Payload Too Large",  # NestJS's name, whatever Python's HTTPStatus calls it
    }
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 0


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/v1/usage/check", {"customer_id": "user_free"}, "customer_id and feature_key are required"),
        ("/v1/usage/check", {"feature_key": "api_calls"}, "customer_id and feature_key are required"),
        ("/v1/usage/check", {"customer_id": "u" * 300, "feature_key": "api_calls"}, "maximum is 255"),
        ("/v1/usage/metrics", {}, "customer_id is required"),
        (
            "/v1/usage/check",
            "customer_id=user_free&customer_id=user_pro&feature_key=api_calls",
            "customer_id must be a string, given 2 times",
        ),
        (
            "/v1/usage/metrics",
            "customer_id=user_free&feature_key=a&feature_key=b",
            "feature_key must be a string, given 2 times",
        ),
        ("/v1/usage/check", "customer_id=%ff&feature_key=api_calls", "customer_id is not UTF-8 text"),
        ("/v1/usage/check", "customer_id=user_free&feature_key=api%ED%A0%80", "feature_key is not UTF-8 text"),
        ("/v1/usage/metrics", "customer_id=user%C3", "customer_id is not UTF-8 text"),
        ("/v1/usage/metrics", "customer_id=user_free&feature_key=%ff", "feature_key is not UTF-8 text"),
    ],
)
async def test_bad_queries_are_400(
    raw: httpx.AsyncClient, path: str, params: dict[str, str] | str, message: str
) -> None:
    # A query string goes into the URL as written: params= would re-encode bytes that are not UTF-8.
    url, query = (path, params) if isinstance(params, dict) else (f"{path}?{params}", None)
    response = await raw.get(url, params=query, headers=AUTH)
    assert response.status_code == 400
    assert message in response.json()["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "externalUserId is required"),
        ({"externalUserId": "u", "expiresIn": 10}, "between 60 and 86400"),
        ({"externalUserId": "u", "expiresIn": "60"}, "integer"),
        ({"externalUserId": "u", "allowedOperations": "all"}, "list of strings"),
    ],
)
async def test_bad_session_token_requests_are_400(raw: httpx.AsyncClient, body: object, message: str) -> None:
    response = await raw.post("/v1/session-tokens", json=body, headers=AUTH)
    assert response.status_code == 400 and message in response.json()["message"]


async def test_a_lone_surrogate_in_session_metadata_is_400(raw: httpx.AsyncClient) -> None:
    body = b'{"externalUserId": "u", "metadata": {"a": "\\ud800"}}'
    response = await raw.post("/v1/session-tokens", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400 and "metadata is not valid Unicode" in response.json()["message"]


@pytest.mark.parametrize(("expires_in", "seconds"), [(None, 3600), (3600.0, 3600), (600.0, 600)])
async def test_session_token_expires_in_null_is_absent_and_a_whole_float_is_an_integer(
    raw: httpx.AsyncClient, expires_in: float | None, seconds: int
) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=1)  # the answer keeps milliseconds
    response = await raw.post("/v1/session-tokens", json={"externalUserId": "u", "expiresIn": expires_in}, headers=AUTH)
    assert response.status_code == 201, response.text
    lifetime = datetime.fromisoformat(response.json()["expiresAt"].replace("Z", "+00:00")) - before
    assert timedelta(seconds=seconds) <= lifetime <= timedelta(seconds=seconds + 2)


async def test_a_database_locked_by_another_process_answers_503_in_time(tmp_path: Path, busy_timeout: float) -> None:
    """Every call answers within about two lock waits (under the client's read timeout), even queued
    behind others: a 503 with Retry-After that the client retries, and nothing is recorded."""
    track = {"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1}
    with running_server(PLANS, tmp_path / "billing.db") as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH) as raw:
            with write_locked(server.database):
                started = time.monotonic()
                answers = await asyncio.gather(*(raw.post("/v1/usage/track", json=track) for _ in range(10)))
                assert time.monotonic() - started < 5 * busy_timeout  # not 10 waits one after the other
                async with BillingOS(SECRET_KEY, base_url=server.base_url, retry=RetryPolicy(max_retries=0)) as client:
                    with pytest.raises(ServerError) as caught:
                        await client.track_usage("user_free", "api_calls", 1)
            assert (await raw.post("/v1/usage/track", json=track)).status_code == 201
        assert await server.billing.recorded_units("user_free", "api_calls") == 1
    message = "the billing database is locked by another connection; try again shortly"
    for answer in answers:
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert answer.json() == {"statusCode": 503, "message": message, "error": "Service Unavailable"}
    assert (caught.value.status, caught.value.message, caught.value.retry_after) == (503, message, 1.0)


async def test_unknown_route_and_method_answer_like_nestjs(raw: httpx.AsyncClient) -> None:
    missing = await raw.get("/v1/nothing", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {"statusCode": 404, "message": "Cannot GET /v1/nothing", "error": "Not Found"}
    wrong_method = await raw.put("/v1/usage/track", headers=AUTH)
    assert wrong_method.status_code == 404 and wrong_method.json()["message"] == "Cannot PUT /v1/usage/track"
    # NestJS names the URL as sent (Express's originalUrl): still percent-encoded, with its query.
    as_sent = await raw.get("/v1/caf%C3%A9%ff?customer_id=user%5Ffree&x", headers=AUTH)
    assert as_sent.status_code == 404
    assert as_sent.json()["message"] == "Cannot GET /v1/caf%C3%A9%ff?customer_id=user%5Ffree&x"
    wrong_method = await raw.delete("/v1/usage/check?customer_id=user_free", headers=AUTH)
    assert wrong_method.json()["message"] == "Cannot DELETE /v1/usage/check?customer_id=user_free"


async def test_one_trailing_slash_reaches_the_route_as_in_nestjs(
    raw: httpx.AsyncClient, local_server: RunningServer
) -> None:
    """Express routes match with or without one trailing slash; Starlette would answer a bare 307."""
    params = {"customer_id": "user_free", "feature_key": "api_calls"}
    check = await raw.get("/v1/usage/check/", params=params, headers=AUTH)
    assert check.status_code == 200 and check.json()["feature_key"] == "api_calls"
    track = await raw.post("/v1/usage/track/", content=TRACK_JSON, headers={**AUTH, "Content-Type": "application/json"})
    assert track.status_code == 201
    assert await local_server.billing.recorded_units("user_free", "api_calls") == 1
    two = await raw.get("/v1/usage/check//?customer_id=user_free&feature_key=api_calls", headers=AUTH)
    assert two.status_code == 404
    assert two.json()["message"] == "Cannot GET /v1/usage/check//?customer_id=user_free&feature_key=api_calls"


async def test_rate_limit_emulation(tmp_path: object) -> None:
    billing = LocalBilling.from_dict(PLANS)
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY, rate_limit=3)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as raw:
            params = {"customer_id": "user_free", "feature_key": "api_calls"}
            answers = [await raw.get("/v1/usage/check", params=params) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["X-RateLimit-Limit"] == "3"
        assert answers[2].headers["X-RateLimit-Remaining"] == "0"
        throttled = answers[3]
        assert 1 <= int(throttled.headers["Retry-After"]) <= 60
        assert throttled.json()["statusCode"] == 429
        async with BillingOS(SECRET_KEY, base_url=base_url, retry=RetryPolicy(max_retry_after=0.5)) as client:
            with pytest.raises(RateLimitError) as caught:
                await client.track_usage("user_free", "api_calls", 1)
        assert caught.value.retry_after is not None and caught.value.retry_after >= 1


async def test_an_oversized_body_is_counted_and_answered_with_the_rate_limit_headers() -> None:
    billing = LocalBilling.from_dict(PLANS)
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY, rate_limit=3)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as raw:
            first = await raw.post("/v1/usage/track", content=b"x" * 70_000)
            second = await raw.post("/v1/usage/track", content=TRACK_JSON, headers={"Content-Type": "application/json"})
    assert first.status_code == 413 and first.json()["statusCode"] == 413
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == ("3", "2")
    assert 1 <= int(first.headers["X-RateLimit-Reset"]) <= 60
    assert second.status_code == 201 and second.headers["X-RateLimit-Remaining"] == "1"


async def test_the_per_customer_track_limit_refuses_one_customers_tracks_only() -> None:
    # SPEC section 2: POST /v1/usage/track is limited per customer (1000/min upstream), beside the global tier.
    billing = LocalBilling.from_dict(PLANS)
    track = {"feature_key": "api_calls", "quantity": 1}
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY, track_rate_limit=2)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as raw:
            free = [await raw.post("/v1/usage/track", json={**track, "customer_id": "user_free"}) for _ in range(3)]
            pro = await raw.post("/v1/usage/track", json={**track, "customer_id": "user_pro"})
            params = {"customer_id": "user_free", "feature_key": "api_calls"}
            checks = [await raw.get("/v1/usage/check", params=params) for _ in range(3)]
        async with BillingOS(SECRET_KEY, base_url=base_url, retry=RetryPolicy(max_retry_after=0.5)) as client:
            with pytest.raises(RateLimitError) as caught:
                await client.track_usage("user_free", "api_calls", 1)
        recorded = await billing.recorded_units("user_free", "api_calls")
    assert recorded == 2  # nothing recorded when refused
    assert [answer.status_code for answer in free] == [201, 201, 429]
    assert [answer.headers["X-RateLimit-Remaining"] for answer in free] == ["1", "0", "0"]
    refused = free[2]
    assert refused.json() == {
        "statusCode": 429,
        "message": "ThrottlerException: Too Many Requests",
        "error": "Too Many Requests",
    }
    assert refused.headers["X-RateLimit-Limit"] == "2"
    assert 1 <= int(refused.headers["Retry-After"]) == int(refused.headers["X-RateLimit-Reset"]) <= 60
    assert pro.status_code == 201 and pro.headers["X-RateLimit-Remaining"] == "1"  # a window of its own
    assert [answer.status_code for answer in checks] == [200] * 3 and "X-RateLimit-Limit" not in checks[0].headers
    assert caught.value.retry_after is not None and caught.value.retry_after >= 1


async def test_a_tracks_error_answer_carries_its_customers_rate_limit_headers_too() -> None:
    """Counted in the customer's window, a refused track says what is left of it, as a recorded one does."""
    billing = LocalBilling.from_dict(PLANS)
    body = {"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1}
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY, track_rate_limit=5)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as raw:
            recorded = await raw.post("/v1/usage/track", json=body)
            refused = await raw.post("/v1/usage/track", json={**body, "quantity": "one"})
    assert (recorded.status_code, refused.status_code) == (201, 400)
    assert [answer.headers.get("X-RateLimit-Remaining") for answer in (recorded, refused)] == ["4", "3"]


async def test_an_id_too_long_to_be_a_customers_is_refused_as_such_and_held_in_no_window() -> None:
    billing = LocalBilling.from_dict(PLANS)
    body = {"customer_id": "u" * 256, "feature_key": "api_calls", "quantity": 1}
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY, track_rate_limit=1)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as raw:
            answers = [await raw.post("/v1/usage/track", json=body) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [400, 400]
    assert "customer_id" in answers[1].json()["message"]


async def test_with_both_limits_a_track_answers_the_global_tiers_headers_unless_its_customers_refuses_it() -> None:
    billing = LocalBilling.from_dict(PLANS)
    body = {"customer_id": "user_free", "feature_key": "api_calls", "quantity": 1}
    with serve_in_thread(create_app(billing, secret_key=SECRET_KEY, rate_limit=5, track_rate_limit=1)) as base_url:
        async with httpx.AsyncClient(base_url=base_url, headers=AUTH) as raw:
            answers = [await raw.post("/v1/usage/track", json=body) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [201, 429]
    assert [answer.headers["X-RateLimit-Limit"] for answer in answers] == ["5", "1"]
    assert answers[0].headers["X-RateLimit-Remaining"] == "4"


def test_rate_limiter_keeps_a_window_per_key_and_forgets_those_that_ended() -> None:
    now = [0.0]
    limiter = RateLimiter(1, clock=lambda: now[0])
    assert limiter.hit("a")[0] and limiter.hit("b")[0] and not limiter.hit("a")[0]
    now[0] += 60
    assert limiter.hit("c")[0]
    assert list(limiter._windows) == ["c"]  # a client naming a new customer every call holds a minute's only


def test_rate_limiter_holds_a_bounded_number_of_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within a minute too: ids made up faster than windows end let go of the oldest windows."""
    monkeypatch.setattr("billingos_asgi.local.server.MAX_WINDOWS", 3)
    limiter = RateLimiter(1, clock=lambda: 0.0)
    assert all(limiter.hit(key)[0] for key in ("a", "b", "c", "d", "e"))
    assert list(limiter._windows) == ["c", "d", "e"] and not limiter.hit("e")[0]


@pytest.mark.parametrize("option", ["rate_limit", "track_rate_limit"])
@pytest.mark.parametrize("rate_limit", [0, -5])
def test_a_rate_limit_below_one_per_minute_is_refused_not_ignored(option: str, rate_limit: int) -> None:
    billing = LocalBilling.from_dict(PLANS)
    with pytest.raises(ValueError, match="at least 1 request/min"):
        options: dict[str, Any] = {option: rate_limit}
        create_app(billing, **options)
    billing.close()


def test_rate_limiter_window_counts_down_and_reopens_after_a_minute() -> None:
    now = [1000.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.hit() == (True, {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "60"})
    now[0] += 15.5
    assert limiter.hit()[1]["X-RateLimit-Reset"] == "45"
    allowed, headers = limiter.hit()
    assert not allowed and headers["Retry-After"] == headers["X-RateLimit-Reset"] == "45"
    assert headers["X-RateLimit-Remaining"] == "0"
    now[0] += 44.25  # 0.25 s before the window ends: still refused, told to wait a whole second
    assert limiter.hit() == (
        False,
        {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1", "Retry-After": "1"},
    )
    now[0] += 0.25
    assert limiter.hit() == (True, {"X-RateLimit-Limit": "2", "X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "60"})


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_served_in_a_thread_on_an_ipv6_address() -> None:
    with serve_in_thread(create_app(LocalBilling.from_dict(PLANS), secret_key=SECRET_KEY), host="::1") as base_url:
        assert re.fullmatch(r"http://\[::1\]:\d+", base_url)
        async with BillingOS(SECRET_KEY, base_url=base_url) as client:
            assert (await client.check_entitlement("user_free", "api_calls")).limit == 10


def test_a_host_serve_in_thread_cannot_bind_leaves_no_socket_open() -> None:
    with pytest.raises(OSError), serve_in_thread(create_app(LocalBilling.from_dict(PLANS)), host="203.0.113.1"):
        pass  # (TEST-NET-3: no interface of this machine has it)


def test_a_new_windows_reset_is_a_minute_at_most() -> None:
    """start + 60 - now rounds past 60 for some clock readings (1000.1507 + 60 - 1000.1507 > 60):
    a new window answered X-RateLimit-Reset: 61."""
    limiter = RateLimiter(3, clock=lambda: 1000.1507)
    allowed, headers = limiter.hit()
    assert allowed and headers["X-RateLimit-Reset"] == "60"
