"""The benchmark suite's own logic, on made-up figures: the report page, the goals, wrk parsing, lag matching.

Nothing here is timed: the benchmarks themselves run with ``make bench``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import goals, run_child
from benchmarks._util import Section, Table, free_port, percentile, stop_server
from benchmarks.bench_client_server import start_server, tracks_per_second
from benchmarks.bench_instructions import send_one_by_one
from benchmarks.bench_pipeline import FEATURE, delivery_lags, full_speed, metered, plans
from benchmarks.bench_server import parse_wrk, start_app
from benchmarks.report import markdown, write
from billingos_asgi import BillingOS, LocalBilling
from billingos_asgi.events import Batch, UsageEvent

STAMP = {"date": "2026-01-01 00:00 UTC", "machine": "2 cores (a CPU)", "packages": "starlette 1.0"}


def sections() -> dict[str, Section]:
    table = Table(
        "In-process", "what it measures", "python -m benchmarks --only middleware", ("app", "us"), [("a", "1")]
    )
    warm = "+ BillingMiddleware, warm cache"
    middleware = Section(
        "middleware",
        [table],
        {
            "overhead_us": {warm: 9.0, "+ slowapi": 40.0, "+ asgi-correlation-id": 8.0},
            "peers": ["+ slowapi", "+ asgi-correlation-id"],
            "warm": warm,
        },
    )
    labels = {"starlette": "bare Starlette", "billing": "+ ours"}
    server: dict[str, Any] = {
        "summary": {
            "starlette": {"rps": 10_000.0, "p50_ms": 2.0, "p99_ms": 4.0, "ratio": 1.0, "cpu_ratio": 1.0, "errors": 0.0},
            "billing": {"rps": 9_500.0, "p50_ms": 2.1, "p99_ms": 4.5, "ratio": 0.95, "cpu_ratio": 0.93, "errors": 0.0},
        },
        "labels": labels,
    }
    samples = [{"requests": n * 100_000, "rss_mb": 40.0 + min(n, 3)} for n in range(11)]
    counted = {"bare Starlette": 100_000.0, "+ ours": 150_000.0, "+ slowapi": 400_000.0, "+ a peer": 120_000.0}
    served = {"bare Starlette": 250_000.0, "+ ours": 300_000.0, "+ a peer": 275_000.0}
    return {
        "middleware": middleware,
        "instructions": Section("instructions", [], {"per_request": counted, "served": served}),
        "server": Section("server", [], server),
        "memory": Section("memory", [], {"samples": samples, "plateau": True}),
        "profile": Section("profile", [], {"blocks": [["a profile", "100% requests"]]}),
    }


def test_goals_say_met_or_missed_with_the_figures() -> None:
    found = {goal.name: goal for goal in goals(sections())}
    assert found["overhead per metered request, in-process (warm cache)"].met
    assert not found["... and below every peer's overhead"].met  # asgi-correlation-id costs 8 us < 9 us
    assert "cheapest peer: asgi-correlation-id" in found["... and below every peer's overhead"].measured
    assert found["throughput under uvicorn vs. bare Starlette"].measured.startswith("0.95x")
    assert found["flat memory, metered requests over many customers"].met
    counted = found["... the same in CPU instructions (callgrind: no noise)"]
    assert not counted.met and counted.measured == "+50,000 vs. peers +300,000, +20,000"
    served = found["... the same by CPU instructions per request served (callgrind: no noise)"]
    assert not served.met and served.measured == "0.83x (peers: a peer 0.91x)"


def test_throughput_goal_is_missed_when_answers_failed() -> None:
    """A 401 or a reset is cheaper than a served request: a fast run of failures meets no goal."""
    found = sections()
    found["server"].data["summary"]["billing"]["errors"] = 12.0
    goal = next(goal for goal in goals(found) if goal.name == "throughput under uvicorn vs. bare Starlette")
    assert not goal.met and "12 failed answers" in goal.measured


def test_instructions_load_reads_every_answer_on_one_connection() -> None:
    port = free_port()
    server = start_app("starlette", port)
    try:
        send_one_by_one(port, 3)  # raises on anything but three whole 200 answers
    finally:
        stop_server(server)


def test_a_server_that_exits_at_start_up_is_told_at_once() -> None:
    with pytest.raises(RuntimeError, match=r"uvicorn serving 'no such app' exited \(code 1\) before answering"):
        start_app("no such app", free_port())  # the factory's KeyError: uvicorn exits with 1


def test_page_has_the_stamp_the_goals_and_every_table() -> None:
    page = markdown(STAMP, goals(sections()), sections(), {"middleware": "bench-overhead.png"})
    assert "- **Machine:** 2 cores (a CPU)" in page
    assert "| ... and below every peer's overhead |" in page and "**missed** |" in page
    assert "Command: `python -m benchmarks --only middleware`" in page
    assert "| a | 1 |" in page
    assert "```\n100% requests\n```" in page
    assert "![" in page and "(bench-overhead.png)" in page


def test_write_draws_the_charts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    page = write(tmp_path, STAMP, goals(sections()), sections(), 12.0)
    assert page.read_text().startswith("# Benchmarks")
    assert {path.name for path in tmp_path.glob("*.png")} == {
        "bench-overhead.png",
        "bench-uvicorn.png",
        "bench-memory.png",
    }


def test_every_chart_carries_the_stamp(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write(tmp_path, STAMP, goals(sections()), sections(), 12.0)
    for chart in tmp_path.glob("*.png"):
        assert b"2 cores (a CPU)" in chart.read_bytes() and b"starlette 1.0" in chart.read_bytes(), chart.name


WRK = """Running 5s test @ http://127.0.0.1:8000/v1/search
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.90ms  612.34us  15.01ms   90.00%
    Req/Sec    11.10k   400.00    11.60k    80.00%
  Latency Distribution
     50%    2.81ms
     75%    3.01ms
     90%    3.30ms
     99%  950.00us
  55234 requests in 5.00s, 7.74MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  11046.80
Transfer/sec:      1.55MB
"""


def test_parse_wrk() -> None:
    assert parse_wrk(WRK) == {
        "requests": 55234.0,
        "rps": 11046.8,
        "p50_ms": 2.81,
        "p99_ms": pytest.approx(0.95),
        "errors": 3.0,
    }


def test_parse_wrk_counts_socket_errors() -> None:
    failed = WRK.replace("  Non-2xx", "  Socket errors: connect 0, read 2, write 1, timeout 5\n  Non-2xx")
    assert parse_wrk(failed)["errors"] == 11.0


def key_of(customer: str, keys: list[str]) -> str:
    return Batch.of(tuple(UsageEvent(customer, FEATURE, 1.0, k) for k in keys)).idempotency_key


def test_delivery_lags_match_each_confirmation_to_its_events() -> None:
    order = {"alice": ["a1", "a2", "a3", "a4"], "bob": ["b1"]}
    ends = {"a1": 0.0, "a2": 0.1, "a3": 0.2, "a4": 0.3, "b1": 0.5}
    confirmed = [
        (1.0, "alice", key_of("alice", ["a3", "a4"]), 2.0),  # a later batch confirmed first
        (1.5, "alice", key_of("alice", ["a1", "a2"]), 2.0),
        (2.0, "bob", "b1", 1.0),  # a batch of one goes up under its event's own key
    ]
    lags = delivery_lags(confirmed, ends, order)
    assert sorted(round(lag, 6) for lag in lags) == [0.7, 0.8, 1.4, 1.5, 1.5]


def test_percentile_is_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert (percentile(samples, 0.5), percentile(samples, 0.99), percentile(samples, 1.0)) == (50.0, 99.0, 100.0)


def test_percentile_rounds_the_rank_up() -> None:
    samples = [float(i) for i in range(1, 14)]  # 13 samples: the median is the 7th, the first quartile the 4th
    assert (percentile(samples, 0.5), percentile(samples, 0.25)) == (7.0, 4.0)
    assert percentile([float(i) for i in range(1, 11)], 0.25) == 3.0  # rank 2.5 -> 3, not 2
    assert percentile([float(i) for i in range(1, 101)], 0.07) == 7.0  # 0.07 * 100 is 7.000000000000001


async def test_client_server_warm_up_and_measured_tracks_are_all_recorded(tmp_path: Path) -> None:
    """The warm-up's keys are not replayed by the measured run (replays are cheaper, and record nothing)."""
    port = free_port()
    server = start_server(tmp_path, port)
    try:
        async with BillingOS("sk_test_local", base_url=f"http://127.0.0.1:{port}") as client:
            await tracks_per_second(client, total=4, concurrency=2, label="warm-up 2")
            await tracks_per_second(client, total=6, concurrency=2, label="2")
    finally:
        stop_server(server)
    async with LocalBilling.from_file(tmp_path / "plans.toml", tmp_path / "bench.db") as billing:
        recorded = [await billing.recorded_units(f"customer_{i}", "api_calls") for i in range(6)]
    assert recorded == [2.0, 2.0, 2.0, 2.0, 1.0, 1.0]


async def test_a_tracking_round_is_timed_until_its_own_events_are_delivered(tmp_path: Path) -> None:
    """Delivery left running after a round would be timed in the next one: the other variant's."""
    async with LocalBilling.from_dict(plans(3), tmp_path / "billing.db") as billing:
        tracked = metered(billing)
        await full_speed(tracked, 3, requests=60)
        stats = tracked.tracker.stats
        assert (stats.queued, stats.sent, tracked.tracker.running) == (60, 60, False)  # through the queue, all sent
        assert sum([await billing.recorded_units(f"customer_{i}", FEATURE) for i in range(3)]) == 60


def state_of(pid: int) -> str:
    """The process's state letter (Z: a zombie, dead), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_what_a_part_started_does_not_outlive_it() -> None:
    """A part that fails (or times out) leaves no server or load generator of its own running."""
    part = (
        "import subprocess, sys; "
        "server = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(server.pid, flush=True); sys.exit(3)"
    )
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_child([sys.executable, "-c", part], timeout=120)
    orphan = int(failed.value.output)
    try:
        assert failed.value.returncode == 3
        for _ in range(1_000):  # a SIGKILL takes effect a moment after it is sent
            if state_of(orphan) in ("Z", "gone"):
                break
            time.sleep(0.01)
        assert state_of(orphan) in ("Z", "gone")
    finally:
        if state_of(orphan) not in ("Z", "gone"):
            os.kill(orphan, signal.SIGKILL)


async def test_the_in_process_driver_stops_at_an_app_that_refuses_rather_than_time_its_refusals() -> None:
    from starlette.responses import PlainTextResponse

    from benchmarks.apps import starlette_app
    from benchmarks.bench_middleware import drive

    assert await drive(starlette_app(), 2) > 0
    with pytest.raises(RuntimeError, match="answered 401, not 200"):
        await drive(PlainTextResponse("sign in", 401), 2)


def test_memory_plateaus_only_when_the_second_half_stays_flat() -> None:
    from benchmarks.bench_memory import plateaus

    noisy_but_flat = [40.0, 52.4, 52.1, 52.1, 51.4, 52.1, 52.7, 52.4, 51.8, 52.1]
    leaking = [40.0 * 1.02**step for step in range(10)]  # 2% a sample: the last three are within 5%
    assert plateaus(noisy_but_flat)
    assert not plateaus(leaking)
    assert not plateaus([52.0, 52.0])  # too few samples to tell
