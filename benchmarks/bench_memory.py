"""Memory: resident set size while a metered app serves 1,000,000 requests over 100,000 customers.

The customers take turns (round robin), the worst case for the bounded structures: every
request misses the entitlement cache (10,000 entries by default, so it stays full and evicts),
and every flush window holds one group per request for the tracker to deliver (to the in-memory
backend, no call budget). The run happens in a fresh process (``python -m
benchmarks.bench_memory``) so earlier benchmarks do not weigh on its RSS; RSS (``VmRSS``) is
sampled every 100,000 requests, and the series plateaus when every sample of its second half lies
within ``PLATEAU`` of the others: by then the cache has been full for long, and a leak of 1.5%
per 100,000 requests adds up past it over those five samples (the last three alone would call 2% flat).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from ._util import Section, Table, command, scaled

REQUESTS = scaled(1_000_000, 100_000)
CUSTOMERS = scaled(100_000, 10_000)
SAMPLES = 10
PLATEAU = 0.05  # the second half's samples within 5% of each other
ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    """The current resident set size in MiB (Linux); the peak from ``resource`` elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


async def serve(requests: int, customers: int) -> None:
    """The child process: serve ``requests`` in-process, printing one JSON line per sample."""
    from billingos_asgi.testing import lifespan

    from .apps import InMemoryBackend, billing_middleware, starlette_app
    from .bench_middleware import _receive, _send, scope_for

    backend = InMemoryBackend()
    middleware = billing_middleware(starlette_app(), backend)
    every = max(1, requests // SAMPLES)
    print(json.dumps({"requests": 0, "rss_mb": rss_mb()}), flush=True)
    start = time.perf_counter()
    async with lifespan(middleware):
        for i in range(1, requests + 1):
            await middleware(scope_for(f"customer_{i % customers}"), _receive, _send)
            await anyio.lowlevel.checkpoint()  # a server's loop turns between requests: the tracker runs
            if i % every == 0:
                sample = {
                    "requests": i,
                    "rss_mb": rss_mb(),
                    "seconds": time.perf_counter() - start,
                    "cache_entries": len(middleware.cache),
                    "backlog": middleware.tracker.backlog,
                }
                print(json.dumps(sample), flush=True)
    print(json.dumps({"done": True, "units": backend.units, "tracks": backend.tracks}), flush=True)


def second_half(series: list[float]) -> list[float]:
    return series[len(series) // 2 :]


def plateaus(series: list[float]) -> bool:
    """Whether RSS stopped growing: the samples of the second half within ``PLATEAU`` of each other."""
    late = second_half(series)
    return len(late) >= 3 and max(late) <= min(late) * (1 + PLATEAU)


def run_sync() -> Section:
    argv = [sys.executable, "-m", "benchmarks.bench_memory", "--requests", str(REQUESTS)]
    argv += ["--customers", str(CUSTOMERS)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    samples = [line for line in lines if "rss_mb" in line]
    summary = next(line for line in lines if line.get("done"))
    series = [sample["rss_mb"] for sample in samples[1:]]
    flat = plateaus(series)
    rows = [
        (
            f"{sample['requests']:,}",
            f"{sample['rss_mb']:.1f}",
            f"{sample.get('cache_entries', 0):,}",
            f"{sample.get('backlog', 0):,}",
            f"{sample.get('seconds', 0.0):.0f}",
        )
        for sample in samples
    ]
    table = Table(
        f"Memory: RSS over {REQUESTS:,} metered requests, {CUSTOMERS:,} customers in turn",
        "Resident set size of a fresh process serving the warm-up-free worst case in-process: every request "
        "misses the bounded entitlement cache, every event is its own group, the tracker delivers to the "
        "in-memory backend. Plateau: every sample of the second half within "
        f"{PLATEAU:.0%} of the others.",
        command("memory"),
        ("requests", "RSS MiB", "cache entries", "events queued", "elapsed s"),
        rows,
        [
            f"{'plateaus' if flat else 'does NOT plateau'}: second half "
            + ", ".join(f"{value:.1f}" for value in second_half(series))
            + f" MiB; units delivered {summary['units']:,.0f} of {REQUESTS:,} in {summary['tracks']:,} track calls"
        ],
    )
    data: dict[str, Any] = {"samples": samples, "plateau": flat, "units": summary["units"]}
    return Section("memory", [table], data)


async def run() -> Section:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(run_sync)


def main() -> None:
    parser = argparse.ArgumentParser(description="the memory benchmark's child process")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--customers", type=int, default=CUSTOMERS)
    args = parser.parse_args()
    anyio.run(serve, args.requests, args.customers)


if __name__ == "__main__":
    main()
