"""Serve an ASGI app on a loopback port under a real ASGI server, in a background thread.

uvicorn through the library's own :func:`serve_in_thread`; Hypercorn (HTTP/1.1 and HTTP/2 with
prior knowledge) through its asyncio or trio ``serve``. Leaving the block stops the server gracefully:
it waits for open requests and runs the lifespan's shutdown (the tracker's drain) before returning.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future

import anyio.from_thread
from starlette.types import ASGIApp

from billingos_asgi.local.background import serve_in_thread

SERVERS = ["uvicorn", "hypercorn", "hypercorn-trio"]


@contextlib.contextmanager
def served(server: str, app: ASGIApp) -> Iterator[str]:
    """``app`` served by ``server`` (one of :data:`SERVERS`) until the block exits; yield the base URL."""
    if server == "uvicorn":
        with serve_in_thread(app) as base_url:
            yield base_url
    elif server in ("hypercorn", "hypercorn-trio"):
        with _hypercorn_in_thread(app, trio=server == "hypercorn-trio") as base_url:
            yield base_url
    else:
        raise ValueError(f"unknown server {server!r}")


@contextlib.contextmanager
def _hypercorn_in_thread(app: ASGIApp, *, trio: bool) -> Iterator[str]:
    """Hypercorn's asyncio or trio worker, on an event loop of its own in a portal's thread."""
    from hypercorn.config import Config

    if trio:
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve  # type: ignore[assignment]

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns (and closes) the bound socket
    config.graceful_timeout = 10
    config.loglevel = "WARNING"
    with anyio.from_thread.start_blocking_portal("trio" if trio else "asyncio") as portal:
        stop = portal.call(anyio.Event)

        async def serve_until_stopped() -> None:
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

        serving = portal.start_task_soon(serve_until_stopped)
        _wait_for_port(port, serving)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            portal.call(stop.set)
            serving.result(timeout=15)


def _wait_for_port(port: int, serving: Future[None]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if serving.done() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on port {port}") from None
            time.sleep(0.01)
