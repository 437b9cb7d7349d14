"""billingos-asgi for Starlette: metering declared on endpoints, and the usage routes for front ends.

::

    @metered("api_calls")
    async def search(request): ...

    app = Starlette(routes=[Route("/v1/search", search), usage_routes(billing, customer)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=customer, routes=declared(app))
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import anyio.from_thread
from starlette._utils import is_async_callable
from starlette.requests import HTTPConnection
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from billingos_asgi import BillingBackend, Metered
from billingos_asgi.context import declared_context
from billingos_asgi.customers import CustomerResolver
from billingos_asgi.discovery import MARK, declared_routes, mounted_apps, unwrapped
from billingos_asgi.endpoints import UsageEndpoints
from billingos_asgi.middleware import gate_preflight, is_preflight
from billingos_asgi.responses import answer_refusals
from billingos_asgi.routes import QuantityFunction

__all__ = ["declared", "metered", "usage_routes"]

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def metered(
    feature: str,
    *,
    quantity: float | QuantityFunction | None = 1,
    bill_partial: bool = False,
    late: bool = False,
) -> Callable[[Endpoint], Endpoint]:
    """Declare an endpoint (a function of the request, or an ``HTTPEndpoint``) metered:
    ``@metered("api_calls")``; see :class:`Metered` for the options.

    Fails closed: a request that reaches it without BillingMiddleware metering it so (a route
    :func:`declared` could not see, in a mounted app wrapped in middleware or added after the
    stack was built) raises, a 500 rather than a free request.
    """
    declaration = Metered(feature, quantity, bill_partial, late)

    def decorate(endpoint: Endpoint) -> Endpoint:
        where = f"endpoint {getattr(endpoint, '__qualname__', None) or repr(endpoint)}"
        checked: Any
        if inspect.isclass(endpoint):  # an HTTPEndpoint: its dispatch checks, whatever the method
            # A decorated base's dispatch wraps the original: wrap that. The check is the class's
            # own (a subclass's dispatch may call its base's, checked too).
            dispatch = endpoint.dispatch  # type: ignore[attr-defined]
            dispatch = getattr(dispatch, _UNCHECKED, dispatch)

            async def checked_dispatch(self: Any) -> None:
                own: Metered = getattr(type(self), MARK)
                declared_context(self.scope, own.feature, f"endpoint {type(self).__qualname__}")
                if not own.late:  # (a late route's own identify() names its customer)
                    await gate_preflight(self.scope)
                await dispatch(self)

            setattr(checked_dispatch, _UNCHECKED, dispatch)
            endpoint.dispatch = checked_dispatch  # type: ignore[attr-defined]
            checked = endpoint
        elif not _request_response(endpoint):  # an ASGI app: Route calls it as one
            checked = _CheckedApp(endpoint, feature, where)
        elif is_async_callable(endpoint):

            @functools.wraps(endpoint)
            async def checked(*args: Any, **keywords: Any) -> Any:  # (request), (self, request), or a partial's
                scope = _scope_among(args, keywords)
                declared_context(scope, feature, where)
                if scope is not None and not late:
                    await gate_preflight(scope)
                return await endpoint(*args, **keywords)

        else:

            @functools.wraps(endpoint)
            def checked(*args: Any, **keywords: Any) -> Any:
                scope = _scope_among(args, keywords)
                declared_context(scope, feature, where)
                if scope is not None and not late and is_preflight(scope):  # (in a worker thread of AnyIO's)
                    anyio.from_thread.run(gate_preflight, scope)
                return endpoint(*args, **keywords)

        setattr(checked, MARK, declaration)
        return cast(Endpoint, checked)

    return decorate


_UNCHECKED = "__billingos_unchecked__"


def _scope_among(args: tuple[Any, ...], keywords: dict[str, Any]) -> Scope | None:
    """The scope of the request an endpoint is called with: Route passes it last; FastAPI passes a
    path operation its parameters by name, the request only if it asks for it (None: it did not)."""
    if args and isinstance(args[-1], HTTPConnection):
        return args[-1].scope
    return next((value.scope for value in keywords.values() if isinstance(value, HTTPConnection)), None)


def _request_response(endpoint: Any) -> bool:
    """Whether ``Route`` calls ``endpoint`` with the request (a function or method, partials
    unwrapped), rather than as an ASGI app."""
    endpoint = unwrapped(endpoint)
    return inspect.isfunction(endpoint) or inspect.ismethod(endpoint)


class _CheckedApp:
    """An ASGI app endpoint that fails closed as a function endpoint does."""

    def __init__(self, app: ASGIApp, feature: str, where: str) -> None:
        self.app = app
        self.feature = feature
        self.where = where
        self.__name__ = getattr(app, "__name__", type(app).__name__)  # the Route's name, as without us

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared_context(scope, self.feature, self.where)  # (a preflight is its own CORS layer's to answer)
        await self.app(scope, receive, send)


def declared(
    app: Any, *, also: Mapping[str, str | Metered | None] | None = None
) -> Callable[[], dict[str, str | Metered | None]]:
    """The middleware's ``routes=``: every ``@metered`` endpoint of ``app`` (mounts included), plus ``also``.

    Collected when the middleware stack is built (at start-up), so routes added after
    ``add_middleware`` count too. A path declared twice with different features is refused. The
    :func:`billingos_fastapi.metered` dependencies of FastAPI apps mounted in it are found too.
    Answers a late gate's refusal (:class:`BillingDenied`, from an endpoint's ``identify``)
    inside the app and the apps mounted in it, so that it is answered however the middleware is
    installed.
    """
    answer_refusals(app)  # now: the app reads its handlers when its stack is built, before collecting

    def collect() -> dict[str, str | Metered | None]:
        if _mounts_fastapi(app):  # its routes declare with dependencies, which FastAPI's adapter reads
            from billingos_fastapi import declared as fastapi_declared

            return fastapi_declared(app, also=also)()
        answer_refusals(app)  # the apps mounted since
        return declared_routes(app.routes, also=also)

    return collect


def _mounts_fastapi(app: Any) -> bool:
    """Whether a FastAPI app is mounted in ``app`` (at any depth), without importing FastAPI."""
    fastapi = sys.modules.get("fastapi")
    return fastapi is not None and any(isinstance(each, fastapi.FastAPI) for each in mounted_apps(app))


def usage_routes(
    billing: BillingBackend, customer: CustomerResolver, *, prefix: str = "/billing", **options: Any
) -> Mount:
    """``GET {prefix}/usage`` and ``POST {prefix}/session-token``, for the signed-in customer only."""
    endpoints = UsageEndpoints(billing, customer, **options)
    return Mount(
        prefix,
        routes=[
            Route("/usage", endpoints.usage, methods=["GET"]),
            Route("/session-token", endpoints.session_token, methods=["POST"]),
        ],
    )
