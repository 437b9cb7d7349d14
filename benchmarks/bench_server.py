"""Throughput and latency under a real server: uvicorn serving each app, a load generator on loopback.

Each app (the same factories as in-process: bare Starlette and FastAPI, ours, the peers) runs in
its own uvicorn process (asyncio loop, httptools when installed, one worker, no access log) pinned
to core 1; the load generator is pinned to core 0, so the two do not fight for one core. The
load is ``wrk`` when it is on PATH (Debian: ``apt-get install wrk``), else the bounded asyncio
generator in ``loadgen.py``: 32 keep-alive connections, each sending its next request when the
last answer arrived, for a fixed duration. Apps are measured in alternating rounds, each round
in a fresh server after a short warm-up; the median round is kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ._util import Section, Table, command, free_port, median, scaled, stop_server, wait_until_answering

APPS = {  # BENCH_APP name -> row label
    "starlette": "bare Starlette",
    "fastapi": "bare FastAPI",
    "billing": "+ BillingMiddleware (metered, warm cache)",
    "slowapi": "+ slowapi",
    "correlation_id": "+ asgi-correlation-id",
    "moesif": "+ moesifasgi",
}
BASELINES = {"fastapi": "fastapi"}  # compared with bare FastAPI; every other app with bare Starlette
ROUNDS = scaled(3, 1)
DURATION = scaled(5, 1)
WARM_UP = 1  # seconds (wrk takes whole seconds)
CONNECTIONS = 32
FIGURES = ("rps", "p50_ms", "p99_ms", "cpu_us")
CUSTOMER_HEADER = "x-api-key: customer_0"
ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, LOAD_CORE = 1, 0


def pinned(core: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child to ``core``, when the machine has it."""
    if not hasattr(os, "sched_setaffinity") or core not in os.sched_getaffinity(0) or len(os.sched_getaffinity(0)) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def http_implementation() -> str:
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def start_app(
    name: str, port: int, *, wrapper: Sequence[str] = (), core: int | None = SERVER_CORE, timeout: float = 20.0
) -> subprocess.Popen[bytes]:
    """uvicorn serving app ``name`` on ``port`` (run by ``wrapper``, e.g. valgrind, when given), once it answers."""
    argv = [*wrapper, sys.executable, "-m", "uvicorn", "benchmarks.apps:served", "--factory", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--loop", "asyncio", "--http", http_implementation(), "--workers", "1"]
    argv += ["--no-access-log", "--log-level", "warning", "--lifespan", "on"]
    env = {**os.environ, "BENCH_APP": name}
    # stdout: moesifasgi prints on every failed post to its (closed) API port
    preexec = None if core is None else pinned(core)
    server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, preexec_fn=preexec)
    name_, _, value = CUSTOMER_HEADER.partition(": ")
    url = f"http://127.0.0.1:{port}/v1/search"
    wait_until_answering(server, url, f"uvicorn serving {name!r}", timeout=timeout, headers={name_: value})
    return server


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(output: str) -> dict[str, float]:
    """From ``wrk --latency`` output: requests answered, requests/s, p50 and p99 (ms), and errors (non-2xx
    answers and socket errors)."""

    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if match is None:
            raise ValueError(f"no {label}% latency in wrk output:\n{output}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    requests = re.search(r"^\s*(\d+) requests in ", output, re.MULTILINE)
    if rps is None or requests is None:
        raise ValueError(f"no Requests/sec or request count in wrk output:\n{output}")
    answers = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    # wrk prints this line only when some occurred: "Socket errors: connect 0, read 2, write 0, timeout 5"
    sockets = re.search(r"^\s*Socket errors:(.*)$", output, re.MULTILINE)
    failed = sum(int(n) for n in re.findall(r"\d+", sockets.group(1))) if sockets else 0
    return {
        "requests": float(requests.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": float((int(answers.group(1)) if answers else 0) + failed),
    }


def load(port: int, duration: int) -> dict[str, float]:
    """One bounded load run against ``port`` (loopback), by wrk or by ``loadgen``."""
    url = f"http://127.0.0.1:{port}/v1/search"
    timeout = duration + 30
    if shutil.which("wrk"):
        argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency", "-H", CUSTOMER_HEADER, url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=pinned(LOAD_CORE))
        done.check_returncode()
        return parse_wrk(done.stdout)
    argv = [sys.executable, "-m", "benchmarks.loadgen", "--port", str(port), "--connections", str(CONNECTIONS)]
    argv += ["--duration", str(duration), "--header", CUSTOMER_HEADER]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=pinned(LOAD_CORE), check=True
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str) -> dict[str, float]:
    """One fresh server for ``name``: warm-up, then the measured load, and the server's CPU time per request.

    CPU time per request does not count the time the server waited for a core (the machine is
    shared), so it is the steadier figure; requests/s is what the goal is about.
    """
    port = free_port()
    server = start_app(name, port)
    try:
        load(port, WARM_UP)
        before = cpu_seconds(server.pid)
        result = load(port, DURATION)
        after = cpu_seconds(server.pid)
    finally:
        stop_server(server)
    # The requests counted, not rps x DURATION: the load runs a little longer than its duration.
    if before is not None and after is not None and result["requests"]:
        result["cpu_us"] = (after - before) / result["requests"] * 1e6
    return result


def generator() -> str:
    if shutil.which("wrk"):
        return f"wrk -t1 -c{CONNECTIONS} -d{DURATION}s --latency"
    return f"benchmarks/loadgen.py (asyncio, {CONNECTIONS} keep-alive connections, {DURATION} s)"


def run_sync() -> Section:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in APPS}
    for _ in range(ROUNDS):
        for name in APPS:
            runs[name].append(measure(name))
    summary: dict[str, dict[str, float]] = {}
    for name, samples in runs.items():
        base = runs[BASELINES.get(name, "starlette")]
        summary[name] = {key: median([run.get(key, float("nan")) for run in samples]) for key in FIGURES}
        summary[name]["errors"] = sum(run["errors"] for run in samples)
        # Paired by round, as the machine's speed drifts: each app against its baseline's run of that round.
        summary[name]["ratio"] = median([run["rps"] / bare["rps"] for run, bare in zip(samples, base, strict=True)])
        summary[name]["cpu_ratio"] = median(
            [
                bare.get("cpu_us", float("nan")) / run.get("cpu_us", float("nan"))
                for run, bare in zip(samples, base, strict=True)
            ]
        )
    rows = []
    for name, label in APPS.items():
        figures = summary[name]
        bare = name in ("starlette", "fastapi")
        rows.append(
            (
                label,
                f"{figures['rps']:,.0f}",
                "1.00x" if bare else f"{figures['ratio']:.2f}x",
                f"{figures['p50_ms']:.2f}",
                f"{figures['p99_ms']:.2f}",
                f"{figures['cpu_us']:.0f}",
                "1.00x" if bare else f"{figures['cpu_ratio']:.2f}x",
                f"{figures['errors']:,.0f}",
            )
        )
    pinning = "server on core 1, load on core 0" if pinned(SERVER_CORE) else "no pinning (fewer than 2 cores)"
    table = Table(
        f"Under uvicorn on loopback: median of {ROUNDS} alternating rounds x {DURATION} s, {CONNECTIONS} connections",
        f"Requests per second and latency with the app served by uvicorn (asyncio loop, {http_implementation()}, one "
        f"worker, no access log) and driven by {generator()}; {pinning}. Ratios are against the bare app "
        "wrapped (Starlette, FastAPI for itself), round by round. Server CPU is the uvicorn process's CPU time per "
        "request (time spent waiting for a core is not in it; with the server's core saturated, as here, it is "
        "close to 1 / requests/s, not a second measure); its ratio is the throughput that CPU cost allows, "
        "bare = 1. Errors: non-2xx answers and socket errors, all rounds. One customer, so our cache is warm and "
        "the tracker delivers its events in the background, coalesced (about one call a second), to an in-memory "
        "backend without a call budget (no HTTP client). The endpoint does nothing: the worst case for any "
        "middleware's share.",
        command("server"),
        (
            "app",
            "requests/s",
            "throughput vs bare",
            "p50 ms",
            "p99 ms",
            "server CPU us/request",
            "vs bare (CPU)",
            "errors",
        ),
        rows,
    )
    return Section("server", [table], {"summary": summary, "labels": APPS})


async def run() -> Section:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(run_sync)
