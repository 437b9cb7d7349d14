"""Small shared pieces of the benchmarks: plans, run size, timing, result tables, the machine stamp, a free port,
starting and stopping a server process."""

from __future__ import annotations

import math
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import anyio
import httpx

STAMPED_PACKAGES = (
    "billingos-asgi",
    "starlette",
    "fastapi",
    "uvicorn",
    "httptools",
    "httpx",
    "anyio",
    "slowapi",
    "asgi-correlation-id",
    "moesifasgi",
)

BENCH_PLANS: dict[str, Any] = {
    "features": {
        "api_calls": {"title": "API calls", "type": "usage_quota"},
        "export": {"title": "Export", "type": "boolean_flag"},
    },
    "plans": {"unlimited": {"name": "Unlimited", "features": {"api_calls": "unlimited", "export": True}}},
    "customers": {f"customer_{i}": "unlimited" for i in range(100)},
}


def plans_toml(customers: int = 100) -> str:
    """A plans file with ``customers`` customers on an unlimited plan (for the local server)."""
    head = '[features.api_calls]\ntitle = "API calls"\ntype = "usage_quota"\n\n'
    head += '[plans.unlimited]\nname = "Unlimited"\nfeatures = { api_calls = "unlimited" }\n\n[customers]\n'
    return head + "".join(f'customer_{i} = "unlimited"\n' for i in range(customers))


BENCH_PLANS_TOML = plans_toml(100)


def quick() -> bool:
    """``BENCH_QUICK=1`` (or ``python -m benchmarks --quick``) shrinks every run to check the suite works,
    not to measure: the figures are meaningless then."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def scaled(full: int, quick_size: int) -> int:
    """``full`` for ``make bench``, ``quick_size`` under ``BENCH_QUICK`` (read when a benchmark is imported)."""
    return quick_size if quick() else full


@dataclass
class Table:
    """One result table: printed to the terminal and written into ``docs/benchmarks.md``."""

    title: str
    measures: str  # what the figures mean, in a sentence or two
    command: str  # how to run just this part
    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def print(self) -> None:
        widths = [max(len(cell) for cell in column) for column in zip(self.header, *self.rows, strict=True)]
        print(f"\n{self.title}")
        print("| " + " | ".join(h.ljust(w) for h, w in zip(self.header, widths, strict=True)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in self.rows:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        for note in self.notes:
            print(f"({note})")


@dataclass
class Section:
    """What one benchmark module found: its tables, and the raw figures the goals and charts use."""

    name: str
    tables: list[Table]
    data: dict[str, Any] = field(default_factory=dict)


def command(part: str) -> str:
    """How to rerun one part (``make bench`` runs them all, and installs the peers and tools they need first)."""
    return f".venv/bin/python -m benchmarks --only {part}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_answering(
    process: subprocess.Popen[bytes], url: str, what: str, *, timeout: float, headers: Mapping[str, str] | None = None
) -> None:
    """Return once ``url`` answers 200. A server that exits first, answers otherwise until ``timeout``, or is
    interrupted (Ctrl-C) is killed and reaped before the error goes up: none outlives the run."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited (code {process.returncode}) before answering")
            try:
                status = httpx.get(url, headers=headers).status_code
            except httpx.TransportError as exc:
                last = type(exc).__name__
            else:
                if status == 200:
                    return
                last = f"status {status}"
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not answer 200 within {timeout:g} s (last: {last})")
    except BaseException:
        process.kill()
        process.wait()
        raise


def stop_server(server: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """A graceful shutdown (SIGTERM: the lifespan drains), killed when it takes over ``timeout`` seconds."""
    server.terminate()
    try:
        server.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> dict[str, str]:
    found = {}
    for name in STAMPED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> str:
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}"
    )


def stamp() -> dict[str, str]:
    """Where and with what the figures were taken."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "packages": ", ".join(f"{name} {version}" for name, version in versions().items()),
    }


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank: the ceiling of ``fraction * n``) of ``samples``; NaN when there
    are none. The product is rounded first so that float error (0.07 * 100 = 7.000000000000001) moves no rank."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = math.ceil(round(fraction * len(ordered), 9))
    return ordered[min(len(ordered), max(1, rank)) - 1]


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
