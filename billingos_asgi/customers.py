"""Who is paying for a request: ready resolvers for the usual ways apps authenticate.

A resolver takes the :class:`~starlette.requests.Request` and returns the customer id or None
(sync or async). None of them trusts anything the client can set directly: they read what the
app's own authentication established, or map a credential through the app's own lookup.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from cachetools import TTLCache
from starlette.requests import Request

__all__ = ["CustomerResolver", "from_api_key", "from_state", "from_user"]

CustomerResolver = Callable[[Request], str | None | Awaitable[str | None]]
KeyLookup = Callable[[str], str | None | Awaitable[str | None]]


def from_user(attribute: str = "identity") -> CustomerResolver:
    """The user Starlette's ``AuthenticationMiddleware`` put in ``scope["user"]`` (when authenticated).

    ``attribute`` names the user attribute holding the customer id (``identity`` by default).
    """

    def resolve(request: Request) -> str | None:
        user = request.scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        value = getattr(user, attribute, None)
        return None if value is None else str(value)

    return resolve


def from_state(attribute: str = "customer_id") -> CustomerResolver:
    """An attribute of ``request.state`` set by the app's own auth middleware (placed outside ours)."""

    def resolve(request: Request) -> str | None:
        value = request.scope.get("state", {}).get(attribute)
        return None if value is None else str(value)

    return resolve


def from_api_key(
    lookup: KeyLookup,
    *,
    header: str = "x-api-key",
    cache_size: int = 10_000,
    ttl: float = 300.0,
) -> CustomerResolver:
    """An API key header mapped to its customer by ``lookup(key)`` (sync or async; None = unknown key).

    Answers, unknown keys included, are cached (bounded LRU with TTL) so the lookup runs once per
    key per ``ttl`` seconds, not once per request.
    """
    if cache_size < 1 or ttl <= 0:
        raise ValueError("cache_size must be >= 1 and ttl > 0")
    header_name = header.lower().encode("latin-1")
    cache: TTLCache[bytes, str | None] = TTLCache(maxsize=cache_size, ttl=ttl)
    is_async = inspect.iscoroutinefunction(lookup)

    def resolve(request: Request) -> str | None | Awaitable[str | None]:
        # Sync on a cache hit (the common case: no coroutine per request); a miss is awaited.
        key = next((value for name, value in request.scope["headers"] if name == header_name), None)
        if not key:
            return None
        try:
            return cache[key]
        except KeyError:
            return look_up(key)

    async def look_up(key: bytes) -> str | None:
        answer = lookup(key.decode("latin-1"))
        if is_async or inspect.isawaitable(answer):
            answer = await answer  # type: ignore[misc]
        customer = None if answer is None else str(answer)
        cache[key] = customer
        return customer

    return resolve
