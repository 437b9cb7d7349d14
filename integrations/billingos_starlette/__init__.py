"""billingos-asgi for Starlette: metering declared on endpoints, and the usage routes for front ends.

::

    @metered("api_calls")
    async def search(request): ...

    app = Starlette(routes=[Route("/v1/search", search), usage_routes(billing, customer)])
    app.add_middleware(BillingMiddleware, billing=billing, customer=customer, routes=declared(app))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from starlette.routing import Mount, Route

from billingos_asgi import BillingBackend, BillingDenied, Metered
from billingos_asgi.customers import CustomerResolver
from billingos_asgi.discovery import declared_routes, metered
from billingos_asgi.endpoints import UsageEndpoints
from billingos_asgi.responses import answer_refusal

__all__ = ["declared", "metered", "usage_routes"]


def declared(
    app: Any, *, also: Mapping[str, str | Metered | None] | None = None
) -> Callable[[], dict[str, str | Metered | None]]:
    """The middleware's ``routes=``: every ``@metered`` endpoint of ``app`` (mounts included), plus ``also``.

    Collected when the middleware stack is built (at start-up), so routes added after
    ``add_middleware`` count too. A path declared twice with different features is refused.
    Answers a late gate's refusal (:class:`BillingDenied`, from an endpoint's ``identify``)
    inside the app, so that it is answered however the middleware is installed.
    """
    handlers = getattr(app, "exception_handlers", None)
    if isinstance(handlers, dict) and BillingDenied not in handlers:  # the app's own handler, if any, decides
        app.add_exception_handler(BillingDenied, answer_refusal)
    return lambda: declared_routes(app.routes, also=also)


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
