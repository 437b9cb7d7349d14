"""billingos-asgi for Litestar: the customer named where Litestar's own auth has run.

::

    app = Litestar(
        route_handlers=[search],
        middleware=[DefineMiddleware(TokenAuth)],  # sets connection.user
        plugins=[BillingPlugin(customer=lambda connection: connection.user.customer_id)],
    )
    app = BillingMiddleware(app, billing=billing, customer=None, routes={"GET /v1/search": "api_calls"})

``BillingMiddleware`` wraps the Litestar app as a plain ASGI app. Litestar authenticates inside
the app, after routing, so the middleware gets no ``customer=`` resolver: each metered request
reaches Litestar unidentified, and the plugin's guard names its customer and runs the gate there,
before the handler and its dependencies. The middleware outside still records the usage afterwards.
Litestar parses typed path parameters (``int()`` takes ``+5``): the middleware sees a Litestar app
and matches them as parsed (``parsed_parameters``; wrapped in other middleware first, say True).
(An API key can also be mapped at the ASGI level with ``customer=from_api_key(lookup)``: then the
guard finds the customer known and does nothing.)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response
from litestar.config.app import AppConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import ImproperlyConfiguredException
from litestar.handlers import BaseRouteHandler
from litestar.plugins import InitPlugin
from litestar.types import Scope

from billingos_asgi import BillingDenied, get_usage_context
from billingos_asgi.middleware import is_preflight

__all__ = ["BillingPlugin", "CustomerOf"]

CustomerOf = Callable[[ASGIConnection[Any, Any, Any, Any]], str | None | Awaitable[str | None]]
_SET_BY_LITESTAR = frozenset({"content-length", "content-type"})


class BillingPlugin(InitPlugin):
    """Identify metered requests in an app-wide guard, and answer BillingOS's refusals.

    ``customer(connection)`` (sync or async) says who pays, from what the app's auth put in
    ``connection.user``; it is called only on metered requests not identified yet, and None
    answers 401 (if it raises, the middleware's ``on_error`` decides; reading a ``connection.user``
    that the auth did not set, as Litestar's skips OPTIONS and excluded paths, is nobody: a 401). Guards run after every
    middleware, authentication included, whatever their order. A refusal (``BillingDenied``,
    from the guard or a handler's own ``identify``) is answered with BillingOS's problem response
    rather than Litestar's 500.
    """

    __slots__ = ("_customer_of", "customer")

    def __init__(self, customer: CustomerOf) -> None:
        if not callable(customer):  # (a dotted path, say): it would fail, and on_error decide, on every request
            # (by type: a key store given here by mistake would put every API key in the message)
            raise ValueError(f"customer must be a function of the connection, got {type(customer).__name__}")
        self.customer = customer
        self._customer_of = _nobody_without_user(customer)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.guards.append(self.identify)
        app_config.exception_handlers[BillingDenied] = refusal
        app_config.after_exception.append(_fail)
        return app_config

    async def identify(self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        """The guard: name the customer of a request the middleware left unidentified, and gate it.

        Not a CORS preflight: the browser sends it without credentials, and Litestar (its automatic
        OPTIONS handler, or ``cors_config``) answers it, unbilled."""
        context = get_usage_context()
        if context is not None and not is_preflight(connection.scope):
            await context.identify_by(self._customer_of, connection)


async def _fail(exc: Exception, scope: Scope) -> None:
    """Bill nothing for a request whose handler (or a guard, a dependency) raised, whatever the app's
    exception handlers make of it (a ``NotFoundException`` answered with a redirect home)."""
    context = get_usage_context()
    if context is not None:
        context.mark_failed()


def _nobody_without_user(customer: CustomerOf) -> CustomerOf:
    """``customer``, answering None where it reads a ``connection.user`` that the app's auth did not set."""

    @functools.wraps(customer)
    async def customer_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
        try:
            answer = customer(connection)
            return await answer if inspect.isawaitable(answer) else answer
        except ImproperlyConfiguredException as exc:
            unset, _, rest = str(exc.detail).removeprefix("'").partition("' is not defined")
            if unset not in ("user", "auth") or not rest or unset in connection.scope:
                raise  # (a session without its middleware, say: a failure, for on_error)
            return None  # the app's auth left this request alone (no user, no auth): nobody signed in

    return customer_of


def refusal(request: Request[Any, Any, Any], denied: BillingDenied) -> Response[bytes]:
    """The refusal (a Starlette response) as Litestar's, body and headers as they are."""
    response = denied.response
    headers = {name: value for name, value in denied.headers.items() if name not in _SET_BY_LITESTAR}
    return Response(
        bytes(response.body),
        status_code=response.status_code,
        headers=headers,
        media_type=denied.media_type,
    )
