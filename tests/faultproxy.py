"""A fault-injecting HTTP/1.1 proxy in front of the local BillingOS server, for delivery tests.

The delivery guarantees (every admitted request counted exactly once) are only worth something
under the failures a real network produces: a call lost before it arrives, a call recorded whose
answer is lost (the dangerous case), a connection reset, a hang past the client's timeout, a 429
storm, an outage, a 2xx saying ``success: false`` for a call not recorded. This proxy produces each
of them on demand, between the real client and the real server, from a seeded random draw per
``POST /v1/usage/track`` (every call with ``all_calls``). It runs on its own event loop in a
background thread, like the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

import httpx

#: A network's faults, which :meth:`FaultPlan.mixed` mixes evenly.
KINDS = ("before", "after", "after_reset", "hang", "reset", "throttle")
#: With a proxy's 2xx refusal, drawn only when a plan asks for it by name.
ALL_KINDS = (*KINDS, "unsuccessful")
_HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "content-encoding"}
_TRACK = ("POST", "/v1/usage/track")
_UNSUCCESSFUL_TRACK = (
    b'{"success":false,"feature_key":"api_calls","quantity":1,"recorded_at":"2025-01-01T00:00:00.000Z",'
    b'"usage":{"consumed_units":0,"limit_units":null,"remaining_units":null,'
    b'"period_start":"2025-01-01T00:00:00.000Z","period_end":"2025-02-01T00:00:00.000Z"}}'
)


@dataclass
class FaultPlan:
    """Probabilities of each fault per faulted call (their sum at most 1), and run-time switches.

    ``down`` and the probabilities may be changed while the proxy runs (plain attribute writes), or
    the whole plan replaced (``proxy.plan = FaultPlan(...)``, which restarts the draws from its seed).
    """

    before: float = 0.0  # 503, not forwarded
    after: float = 0.0  # forwarded (recorded), then 502
    after_reset: float = 0.0  # forwarded (recorded), then the connection is aborted
    hang: float = 0.0  # not forwarded; no answer for hang_seconds, then the connection closes
    reset: float = 0.0  # not forwarded; the connection is aborted
    throttle: float = 0.0  # 429 with Retry-After: 1, not forwarded
    unsuccessful: float = 0.0  # not forwarded; 201 with a well-formed track answer saying success: false
    seed: int = 0
    all_calls: bool = False
    down: bool = False  # an outage: every connection is aborted at once
    hang_seconds: float = 2.0
    rng: random.Random = field(init=False, repr=False)

    @classmethod
    def mixed(cls, rate: float, *, seed: int = 0, all_calls: bool = False) -> FaultPlan:
        """Every fault kind at once, ``rate`` of the calls in all, evenly shared."""
        share = rate / len(KINDS)
        return cls(share, share, share, share, share, share, seed=seed, all_calls=all_calls)

    def __post_init__(self) -> None:
        if sum(getattr(self, kind) for kind in ALL_KINDS) > 1:
            raise ValueError("fault probabilities add up to more than 1")
        self.rng = random.Random(self.seed)

    def pick(self) -> str | None:
        """The fault for one call (the next draw of this plan's seeded generator), or None to pass it."""
        roll, edge = self.rng.random(), 0.0
        for kind in ALL_KINDS:
            edge += getattr(self, kind)
            if roll < edge:
                return kind
        return None


class FaultProxy:
    """The proxy's address and what it did: ``counts`` per fault kind, plus "passed" (drawn, no fault),
    "unfaulted" (calls the plan does not fault) and "down" (connections aborted by the outage)."""

    def __init__(self, upstream_base_url: str, plan: FaultPlan) -> None:
        self.upstream_base_url = upstream_base_url.rstrip("/")
        self.plan = plan
        self.base_url = ""
        self.counts: dict[str, int] = dict.fromkeys((*ALL_KINDS, "passed", "unfaulted", "down"), 0)
        self._upstream: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def draws(self) -> int:
        """Calls the plan drew a fault (or none) for."""
        return sum(self.counts[kind] for kind in ALL_KINDS) + self.counts["passed"]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._exchange(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, httpx.HTTPError):
            pass  # the client went away, or upstream failed: either way this connection ends
        except asyncio.CancelledError:
            pass  # the proxy stops (Python 3.11's stream callback would log a cancelled task)
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done with."""
        if self.plan.down:
            self.counts["down"] += 1
            return False
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, _ = request_line.split(" ", 2)
        headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        fields = {name.lower(): value for name, value in headers}
        body = await reader.readexactly(int(fields.get("content-length", "0")))
        if self.plan.down:
            self.counts["down"] += 1
            return False
        faulted = self.plan.all_calls or (method, target.split("?", 1)[0]) == _TRACK
        kind = self.plan.pick() if faulted else None
        self.counts[kind or ("passed" if faulted else "unfaulted")] += 1
        if kind == "before":
            await _answer(writer, 503, b'{"statusCode":503,"message":"injected: before"}')
        elif kind == "throttle":
            await _answer(writer, 429, b'{"statusCode":429,"message":"injected: throttle"}', {"Retry-After": "1"})
        elif kind == "unsuccessful":
            await _answer(writer, 201, _UNSUCCESSFUL_TRACK)
        elif kind == "hang":
            await asyncio.sleep(self.plan.hang_seconds)
            return False
        elif kind == "reset":
            return False
        else:
            status, reply_headers, content = await self._forward(method, target, headers, body)
            if kind == "after":
                await _answer(writer, 502, b'{"statusCode":502,"message":"injected: after"}')
            elif kind == "after_reset":
                return False
            else:
                await _answer(writer, status, content, reply_headers)
        return fields.get("connection", "").lower() != "close"

    async def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        assert self._upstream is not None
        sent = [(name, value) for name, value in headers if name.lower() not in _HOP_BY_HOP]
        response = await self._upstream.request(method, target, headers=sent, content=body)
        kept = {name: value for name, value in response.headers.items() if name.lower() not in _HOP_BY_HOP}
        return response.status_code, kept, response.content

    async def _serve(self, started: threading.Event) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with httpx.AsyncClient(base_url=self.upstream_base_url, timeout=30) as upstream:
            self._upstream = upstream
            server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            self.base_url = f"http://127.0.0.1:{port}"
            started.set()
            await self._stop.wait()
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()


async def _answer(
    writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: keep-alive"]
    if not any(name.lower() == "content-type" for name in headers or {}):
        lines.append("Content-Type: application/json")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


@contextlib.contextmanager
def serve_fault_proxy(upstream_base_url: str, faults: FaultPlan) -> Iterator[FaultProxy]:
    """Run a :class:`FaultProxy` in front of ``upstream_base_url`` until the block exits."""
    proxy = FaultProxy(upstream_base_url, faults)
    started = threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(proxy._serve(started),), name="fault-proxy", daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if started.wait(0.01) or not thread.is_alive():
                break
        if not started.is_set():
            raise RuntimeError("the fault proxy did not start")
        yield proxy
    finally:
        if proxy._loop is not None and proxy._stop is not None:
            proxy._loop.call_soon_threadsafe(proxy._stop.set)
        thread.join(10)
