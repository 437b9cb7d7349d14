"""Who is paying for a request: ready resolvers for the usual ways apps authenticate.

A resolver takes the :class:`~starlette.requests.Request` and returns the customer id or None
(sync or async). None of them trusts anything the client can set directly: they read what the
app's own authentication established, or map a credential through the app's own lookup. They
read the ASGI scope only (:class:`ScopeResolver`), so the middleware need not build a Request.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from time import monotonic
from typing import TypeVar
from uuid import UUID

import anyio
from starlette.requests import Request
from starlette.types import Scope

from ._validation import customer_answer

__all__ = ["CustomerResolver", "ScopeResolver", "from_api_key", "from_state", "from_user"]

logger = logging.getLogger("billingos_asgi")

Answer = str | None | Awaitable[str | None]
MAX_KEY_BYTES = 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110's token)
CustomerResolver = Callable[[Request], Answer]
KeyLookup = Callable[[str], str | None | Awaitable[str | None]]


class ScopeResolver:
    """A customer resolver that reads only the ASGI scope (wrap your own in it for the same benefit).

    A resolver like any other, but :class:`~billingos_asgi.BillingMiddleware` calls ``from_scope``
    directly and skips building a :class:`~starlette.requests.Request` for requests it admits.
    """

    __slots__ = ("from_scope",)

    def __init__(self, from_scope: Callable[[Scope], Answer]) -> None:
        self.from_scope = from_scope

    def __call__(self, request: Request) -> Answer:
        return self.from_scope(request.scope)


def refuse_a_mappings_method(customer: object) -> None:
    """Refuse ``API_KEYS.get`` as a resolver: called with the Request, it answers None, a 401 for every request."""
    if getattr(customer, "__name__", "") in ("get", "__getitem__") and isinstance(
        getattr(customer, "__self__", None), Mapping
    ):
        raise ValueError(
            "customer is a mapping's method, which would be called with the request:"
            " for an API key store, pass from_api_key(keys.get)"
        )


def from_user(attribute: str = "identity") -> ScopeResolver:
    """The user Starlette's ``AuthenticationMiddleware`` put in ``scope["user"]`` (when authenticated).

    ``attribute`` names the user attribute holding the customer id (``identity`` by default).
    A scope without ``"user"`` at all means the authentication runs inside the billing middleware
    (added before it): every request is answered 401, so that is logged once.
    """
    warned = False

    def resolve(scope: Scope) -> str | None:
        nonlocal warned
        user = scope.get("user")
        if user is None and "user" not in scope and not warned:
            warned = True
            logger.warning(
                "from_user(): the request has no scope['user'], so every request is answered 401:"
                " AuthenticationMiddleware must run first (app.add_middleware it after BillingMiddleware,"
                " or list it before BillingMiddleware in middleware=[...])"
            )
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        return _stored_id(getattr(user, attribute, None), f"from_user({attribute!r})")

    return ScopeResolver(resolve)


def from_state(attribute: str = "customer_id") -> ScopeResolver:
    """An attribute of ``request.state`` set by the app's own auth middleware (placed outside ours)."""

    def resolve(scope: Scope) -> str | None:
        return _stored_id(scope.get("state", {}).get(attribute), f"from_state({attribute!r})")

    return ScopeResolver(resolve)


def from_api_key(
    lookup: KeyLookup,
    *,
    header: str = "x-api-key",
    cache_size: int = 10_000,
    ttl: float = 300.0,
) -> ScopeResolver:
    """An API key header mapped to its customer by ``lookup(key)`` (sync or async; None = unknown key).

    Answers, unknown keys included, are cached (bounded, with TTL) so the lookup runs once per
    key per ``ttl`` seconds, not once per request, and once for all the requests that miss on a
    key together. Unknown keys have a cache of their own (``cache_size`` too), so that a flood of
    made-up keys never pushes out the good ones. A key longer than 1,024 bytes is no key (401),
    looked up and cached never.
    """
    if not callable(lookup):  # the key store itself: every lookup would fail, and on_error decide
        raise ValueError(f"from_api_key needs a function of the key (a dict's .get), got {type(lookup).__name__}")
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
        raise ValueError(f"cache_size must be a whole number >= 1, got {cache_size!r}")
    # Finite: a key revoked in the app's store must stop working here too, in time.
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a number of seconds > 0, got {ttl!r}")
    if not isinstance(header, str) or not _TOKEN.fullmatch(header):  # (another would never match: every request a 401)
        raise ValueError(f"header must be an HTTP header name (letters, digits, '-'...), got {header!r}")
    header_name = header.lower().encode("latin-1")
    # key -> (customer, expiry). A plain dict in insertion order, oldest evicted first: every entry
    # lives ttl seconds from its insertion, so the oldest is also the one to expire first. A third
    # of cachetools.TTLCache's cost per hit, and this lookup runs on every request.
    answers: dict[bytes, tuple[str, float]] = {}
    # Keys no customer has, apart (key -> expiry): a flood of made-up keys never pushes out good ones.
    unknown: dict[bytes, float] = {}
    flights: dict[bytes, _Lookup] = {}  # keys being looked up, for the requests that wait on them
    is_async = inspect.iscoroutinefunction(lookup)

    def cached(key: bytes) -> tuple[bool, str | None]:
        """Whether ``key``'s answer is cached, and its customer (None: no customer has the key)."""
        answer = answers.get(key)
        if answer is not None and answer[1] > monotonic():
            return True, answer[0]
        expiry = unknown.get(key)
        return expiry is not None and expiry > monotonic(), None

    def resolve(scope: Scope) -> Answer:
        # Sync on a cache hit (the common case: no coroutine per request); a miss is awaited.
        for name, key in scope["headers"]:  # noqa: B007 - the loop stops at the key, used below
            if name == header_name:
                break
        else:
            return None
        if not key or len(key) > MAX_KEY_BYTES:
            return None
        answer = answers.get(key)
        if answer is not None and answer[1] > monotonic():
            return answer[0]
        hit, customer = cached(key)  # (an unknown key's answer, then)
        return customer if hit else look_up(key)

    async def look_up(key: bytes) -> str | None:
        failed = 0
        while (flight := flights.get(key)) is not None:
            await flight.done.wait()
            hit, customer = cached(key)
            if hit:
                return customer
            # Failed, cancelled (its request gone) or already evicted: tried again here. A failure
            # only once: a key store that is down would otherwise be asked by each waiter in turn.
            failed += flight.failed
            if failed > 1:
                raise LookupError("the API key lookup failed twice while this request waited (the key left out)")
        flights[key] = flight = _Lookup()
        try:
            failure = None
            try:
                answer = lookup(key.decode("latin-1"))
                if is_async or inspect.isawaitable(answer):
                    answer = await answer  # type: ignore[misc]
            except Exception as exc:  # its message may quote the key (a database error's parameters)
                failure = type(exc).__name__
            if failure is not None:  # raised out of the except block: the lookup's error is not its context
                raise LookupError(f"the API key lookup failed with {failure} (the key left out)")
            customer = _stored_id(answer, "the API key lookup")
            expiry = monotonic() + ttl
            if customer is None:
                _insert_last(unknown, key, expiry, cache_size)
            else:
                _insert_last(answers, key, (customer, expiry), cache_size)
            return customer
        except Exception:
            flight.failed = True
            raise
        finally:
            del flights[key]
            flight.done.set()

    return ScopeResolver(resolve)


class _Lookup:
    """One lookup of a key under way, for the requests that wait on it."""

    __slots__ = ("done", "failed")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.failed = False  # it raised (not cancelled: its request went away)


def _stored_id(value: object, source: str) -> str | None:
    """The customer id an app stored: a string, an integer (a database key) in digits, or a UUID.
    Anything else is refused by its type: ``str()`` of a record (an API key row) would send it,
    secrets and all, upstream as the customer id."""
    if isinstance(value, str):
        return value  # (checked as any resolver's answer is)
    if isinstance(value, int | UUID) and not isinstance(value, bool):
        return str(value)
    return customer_answer(value, source)  # None, or refused


V = TypeVar("V")


def _insert_last(entries: dict[bytes, V], key: bytes, value: V, size: int) -> None:
    """Insert ``key`` last (the order stays the expiry order), evicting the oldest beyond ``size``."""
    entries.pop(key, None)
    while len(entries) >= size:
        del entries[next(iter(entries))]
    entries[key] = value
