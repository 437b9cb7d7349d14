"""Where a metered request's time goes: the profiles shown when an overhead goal is missed.

In-process: pyinstrument's call tree of the warm-cache metered request loop (our frames shown,
Starlette's folded), as shares of the loop's time. Under uvicorn: py-spy samples (non-blocking,
1 kHz) of the serving process under load, bare Starlette and ours alike; each function's self
time per request is its sample count over the requests served while sampling, and the table
lists the functions whose cost per request grew most with our middleware (py-spy needs ptrace
rights: without them this part is skipped with a note).
"""

from __future__ import annotations

import gc
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from starlette.types import ASGIApp

from billingos_asgi.testing import lifespan

from . import bench_server
from ._util import Section, Table, command, free_port, scaled, stop_server
from .apps import InMemoryBackend, billing_app
from .bench_middleware import _receive, _send, drive, scope_for

PROFILED_REQUESTS = scaled(30_000, 3_000)
SAMPLING_SECONDS = scaled(5, 1)
SAMPLING_RATE = 1_000
TOP = 15


async def in_process() -> str:
    """pyinstrument's tree of the warm-cache metered loop, as text."""
    from pyinstrument import Profiler

    app = billing_app(InMemoryBackend())
    async with lifespan(app):
        await drive(app, 2_000)  # warm
        gc.collect()
        profiler = Profiler(interval=0.0002, async_mode="disabled")
        profiler.start()
        await requests(app, PROFILED_REQUESTS)
        profiler.stop()
    text = profiler.output_text(time="percent_of_total")
    lines = [line.rstrip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if "requests" in line), 0)  # skip the banner
    return "\n".join(line for line in lines[start:] if line.strip())


async def requests(app: ASGIApp, count: int) -> None:
    """The loop profiled: one customer, as ``drive`` (which also times and collects garbage)."""
    template = scope_for("customer_0")
    for _ in range(count):
        scope = template.copy()
        scope["state"] = {}
        await app(scope, _receive, _send)


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


_LINE = re.compile(r":\d+\)$")


def self_time(raw: str) -> Counter[str]:
    """Samples per leaf function (line numbers dropped) from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.strip() or not count.isdigit():
            continue
        leaf = _LINE.sub(")", stack.split(";")[-1])
        counts[leaf] += int(count)
    return counts


def sample_server(name: str, spy: str, output: Path) -> float:
    """Serve ``name`` under load, sample it for a while; return the requests/s of the load."""
    port = free_port()
    server = bench_server.start_app(name, port)
    result: dict[str, float] = {}
    try:
        bench_server.load(port, 1)  # warm-up
        loader = threading.Thread(target=lambda: result.update(bench_server.load(port, SAMPLING_SECONDS + 2)))
        loader.start()
        time.sleep(1)
        argv = [spy, "record", "--pid", str(server.pid), "--duration", str(SAMPLING_SECONDS)]
        argv += ["--rate", str(SAMPLING_RATE), "--nonblocking", "--format", "raw", "--output", str(output)]
        subprocess.run(argv, capture_output=True, timeout=SAMPLING_SECONDS + 30, check=True)
        loader.join()
    finally:
        stop_server(server)
    return result["rps"]


def under_uvicorn(workdir: Path) -> Table | str:
    """The functions whose self time per request grew most from bare Starlette to ours, under uvicorn."""
    spy = py_spy()
    if spy is None:
        return "py-spy is not installed: no profile under uvicorn."
    per_request: dict[str, dict[str, float]] = {}
    try:
        for name in ("starlette", "billing"):
            output = workdir / f"{name}.txt"
            rps = sample_server(name, spy, output)
            served = rps * SAMPLING_SECONDS
            per_request[name] = {
                function: samples / SAMPLING_RATE / served * 1e6
                for function, samples in self_time(output.read_text()).items()
            }
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return f"py-spy could not sample the server ({exc}): no profile under uvicorn."
    bare, ours = per_request["starlette"], per_request["billing"]
    grown = sorted(((ours.get(f, 0.0) - bare.get(f, 0.0), f) for f in set(bare) | set(ours)), reverse=True)
    total_bare, total_ours = sum(bare.values()), sum(ours.values())
    rows = [
        (function, f"{bare.get(function, 0.0):.2f}", f"{ours.get(function, 0.0):.2f}", f"{delta:+.2f}")
        for delta, function in grown[:TOP]
    ]
    return Table(
        f"Under uvicorn: self time per request (py-spy, {SAMPLING_RATE} Hz, {SAMPLING_SECONDS} s of load), "
        f"the {TOP} functions that grew most",
        f"Sampled CPU time per request in each function's own code (not its callees), bare Starlette vs. ours, "
        f"under the same load as the throughput table. All sampled functions: {total_bare:.1f} us/request bare, "
        f"{total_ours:.1f} us/request ours.",
        command("profile"),
        ("function (file)", "bare us/request", "ours us/request", "grew by"),
        rows,
    )


async def run() -> Section:
    import tempfile

    import anyio.to_thread

    tree = await in_process()
    with tempfile.TemporaryDirectory() as workdir:
        server = await anyio.to_thread.run_sync(under_uvicorn, Path(workdir))
    tables = [server] if isinstance(server, Table) else []
    blocks = [
        (
            f"In-process: pyinstrument, warm-cache metered loop ({PROFILED_REQUESTS:,} requests), share of the loop's "
            "time (profiling inflates small calls; read the shares, not absolute times)",
            tree,
        )
    ]
    if isinstance(server, str):
        blocks.append(("Under uvicorn", server))
    return Section("profile", tables, {"blocks": blocks, "tree": tree})
