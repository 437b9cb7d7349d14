"""Client -> local server track round trips per second over loopback, keep-alive, server in its own process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from billingos_asgi import BillingOS

from ._util import (
    Section,
    Table,
    command,
    free_port,
    ops_per_second,
    plans_toml,
    scaled,
    stop_server,
    wait_until_answering,
)

ROUND_TRIPS = scaled(3_000, 300)


def start_server(workdir: Path, port: int, customers: int = 100) -> subprocess.Popen[bytes]:
    """``billingos-asgi serve`` (uvicorn) in its own process on ``port``, over ``workdir/bench.db``."""
    plans = workdir / "plans.toml"
    plans.write_text(plans_toml(customers))
    command = [sys.executable, "-m", "billingos_asgi", "serve", "--plans", str(plans)]
    command += ["--db", str(workdir / "bench.db"), "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command)
    wait_until_answering(process, f"http://127.0.0.1:{port}/health", "the local server", timeout=15)
    return process


async def tracks_per_second(client: BillingOS, *, total: int, concurrency: int, label: str) -> float:
    """``total`` tracks over 100 customers, each under a new key (``label`` names the run) so that each is
    recorded: a key seen before is answered from the idempotency table, which is cheaper and records nothing."""

    async def track(i: int) -> None:
        await client.track_usage(f"customer_{i % 100}", "api_calls", 1, idempotency_key=f"{label}-{i}")

    return await ops_per_second(track, total=total, concurrency=concurrency)


async def run() -> Section:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        server = start_server(Path(workdir), port)
        try:
            async with BillingOS("sk_test_local", base_url=f"http://127.0.0.1:{port}") as client:
                for concurrency in (1, 8):
                    # warm-up: opens the connections
                    await tracks_per_second(client, total=200, concurrency=concurrency, label=f"warm-up {concurrency}")
                    rate = await tracks_per_second(
                        client, total=ROUND_TRIPS, concurrency=concurrency, label=f"{concurrency}"
                    )
                    rows.append((str(concurrency), f"{rate:,.0f}", f"{1e3 * concurrency / rate:.2f}"))
        finally:
            stop_server(server)
    table = Table(
        f"BillingOS client -> local server over loopback, {ROUND_TRIPS:,} tracks",
        "Track round trips per second from the async client to `billingos-asgi serve` (uvicorn, its own process, "
        "SQLite file), keep-alive connections: the ceiling of one process's delivery to a real server.",
        command("client_server"),
        ("concurrent requests", "track round trips/s", "mean latency ms"),
        rows,
    )
    return Section("client_server", [table])
