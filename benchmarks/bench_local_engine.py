"""LocalBilling check and track operations per second, in-process (SQLite file in WAL mode and :memory:)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from billingos_asgi import LocalBilling

from ._util import BENCH_PLANS, Section, Table, command, ops_per_second, scaled

OPERATIONS = scaled(5_000, 500)


async def run() -> Section:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for label, database in (("SQLite file (WAL)", str(Path(workdir) / "bench.db")), (":memory:", ":memory:")):
            async with LocalBilling.from_dict(BENCH_PLANS, database) as billing:
                for concurrency in (1, 16):

                    async def check(i: int) -> None:
                        await billing.check_entitlement(f"customer_{i % 100}", "api_calls")

                    async def track(i: int, run: int = concurrency) -> None:
                        await billing.track_usage(f"customer_{i % 100}", "api_calls", 1, idempotency_key=f"k{run}-{i}")

                    await ops_per_second(check, total=500, concurrency=concurrency)  # warm-up
                    checks = await ops_per_second(check, total=OPERATIONS, concurrency=concurrency)
                    tracks = await ops_per_second(track, total=OPERATIONS, concurrency=concurrency)
                    rows.append((label, str(concurrency), f"{checks:,.0f}", f"{tracks:,.0f}"))
    table = Table(
        f"LocalBilling in-process, {OPERATIONS:,} operations each",
        "Operations per second of the embedded engine's check and track (each track with an idempotency key), "
        "each call one SQLite transaction in a worker thread, over 100 customers.",
        command("engine"),
        ("database", "concurrent tasks", "check ops/s", "track ops/s"),
        rows,
    )
    return Section("engine", [table])
