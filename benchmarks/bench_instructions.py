"""Instructions per request under callgrind: each middleware's cost, free of the machine's noise.

Timings on a shared machine drift by tens of percent; instruction counts do not (valgrind's
callgrind counts the same total for the same program and input whatever else runs). Each app
runs in-process (as in ``bench_middleware``) under callgrind twice, for two request counts; the
difference divided by the difference in requests is its cost per request, start-up excluded.
Skipped, with a note, where valgrind is not installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

import anyio

from ._util import Section, Table, command, scaled

APPS = {  # name in this module -> row label
    "starlette": "bare Starlette",
    "billing": "+ BillingMiddleware, warm cache",
    "slowapi": "+ slowapi (SlowAPIASGIMiddleware)",
    "correlation_id": "+ asgi-correlation-id",
}
FEW, MANY = scaled(500, 50), scaled(2_500, 150)
_COLLECTED = re.compile(rb"Collected : (\d+)")


def instructions(app: str, requests: int) -> int:
    """Instructions callgrind counts for a process serving ``requests`` requests to ``app``."""
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    argv += ["-m", "benchmarks.bench_instructions", "--app", app, "--requests", str(requests)]
    done = subprocess.run(argv, capture_output=True, timeout=600, check=True)
    found = _COLLECTED.search(done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total for {app}: {done.stderr[-500:]!r}")
    return int(found.group(1))


def per_request(app: str) -> float:
    return (instructions(app, MANY) - instructions(app, FEW)) / (MANY - FEW)


def run_sync() -> Section:
    measures = (
        "CPU instructions per request (valgrind's callgrind: deterministic, unlike timings on a shared machine), "
        f"each app called in-process, {FEW:,} and {MANY:,} requests, the difference per request. "
        "Ours resolves the customer from an API key, decides from the warm cache, adds its headers "
        "and queues the usage event."
    )
    header = ("app", "instructions/request", "overhead", "vs bare")
    if shutil.which("valgrind") is None:
        table = Table("Instructions per request (callgrind)", measures, command("instructions"), header, [])
        table.notes.append("valgrind is not installed (Debian: apt-get install valgrind): skipped.")
        return Section("instructions", [table], {})
    counts = {app: per_request(app) for app in APPS}
    bare = counts["starlette"]
    rows = [
        (APPS[app], f"{n:,.0f}", "-" if app == "starlette" else f"{n - bare:+,.0f}", f"{n / bare:.2f}x")
        for app, n in counts.items()
    ]
    table = Table("Instructions per request (callgrind)", measures, command("instructions"), header, rows)
    return Section("instructions", [table], {"per_request": {APPS[app]: n for app, n in counts.items()}})


async def run() -> Section:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(run_sync)


async def serve(app_name: str, requests: int) -> None:
    """The measured process: build ``app_name`` and serve ``requests`` requests to it in-process."""
    from .apps import InMemoryBackend, billing_app, correlation_id_app, slowapi_app, starlette_app
    from .bench_middleware import drive, with_lifespan

    factories = {
        "starlette": starlette_app,
        "billing": lambda: billing_app(InMemoryBackend()),
        "slowapi": slowapi_app,
        "correlation_id": correlation_id_app,
    }
    app = factories[app_name]()

    async def body() -> None:
        await drive(app, requests)

    await with_lifespan(app, body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", choices=APPS, required=True)
    parser.add_argument("--requests", type=int, required=True)
    args = parser.parse_args()
    anyio.run(serve, args.app, args.requests)
