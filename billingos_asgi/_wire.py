"""The BillingOS JSON wire format (SPEC section 2), both ways.

The client decodes with these functions and the local server encodes with them, so the two can
never drift apart.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from ._exceptions import InvalidResponseError
from ._models import Entitlement, SessionToken, TrackUsageResult, UsageMetric, UsageMetrics, UsageSnapshot

JSON = dict[str, Any]


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, as JavaScript's ``toISOString()`` writes it."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def format_number(value: float | None) -> float | int | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else value


def entitlement_to_json(entitlement: Entitlement) -> JSON:
    body: JSON = {"feature_key": entitlement.feature_key, "has_access": entitlement.has_access}
    if entitlement.reason is not None:
        body["reason"] = entitlement.reason
    body["limit"] = format_number(entitlement.limit)
    body["usage"] = format_number(entitlement.usage)
    if entitlement.type is None:
        body["metadata"] = None
    else:
        body["metadata"] = {
            "remaining": format_number(entitlement.remaining),
            "resets_at": format_time(entitlement.resets_at) if entitlement.resets_at else None,
            "type": entitlement.type,
        }
    return body


def snapshot_to_json(usage: UsageSnapshot) -> JSON:
    return {
        "consumed_units": format_number(usage.consumed_units),
        "limit_units": format_number(usage.limit_units),
        "remaining_units": format_number(usage.remaining_units),
        "period_start": format_time(usage.period_start),
        "period_end": format_time(usage.period_end),
    }


def track_result_to_json(result: TrackUsageResult) -> JSON:
    return {
        "success": result.success,
        "feature_key": result.feature_key,
        "quantity": format_number(result.quantity),
        "recorded_at": format_time(result.recorded_at),
        "usage": snapshot_to_json(result.usage),
    }


def metrics_to_json(metrics: UsageMetrics) -> JSON:
    return {
        "metrics": [
            {
                "feature_key": m.feature_key,
                "feature_title": m.feature_title,
                "product_name": m.product_name,
                "consumed": format_number(m.consumed),
                "limit": format_number(m.limit),
                "remaining": format_number(m.remaining),
                "percentage_used": m.percentage_used,
                "period_start": format_time(m.period_start),
                "period_end": format_time(m.period_end),
                "resets_in_days": m.resets_in_days,
            }
            for m in metrics.metrics
        ],
        "customer_id": metrics.customer_id,
    }


def session_token_to_json(token: SessionToken) -> JSON:
    return {"sessionToken": token.token, "expiresAt": format_time(token.expires_at)}


# -- decoding: every malformed answer becomes InvalidResponseError, never a KeyError or TypeError --


def _fail(what: str, body: Any) -> InvalidResponseError:
    return InvalidResponseError(f"malformed BillingOS response: {what}", body=body)


def _field(obj: Any, key: str, body: Any) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _fail(f"missing field {key!r}", body)
    return obj[key]


def _number(value: Any, key: str, body: Any) -> float:
    if isinstance(value, str):  # DECIMAL columns are often serialised as strings
        try:
            value = float(value)
        except ValueError:
            raise _fail(f"{key!r} is not a number: {value!r}", body) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{key!r} is not a number: {value!r}", body)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise _fail(f"{key!r} is out of range", body) from None
    if not math.isfinite(number):
        raise _fail(f"{key!r} is not a number: {value!r}", body)
    return number


def _optional_number(value: Any, key: str, body: Any) -> float | None:
    return None if value is None else _number(value, key, body)


def _time(value: Any, key: str, body: Any) -> datetime:
    if not isinstance(value, str):
        raise _fail(f"{key!r} is not a timestamp: {value!r}", body)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(f"{key!r} is not an ISO-8601 timestamp: {value!r}", body) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    try:  # in UTC, as the wire has it: one without a UTC datetime would fail whoever formats it next
        return moment.astimezone(timezone.utc)
    except OverflowError:  # hours past the first or last datetime: the first or last there is
        return (datetime.max if moment.year > 1 else datetime.min).replace(tzinfo=timezone.utc)


def _optional_time(value: Any, key: str, body: Any) -> datetime | None:
    return None if value is None else _time(value, key, body)


def _string(value: Any, key: str, body: Any) -> str:
    if not isinstance(value, str):
        raise _fail(f"{key!r} is not a string: {value!r}", body)
    return value


def entitlement_from_json(body: Any) -> Entitlement:
    has_access = _field(body, "has_access", body)
    if not isinstance(has_access, bool):
        raise _fail(f"'has_access' is not a boolean: {has_access!r}", body)
    reason = body.get("reason")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _fail("'metadata' is not an object", body)
    metadata = metadata or {}
    kind = None if metadata.get("type") is None else _string(metadata["type"], "metadata.type", body)
    # A quota's limit is null when unlimited: one missing is a malformed answer, not an unlimited quota.
    limit = _field(body, "limit", body) if kind == "usage_quota" else body.get("limit")
    return Entitlement(
        feature_key=_string(_field(body, "feature_key", body), "feature_key", body),
        has_access=has_access,
        reason=None if reason is None else _string(reason, "reason", body),
        limit=_optional_number(limit, "limit", body),
        usage=_optional_number(body.get("usage"), "usage", body),
        remaining=_optional_number(metadata.get("remaining"), "metadata.remaining", body),
        resets_at=_optional_time(metadata.get("resets_at"), "metadata.resets_at", body),
        type=kind,
    )


def track_result_from_json(body: Any) -> TrackUsageResult:
    success = _field(body, "success", body)
    if not isinstance(success, bool):
        raise _fail(f"'success' is not a boolean: {success!r}", body)
    if not success:  # not a recording: read as one, the usage would go unbilled (and is never resent)
        raise _fail("'success' is false: the usage may not be recorded", body)
    usage = _field(body, "usage", body)
    return TrackUsageResult(
        success=success,
        feature_key=_string(_field(body, "feature_key", body), "feature_key", body),
        quantity=_number(_field(body, "quantity", body), "quantity", body),
        recorded_at=_time(_field(body, "recorded_at", body), "recorded_at", body),
        usage=UsageSnapshot(
            consumed_units=_number(_field(usage, "consumed_units", body), "consumed_units", body),
            limit_units=_optional_number(_field(usage, "limit_units", body), "limit_units", body),
            remaining_units=_optional_number(_field(usage, "remaining_units", body), "remaining_units", body),
            period_start=_time(_field(usage, "period_start", body), "period_start", body),
            period_end=_time(_field(usage, "period_end", body), "period_end", body),
        ),
    )


def metrics_from_json(body: Any) -> UsageMetrics:
    items = _field(body, "metrics", body)
    if not isinstance(items, list):
        raise _fail("'metrics' is not a list", body)
    metrics = []
    for item in items:
        percentage = _number(_field(item, "percentage_used", body), "percentage_used", body)
        resets_in = _number(_field(item, "resets_in_days", body), "resets_in_days", body)
        metrics.append(
            UsageMetric(
                feature_key=_string(_field(item, "feature_key", body), "feature_key", body),
                feature_title=_string(_field(item, "feature_title", body), "feature_title", body),
                product_name=_string(_field(item, "product_name", body), "product_name", body),
                consumed=_number(_field(item, "consumed", body), "consumed", body),
                limit=_optional_number(_field(item, "limit", body), "limit", body),
                remaining=_optional_number(_field(item, "remaining", body), "remaining", body),
                percentage_used=round(percentage),
                period_start=_time(_field(item, "period_start", body), "period_start", body),
                period_end=_time(_field(item, "period_end", body), "period_end", body),
                resets_in_days=round(resets_in),
            )
        )
    customer_id = _string(_field(body, "customer_id", body), "customer_id", body)
    return UsageMetrics(customer_id=customer_id, metrics=tuple(metrics))


def session_token_from_json(body: Any) -> SessionToken:
    return SessionToken(
        token=_string(_field(body, "sessionToken", body), "sessionToken", body),
        expires_at=_time(_field(body, "expiresAt", body), "expiresAt", body),
    )
