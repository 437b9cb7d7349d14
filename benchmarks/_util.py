"""Small shared pieces of the benchmarks: plans, timing, table printing, a free port."""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

BENCH_PLANS: dict[str, Any] = {
    "features": {
        "api_calls": {"title": "API calls", "type": "usage_quota"},
        "export": {"title": "Export", "type": "boolean_flag"},
    },
    "plans": {"unlimited": {"name": "Unlimited", "features": {"api_calls": "unlimited", "export": True}}},
    "customers": {f"customer_{i}": "unlimited" for i in range(100)},
}

BENCH_PLANS_TOML = """
[features.api_calls]
title = "API calls"
type = "usage_quota"

[plans.unlimited]
name = "Unlimited"
features = { api_calls = "unlimited" }

[customers]
""" + "".join(f'customer_{i} = "unlimited"\n' for i in range(100))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()} {platform.machine()}"


async def ops_per_second(operation: Callable[[int], Awaitable[object]], *, total: int, concurrency: int = 1) -> float:
    """Run ``operation(i)`` for i in range(total) with ``concurrency`` tasks; return operations/s."""
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await operation(i)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return total / (time.perf_counter() - start)


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
