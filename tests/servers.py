"""Serve an ASGI app on a loopback port under a real ASGI server, in a background thread.

uvicorn through the library's own :func:`serve_in_thread`; Hypercorn (HTTP/1.1 and HTTP/2 with
prior knowledge) through its asyncio ``serve``. Leaving the block stops the server gracefully:
it waits for open requests and runs the lifespan's shutdown (the tracker's drain) before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from starlette.types import ASGIApp

from billingos_asgi.local.background import serve_in_thread

SERVERS = ["uvicorn", "hypercorn"]


@contextlib.contextmanager
def served(server: str, app: ASGIApp) -> Iterator[str]:
    """``app`` served by ``server`` (one of :data:`SERVERS`) until the block exits; yield the base URL."""
    if server == "uvicorn":
        with serve_in_thread(app) as base_url:
            yield base_url
    elif server == "hypercorn":
        with _hypercorn_in_thread(app) as base_url:
            yield base_url
    else:
        raise ValueError(f"unknown server {server!r}")


@contextlib.contextmanager
def _hypercorn_in_thread(app: ASGIApp) -> Iterator[str]:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns (and closes) the bound socket
    config.graceful_timeout = 10
    config.loglevel = "WARNING"
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            failed.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="billingos-hypercorn", daemon=True)
    thread.start()
    _wait_for_port(port, thread)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        if failed:
            raise RuntimeError("hypercorn failed") from failed[0]


def _wait_for_port(port: int, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on port {port}") from None
            time.sleep(0.01)
