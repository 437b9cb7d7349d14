"""Instructions per request under callgrind: each middleware's cost, free of the machine's noise.

Timings on a shared machine drift by tens of percent; instruction counts do not (valgrind's
callgrind counts the same total for the same program and input whatever else runs). Each app
runs under callgrind twice, for two request counts; the difference divided by the difference in
requests is its cost per request, start-up and shutdown excluded. Twice over: in-process (as in
``bench_middleware``), and served by uvicorn (as in ``bench_server``) to requests sent one after
another on one keep-alive connection, which counts the server's share too (parsing, the extra
header bytes it checks and writes, the event loop) and so the throughput the CPU allows.
Skipped, with a note, where valgrind is not installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio

from . import bench_server
from ._util import Section, Table, command, free_port, scaled, stop_server

APPS = {  # name in this module -> row label
    "starlette": "bare Starlette",
    "billing": "+ BillingMiddleware, warm cache",
    "slowapi": "+ slowapi (SlowAPIASGIMiddleware)",
    "correlation_id": "+ asgi-correlation-id",
}
SERVED = ("starlette", "billing", "correlation_id", "slowapi")  # bench_server names, same labels
#: Ours with its usage events discarded: what tracking (queueing and delivering them) costs.
UNTRACKED = "untracked"
UNTRACKED_LABEL = "+ BillingMiddleware, events discarded (tracking off)"
FEW, MANY = scaled(500, 50), scaled(2_500, 150)
#: Requests between two turns of the event loop in-process: our tracker delivers their events then,
#: in one track call (one customer: its events coalesce, as within a flush window under load).
WINDOW = 100
SERVED_FEW, SERVED_MANY = scaled(200, 10), scaled(1_200, 30)
_CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
_COLLECTED = re.compile(rb"Collected : (\d+)")
_REQUEST = f"GET /v1/search HTTP/1.1\r\nhost: 127.0.0.1\r\n{bench_server.CUSTOMER_HEADER}\r\n\r\n".encode()
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def collected(output: bytes, what: str) -> int:
    """The total instructions in callgrind's closing summary (``output``) of the run of ``what``."""
    found = _COLLECTED.search(output)
    if found is None:
        raise RuntimeError(f"callgrind printed no total for {what}: {output[-500:]!r}")
    return int(found.group(1))


def instructions(app: str, requests: int) -> int:
    """Instructions callgrind counts for a process serving ``requests`` requests to ``app``."""
    argv = [*_CALLGRIND, sys.executable, "-m", "benchmarks.bench_instructions"]
    argv += ["--app", app, "--requests", str(requests)]
    done = subprocess.run(argv, capture_output=True, timeout=600, check=True)
    return collected(done.stderr, app)


def served_instructions(app: str, requests: int) -> int:
    """Instructions callgrind counts for a uvicorn process serving ``app``: start-up, ``requests``
    requests one after another on one connection, and a graceful shutdown (SIGTERM)."""
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch, "callgrind.log")
        port = free_port()
        server = bench_server.start_app(app, port, wrapper=[*_CALLGRIND, f"--log-file={log}"], core=None, timeout=300)
        try:
            send_one_by_one(port, requests)
        finally:
            stop_server(server, timeout=300)
        return collected(log.read_bytes(), f"uvicorn serving {app}")


def send_one_by_one(port: int, requests: int) -> None:
    """``requests`` GETs on one keep-alive connection, each sent once the last answer is read in full."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        unread = b""
        for _ in range(requests):
            connection.sendall(_REQUEST)
            while True:
                head_end = unread.find(b"\r\n\r\n")
                if head_end >= 0:
                    length = _CONTENT_LENGTH.search(unread, 0, head_end)
                    if length is None or not unread.startswith(b"HTTP/1.1 200 "):
                        raise RuntimeError(f"unexpected answer: {unread[:200]!r}")
                    end = head_end + 4 + int(length.group(1))
                    if len(unread) >= end:
                        unread = unread[end:]
                        break
                chunk = connection.recv(65536)
                if not chunk:
                    raise RuntimeError("the server closed the connection")
                unread += chunk


def per_request(count: Callable[[str, int], int], app: str, few: int, many: int) -> float:
    """The cost of one request: two runs (in parallel, as callgrind's counts do not mind), differenced."""
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda n: count(app, n), (few, many))
    return (second - first) / (many - few)


def rows(counts: dict[str, float], *, throughput: bool) -> list[tuple[str, ...]]:
    """Table rows; the ratio to bare is of cost (as in-process timings) or of the throughput it allows."""
    bare = counts["starlette"]
    return [
        (
            APPS[app],
            f"{n:,.0f}",
            "-" if app == "starlette" else f"{n - bare:+,.0f}",
            f"{bare / n:.2f}x" if throughput else f"{n / bare:.2f}x",
        )
        for app, n in counts.items()
    ]


def run_sync() -> Section:
    measures = (
        "CPU instructions per request (valgrind's callgrind: deterministic, unlike timings on a shared machine), "
        f"each app called in-process, {FEW:,} and {MANY:,} requests, the difference per request. "
        "Ours resolves the customer from an API key, decides from the warm cache, adds its headers "
        f"and queues the usage event; every app's event loop turns after each {WINDOW} requests, when our "
        "tracker delivers their events (one customer's: one track call). Its count includes about 1,200 "
        "instructions per request for the SHA-256 of the event's key into its batch's key: valgrind hides "
        "the CPU's SHA extensions, so OpenSSL runs its software path (some 28 instructions a byte, against "
        "about 2 cycles a byte in hardware)."
    )
    served_measures = (
        f"The same apps served by uvicorn (as in the server table: asyncio, {bench_server.http_implementation()}, "
        f"one worker), {SERVED_FEW:,} and {SERVED_MANY:,} requests sent one after another on one keep-alive "
        "connection, the difference per request: everything the server process does for a request, its own "
        "parsing and writing of the extra headers and the tracker's background delivery included. Its ratio "
        "is the throughput that CPU cost allows, bare = 1."
    )
    header = ("app", "instructions/request", "overhead", "cost vs bare")
    served_header = ("app", "instructions/request", "overhead", "throughput vs bare")
    title, served_title = "Instructions per request (callgrind)", "Under uvicorn: instructions per request served"
    if shutil.which("valgrind") is None:
        table = Table(title, measures, command("instructions"), header, [])
        table.notes.append("valgrind is not installed (Debian: apt-get install valgrind): skipped.")
        return Section("instructions", [table], {})
    counts = {app: per_request(instructions, app, FEW, MANY) for app in APPS}
    untracked = per_request(instructions, UNTRACKED, FEW, MANY)
    served = {app: per_request(served_instructions, app, SERVED_FEW, SERVED_MANY) for app in SERVED}
    bare = counts["starlette"]
    untracked_row = (UNTRACKED_LABEL, f"{untracked:,.0f}", f"{untracked - bare:+,.0f}", f"{untracked / bare:.2f}x")
    table = Table(title, measures, command("instructions"), header, [*rows(counts, throughput=False), untracked_row])
    table.notes.append(
        f"tracking (queueing each event, and delivering them through the in-memory backend in one track call "
        f"per {WINDOW} requests, as one customer's coalesce in a flush window) costs "
        f"{counts['billing'] - untracked:+,.0f} instructions a request: the app's throughput with tracking on "
        f"is {untracked / counts['billing']:.2f}x that with it off, as far as the CPU goes"
    )
    tables = [
        table,
        Table(served_title, served_measures, command("instructions"), served_header, rows(served, throughput=True)),
    ]
    data = {
        "per_request": {APPS[app]: n for app, n in counts.items()},
        "served": {APPS[app]: n for app, n in served.items()},
        "untracked": untracked,
    }
    return Section("instructions", tables, data)


async def run() -> Section:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(run_sync)


async def serve(app_name: str, requests: int) -> None:
    """The measured process: build ``app_name`` and serve ``requests`` requests to it in-process, the
    event loop turning after every :data:`WINDOW` of them until our tracker has delivered their events."""
    import anyio.lowlevel

    from billingos_asgi import BillingMiddleware

    from .apps import InMemoryBackend, billing_app, billing_middleware, correlation_id_app, slowapi_app, starlette_app
    from .bench_middleware import _receive, _send, scope_for, with_lifespan

    def untracked() -> BillingMiddleware:
        middleware = billing_middleware(starlette_app(), InMemoryBackend())
        middleware.tracker.add = lambda *usage: True  # type: ignore[method-assign]  # events discarded
        return middleware

    factories: dict[str, Callable[[], Any]] = {
        "starlette": starlette_app,
        # (flushed as soon as the loop turns: no timer, whose real time would make the count vary)
        "billing": lambda: billing_app(InMemoryBackend(), flush_interval=0),
        UNTRACKED: untracked,
        "slowapi": slowapi_app,
        "correlation_id": correlation_id_app,
    }
    app = factories[app_name]()
    tracker = app.tracker if isinstance(app, BillingMiddleware) else None
    template = scope_for("customer_0")

    async def body() -> None:
        for served in range(1, requests + 1):
            scope = template.copy()
            scope["state"] = {}
            await app(scope, _receive, _send)
            if served % WINDOW == 0:  # a flush window's worth: every app's loop turns alike
                await anyio.lowlevel.checkpoint()
                while tracker is not None and (tracker.backlog or tracker.stats.in_flight):
                    await anyio.lowlevel.checkpoint()

    await with_lifespan(app, body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--app", choices=[*APPS, UNTRACKED], required=True)
    parser.add_argument("--requests", type=int, required=True)
    args = parser.parse_args()
    anyio.run(serve, args.app, args.requests)
