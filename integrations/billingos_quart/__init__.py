"""billingos-asgi for Quart: the customer named where Quart's own auth has run.

::

    app = Quart(__name__)

    @app.before_request
    async def authenticate() -> None:  # the app's own auth: a session, a token, Quart-Auth...
        g.account = await account_for(request.headers.get("authorization"))

    Billing(app, customer=lambda request: g.account.customer_id if g.account else None)  # after it
    routes = {"GET /v1/search": "api_calls"}
    app.asgi_app = BillingMiddleware(app.asgi_app, billing=billing, customer=None, routes=routes)

``BillingMiddleware`` wraps Quart's ``asgi_app``, as Quart documents for ASGI middleware. Quart
authenticates inside the app, so the middleware gets no ``customer=`` resolver: each metered
request reaches Quart unidentified, and the ``before_request`` hook that :class:`Billing`
registers, after the app's own hooks, names its customer and runs the gate there, before the view
(answering a refusal itself: a blueprint's catch-all error handler would make it its own 500).
The middleware outside still records the usage afterwards. Quart hands sync views to executor
threads: what they report with ``report_usage()`` comes back to the event loop that owns the quotas.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Blueprint, Quart, Request, Response, request

from billingos_asgi import BillingDenied, get_usage_context
from billingos_asgi.middleware import is_preflight

__all__ = ["Billing", "CustomerOf"]

CustomerOf = Callable[[Request], str | None | Awaitable[str | None]]
_SET_BY_QUART = frozenset({"content-length", "content-type"})


class Billing:
    """Identify metered requests in a ``before_request`` hook, and answer BillingOS's refusals.

    ``customer(request)`` (sync or async) says who pays, from what the app's auth established (in
    ``g``, a session, Quart-Auth's ``current_user``); it is called only on metered requests not
    identified yet, and None answers 401 (if it raises, the middleware's ``on_error`` decides).
    Quart runs ``before_request`` hooks in the order they were registered, an app's before its
    blueprints': create this after the app's authentication hooks, or on the blueprint whose hooks
    authenticate (``Billing(blueprint, ...)``). A refusal (``BillingDenied``, from the hook or a
    view's own ``identify``) is answered with BillingOS's problem response rather than Quart's 500.
    """

    __slots__ = ("customer",)

    def __init__(self, app: Quart | Blueprint | None = None, *, customer: CustomerOf) -> None:
        if not callable(customer):  # (a dotted path, say): it would fail, and on_error decide, on every request
            # (by type: a key store given here by mistake would put every API key in the message)
            raise ValueError(f"customer must be a function of the request, got {type(customer).__name__}")
        self.customer = customer
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart | Blueprint) -> None:
        """Register the hook and the refusal's answer on ``app`` (for an app made in a factory), or
        on a blueprint (its requests only)."""
        app.before_request(self.identify)
        app.register_error_handler(BillingDenied, refusal)
        if isinstance(app, Blueprint):  # (the app it is registered on)
            app.record_once(lambda state: _fail_on_exceptions(state.app))
        else:
            _fail_on_exceptions(app)

    async def identify(self) -> Response | None:
        """The hook: name the customer of a request the middleware left unidentified, and gate it;
        a refusal is its answer (returned: raised, a blueprint's own handler of every ``Exception``
        would take it before the app's handler of refusals).

        Not a CORS preflight: the browser sends it without credentials, and Quart (its automatic
        OPTIONS) or the app's CORS extension (quart-cors' ``route_cors``, in the view) answers it,
        unbilled."""
        context = get_usage_context()
        if context is None:
            return None
        if request.url_rule is not None:  # routed to a view (not Werkzeug's slash redirect): it runs
            context.mark_routed()
        elif request.routing_exception is not None:
            # No view serves it (404, 405, a slash redirect): whatever the app's error handler makes of
            # it (a redirect home), not billed, nor gated (Quart answers it next).
            context.mark_failed()
            return None
        if is_preflight(request.scope):
            return None
        context.bind_loop()  # sync views run in executor threads: their report_usage() comes back here
        try:
            await context.identify_by(self.customer, request)
        except BillingDenied as denied:
            return await refusal(denied)
        return None


def _fail_on_exceptions(app: object) -> None:
    """Bill nothing for a request whose view (or hook) raised, whatever the app's error handlers
    make of it (``abort(404)`` answered with a redirect home): Quart hands every such exception to
    ``handle_user_exception``, which has no hook of its own."""
    if not isinstance(app, Quart) or getattr(app.handle_user_exception, "fails_billing", False):
        return
    handle = app.handle_user_exception

    async def handle_user_exception(error: Exception) -> Any:
        context = get_usage_context()
        if context is not None:
            context.mark_failed()
        return await handle(error)

    handle_user_exception.fails_billing = True  # type: ignore[attr-defined]
    app.handle_user_exception = handle_user_exception  # type: ignore[method-assign]


async def refusal(denied: BillingDenied) -> Response:
    """The refusal (a Starlette response) as Quart's, body and headers as they are."""
    response = denied.response
    headers = {name: value for name, value in denied.headers.items() if name not in _SET_BY_QUART}
    return Response(
        bytes(response.body),
        status=response.status_code,
        headers=headers,
        content_type=denied.media_type,
    )
