"""Delivery counters: readable from Python, and scraped as Prometheus text at ``metrics_path``."""

from __future__ import annotations

import re

from billingos_asgi import BillingMiddleware, LocalBilling

from ..asgi import serve
from .support import as_customer, by_header, recording_app

SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="[a-z_0-9]+"\})? \d+(\.\d+)?$')


async def test_counters_after_traffic_in_python_and_prometheus_text(billing: LocalBilling) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls),
        billing=billing,
        customer=by_header,
        routes={"/x": "api_calls"},
        flush_interval=0.05,
        metrics_path="/internal/metrics",
    )
    async with serve(middleware) as client:
        for _ in range(3):
            assert (await client.get("/x", headers=as_customer("user_pro"))).status_code == 200
        assert (await client.get("/x", headers=as_customer("nobody"))).status_code == 403
        assert (await client.get("/x")).status_code == 401
        scrape = await client.get("/internal/metrics")
    metrics = middleware.metrics()
    assert metrics["events_queued"] == metrics["events_sent"] == 3
    assert (metrics["events_dropped"], metrics["events_backlog"], metrics["breaker_state"]) == (0, 0, "closed")
    assert metrics["check_calls"] == 2 and 1 <= int(metrics["track_calls"]) <= 3
    assert metrics["cache_entries"] == 2 and metrics["outbox_events"] == 0
    assert [metrics[f"refused_{status}"] for status in (401, 403, 429, 503)] == [1, 1, 0, 0]

    assert scrape.status_code == 200
    assert scrape.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "x-request-id" not in scrape.headers and calls == ["GET /x"] * 3  # not metered, not the app's
    samples = [line for line in scrape.text.splitlines() if not line.startswith("#")]
    assert samples and all(SAMPLE.match(line) for line in samples), samples
    assert 'billingos_upstream_calls_total{call="check"} 2' in samples
    assert 'billingos_upstream_calls_total{call="retry"} 0' in samples
    assert 'billingos_breaker_state{state="closed"} 1' in samples
    assert 'billingos_breaker_state{state="open"} 0' in samples
    assert 'billingos_requests_refused_total{status="403"} 1' in samples
    assert 'billingos_usage_events_received_total{source="request"} 3' in samples
    text = middleware.prometheus()
    assert 'billingos_usage_events_total{outcome="sent"} 3' in text


async def test_the_metrics_path_serves_get_and_head_only_the_app_its_other_methods(billing: LocalBilling) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(
        recording_app(calls), billing=billing, customer=by_header, metrics_path="/internal/metrics"
    )
    async with serve(middleware) as client:
        scrapes = [await client.request(method, "/internal/metrics") for method in ("GET", "HEAD")]
        await client.post("/internal/metrics")
        await client.delete("/internal/metrics")
    assert [scrape.headers["content-type"] for scrape in scrapes] == ["text/plain; version=0.0.4; charset=utf-8"] * 2
    assert calls == ["POST /internal/metrics", "DELETE /internal/metrics"]


async def test_without_a_metrics_path_the_app_owns_every_path(billing: LocalBilling) -> None:
    calls: list[str] = []
    middleware = BillingMiddleware(recording_app(calls), billing=billing, customer=by_header)
    async with serve(middleware) as client:
        await client.get("/metrics")
    assert calls == ["GET /metrics"]


async def test_events_are_counted_once_by_outcome_and_those_not_recorded_by_reason(billing: LocalBilling) -> None:
    """Summed over outcomes, every event counts once (where it came from is a family of its own);
    a quota conflict shows as rejected, with its reason."""
    middleware = BillingMiddleware(
        recording_app([]), billing=billing, customer=by_header, routes={"/x": "api_calls"}, flush_interval=60
    )
    async with serve(middleware) as client:
        for _ in range(2):
            assert (await client.get("/x", headers=as_customer("user_free"))).status_code == 200
        await billing.track_usage("user_free", "api_calls", 10)  # another process takes the whole quota
    # (delivered at shutdown)
    text = middleware.prometheus()
    outcomes = re.findall(r'^billingos_usage_events_total\{outcome="\w+"\} (\d+)$', text, re.MULTILINE)
    assert len(outcomes) == 6 and sum(map(int, outcomes)) == 2
    assert 'billingos_usage_events_total{outcome="rejected"} 2' in text
    assert 'billingos_usage_events_unrecorded_total{outcome="rejected",reason="QuotaExceededError"} 2' in text, text
