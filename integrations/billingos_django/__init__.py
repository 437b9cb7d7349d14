"""billingos-asgi for Django (ASGI): the customer named where Django's auth has run, and the lifespan Django lacks.

::

    # settings.py
    MIDDLEWARE = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "billingos_django.IdentifyCustomerMiddleware",  # after the app's authentication
    ]
    BILLINGOS_CUSTOMER = "myapp.billing.customer_of"  # optional; default: the signed-in user's pk

    # asgi.py
    application = BillingMiddleware(
        get_asgi_application(), billing=billing, customer=None, routes={"GET /v1/search": "api_calls"}
    )

    # views.py: "GET /v1/search" meters GET (and HEAD) only, so the view must accept no other method
    @require_safe
    @metered("api_calls")  # reached without the middleware metering it as api_calls, it fails closed
    async def search(request): ...

``BillingMiddleware`` wraps Django as a plain ASGI app. ``request.user`` only exists inside
Django's middleware chain, so the middleware gets no ``customer=`` resolver: each metered request
reaches Django unidentified, and :class:`IdentifyCustomerMiddleware` names its customer and runs
the gate there, before the view. The middleware outside still records the usage afterwards, and
answers the ASGI lifespan that Django refuses, so its tracker starts and drains with the server.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.urls import Resolver404, get_resolver
from django.utils.module_loading import import_string

from billingos_asgi import BillingDenied, get_usage_context
from billingos_asgi.context import declared_context

__all__ = ["CustomerOf", "IdentifyCustomerMiddleware", "metered", "signed_in_user"]

logger = logging.getLogger("billingos_asgi")

#: Set on a request that IdentifyCustomerMiddleware has identified (or let through by ``on_error``).
_IDENTIFIED = "_billingos_identified"

CustomerOf = Callable[[HttpRequest], str | None | Awaitable[str | None]]
View = TypeVar("View", bound=Callable[..., Any])


_told_of_no_user = False


async def signed_in_user(request: HttpRequest) -> str | None:
    """The default ``BILLINGOS_CUSTOMER``: the signed-in user's primary key (None when anonymous).

    No user at all (Django's ``AuthenticationMiddleware`` missing, or after ours) is nobody: a 401,
    said once, rather than a failure that ``on_error="allow"`` would let through unbilled."""
    global _told_of_no_user
    auser = getattr(request, "auser", None)
    if auser is None:
        if not _told_of_no_user:
            _told_of_no_user = True
            logger.warning(
                "billingos_django: the request has no user, so every metered request is answered 401:"
                " django.contrib.auth.middleware.AuthenticationMiddleware must come before"
                " billingos_django.IdentifyCustomerMiddleware in MIDDLEWARE"
            )
        return None
    user = await auser()
    return str(user.pk) if user.is_authenticated else None


def _in_djangos_thread(customer: Callable[[HttpRequest], Any]) -> CustomerOf:
    """A sync ``BILLINGOS_CUSTOMER`` run as Django runs sync code under ASGI (its thread, not the
    event loop): ``request.user`` queries the database, which Django refuses on the loop."""
    run = sync_to_async(customer, thread_sensitive=True)

    @functools.wraps(customer)
    async def customer_of(request: HttpRequest) -> Any:
        answer = await run(request)
        # An async function behind a sync wrapper (a decorator, a lambda) answers a coroutine: awaited
        # here, on the loop, as the other adapters do (handed on, it was no customer: on_error decided).
        return await answer if inspect.isawaitable(answer) else answer

    return customer_of


class IdentifyCustomerMiddleware:
    """Name the paying customer of a metered request once Django's auth has run, and gate it.

    ``BILLINGOS_CUSTOMER`` (a callable or its dotted path, given the request, sync or async: a
    sync one runs in Django's thread for sync code, so it may read ``request.user``) says who
    pays; it is called only on metered requests not identified yet (if it raises, the
    middleware's ``on_error`` decides). A refusal (401 when it answers None, 403, 429, 503) is
    answered here, as BillingOS's problem response: raised further, Django would make it a 500.
    """

    sync_capable = False
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response
        customer = getattr(settings, "BILLINGOS_CUSTOMER", signed_in_user)
        self.customer: CustomerOf = import_string(customer) if isinstance(customer, str) else customer
        if not callable(self.customer):  # it would fail, and on_error decide, on every metered request
            # (by type: a key store set here by mistake would put every API key in the message)
            found = type(self.customer).__name__
            if isinstance(customer, str):  # (a dotted path: what it names)
                found = f"{customer!r}, {found}"
            raise ImproperlyConfigured(f"BILLINGOS_CUSTOMER must be a function of the request, got {found}")
        if not (iscoroutinefunction(self.customer) or iscoroutinefunction(type(self.customer).__call__)):
            self.customer = _in_djangos_thread(self.customer)  # (an object whose __call__ is async is not)
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        context = get_usage_context()
        if context is not None:
            context.bind_loop()  # sync views run in asgiref's threads: their report_usage() comes back here
            try:
                await context.identify_by(self.customer, request)
            except BillingDenied as denied:
                return django_response(denied)
            setattr(request, _IDENTIFIED, True)
        response = await self.get_response(request)
        if context is not None and (response.status_code >= 400 or not context.routed and _resolves_nowhere(request)):
            # Not served, whatever Django's middleware outside makes of it (LocaleMiddleware and
            # CommonMiddleware redirect a 404 to the language's or the slashed URL), or the URLconf's
            # handler404 inside (a redirect home): not billed. (A middleware's own answer, a cached
            # page, for a URL a view serves, is.)
            context.mark_failed()
        return response

    async def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """The view raised (``Http404`` too): not billed, whatever Django makes of it (the URLconf's
        handler404 or handler500 may answer with a redirect home)."""
        context = get_usage_context()
        if context is not None:
            context.mark_failed()

    async def process_view(self, request: HttpRequest, view: Any, args: Any, kwargs: Any) -> None:
        """The URL resolved to a view, which runs: its redirect to its own URL is billed, unlike
        ``CommonMiddleware``'s to the slashed one (see :meth:`UsageContext.mark_routed`)."""
        context = get_usage_context()
        if context is not None:
            context.mark_routed()


def _resolves_nowhere(request: HttpRequest) -> bool:
    """Whether no view serves the request's URL (its URLconf's, as Django resolved it)."""
    try:
        get_resolver(getattr(request, "urlconf", None)).resolve(request.path_info)
    except Resolver404:
        return True
    return False


def django_response(denied: BillingDenied) -> HttpResponse:
    """The refusal (a Starlette response) as Django's, body and headers as they are."""
    return HttpResponse(denied.response.body, status=denied.response.status_code, headers=denied.headers)


def metered(feature: str) -> Callable[[View], View]:
    """Declare a view metered as ``feature``: run without BillingMiddleware metering it so, it fails closed.

    The middleware's ``routes=`` says what is metered; a request it does not meter as ``feature``
    (a method or path missing from ``routes=``, another feature) raises here, a 500 rather than a
    free request. So does a request that nothing identified and gated (``IdentifyCustomerMiddleware``
    missing from ``MIDDLEWARE``). Put it under method decorators (``@require_safe``), which answer 405 first.
    """

    def check(request: HttpRequest) -> None:
        where = f"view {request.method} {request.path}"
        context = declared_context(getattr(request, "scope", {}), feature, where)
        if context is not None and context.customer_id is None and not getattr(request, _IDENTIFIED, False):
            raise RuntimeError(
                f"metered({feature!r}) {where} reached with no customer identified:"
                " is billingos_django.IdentifyCustomerMiddleware in MIDDLEWARE, after the app's authentication?"
            )

    def decorate(view: View) -> View:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def checked_async(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                check(request)
                return await view(request, *args, **kwargs)

            return cast(View, checked_async)

        @functools.wraps(view)
        def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            check(request)
            return view(request, *args, **kwargs)

        return cast(View, checked)

    return decorate
