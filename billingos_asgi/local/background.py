"""Run an ASGI app (usually the local BillingOS server) under uvicorn in a background thread.

For demos, tests and benchmarks that need a real loopback socket without a second process.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> Iterator[str]:
    """Serve ``app`` on ``host:port`` (0: a free port) until the block exits; yield the base URL."""
    import uvicorn  # the server extra; imported here so the core does not need it

    ipv6 = ":" in host  # as uvicorn tells them apart; its URL takes the address in brackets
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound_port = sock.getsockname()[1]
        config.setdefault("log_level", "warning")
        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **config))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="billingos-uvicorn", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start on {host}:{bound_port}")
                time.sleep(0.005)
            yield f"http://[{host}]:{bound_port}" if ipv6 else f"http://{host}:{bound_port}"
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        sock.close()
