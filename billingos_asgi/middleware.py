"""``BillingMiddleware``: the entitlement gate and zero-code metering, as pure ASGI.

For a metered request, in order (SPEC section 5): resolve the customer (401 when none), decide
from the cached entitlement and this process's pending units (403 / 429), run the app while
watching its response, and once a response with status < 400 has sent its last byte, queue one
usage event keyed by the request id. Everything here is synchronous bookkeeping except the app
call, the customer resolver and a cache miss.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ._exceptions import ValidationError
from ._logging import Throttled, without_message
from ._validation import MAX_ID_LENGTH, QUANTITY_BOUND, check_id, customer_answer, float_of_decimal, stored_quantity
from .backend import BillingBackend
from .cache import (
    DEFAULT_MAX_SIZE,
    DEFAULT_NEGATIVE_TTL,
    DEFAULT_STALE_TTL,
    DEFAULT_TTL,
    EntitlementCache,
    Quota,
    Refresh,
)
from .context import LET_THROUGH, UsageContext, _current
from .customers import Answer, CustomerResolver, ScopeResolver, refuse_a_mappings_method
from .discovery import framework_app, route_endpoints, routed_app, routes_of, unserved
from .events import UsageEvent, event_key, new_event
from .local import LocalBilling
from .metrics import metrics_snapshot, prometheus_text, serve_prometheus
from .outbox import Outbox
from .request_ids import new_request_id, send_with_request_id, trusted_request_id
from .responses import (
    REFUSAL_STATUSES,
    BillingDenied,
    Denial,
    ProblemFactory,
    answer_refusals,
    problem_response,
    refusal_in,
    with_refusal_headers,
)
from .routes import EXCLUDED, UNDECLARED, FoundRoutes, Metered, RouteTable
from .tracker import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_QUEUE,
    RejectedCallback,
    Tracker,
)
from .upstream import (
    DEFAULT_BURST,
    DEFAULT_CALLS_PER_MINUTE,
    DEFAULT_COOLDOWN,
    DEFAULT_FAILURE_THRESHOLD,
    Budget,
    CircuitBreaker,
    Upstream,
    share_door,
)
from .watch import ResponseWatch, target_path

__all__ = ["BillingMiddleware", "is_preflight"]

logger = logging.getLogger("billingos_asgi")

OnError = Literal["allow", "deny"]
#: Any framework's ASGI app (Litestar and Django type their scopes their own way).
AnyASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
_SIGN_IN = "this route is metered: sign in first"


async def gate_preflight(scope: Scope) -> None:
    """Gate a CORS preflight that reached the handler of a route declared metered: the middleware
    let it on unidentified for the app's CORS layer, which did not answer it, so the handler works
    for it, and it is identified by ``customer=`` and gated like any request (an anonymous one: 401).
    For the gates of declared routes (FastAPI's ``metered()``, Starlette's ``@metered``); a no-op
    for any other request."""
    context = (scope.get("state") or {}).get("billing")
    if isinstance(context, UsageContext) and context.customer_id is None and is_preflight(scope):
        gate = context._gate
        if isinstance(gate, _LateGate):
            await gate.resolve(context)


def is_preflight(scope: Mapping[str, Any]) -> bool:
    """Whether a request (its ASGI scope) is a CORS preflight: the browser's own question before a
    cross-origin call, sent without credentials; the app's CORS middleware answers it. Both
    headers, as Starlette's CORSMiddleware asks: one alone is an ordinary OPTIONS request."""
    if scope["method"] != "OPTIONS":
        return False
    names = {name for name, _ in scope["headers"]}
    return b"access-control-request-method" in names and b"origin" in names


#: The options in seconds, and whether each may be 0.
_SECONDS = (
    ("cache_ttl", False),
    ("cache_stale_ttl", False),
    ("cache_negative_ttl", False),
    ("flush_interval", True),
    ("drain_timeout", True),
    ("breaker_cooldown", False),
)


def _check_options(**options: Any) -> None:
    """Refuse, by name, what would otherwise fail on every request or never take effect."""
    billing = options["billing"]
    if not all(callable(getattr(billing, call, None)) for call in ("check_entitlement", "track_usage")):
        # (by type: a secret key given here by mistake, billing=os.environ[...], would be in the message)
        kind = type(billing).__name__
        raise ValueError(f"billing must be a BillingOS, a LocalBilling or another BillingBackend, got {kind}")
    if options["on_error"] not in ("allow", "deny"):
        raise ValueError(f"on_error must be 'allow' or 'deny', got {options['on_error']!r}")
    if not isinstance(options["trust_request_id"], bool):  # "false" from an environment variable is true
        raise ValueError(f"trust_request_id must be True or False, got {options['trust_request_id']!r}")
    if not isinstance(options["parsed_parameters"], bool | None):
        raise ValueError(f"parsed_parameters must be True, False or None, got {options['parsed_parameters']!r}")
    for hook in ("customer", "problem_factory", "on_rejected"):
        if options[hook] is not None and not callable(options[hook]):
            # By its type: a key store passed as the resolver would put every API key in the message.
            raise ValueError(f"{hook} must be a function (or None), got {type(options[hook]).__name__}")
    if inspect.iscoroutinefunction(options["on_rejected"]):  # called from sync code: its coroutine would never run
        raise ValueError("on_rejected must be a plain function, not async (start your async work from it)")
    if inspect.iscoroutinefunction(options["problem_factory"]):  # (each answer would be the default one, and logged)
        raise ValueError("problem_factory must be a plain function returning a Response, not async")
    refuse_a_mappings_method(options["customer"])
    if options["upgrade_url"] is not None and not isinstance(options["upgrade_url"], str):
        raise ValueError(f"upgrade_url must be a URL string, got {options['upgrade_url']!r}")
    path = options["metrics_path"]
    if path is not None and not (isinstance(path, str) and path.startswith("/")):
        raise ValueError(f"metrics_path must be a path starting with '/', got {path!r}")
    # By the option's name (the cache and the tracker would name their own parameters), NaN included;
    # finite: an infinite wait never ends (a drain, a refusal cached, a breaker open for good).
    for name, zero in _SECONDS:
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 0 if zero else value > 0):
            raise ValueError(f"{name} must be a number of seconds {'>= 0' if zero else '> 0'}, got {value!r}")
        if value == math.inf:
            raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    rate = options["calls_per_minute"]
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf):
        raise ValueError(f"calls_per_minute must be a number > 0 (or None: no budget), got {rate!r}")
    if not options["cache_stale_ttl"] >= options["cache_ttl"]:
        raise ValueError(
            f"cache_stale_ttl ({options['cache_stale_ttl']!r}) must be >= cache_ttl ({options['cache_ttl']!r}):"
            " raise it with cache_ttl"
        )
    for name in ("cache_size", "max_queue", "call_burst", "breaker_threshold"):
        if isinstance(options[name], bool) or not isinstance(options[name], int) or options[name] < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {options[name]!r}")


def _warn_of_unknown_features(metered: Iterable[str], declared: Iterable[str]) -> None:
    """A feature no plan can grant (a typo, most likely) answers every request 403, silently."""
    unknown = sorted(set(metered) - set(declared))
    if unknown:
        logger.warning(
            "features %s are metered but not in the plans (which declare %s): every request to them is answered 403",
            unknown,
            sorted(declared),
        )


def _warn_of_unserved_keys(app: object, keys: list[str]) -> None:
    """A key no route of a Starlette or FastAPI app serves (a typo, most likely) leaves the route it
    meant unmetered, silently: said once, at start-up, when every route has been added."""
    try:
        routes = routes_of(app) if keys else None
        missing = [] if routes is None else unserved(routes, keys)
    except Exception:  # a route of a shape not foreseen: a hint is not worth a failed start-up
        logger.debug("could not tell which routes= keys the app serves", exc_info=True)
        return
    if missing:
        logger.warning(
            "routes %s are metered but no route of the app serves them: a typo? (the routes meant go unmetered)",
            missing,
        )


def _own_root_path(app: object, routed: object) -> str:
    """The root path an app sets on each request itself: ``FastAPI(root_path="/api")`` (``routed``:
    the app holding the routes), or Django's ``FORCE_SCRIPT_NAME`` (its handler routes under it,
    whatever the server's root path). Wrapped from outside, the middleware sees the request before
    that, and routes as the app will."""
    if framework_app(app, "django") is not None:  # its ASGI handler, maybe inside others' wrappers
        from django.conf import settings  # (set up: the handler exists)

        root_path = getattr(settings, "FORCE_SCRIPT_NAME", None)
    else:
        root_path = getattr(routed, "root_path", "")
    return root_path if isinstance(root_path, str) else ""


def _is_litestar(app: object) -> bool:
    """Whether ``app`` is (or wraps) a Litestar app, which routes its own way: it parses a typed path
    parameter (``int()`` takes ``+5``; Starlette, FastAPI and Django match a pattern), it routes
    what follows the root path wherever the path has it, not only at its start, and it routes a
    path without its trailing slash."""
    return framework_app(app, "litestar") is not None


def _litestar_routes(app: object) -> tuple[list[str], list[str]]:
    """The paths of a Litestar app's ASGI mounts (``@asgi(path, is_mount=True)``), which Litestar
    sends every path starting with to, a slash following or not; and of its routes without
    parameters, which it serves first."""
    routes = getattr(framework_app(app, "litestar"), "routes", None) or ()
    mounts = [route.path for route in routes if getattr(getattr(route, "route_handler", None), "is_mount", False)]
    plain = [route.path for route in routes if "{" not in route.path and route.path not in mounts]
    return mounts, plain


def _is_quart(app: object) -> bool:
    """Whether ``app`` is (or wraps) a Quart app, whose typed parameters (Werkzeug's) take every
    Unicode digit (``\\d``), and which routes what follows the root path, slash or not."""
    return framework_app(app, "quart") is not None


def _of_scope(customer: CustomerResolver) -> Callable[[Scope], Answer]:
    """The resolver as a function of the scope: a :class:`ScopeResolver` needs no Request built.

    Another gets a Request without the receive channel: a resolver never reads the body (SPEC
    section 5), which is the app's to read.
    """
    if isinstance(customer, ScopeResolver):
        return customer.from_scope
    return lambda scope: customer(Request(scope))


class BillingMiddleware:
    """Meter an ASGI app with BillingOS: ``app.add_middleware(BillingMiddleware, billing=..., customer=...)``.

    ``routes`` maps ``"METHOD /path/{param}"`` (method optional) to a feature key, a
    :class:`Metered`, or None for a route not metered whatever a template or the default says
    (or is a function returning that map, called when the stack is built);
    ``default_feature`` meters every other route not in ``exclude`` (paths or templates; a
    trailing ``*`` excludes a prefix); a CORS preflight is never metered.
    ``parsed_parameters=True`` lets a typed parameter (``{item_id:int}``) take every spelling its
    type's parser takes, for a framework that routes by parsing (Litestar serves ``/items/+5`` as
    ``{item_id:int}``; Starlette routes it elsewhere); None (the default) sets it for a Litestar app
    (wrapped in other middleware first, say True). A Quart app's numbers take any script's digits
    (Werkzeug's ``<int>`` serves ``/items/٥``), not every spelling ``int()`` parses.
    ``on_error`` decides requests when billing is unreachable with nothing cached, or a user hook
    raises: ``"allow"`` (the default) lets them through, ``"deny"`` answers 503. A client-sent
    ``X-Request-ID`` becomes the idempotency key only with ``trust_request_id=True`` (behind a
    gateway that sets it); otherwise every request gets a fresh id, so a client repeating an id
    is still billed for every request.

    ``customer`` is required: a resolver of the request, or None where the app's own auth runs
    inside the app (FastAPI dependencies, Django, Litestar) and the app names the customer
    late: ``customer=None`` (or ``Metered(late=True)`` per route) runs the
    app with an unidentified :class:`UsageContext` whose ``identify(customer_id)`` gates the
    request there, raising :class:`BillingDenied` for this middleware to answer with.

    Delivery (SPEC section 6): usage events are coalesced per (customer, feature) every
    ``flush_interval`` and sent within ``calls_per_minute`` (a token bucket shared with the
    checks; None lifts it); after ``breaker_threshold`` failures in a row, upstream is left alone
    for ``breaker_cooldown`` seconds. ``outbox`` (a SQLite file path) keeps events on disk until
    upstream confirms them, and resends what a crash left at the next start. ``metrics_path``
    serves the counters to Prometheus (protect it as you would any internal endpoint).
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        billing: BillingBackend,
        customer: CustomerResolver | None,
        routes: Mapping[str, str | Metered | None] | Callable[[], Mapping[str, str | Metered | None]] | None = None,
        default_feature: str | Metered | None = None,
        exclude: Iterable[str] = (),
        parsed_parameters: bool | None = None,
        on_error: OnError = "allow",
        trust_request_id: bool = False,
        problem_factory: ProblemFactory | None = None,
        upgrade_url: str | None = None,
        cache_ttl: float = DEFAULT_TTL,
        cache_stale_ttl: float = DEFAULT_STALE_TTL,
        cache_negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        cache_size: int = DEFAULT_MAX_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        on_rejected: RejectedCallback | None = None,
        outbox: str | Path | None = None,
        calls_per_minute: float | None = DEFAULT_CALLS_PER_MINUTE,
        call_burst: int = DEFAULT_BURST,
        breaker_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        breaker_cooldown: float = DEFAULT_COOLDOWN,
        metrics_path: str | None = None,
    ) -> None:
        _check_options(
            billing=billing,
            customer=customer,
            on_error=on_error,
            trust_request_id=trust_request_id,
            parsed_parameters=parsed_parameters,
            problem_factory=problem_factory,
            on_rejected=on_rejected,
            upgrade_url=upgrade_url,
            metrics_path=metrics_path,
            cache_ttl=cache_ttl,
            cache_stale_ttl=cache_stale_ttl,
            cache_negative_ttl=cache_negative_ttl,
            cache_size=cache_size,
            flush_interval=flush_interval,
            max_queue=max_queue,
            drain_timeout=drain_timeout,
            calls_per_minute=calls_per_minute,
            call_burst=call_burst,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
        )
        self.app = app
        self.billing = billing
        # Declared next to the app's routes: collected now, when the stack is built, and again once the
        # app's own startup is complete (routers it includes then, its plugins').
        self._collect = routes if callable(routes) else None
        if callable(routes):
            routes = routes()
        self._litestar = _is_litestar(app)
        # Routed after the root path wherever it ends ("/apiv1/x" under "/api" is "v1/x"), as
        # Starlette does only where a slash follows it.
        self._parses_target = _is_quart(app)
        self._strips_root_path = self._litestar or self._parses_target
        if parsed_parameters is None:
            parsed_parameters = self._litestar
        routed = routed_app(app)
        self._root_path = _own_root_path(app, routed)
        self._routes_whole_path = routed is not None  # Starlette's routing: a root path ends at a slash
        # Wrapped from outside, a late refusal would reach the app's error middleware first (a 500):
        # the app answers it itself (registered before its first call, when it reads its handlers).
        answer_refusals(routed)
        mounts, plain = _litestar_routes(app) if self._litestar else ([], [])
        django = framework_app(app, "django") is not None
        # Their sync views run in threads AnyIO did not start (Quart's executor, asgiref's): what they
        # report is handed to this loop, which owns the quotas, with no adapter's hook too (an API key).
        self._foreign_threads = django or self._parses_target

        def table(routes: Mapping[str, str | Metered | None] | None) -> RouteTable:
            found = RouteTable(
                routes,
                default_feature=default_feature,
                exclude=exclude,
                parsed_parameters=parsed_parameters,
                any_digits=self._parses_target,  # Quart's (Werkzeug's) numbers: any script's digits, not int()'s
                canonical_paths=self._litestar,
                mounts=mounts,
                plain=plain,
                # Found on a Starlette or FastAPI app's routes: matched as its router matches them, as requested.
                exact_paths=isinstance(routes, FoundRoutes) and routed is not None and not self._strips_root_path,
                anchored_paths=django,
            )
            if metrics_path is not None and found.configures("GET", metrics_path):
                # (its GET would answer the counters, never the app's metered route: nor billed)
                raise ValueError(f"metrics_path {metrics_path!r} is a metered route's path: give it a path of its own")
            return found

        self._table = table
        self._endpoint_ids: frozenset[int] | None = None  # see _route_endpoints()
        self._route_endpoints = self._endpoints_of_routes  # (bound once: one per request would cost it)
        self.routes = table(routes)
        if isinstance(billing, LocalBilling):
            _warn_of_unknown_features(self.routes.features, billing.catalog.features)
        self._keys = [key for key, value in (routes or {}).items() if value is not None and value is not UNDECLARED]
        self.upstream = Upstream(
            billing,
            budget=None if calls_per_minute is None else Budget(calls_per_minute, call_burst),
            breaker=CircuitBreaker(breaker_threshold, breaker_cooldown),
        )
        share_door(billing, self.upstream)  # the usage endpoints' calls count in its budget too
        self.cache = EntitlementCache(
            self.upstream,
            ttl=cache_ttl,
            stale_ttl=cache_stale_ttl,
            negative_ttl=cache_negative_ttl,
            max_size=cache_size,
        )
        self.tracker = Tracker(
            self.upstream,
            self.cache,
            flush_interval=flush_interval,
            max_queue=max_queue,
            drain_timeout=drain_timeout,
            on_rejected=on_rejected,
            deduplicate=trust_request_id,
            outbox=None if outbox is None else Outbox(outbox, max_events=max_queue),
        )
        self._customer_of = None if customer is None else _of_scope(customer)
        self._allow_on_error = on_error == "allow"
        self._trust_request_id = trust_request_id
        self._problem_factory = problem_factory
        self._upgrade_url = upgrade_url
        self._metrics_path = metrics_path
        self.unidentified = 0  # late-identified requests that succeeded without naming a customer
        self.refused = dict.fromkeys(REFUSAL_STATUSES, 0)  # requests answered by the middleware, by status
        self._throttled = Throttled()  # failures of every request alike (billing down, a broken resolver)
        self._log = self._throttled.log
        self._lifespan_owner: object | None = None  # the lifespan running the tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self._parses_target and path[:1] != "/":
            # An absolute-form target ("GET http://host/v1/export", which Hypercorn and h11 pass on as
            # the path), or one without its leading slash: Quart routes its path as urlparse() reads
            # it, its ";params" (and a "?" or "#" the server decoded from "%3F") cut off.
            path = target_path(path)
        root_path = self._root_path or scope.get("root_path")
        if root_path and path.startswith(root_path):
            if path[len(root_path) : len(root_path) + 1] in ("/", ""):
                path = path[len(root_path) :]  # route on what the app routes on, as Starlette does
            elif self._strips_root_path or (
                not self._routes_whole_path and self.routes.match(scope["method"], path) is None
            ):
                # "GET v1/search" under root "/api" (uvicorn prepends it): Starlette routes the
                # whole path "/apiv1/search", Litestar and Quart what follows the root path, "/v1/search";
                # another framework, as the table finds it.
                path = path[len(root_path) :]
        elif root_path and self._litestar and root_path in path:
            # "/x/api/v1/search" under "/api", from a server that leaves the path as requested
            # (Hypercorn): Starlette routes the whole path, Litestar "/v1/search".
            path = path.partition(root_path)[2]
        if path == self._metrics_path and scope["method"] in ("GET", "HEAD"):  # (the app's, for other methods)
            await serve_prometheus(self, scope, receive, send)
            return
        metered = self.routes.match(scope["method"], path)
        if metered is None:
            await self.app(scope, receive, send)
        elif metered is EXCLUDED:
            await self._unmetered(scope, receive, send)
        elif scope["method"] == "OPTIONS" and is_preflight(scope):
            await self._metered(scope, receive, send, metered, preflight=True)
        else:
            await self._metered(scope, receive, send, metered)

    def _endpoints_of_routes(self) -> frozenset[int]:
        """The ids of the app's routes' endpoints (Starlette, FastAPI), found once, at the first
        redirect that needs them (the app has its routes by then)."""
        if self._endpoint_ids is None:
            self._endpoint_ids = route_endpoints(self.app)
        return self._endpoint_ids

    def metrics(self) -> dict[str, float | str]:
        """Counters and gauges by name: events by outcome, refusals by status, upstream calls, breaker state..."""
        return metrics_snapshot(self)

    def prometheus(self) -> str:
        """The same, in the Prometheus text format (also served at ``metrics_path`` when set)."""
        return prometheus_text(self)

    # -- the decision table --

    async def _metered(
        self, scope: Scope, receive: Receive, send: Send, metered: Metered, preflight: bool = False
    ) -> None:
        """The decision table, then the app, watched. A CORS ``preflight`` is never gated here: it
        goes on unidentified, as a late one, for the app's CORS middleware to answer (not billed),
        or for its own gate (a framework adapter's, before a view that answers OPTIONS itself: a
        Django view) to gate and bill like any request."""
        # No Request is built for an admitted request unless a user hook needs one.
        feature = metered.feature
        customer: str | None = None
        quota: Quota | None = None
        # None: the app names the customer (late); a preflight's too, whatever its URL says (a browser
        # keeps the query string, ?api_key= included): only a gate of the app's, before a view, takes it.
        customer_of = None if metered.late or preflight else self._customer_of
        if customer_of is not None:
            try:
                answer = customer_of(scope)
                if isinstance(answer, str) and len(answer) <= MAX_ID_LENGTH and answer.strip():
                    customer = answer  # the common case, checked inline
                else:  # None, an awaitable (an async resolver), or not a customer id (raises)
                    if inspect.isawaitable(answer):
                        answer = await answer
                    customer = customer_answer(answer, "customer resolver")
            except Exception as exc:
                self._log(logging.ERROR, "customer resolver failed on %s: %s", feature, without_message(exc))
                await self._on_error(feature, "the customer resolver failed", scope, receive, send)
                return
            if not customer:
                await self._deny(Denial(401, _SIGN_IN, Request(scope, receive), feature), scope, receive, send)
                return
        quantity = metered.fixed
        if quantity is None:  # before the lookup: awaited between it and the admission,
            try:  # the entry could be evicted meanwhile, and units admitted on it counted where no one looks
                quantity = await self._quantity(metered, Request(scope))  # the body stays the app's
            except Exception:
                if not preflight:
                    self._log(logging.ERROR, "quantity function of %r failed", feature, exc_info=True)
                    await self._on_error(feature, "the quantity function failed", scope, receive, send)
                    return
                # A preflight has no body to size (no Content-Length): 0 units, should a gate of the app's take it.
                quantity = 0.0
        if customer is not None:
            quota = self.cache.get(customer, feature)
            if quota is None:
                try:
                    check_id("customer_id", customer)  # the rest of the rules, once per cache miss
                except ValidationError:
                    self._log(logging.ERROR, "customer resolver answered an invalid id on %s", feature, exc_info=True)
                    await self._on_error(feature, "the customer resolver failed", scope, receive, send)
                    return
                fetched = await self._fetch(Request(scope, receive), feature, customer)
                if isinstance(fetched, Denial):
                    await self._deny(fetched, scope, receive, send)
                    return
                quota = fetched
        if quota is not None:
            status = quota.admit(quantity)
            if status:
                denial = self._denial(status, Request(scope, receive), feature, customer or "", quota)
                await self._deny(denial, scope, receive, send)
                return

        # Admitted (or, when identified late, still to be gated by the app): call the app, watching
        # whether its response succeeds and completes.
        request_id = (self._trust_request_id and trusted_request_id(scope)) or new_request_id()
        gate = _LateGate(self, Request(scope, receive)) if customer_of is None else None
        context = UsageContext(request_id, customer, feature, quantity, quota, gate)
        if self._foreign_threads:
            context.bind_loop()
        state = scope.get("state")
        if state is None:  # a server without lifespan state
            state = scope["state"] = {}
        state["billing"] = context
        watch = ResponseWatch(scope, receive, send, context, self._route_endpoints)
        token = _current.set(context)
        failure: BaseException | None = None
        try:
            await self.app(scope, watch.receive, watch.send)
        except BaseException as exc:
            denied = refusal_in(exc)
            if denied is not None and (watch.refused or not watch.status):
                self._settle(context, quantity, 0.0)
                if not watch.status:  # the app's late gate refused it (answered here, unless the watch did)
                    await send_with_request_id(denied.response, request_id, scope, receive, send)
                return
            failure = exc  # billed below as any answer, then raised again
        finally:
            _current.reset(token)
        status = watch.status
        if context._failed:  # failed by the app, and made a success of by its own layers outside
            used = 0.0
        elif watch.completed and status < 400:  # answered in full; what failed after (a background task) is the app's
            used = quantity + context.reported
        else:  # bill_partial keeps what a client's disconnect cut short of a successful answer, never of an
            # error answer or a failure (the watch tells a client gone: an app's own OSError is a failure),
            # nor of an app that raised before answering (its error layer, outside or in, makes it a 500)
            cut_short = watch.disconnected and status < 400 and (status or failure is None)
            used = context.reported if metered.bill_partial and cut_short else 0.0
        unsent = self._settle(context, quantity, used, unnamed_ok=preflight)
        if unsent is not None:
            await self.tracker.send(unsent)  # no lifespan: the response is already complete
        if failure is not None:
            try:
                raise failure
            finally:
                del failure  # (held here, it would tie this frame and its traceback in a cycle)

    def _settle(
        self, context: UsageContext, admitted: float, used: float, unnamed_ok: bool = False
    ) -> UsageEvent | None:
        """Bill the finished request ``used`` units: its usage event is queued, or returned when no
        worker runs (the caller sends it inline). The quota counts what is billed instead of what
        was admitted, until upstream confirms it. A late request that succeeded unnamed is not
        billed, and said so unless ``unnamed_ok`` (a preflight, which the app's CORS layer answers)."""
        context.settled = True
        quota = context.quota
        customer = context.customer_id
        reported = context.reported
        if reported and quota is not None and quota.tracked:
            admitted += reported  # held on the quota as they were reported
        if used <= 0 or customer is None or (quota is not None and not quota.tracked):
            if quota is not None:
                quota.release(admitted)  # nothing on its way (flags and numeric limits are never tracked)
            if used > 0 and customer is None and not unnamed_ok:
                self.unidentified += 1
                self._log(
                    logging.WARNING,
                    "%s: a late-identified request succeeded but the app never named its customer: "
                    "%g unit(s) not billed (is the framework's adapter in place: Django's IdentifyCustomerMiddleware, "
                    "Litestar's BillingPlugin, Quart's Billing, a metered(customer=...) dependency?)",
                    context.feature,
                    used,
                )
            return None
        feature = context.feature
        if quota is not None and used != admitted:  # billed less than it holds (a partial answer)
            quota.local += used - admitted
        if quota is None:  # let through with nothing cached: pending here all the same
            self.cache.count_pending(customer, feature, used)
        key = f"{context.request_id}:{feature}"  # event_key's common case, inline: a call less a request
        if len(key) > MAX_ID_LENGTH or self._trust_request_id:  # (ours are hex: a trusted one may need encoding)
            key = event_key(context.request_id, feature)
        if self.tracker.add(customer, feature, used, key):
            return None
        return new_event((customer, feature, used, key, None))

    async def _fetch(self, request: Request, feature: str, customer: str) -> Quota | Denial | None:
        """A cache miss: ask upstream; when that fails, None (let through) or a 503, as ``on_error`` says."""
        try:
            return await self.cache.fetch(customer, feature)
        except Exception:
            self._log(logging.WARNING, "billing check of %s failed with nothing cached", feature, exc_info=True)
            return None if self._allow_on_error else Denial(503, "billing is unavailable", request, feature, customer)

    async def _identify_late(self, request: Request, context: UsageContext, customer: str | None) -> None:
        """The gate of a late-identified request (:class:`_LateGate`), run when the app names its customer."""
        feature = context.feature
        if customer is None:
            raise self._refusal(Denial(401, _SIGN_IN, request, feature))
        check_id("customer_id", customer)
        quota = self.cache.get(customer, feature)
        if quota is None:
            fetched = await self._fetch(request, feature, customer)
            if isinstance(fetched, Denial):
                raise self._refusal(fetched)
            quota = fetched
        if context._same_customer(customer):
            return  # identified by a concurrent call meanwhile (its customer function awaited, or the check)
        context._still_open("identify()")  # (a task outliving the request may have waited for the check)
        if quota is not None:
            status = quota.admit(context.quantity)
            if status:
                raise self._refusal(self._denial(status, request, feature, customer, quota))
            if context.reported and quota.tracked:  # reported before the app knew whose they were
                quota = quota.hold(context.reported)
        context.customer_id, context.quota = customer, quota

    # -- user hooks, called so that their failure cannot take a request down silently --

    @staticmethod
    async def _quantity(metered: Metered, request: Request) -> float:
        """A callable quantity's value (0 when the endpoint reports its own units)."""
        quantity = metered.quantity
        if quantity is None:
            return 0.0
        value = quantity(request) if callable(quantity) else quantity  # callable here; narrows the type
        if inspect.isawaitable(value):
            value = await value
        if isinstance(value, Decimal):  # (as report_usage and the client take it: counted as a float)
            value = float_of_decimal(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < QUANTITY_BOUND:
            raise TypeError(
                f"quantity function of {metered.feature!r} returned {value!r}, "
                f"not a number >= 0 and below {QUANTITY_BOUND}"
            )
        return stored_quantity(value)  # what upstream stores; below it, the request is free

    async def _unmetered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Call the app unmetered on purpose (excluded, or let through by ``on_error``): marked so in
        the request state, which the framework adapters' declared gates accept."""
        scope.setdefault("state", {})["billing"] = None
        # report_usage() in its handler has nothing to do, unless a middleware outside this one meters
        # it (request.state.billing is this one's: None, as the declared gates of its routes expect).
        token = _current.set(LET_THROUGH) if _current.get() is None else None
        try:
            await self.app(scope, receive, send)
        finally:
            if token is not None:
                _current.reset(token)

    async def _on_error(self, feature: str, detail: str, scope: Scope, receive: Receive, send: Send) -> None:
        """A hook failed: let the request through unbilled, or answer 503, as ``on_error`` says."""
        if self._allow_on_error:
            await self._unmetered(scope, receive, send)
        else:
            await self._deny(Denial(503, detail, Request(scope, receive), feature), scope, receive, send)

    # -- answers --

    def _denial(self, status: int, request: Request, feature: str, customer: str, quota: Quota) -> Denial:
        if quota.entitlement is None:
            detail = "billing does not know this customer"
        elif status == 429:
            detail = f"the {feature} quota of this billing period is used up"
        else:
            detail = f"your plan does not include {feature}"
            if quota.entitlement.reason == "subscription_not_active":
                detail = "your subscription is not active"
        return Denial(
            status,
            detail,
            request,
            feature,
            customer,
            limit=quota.limit,
            usage=None if quota.limit is None else quota.usage + quota.local,
            resets_at=quota.resets_at,
            upgrade_url=self._upgrade_url,
        )

    async def _deny(self, denial: Denial, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = (self._trust_request_id and trusted_request_id(scope)) or new_request_id()
        await send_with_request_id(self._response(denial), request_id, scope, receive, send)

    def _refusal(self, denial: Denial) -> BillingDenied:
        return BillingDenied(denial, self._response(denial))

    def _response(self, denial: Denial) -> Response:
        """The answer to a refusal (every one is made here, and counted)."""
        self.refused[denial.status] += 1
        if self._problem_factory is not None:
            try:
                response = self._problem_factory(denial)
                # A body the framework adapters can copy: not a streaming or file response.
                if not isinstance(response, Response) or not isinstance(getattr(response, "body", None), bytes):
                    if inspect.iscoroutine(response):  # closed, or Python warns later that it was never awaited
                        response.close()
                    raise TypeError(f"returned {response!r}, not a Response with its body")
                return with_refusal_headers(response, denial)
            except Exception:  # (failing alike for every refusal: one line a second)
                self._log(
                    logging.ERROR,
                    "problem_factory failed on a %d for %s; answering with the default problem response",
                    denial.status,
                    denial.feature,
                    exc_info=True,
                )
        return problem_response(denial)

    # -- lifespan: the tracker's worker and the cache's refreshes live in one task group --

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner = object()  # this lifespan stops only the tracker it started
        async with anyio.create_task_group() as task_group:
            listened = failed = False

            async def lifespan_receive() -> Message:
                nonlocal listened, failed
                listened = True
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self._start(task_group, owner)
                    except Exception as exc:
                        # Told here: raised from the app's first receive, a server in "auto" mode
                        # would take it for no lifespan support and serve without the tracker.
                        failed = True
                        await send({"type": "lifespan.startup.failed", "message": f"billing: {exc}"})
                        raise
                elif message["type"] == "lifespan.shutdown":
                    await self._stop(owner)  # before the app's own shutdown closes the billing client
                return message

            async def lifespan_send(message: Message) -> None:
                nonlocal failed
                if message["type"] == "lifespan.startup.complete" and self._collect is not None and not failed:
                    try:  # the routes the app's startup added count too
                        self.routes = self._table(self._collect())
                    except Exception as exc:  # (declared twice differently, say): refused as at construction
                        failed = True
                        await send({"type": "lifespan.startup.failed", "message": f"billing: {exc}"})
                        raise
                if not (failed and message["type"].startswith("lifespan.startup.")):  # the server knows
                    await send(message)

            try:
                try:
                    await self.app(scope, lifespan_receive, lifespan_send)
                except Exception:
                    if listened:
                        raise
                    logger.info("the app refuses the ASGI lifespan (Django does): BillingMiddleware answers it")
                    await self._own_lifespan(task_group, owner, receive, send)
                else:
                    if not listened:  # the app ignores lifespan: the server still waits for an answer
                        await self._own_lifespan(task_group, owner, receive, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._stop(owner)
                task_group.cancel_scope.cancel()

    async def _own_lifespan(self, task_group: TaskGroup, owner: object, receive: Receive, send: Send) -> None:
        """The lifespan protocol for an app without one, so that the tracker still starts and drains."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start(task_group, owner)
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"billing: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop(owner)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self, task_group: TaskGroup, owner: object) -> None:
        if self._lifespan_owner is not None:
            raise RuntimeError("this BillingMiddleware is already running in another lifespan")
        await self.tracker.start(task_group)
        self._lifespan_owner = owner
        _warn_of_unserved_keys(self.app, self._keys)

        def spawn(refresh: Refresh) -> None:
            task_group.start_soon(refresh)

        self.cache.spawn = spawn

    async def _stop(self, owner: object) -> None:
        if self._lifespan_owner is owner:
            self._lifespan_owner = None
            self.cache.spawn = None
            await self.tracker.stop()
            self._throttled.flush()  # the last storm's count: no later line will carry it


class _LateGate:
    """The gate of one late-identified request, held by its :class:`UsageContext`."""

    __slots__ = ("_middleware", "_request")

    def __init__(self, middleware: BillingMiddleware, request: Request) -> None:
        self._middleware = middleware
        self._request = request

    async def admit(self, context: UsageContext, customer_id: str | None) -> None:
        await self._middleware._identify_late(self._request, context, customer_id)

    async def resolve(self, context: UsageContext) -> None:
        """Identify the request by the middleware's own ``customer=`` resolver (if it has one) and gate it."""
        customer_of = self._middleware._customer_of
        if customer_of is not None:
            await context.identify_by(customer_of, self._request.scope)

    def hook_failed(self, context: UsageContext, hook: object, exc: Exception) -> None:
        middleware = self._middleware
        feature = context.feature
        middleware._log(
            logging.ERROR, "the customer function %r failed on a %s request: %s", hook, feature, without_message(exc)
        )
        if not middleware._allow_on_error:
            raise middleware._refusal(Denial(503, "the customer function failed", self._request, feature))
