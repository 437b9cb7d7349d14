"""Single flight: one call per key at a time, its answer (or failure) shared by those who wait on it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Generic, TypeVar

import anyio

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Flight(Generic[T]):
    """A call under way; ``result`` or ``error`` once ``done`` (neither: its caller was cancelled)."""

    __slots__ = ("done", "error", "origin", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: T | None = None
        self.error: Exception | None = None
        self.origin: TracebackType | None = None  # the error's traceback as the caller caught it


async def once(flights: dict[K, Flight[T]], key: K, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, or the answer of the one already under way for ``key``; its failure is raised from
    where its caller caught it (each waiter raising the shared error as it is would add its frames to
    those of the waiters before it: memory, and logs). A caller cancelled (its client went away) is
    taken over by the next."""
    while True:
        flight = flights.get(key)
        if flight is None:
            flight = flights[key] = Flight()
            try:
                flight.result = await call()
                return flight.result
            except Exception as exc:
                flight.error, flight.origin = exc, exc.__traceback__
                raise
            finally:
                del flights[key]
                flight.done.set()
        await flight.done.wait()
        if flight.result is not None:
            return flight.result
        if flight.error is not None:
            raise flight.error.with_traceback(flight.origin)
