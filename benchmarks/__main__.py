"""``make bench``: every benchmark of the suite, printed as Markdown tables."""

from __future__ import annotations

import anyio

from . import bench_client_server, bench_local_engine, bench_middleware, bench_pipeline
from ._util import machine


async def main() -> None:
    print(f"billingos-asgi benchmarks on {machine()}")
    await bench_local_engine.run()
    await bench_client_server.run()
    await bench_middleware.run()
    await bench_pipeline.run()


if __name__ == "__main__":
    anyio.run(main)
