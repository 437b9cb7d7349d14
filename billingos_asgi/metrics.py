"""The middleware's counters, as a flat dict for Python and as Prometheus text for scrapers.

Read on demand from the objects that keep them (tracker, upstream door, cache, outbox):
nothing is added to the request path to collect them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from .middleware import BillingMiddleware

__all__ = ["metrics_snapshot", "prometheus_text", "serve_prometheus"]

#: Where each event ends (or waits, at shutdown): the outcomes, summed, count every event once.
_EVENT_OUTCOMES = ("sent", "rejected", "dead_lettered", "dropped", "in_doubt", "deferred")
#: Where events come from: handed over by a request, found in the outbox, or a quota refusal's second part.
_EVENT_SOURCES = (("request", "queued"), ("outbox", "replayed"), ("split", "split"))
_BREAKER_STATES = ("closed", "open", "half_open")


def metrics_snapshot(middleware: BillingMiddleware) -> dict[str, float | str]:
    """Every counter and gauge, by name: events by outcome, calls by kind, backlog, breaker state."""
    stats = middleware.tracker.stats
    upstream = middleware.upstream
    outbox = middleware.tracker.outbox
    names = (*_EVENT_OUTCOMES, *(name for _, name in _EVENT_SOURCES), "duplicates", "coalesced", "not_durable")
    snapshot: dict[str, float | str] = {f"events_{name}": getattr(stats, name) for name in names}
    snapshot.update({f"refused_{status}": count for status, count in middleware.refused.items()})
    snapshot.update(
        events_backlog=middleware.tracker.backlog,
        events_in_flight=stats.in_flight,
        track_calls=upstream.tracks,
        check_calls=upstream.checks,
        retry_calls=upstream.retries,
        endpoint_calls=upstream.endpoint_calls,
        track_retries=stats.retried,
        throttled=upstream.throttled,
        checks_refused_by_budget=upstream.refused_by_budget,
        breaker_state=upstream.breaker.state,
        breaker_opened=upstream.breaker.opened,
        cache_entries=len(middleware.cache),
        outbox_events=0 if outbox is None else outbox.size,
        requests_unidentified=middleware.unidentified,
    )
    return snapshot


def prometheus_text(middleware: BillingMiddleware) -> str:
    """The counters in the Prometheus text exposition format (version 0.0.4)."""
    m = metrics_snapshot(middleware)
    refused = middleware.refused
    lines = [
        "# HELP billingos_requests_refused_total Requests the middleware answered itself, by status.",
        "# TYPE billingos_requests_refused_total counter",
        *(f'billingos_requests_refused_total{{status="{status}"}} {m[f"refused_{status}"]}' for status in refused),
        "# HELP billingos_usage_events_received_total Usage events to deliver, by source.",
        "# TYPE billingos_usage_events_received_total counter",
        *(f'billingos_usage_events_received_total{{source="{s}"}} {m["events_" + name]}' for s, name in _EVENT_SOURCES),
        "# HELP billingos_usage_events_total Usage events by outcome since start-up.",
        "# TYPE billingos_usage_events_total counter",
        *(f'billingos_usage_events_total{{outcome="{name}"}} {m["events_" + name]}' for name in _EVENT_OUTCOMES),
        "# HELP billingos_usage_events_unrecorded_total Usage events not recorded, by outcome and reason.",
        "# TYPE billingos_usage_events_unrecorded_total counter",
        *_unrecorded(middleware.tracker.stats.reasons),
        "# HELP billingos_usage_events_duplicates_total Events of a trusted request id seen before: counted once.",
        "# TYPE billingos_usage_events_duplicates_total counter",
        f"billingos_usage_events_duplicates_total {m['events_duplicates']}",
        "# HELP billingos_usage_events_coalesced_total Track calls saved by coalescing (n - 1 for a batch of n).",
        "# TYPE billingos_usage_events_coalesced_total counter",
        f"billingos_usage_events_coalesced_total {m['events_coalesced']}",
        "# HELP billingos_usage_events_not_durable_total Events kept in memory only: the outbox failed to write them.",
        "# TYPE billingos_usage_events_not_durable_total counter",
        f"billingos_usage_events_not_durable_total {m['events_not_durable']}",
        "# HELP billingos_usage_events_backlog Usage events accepted and not in a track call (queued, or to retry).",
        "# TYPE billingos_usage_events_backlog gauge",
        f"billingos_usage_events_backlog {m['events_backlog']}",
        "# HELP billingos_usage_events_in_flight Usage events in a track call right now.",
        "# TYPE billingos_usage_events_in_flight gauge",
        f"billingos_usage_events_in_flight {m['events_in_flight']}",
        "# HELP billingos_upstream_calls_total Calls made to the billing service.",
        "# TYPE billingos_upstream_calls_total counter",
        f'billingos_upstream_calls_total{{call="check"}} {m["check_calls"]}',
        f'billingos_upstream_calls_total{{call="track"}} {m["track_calls"]}',
        f'billingos_upstream_calls_total{{call="retry"}} {m["retry_calls"]}',
        f'billingos_upstream_calls_total{{call="endpoint"}} {m["endpoint_calls"]}',
        "# HELP billingos_track_retries_total Track calls retried after a transient failure.",
        "# TYPE billingos_track_retries_total counter",
        f"billingos_track_retries_total {m['track_retries']}",
        "# HELP billingos_upstream_throttled_total 429 answers from the billing service.",
        "# TYPE billingos_upstream_throttled_total counter",
        f"billingos_upstream_throttled_total {m['throttled']}",
        "# HELP billingos_checks_refused_by_budget_total Checks not made for want of a budget token.",
        "# TYPE billingos_checks_refused_by_budget_total counter",
        f"billingos_checks_refused_by_budget_total {m['checks_refused_by_budget']}",
        "# HELP billingos_breaker_state The circuit breaker's state (1 for the current one).",
        "# TYPE billingos_breaker_state gauge",
        *(f'billingos_breaker_state{{state="{s}"}} {int(m["breaker_state"] == s)}' for s in _BREAKER_STATES),
        "# HELP billingos_breaker_opened_total Times the circuit breaker opened.",
        "# TYPE billingos_breaker_opened_total counter",
        f"billingos_breaker_opened_total {m['breaker_opened']}",
        "# HELP billingos_entitlement_cache_entries Entitlements cached.",
        "# TYPE billingos_entitlement_cache_entries gauge",
        f"billingos_entitlement_cache_entries {m['cache_entries']}",
        "# HELP billingos_outbox_events Usage events in the durable outbox.",
        "# TYPE billingos_outbox_events gauge",
        f"billingos_outbox_events {m['outbox_events']}",
        "# HELP billingos_requests_unidentified_total Late-identified requests that succeeded unbilled (no customer).",
        "# TYPE billingos_requests_unidentified_total counter",
        f"billingos_requests_unidentified_total {m['requests_unidentified']}",
    ]
    return "\n".join(lines) + "\n"


def _unrecorded(reasons: dict[str, int]) -> Iterator[str]:
    """The samples of events not recorded, from the tracker's ``"outcome: reason"`` counts."""
    for category, count in sorted(reasons.items()):
        outcome, _, reason = category.partition(": ")
        reason = reason.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # quoted as the format says
        yield f'billingos_usage_events_unrecorded_total{{outcome="{outcome}",reason="{reason}"}} {count}'


async def serve_prometheus(middleware: BillingMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a scrape with :func:`prometheus_text`."""
    await PlainTextResponse(prometheus_text(middleware), media_type="text/plain; version=0.0.4")(scope, receive, send)
