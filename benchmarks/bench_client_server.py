"""Client -> local server track round trips per second over loopback, keep-alive, server in its own process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from billingos_asgi import BillingOS

from ._util import BENCH_PLANS_TOML, free_port, ops_per_second, print_table

ROUND_TRIPS = 3_000


def start_server(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    plans = workdir / "plans.toml"
    plans.write_text(BENCH_PLANS_TOML)
    command = [sys.executable, "-m", "billingos_asgi", "serve", "--plans", str(plans)]
    command += ["--db", str(workdir / "bench.db"), "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the local server did not start")


async def run() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        server = start_server(Path(workdir), port)
        try:
            async with BillingOS("sk_test_local", base_url=f"http://127.0.0.1:{port}") as client:
                for concurrency in (1, 8):

                    async def track(i: int, run: int = concurrency) -> None:
                        await client.track_usage(f"customer_{i % 100}", "api_calls", 1, idempotency_key=f"k{run}-{i}")

                    await ops_per_second(track, total=200, concurrency=concurrency)  # warm-up, opens connections
                    rate = await ops_per_second(track, total=ROUND_TRIPS, concurrency=concurrency)
                    rows.append((str(concurrency), f"{rate:,.0f}", f"{1e3 * concurrency / rate:.2f}"))
        finally:
            server.terminate()
            server.wait(10)
    print_table(
        f"BillingOS client -> local server (uvicorn, separate process) over loopback, {ROUND_TRIPS:,} tracks",
        ("concurrent requests", "track round trips/s", "mean latency ms"),
        rows,
    )
