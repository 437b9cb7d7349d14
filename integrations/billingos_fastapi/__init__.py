"""billingos-asgi for FastAPI: metering declared as a dependency, documented in OpenAPI, and a usage router.

::

    app = FastAPI()

    @app.post("/v1/search", dependencies=[metered("api_calls")])
    async def search(billing: Billing): ...  # billing.entitlement, billing.report(units)

    app.include_router(usage_router(billing, customer))
    app.add_middleware(BillingMiddleware, billing=billing, customer=customer, routes=declared(app))

The middleware gates a declared route before routing (the handler never runs on 401/403/429):
:func:`declared` collects the declarations from the app's routes when the stack is built.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import fastapi.routing
from fastapi import APIRouter, Depends, FastAPI, Request, params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from billingos_asgi import BillingBackend, Metered, UsageContext, UsageMetric, get_usage_context
from billingos_asgi.context import declared_context
from billingos_asgi.customers import CustomerResolver
from billingos_asgi.discovery import (
    MARK,
    Found,
    declarations,
    metering_of,
    mounted_apps,
    route_table,
    walk,
)
from billingos_asgi.endpoints import UsageEndpoints
from billingos_asgi.middleware import gate_preflight
from billingos_asgi.responses import answer_refusals
from billingos_asgi.routes import QuantityFunction, joined

__all__ = [
    "Billing",
    "BillingSessionToken",
    "BillingUsage",
    "BillingUsageMetric",
    "PROBLEM_RESPONSES",
    "declared",
    "metered",
    "usage_router",
]

logger = logging.getLogger("billingos_asgi")

_PROBLEM = {
    "application/problem+json": {
        "schema": {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "feature": {"type": "string"},
                "limit": {"type": "number", "nullable": True},
                "usage": {"type": "number", "nullable": True},
                "resets_at": {"type": "string", "format": "date-time", "nullable": True},
                "upgrade_url": {"type": "string"},
            },
        }
    }
}
#: What the middleware may answer instead of a metered route's handler.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No signed-in customer", "content": _PROBLEM},
    403: {"description": "The customer's plan does not include this feature", "content": _PROBLEM},
    429: {"description": "The feature's quota for this period is used up (see Retry-After)", "content": _PROBLEM},
}
_COLLECTED = "__billingos_collected__"  # set on a metered() dependency found by declared()
_DOCUMENTS = "__billingos_documents__"  # set on an app's openapi() that declared() wraps


def metered(
    feature: str,
    *,
    quantity: float | QuantityFunction | None = 1,
    bill_partial: bool = False,
    customer: Callable[..., Any] | None = None,
) -> Any:
    """A dependency declaring the route metered: ``dependencies=[metered("api_calls")]`` (on a route or
    router; ``Depends(metered("api_calls"))`` works too).

    ``customer``: the app's own auth dependency returning the customer id (or None). The gate
    then runs at dependency time with what it produced (late identification), and the
    middleware's ``customer=`` resolver is not used for the route.

    One request meters one feature: a route declared twice differently (on its router and on
    itself, say) is refused when the middleware stack is built; neither declaration wins.
    """
    declaration = Metered(feature, quantity, bill_partial, late=customer is not None)
    websockets_told = False

    def context_of(connection: HTTPConnection) -> UsageContext | None:
        nonlocal websockets_told
        if connection.scope["type"] != "http":
            # A router's (or the app's) dependencies apply to its websocket routes too, which
            # pass through the middleware unmetered (SPEC section 5): said once, not a failure.
            if not websockets_told:
                websockets_told = True
                logger.warning(
                    "metered(%r) on websocket route %s: websockets are not metered, it is served free",
                    feature,
                    connection.url.path,
                )
            return None
        # Fail closed: a route declared metered must never run unmetered by mistake.
        if not getattr(billing_gate, _COLLECTED, False):
            raise RuntimeError(
                f"route declared metered({feature!r}) but BillingMiddleware was not given routes=declared(app)"
            )
        return declared_context(connection.scope, feature, f"route {connection.url.path!r}")

    # The dependencies are async: FastAPI runs a sync one in its thread pool, where each metered
    # request would wait for a thread behind the app's blocking sync endpoints.
    async def gate(connection: HTTPConnection) -> UsageContext | None:
        context = context_of(connection)
        await gate_preflight(connection.scope)  # (a CORS preflight that no CORS layer answered: gated here)
        return context

    billing_gate: Callable[..., Any] = gate
    if customer is not None:

        async def identified(
            connection: HTTPConnection, customer_id: str | None = Depends(customer)
        ) -> UsageContext | None:
            context = context_of(connection)
            if context is not None:  # None: let through unmetered by on_error="allow", or a websocket
                # Raises BillingDenied for the middleware to answer; an answer that is no customer id
                # (the dependency's bug) is handled by on_error, as the middleware's own resolver's.
                await context.identify_by(_as_produced, customer_id)
            return context

        billing_gate = identified
    setattr(billing_gate, MARK, declaration)
    return _Declaration(billing_gate)


class _Declaration(params.Depends):
    """What :func:`metered` returns: the gate's ``Depends``, which FastAPI's habit of wrapping it
    again (``Depends(metered(...))``) also takes, as a dependency calling the gate."""

    def __init__(self, gate: Callable[..., Any]) -> None:
        super().__init__(gate)
        # What FastAPI reads of a dependency: the gate's parameters, their annotations resolved
        # (its older releases look for the names in the dependency's own __globals__).
        object.__setattr__(self, "__signature__", inspect.signature(gate, eval_str=True))

    async def __call__(self, *args: Any, **kwargs: Any) -> UsageContext | None:
        gate = self.dependency
        assert gate is not None  # (set in __init__)
        result: UsageContext | None = await gate(*args, **kwargs)
        return result

    def __getattr__(self, name: str) -> Any:
        """The gate's marks, which :func:`declared` reads (and nothing else: a copy made without
        ``__init__`` has no gate to ask)."""
        if name in (MARK, _COLLECTED):
            return getattr(self.__dict__["dependency"], name)
        raise AttributeError(name)


def _as_produced(customer_id: Any) -> Any:
    """What the app's auth dependency produced, checked by ``identify_by``."""
    return customer_id


async def _usage_context(request: Request) -> UsageContext | None:  # (async: see metered())
    return get_usage_context(request)


#: The handler's view of its metered request: ``billing.entitlement``, ``billing.report(tokens)``
#: (None when the request was let through unmetered: excluded, or a user hook failed with ``on_error="allow"``).
Billing = Annotated[UsageContext | None, Depends(_usage_context)]


def _find(route: Route) -> Metered | None:
    """A route's declaration (a :func:`metered` dependency, or ``@metered``), documented in OpenAPI."""
    if not isinstance(route, APIRoute):
        return metering_of(route)
    found = _declared_on(route, route.dependant, route.path)
    if found is not None:
        _document(route.responses)
    return found


def _expand(route: BaseRoute, prefix: str) -> Iterator[Found]:
    """A lazily included router (FastAPI >= 0.16x): its routes, with their full paths; a mount: the
    frontends of the app mounted (see :func:`_frontends`).

    Its Starlette routes, mounts and hosts come as copies carrying the router's prefix
    (``starlette_route``), walked like the app's own.
    """
    if isinstance(route, _TriedLast):
        yield from _frontends(route.app, prefix)
        return
    if isinstance(route, Mount):
        yield from _frontends(getattr(route, "_base_app", route.app), joined(prefix, route.path))
        return
    contexts = getattr(route, "effective_route_contexts", None)
    if not callable(contexts):
        return
    for context in contexts():
        original = context.original_route
        if isinstance(original, APIRoute):
            path = joined(prefix, context.path)
            found = None if context.dependant is None else _declared_on(original, context.dependant, path)
            if found is not None:
                _document(context.responses)  # (not the route's own: they would override the include's)
            yield path, context.methods, found, True
        elif context.starlette_route is not None:
            yield from walk([context.starlette_route], find=_find, expand=_expand, prefix=prefix)


#: FastAPI's frontends (``frontend()``, FastAPI >= 0.16x): a router's group of them, and a group as
#: a router including it sees it (its prefix and dependencies added); () before that FastAPI.
_FRONTEND_GROUP: Any = getattr(fastapi.routing, "_FrontendRouteGroup", ())
_INCLUDED: Any = getattr(fastapi.routing, "_EffectiveRouteContext", ())


class _TriedLast(BaseRoute):
    """Stands after an app's routes, in the walk, for the ones it tries when none of them matched."""

    def __init__(self, app: Starlette) -> None:
        self.app = app


def _frontends(app: object, prefix: str) -> Iterator[Found]:
    """The frontends of a FastAPI app or router: tried when none of its routes matched, the most
    specific first, each serving GET (and HEAD) on its path and under it, with its router's dependencies."""
    router = getattr(app, "router", app)
    tried_last = getattr(router, "_iter_low_priority_routes", None)
    found: list[Found] = []
    for route in tried_last() if callable(tried_last) else ():
        # (one a router included has that router's prefix, and its dependencies too)
        group, under = (route.original_route, route.frontend_prefix) if isinstance(route, _INCLUDED) else (route, "")
        if not isinstance(group, _FRONTEND_GROUP):
            continue
        paths = [joined(prefix, under + frontend.path if frontend.path != "/" else under) for frontend in group.routes]
        declaration = _declared_on(group, route.dependant, ", ".join(path or "/" for path in paths))
        for path, frontend in zip(paths, group.routes, strict=True):
            keys = [path, joined(path, "/{path:path}")] if path else ["/{path:path}"]  # (which takes "/" too)
            found += [(key, frontend.methods, declaration, True) for key in keys]
    found.sort(key=lambda route: len(route[0].removesuffix("/{path:path}")), reverse=True)  # as FastAPI picks
    yield from found


def _declared_on(route: BaseRoute, dependant: Dependant, path: str) -> Metered | None:
    """The route's declaration: ``@metered``, or a :func:`metered` dependency at any depth.

    Two different ones (its router's and its own, say) are refused: neither wins, as one request
    is billed for one feature; ``path`` (the route's, as the client calls it) says where.
    """
    declaration = metering_of(route) if isinstance(route, Route) else None
    for call in _metered_calls(dependant):
        found: Metered = getattr(call, MARK)
        if declaration is not None and found != declaration:
            raise ValueError(f"{path}: metered twice, as {declaration!r} and {found!r}: declare one")
        declaration = found
        setattr(call.dependency if isinstance(call, _Declaration) else call, _COLLECTED, True)  # (on the gate)
    return declaration


def _metered_calls(dependant: Dependant) -> Iterator[Any]:
    """The :func:`metered` dependencies of a route, also inside the app's own shared dependencies."""
    for dependency in dependant.dependencies:
        if isinstance(getattr(dependency.call, MARK, None), Metered):
            yield dependency.call
        yield from _metered_calls(dependency)


def _document(*responses: dict[int | str, dict[str, Any]]) -> None:
    for documented in responses:
        for status, response in PROBLEM_RESPONSES.items():
            if status not in documented and str(status) not in documented:  # (FastAPI takes "401" too)
                documented[status] = response


def declared(
    app: Starlette, *, also: Mapping[str, str | Metered | None] | None = None
) -> Callable[[], dict[str, str | Metered | None]]:
    """The middleware's ``routes=``: every route with a :func:`metered` dependency, plus ``also``.

    ``app``: a FastAPI app, or a Starlette app with FastAPI apps mounted in it.

    Collected when the middleware stack is built (at start-up); also documents the 401/403/429
    answers in the OpenAPI schema of those routes. Answers a late gate's refusal
    (:class:`BillingDenied`, raised in a ``metered(customer=...)`` dependency) inside the app and
    the apps mounted in it: with the middleware wrapped around the app from outside, or the route
    in a mounted app, Starlette's error middleware would otherwise make it a 500 before the
    middleware saw it.
    """
    answer_refusals(app)  # now: the app reads its handlers when its stack is built, before collect()

    def document() -> None:
        """Document the declared routes' answers (the walk does), in the app and the apps mounted in it."""
        deque(walk([*app.routes, _TriedLast(app)], find=_find, expand=_expand), maxlen=0)

    for target in _schema_apps(app):
        _document_before_schema(target, document)

    def collect() -> dict[str, str | Metered | None]:
        answer_refusals(app)  # the apps mounted since
        table = route_table(declarations([*app.routes, _TriedLast(app)], find=_find, expand=_expand), also)
        for target in _schema_apps(app):  # regenerated with the documented answers
            target.openapi_schema = None
            _document_before_schema(target, document)
        return table

    return collect


def _schema_apps(app: object) -> Iterator[FastAPI]:
    """``app`` if a FastAPI app, and the FastAPI apps mounted in it at any depth: each serves a schema of its own."""
    yield from (each for each in (app, *mounted_apps(app)) if isinstance(each, FastAPI))


def _document_before_schema(app: FastAPI, document: Callable[[], None]) -> None:
    """Have ``app.openapi()`` document the declared routes' answers first, also when asked before
    the first request (a script exporting the schema); once, however often the table is collected."""
    schema_of = app.openapi
    if getattr(schema_of, _DOCUMENTS, False):
        return

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document()
        return schema_of()

    setattr(openapi, _DOCUMENTS, True)
    app.openapi = openapi  # type: ignore[method-assign]  # (as FastAPI documents for extending the schema)


@dataclass(frozen=True)
class BillingUsageMetric(UsageMetric):
    """One quota of the signed-in customer, as BillingOS reports it (a null limit: unlimited)."""


class BillingUsage(BaseModel):
    """What ``GET /billing/usage`` answers (documentation only: the endpoint writes the JSON itself)."""

    metrics: list[BillingUsageMetric]
    customer_id: str


class BillingSessionToken(BaseModel):
    """What ``POST /billing/session-token`` answers, for the React SDK."""

    sessionToken: str  # noqa: N815 - BillingOS's wire names
    expiresAt: datetime  # noqa: N815


#: ``?feature_key=``, read by UsageEndpoints (which answers 400 for a value that is no feature key).
_FEATURE_KEY = {
    "name": "feature_key",
    "in": "query",
    "required": False,
    "description": "One feature's usage only (empty or absent: every feature)",
    "schema": {"type": "string", "maxLength": 255},
}


def usage_router(
    billing: BillingBackend,
    customer: CustomerResolver,
    *,
    prefix: str = "/billing",
    tags: list[str] | None = None,
    **options: Any,
) -> APIRouter:
    """``GET {prefix}/usage`` and ``POST {prefix}/session-token`` for the signed-in customer."""
    endpoints = UsageEndpoints(billing, customer, **options)
    router = APIRouter(prefix=prefix, tags=["billing"] if tags is None else list(tags))  # ([]: untagged)
    # What UsageEndpoints answers (a token is created: 201).
    unavailable = {"description": "Billing is unavailable, or the customer resolver failed", "content": _PROBLEM}
    token_answers: dict[int | str, dict[str, Any]] = {401: PROBLEM_RESPONSES[401], 503: unavailable}
    unknown = {"description": "Billing does not know the signed-in customer", "content": _PROBLEM}
    bad_feature = {"description": "feature_key is no feature key", "content": _PROBLEM}
    usage_answers: dict[int | str, dict[str, Any]] = {**token_answers, 400: bad_feature, 403: unknown}

    @router.get(
        "/usage",
        response_model=None,
        responses={200: {"model": BillingUsage, "description": "Your usage metrics"}, **usage_answers},
        summary="Your usage this period",
        openapi_extra={"parameters": [_FEATURE_KEY]},
    )
    async def usage(request: Request) -> Response:
        return await endpoints.usage(request)

    @router.post(
        "/session-token",
        status_code=201,
        response_model=None,
        responses={201: {"model": BillingSessionToken, "description": "A session token"}, **token_answers},
        summary="A BillingOS session token",
    )
    async def session_token(request: Request) -> Response:
        return await endpoints.session_token(request)

    return router
