"""A bounded HTTP/1.1 load generator for loopback, used when ``wrk`` is not installed.

``python -m benchmarks.loadgen --port 8000 --connections 32 --duration 5 [--header "x-api-key: k"]``
keeps that many keep-alive connections busy with GET requests (each sends its next request when
the previous answer has arrived, as wrk does) for a fixed duration, then prints one JSON line:
requests/s, p50/p99 latency and non-2xx answers. Raw asyncio streams rather than an HTTP client
library, so that one core of load is enough to saturate one core of server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from ._util import percentile

TARGET_HOST = "127.0.0.1"  # loopback only, by construction


async def connection(port: int, request: bytes, deadline: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(TARGET_HOST, port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                errors.append(1)
    finally:
        writer.close()


async def load(port: int, path: str, headers: list[str], connections: int, duration: float) -> dict[str, float]:
    lines = [f"GET {path} HTTP/1.1", f"Host: {TARGET_HOST}:{port}", *headers, "", ""]
    request = "\r\n".join(lines).encode()
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(*(connection(port, request, deadline, latencies, errors) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": 1e3 * percentile(latencies, 0.50),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/search")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600] seconds")
    result = asyncio.run(load(args.port, args.path, args.header, args.connections, args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
