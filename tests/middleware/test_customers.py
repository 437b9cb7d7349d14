"""Customer resolution with the ready resolvers: API keys, Starlette's authentication, request state."""

from __future__ import annotations

import inspect
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from billingos_asgi import BillingMiddleware, LocalBilling, from_api_key, from_state, from_user, get_usage_context
from billingos_asgi.customers import CustomerResolver
from tests.asgi import serve

KEYS = {"key-free": "user_free", "key-pro": "user_pro"}


async def whoami(request: Request) -> Response:
    context = get_usage_context(request)
    return JSONResponse({"customer": None if context is None else context.customer_id})


def app(middleware: list[Middleware]) -> Starlette:
    return Starlette(routes=[Route("/v1/whoami", whoami)], middleware=middleware)


async def test_from_api_key_with_a_sync_lookup_cached_per_key(billing: LocalBilling) -> None:
    lookups: list[str] = []

    def lookup(key: str) -> str | None:
        lookups.append(key)
        return KEYS.get(key)

    metered = app(
        [
            Middleware(
                BillingMiddleware, billing=billing, customer=from_api_key(lookup), routes={"/v1/whoami": "api_calls"}
            )
        ]
    )
    async with serve(metered) as client:
        free = [await client.get("/v1/whoami", headers={"x-api-key": "key-free"}) for _ in range(3)]
        pro = await client.get("/v1/whoami", headers={"X-API-Key": "key-pro"})
        unknown = [await client.get("/v1/whoami", headers={"x-api-key": "nope"}) for _ in range(2)]
        missing = await client.get("/v1/whoami")
    assert [r.json() for r in free] == [{"customer": "user_free"}] * 3
    assert pro.json() == {"customer": "user_pro"}
    assert [r.status_code for r in unknown] == [401, 401] and missing.status_code == 401
    assert lookups == ["key-free", "key-pro", "nope"]  # one lookup per key, unknown keys included
    assert await billing.recorded_units("user_free", "api_calls") == 3
    assert await billing.recorded_units("user_pro", "api_calls") == 1


async def test_from_api_key_with_an_async_lookup_and_custom_header(billing: LocalBilling) -> None:
    async def lookup(key: str) -> str | None:
        return KEYS.get(key)

    metered = app(
        [
            Middleware(
                BillingMiddleware,
                billing=billing,
                customer=from_api_key(lookup, header="Authorization-Key"),
                routes={"/v1/whoami": "api_calls"},
            )
        ]
    )
    async with serve(metered) as client:
        ok = await client.get("/v1/whoami", headers={"authorization-key": "key-pro"})
        wrong_header = await client.get("/v1/whoami", headers={"x-api-key": "key-pro"})
    assert ok.json() == {"customer": "user_pro"}
    assert wrong_header.status_code == 401
    assert await billing.recorded_units("user_pro", "api_calls") == 1


def keyed(key: str) -> Request:
    return Request({"type": "http", "headers": [(b"host", b"x"), (b"x-api-key", key.encode())]})


async def resolved(resolver: CustomerResolver, key: str) -> str | None:
    answer = resolver(keyed(key))
    return await answer if inspect.isawaitable(answer) else answer


async def test_from_api_key_cache_is_bounded_oldest_first() -> None:
    lookups: list[str] = []

    def lookup(key: str) -> str:
        lookups.append(key)
        return f"owner-of-{key}"

    resolver = from_api_key(lookup, cache_size=2)
    for key in ["a", "b", "a", "c", "b", "a"]:
        assert await resolved(resolver, key) == f"owner-of-{key}"
    # c evicted a (the oldest, though used since: eviction follows insertion), b was still cached.
    assert lookups == ["a", "b", "c", "a"]


async def test_from_api_key_made_up_keys_never_push_out_good_ones() -> None:
    lookups: list[str] = []

    def lookup(key: str) -> str | None:
        lookups.append(key)
        return "customer_free" if key == "good" else None

    resolver = from_api_key(lookup, cache_size=3)
    assert await resolved(resolver, "good") == "customer_free"
    for i in range(100):  # a flood of made-up keys
        assert await resolved(resolver, f"made-up-{i}") is None
    assert await resolved(resolver, "made-up-99") is None  # remembered, within its own bound
    assert await resolved(resolver, "good") == "customer_free"
    assert lookups.count("good") == 1 and lookups.count("made-up-99") == 1


async def test_from_api_key_answers_expire_after_ttl() -> None:
    lookups: list[str] = []
    owners = {"k": "first-owner"}

    def lookup(key: str) -> str | None:
        lookups.append(key)
        return owners.get(key)

    resolver = from_api_key(lookup, ttl=0.05)
    assert await resolved(resolver, "k") == "first-owner"
    owners["k"] = "second-owner"  # the key was reassigned (or revoked) in the app's store
    assert await resolved(resolver, "k") == "first-owner"  # cached
    await anyio.sleep(0.1)
    assert await resolved(resolver, "k") == "second-owner"
    assert lookups == ["k", "k"]


async def concurrently(resolver: CustomerResolver, key: str, count: int) -> tuple[list[str | None], int]:
    """``count`` requests resolving ``key`` together: their answers, and how many failed."""
    answers: list[str | None] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        try:
            answers.append(await resolved(resolver, key))
        except LookupError as failure:  # the lookup's own error, its message left out (it may quote the key)
            assert str(failure) in (
                "the API key lookup failed with ConnectionError (the key left out)",
                "the API key lookup failed twice while this request waited (the key left out)",
            )
            assert failure.__context__ is None  # not even the lookup's error, which may quote the key, behind it
            failed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return answers, failed


async def test_from_api_key_looks_a_key_up_once_for_all_that_miss_together() -> None:
    attempts: list[str] = []

    async def slow_lookup(key: str) -> str | None:
        attempts.append(key)
        await anyio.sleep(0.05)
        if key == "flaky" and attempts.count(key) == 1:
            raise ConnectionError("key store unreachable")
        return f"owner-of-{key}"

    resolver = from_api_key(slow_lookup)
    assert await concurrently(resolver, "k", 50) == (["owner-of-k"] * 50, 0)
    # The first lookup fails for the request that made it; one waiting request tries again for the rest.
    assert await concurrently(resolver, "flaky", 50) == (["owner-of-flaky"] * 49, 1)
    assert attempts == ["k", "flaky", "flaky"]


async def test_from_api_key_tries_a_failed_lookup_once_more_for_those_waiting() -> None:
    """A key store that is down: the requests waiting on its lookup each tried it in turn, the
    last of 50 waiting out 50 lookups; now one retry, and those still waiting fail with it."""
    attempts = 0

    async def store_down(key: str) -> str | None:
        nonlocal attempts
        attempts += 1
        await anyio.sleep(0.05)
        raise ConnectionError("key store unreachable")

    assert await concurrently(from_api_key(store_down), "k", 50) == ([], 50)
    assert attempts == 2


async def test_from_api_key_a_lookup_cancelled_with_its_request_is_no_failure() -> None:
    """A request gone (its lookup cancelled with it) left the others to try again, which counted as a
    failure: the second cancellation failed the third request, that nothing had failed."""
    started: list[anyio.Event] = []

    async def lookup(key: str) -> str | None:
        started.append(anyio.Event())
        started[-1].set()
        await anyio.sleep(0.05)
        return f"owner-of-{key}"

    resolver = from_api_key(lookup)
    answers: list[str | None] = []
    async with anyio.create_task_group() as tg:
        scopes = [anyio.CancelScope() for _ in range(2)]

        async def leaving(scope: anyio.CancelScope) -> None:
            with scope:
                await resolved(resolver, "k")

        async def staying() -> None:
            answers.append(await resolved(resolver, "k"))

        for scope in scopes:
            tg.start_soon(leaving, scope)
        tg.start_soon(staying)
        for scope in scopes:  # each request leaves while its lookup runs, the next one taking over
            while len(started) <= scopes.index(scope):  # noqa: ASYNC110 - waiting for the lookup to start
                await anyio.sleep(0.001)
            scope.cancel()
    assert answers == ["owner-of-k"] and len(started) == 3


async def test_from_api_key_never_looks_up_or_keeps_an_oversized_key() -> None:
    lookups: list[str] = []

    def lookup(key: str) -> str:
        lookups.append(key)
        return "someone"

    resolver = from_api_key(lookup)
    assert await resolved(resolver, "k" * 1025) is None  # 401: no key
    assert await resolved(resolver, "k" * 1024) == "someone"
    assert [len(key) for key in lookups] == [1024]


def test_from_api_key_refuses_the_key_store_itself_without_showing_it() -> None:
    """Passed the dict rather than its ``.get``, every request's lookup would fail (and be served
    free under on_error="allow"): refused at once, by type, not by a repr listing every key."""
    with pytest.raises(ValueError, match=r"a function of the key \(a dict's \.get\), got dict") as refused:
        from_api_key(KEYS)  # type: ignore[arg-type]
    assert "key-free" not in str(refused.value)


@pytest.mark.parametrize("cache_size", [0, -1, float("nan"), float("inf"), True, 10.5, "100"])
def test_from_api_key_refuses_a_cache_size_that_bounds_nothing(cache_size: Any) -> None:
    """NaN and infinity passed the old check, and the caches grew without bound."""
    with pytest.raises(ValueError, match="cache_size must be a whole number >= 1"):
        from_api_key(KEYS.get, cache_size=cache_size)


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), True, "300"])
def test_from_api_key_refuses_a_ttl_that_is_no_lifetime(ttl: Any) -> None:
    """NaN turned the cache off; infinity would keep a key revoked in the app's store working."""
    with pytest.raises(ValueError, match="ttl must be a number of seconds > 0"):
        from_api_key(KEYS.get, ttl=ttl)


@pytest.mark.parametrize("header", [None, b"x-api-key", "", "x api", "x-clé"])
def test_from_api_key_refuses_a_header_no_request_can_carry(header: Any) -> None:
    """Crashed unnamed, or taken: never found, every request answered 401."""
    with pytest.raises(ValueError, match="header must be an HTTP header name"):
        from_api_key(KEYS.get, header=header)


class TokenBackend(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        token = conn.headers.get("authorization", "").removeprefix("Bearer ")
        customer = {"t-free": "user_free", "t-pro": "user_pro"}.get(token)
        return None if customer is None else (AuthCredentials(["authenticated"]), SimpleUser(customer))


async def test_from_user_with_starlette_authentication(billing: LocalBilling) -> None:
    metered = app(
        [
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),  # outermost: runs first
            Middleware(
                BillingMiddleware, billing=billing, customer=from_user("username"), routes={"/v1/whoami": "api_calls"}
            ),
        ]
    )
    async with serve(metered) as client:
        free = await client.get("/v1/whoami", headers={"authorization": "Bearer t-free"})
        anonymous = await client.get("/v1/whoami")
        bad = await client.get("/v1/whoami", headers={"authorization": "Bearer forged"})
    assert free.status_code == 200 and free.json() == {"customer": "user_free"}
    assert anonymous.status_code == 401 and bad.status_code == 401
    assert await billing.recorded_units("user_free", "api_calls") == 1


async def test_from_user_with_authentication_inside_is_warned_of_once(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """Authentication added before BillingMiddleware runs after it: no request has a user yet, so
    every one is refused 401, which the log says once, with the fix; an anonymous request that
    went through the authentication (auth outside) is no such mistake."""
    inside = app(
        [
            Middleware(
                BillingMiddleware, billing=billing, customer=from_user("username"), routes={"/v1/whoami": "api_calls"}
            ),
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),  # inside: runs after billing
        ]
    )
    async with serve(inside) as client:
        answers = [(await client.get("/v1/whoami", headers={"authorization": "Bearer t-free"})) for _ in range(3)]
    assert [r.status_code for r in answers] == [401] * 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "AuthenticationMiddleware must run first" in warned[0]

    caplog.clear()
    outside = app(
        [
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),
            Middleware(
                BillingMiddleware, billing=billing, customer=from_user("username"), routes={"/v1/whoami": "api_calls"}
            ),
        ]
    )
    async with serve(outside) as client:
        assert (await client.get("/v1/whoami")).status_code == 401
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class StateAuth:
    """An outer pure-ASGI auth middleware recording the customer in ``scope["state"]``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            token = dict(scope["headers"]).get(b"authorization", b"").decode()
            if token == "Bearer t-pro":
                scope.setdefault("state", {})["customer_id"] = "user_pro"
        await self.app(scope, receive, send)


async def test_from_state_set_by_an_outer_middleware(billing: LocalBilling) -> None:
    metered = app(
        [
            Middleware(StateAuth),
            Middleware(BillingMiddleware, billing=billing, customer=from_state(), routes={"/v1/whoami": "api_calls"}),
        ]
    )
    async with serve(metered) as client:
        pro = [await client.get("/v1/whoami", headers={"authorization": "Bearer t-pro"}) for _ in range(2)]
        anonymous = await client.get("/v1/whoami")
    assert [r.json() for r in pro] == [{"customer": "user_pro"}] * 2
    assert anonymous.status_code == 401
    assert await billing.recorded_units("user_pro", "api_calls") == 2


@dataclass
class ApiKeyRow:
    """What a key store's lookup may return by mistake: the record, secret key and all."""

    key: str
    customer_id: str


async def test_the_ready_resolvers_take_a_string_or_a_database_key_and_nothing_else() -> None:
    """And a UUID (a primary key). Anything else was made a string: an API key's record went upstream
    as the customer id (its key in it, and back in the "Customer not found" message), bytes as "b'user_123'"."""
    row = ApiKeyRow("ck_live_SECRET", "user_123")
    keys: dict[str, object] = {"by-id": "user_123", "by-pk": 42, "by-row": row}
    lookup = from_api_key(keys.get)  # type: ignore[arg-type]  # (a lookup answering what the store holds)
    assert [await resolved(lookup, key) for key in ("by-id", "by-pk")] == ["user_123", "42"]
    with pytest.raises(TypeError, match="the API key lookup returned an object of type ApiKeyRow") as refused:
        await resolved(lookup, "by-row")
    assert "SECRET" not in str(refused.value)
    account = uuid.UUID("12345678-1234-5678-1234-567812345678")
    for state, expected in (("user_123", "user_123"), (7, "7"), (account, str(account)), (None, None)):
        assert from_state().from_scope({"state": {"customer_id": state}}) == expected
    for wrong in (b"user_123", True, {"id": "user_123"}):
        with pytest.raises(TypeError, match=r"from_state\('customer_id'\) returned an object of type"):
            from_state().from_scope({"state": {"customer_id": wrong}})
    user = SimpleUser("user_123")
    assert from_user().from_scope({"user": user}) == "user_123"
    with pytest.raises(TypeError, match=r"from_user\('tokens'\) returned an object of type dict"):
        from_user("tokens").from_scope({"user": type("User", (), {"is_authenticated": True, "tokens": {}})()})


async def test_async_resolver_and_async_callable_object(billing: LocalBilling) -> None:
    class Resolver:
        async def __call__(self, request: Request) -> str | None:
            return request.headers.get("x-customer")

    async def resolve(request: Request) -> str | None:
        return request.headers.get("x-customer")

    for resolver in (Resolver(), resolve):
        metered = app(
            [Middleware(BillingMiddleware, billing=billing, customer=resolver, routes={"/v1/whoami": "api_calls"})]
        )
        async with serve(metered) as client:
            ok = await client.get("/v1/whoami", headers={"x-customer": "user_free"})
            anonymous = await client.get("/v1/whoami")
        assert ok.json() == {"customer": "user_free"}
        assert anonymous.status_code == 401
    assert await billing.recorded_units("user_free", "api_calls") == 2


async def test_a_failing_lookup_never_puts_the_key_in_the_log(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """A database error quotes its parameters; the key must not reach the log through it, and a
    flood of such keys makes one line a second, not one a request."""

    def lookup(key: str) -> str | None:
        raise RuntimeError(f"(psycopg.errors.DataError) invalid input [parameters: ('{key}',)]")

    async def search(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/search", search)])
    app.add_middleware(
        BillingMiddleware, billing=billing, customer=from_api_key(lookup), default_feature="api_calls", on_error="deny"
    )
    async with serve(app) as client:
        answers = [
            (await client.get("/v1/search", headers={"x-api-key": f"sk-secret-{i}"})).status_code for i in range(20)
        ]
    assert answers == [503] * 20
    assert "sk-secret" not in caplog.text
    assert sum(r.getMessage().startswith("customer resolver failed") for r in caplog.records) == 1
    held = sum(int(count) for count in re.findall(r"(\d+) similar lines held back", caplog.text))
    assert held == 19 and "held back since the last one" in caplog.text  # the last count, said at shutdown


async def test_a_failing_resolver_is_logged_by_its_type_and_frames_never_its_message(
    billing: LocalBilling, caplog: pytest.LogCaptureFixture
) -> None:
    """``API_KEYS[key]`` raises ``KeyError(key)``: the key of a request must not reach the log
    through the resolver's error, which is still found by its type and the line that raised it."""
    keys = {"key_alice": "user_free"}

    def resolver(request: Request) -> str | None:
        return keys[request.headers.get("x-api-key", "")]

    async def search(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/search", search)])
    middleware = BillingMiddleware(
        app, billing=billing, customer=resolver, default_feature="api_calls", on_error="deny"
    )
    async with serve(middleware) as client:
        refused = await client.get("/v1/search", headers={"x-api-key": "sk-guessed-secret"})
        served = await client.get("/v1/search", headers={"x-api-key": "key_alice"})
    assert (refused.status_code, served.status_code) == (503, 200)
    assert "sk-guessed-secret" not in caplog.text
    assert "customer resolver failed on api_calls: KeyError (its message left out" in caplog.text
    assert "return keys[request.headers.get" in caplog.text  # where it was raised
