"""Delivery across process ends: SIGTERM under uvicorn drains; SIGKILL leaves the outbox to a restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from billingos_asgi import BillingMiddleware, BillingOS
from billingos_asgi.testing import lifespan

from ..conftest import SECRET_KEY, RunningServer, running_server
from ..faultproxy import FaultPlan, serve_fault_proxy

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = ("user_0", "user_1", "user_2")
PLANS: dict[str, Any] = {
    "features": {"api_calls": {"type": "usage_quota"}},
    "plans": {"big": {"features": {"api_calls": 1_000_000}}},
    "customers": dict.fromkeys(CUSTOMERS, "big"),
}


@pytest.fixture
def big_server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(PLANS, tmp_path / "billing.db") as server:
        yield server


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def recorded(server: RunningServer) -> int:
    return sum([int(await server.billing.recorded_units(c, "api_calls")) for c in CUSTOMERS])


async def test_sigterm_under_uvicorn_drains_every_unit(big_server: RunningServer) -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "tests.delivery.served_app:app", "--port", str(port)]
    command += ["--log-level", "warning"]
    # A long flush window: at SIGTERM, nearly every event is still queued.
    env = child_env(BILLING_URL=big_server.base_url, FLUSH_INTERVAL="30")
    process = subprocess.Popen(command, cwd=ROOT, env=env)  # noqa: ASYNC220 - a test's child, started once
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            with anyio.fail_after(20):
                while True:
                    try:
                        await client.get("/health")
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.05)

            async def hit(i: int) -> None:
                response = await client.get("/hello", headers={"x-customer": CUSTOMERS[i % 3]})
                assert response.status_code == 200

            for wave in range(15):
                async with anyio.create_task_group() as tg:
                    for i in range(10):
                        tg.start_soon(hit, wave * 10 + i)
        assert await recorded(big_server) < 150
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    finally:
        process.kill()
        process.wait()
    assert await recorded(big_server) == 150


async def test_sigkill_with_events_in_the_outbox_delivers_them_once_after_restart(
    big_server: RunningServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    requests = 60
    # Half the track calls are recorded upstream but answered with an error (the dangerous case),
    # the other half fail before reaching it: every event stays in the outbox, some already counted.
    with serve_fault_proxy(big_server.base_url, FaultPlan(seed=7, after=0.5, before=0.5)) as proxy:
        command = [sys.executable, "-m", "tests.delivery.served_app", str(requests)]
        env = child_env(BILLING_URL=proxy.base_url, OUTBOX=str(outbox), FLUSH_INTERVAL="0.05")
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
        try:
            assert process.stdout is not None
            ready = process.stdout.readline()
            assert ready.startswith(f"READY {requests} "), ready
            deadline = time.monotonic() + 10
            # (the proxy counts a fault when it draws it: an "after" is recorded upstream a moment later)
            while await recorded(big_server) == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
    assert proxy.counts.get("after", 0) > 0 and await recorded(big_server) > 0  # some counted before the crash

    # The restart, straight to the billing service: the same batches under the same keys.
    async with BillingOS(secret_key=SECRET_KEY, base_url=big_server.base_url) as billing:
        restarted = BillingMiddleware(
            Starlette(),
            billing=billing,
            customer=lambda request: None,
            flush_interval=0.05,
            calls_per_minute=None,
            outbox=outbox,
        )
        async with lifespan(restarted):
            pass
    assert restarted.tracker.stats.replayed == requests
    assert restarted.tracker.stats.sent == requests
    assert await recorded(big_server) == requests
