"""Endpoints for front ends: the signed-in customer's usage, and a BillingOS session token for them.

Framework adapters mount these (``GET /billing/usage``, ``POST /billing/session-token``). The
customer always comes from the app's own resolver, never from the request: a caller can read
only its own usage and mint tokens only for itself. Their calls to billing go through the door
of the middleware built over the same backend (its call budget and circuit breaker: upstream's
limits are per secret key), or through one of their own when there is none.
"""

from __future__ import annotations

import inspect
import logging
import math

from cachetools import TTLCache
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import _wire
from ._exceptions import CustomerNotFoundError, ValidationError
from ._flights import Flight, once
from ._logging import Throttled, without_message
from ._models import SessionToken, UsageMetrics
from ._validation import MAX_SESSION_TTL, MIN_SESSION_TTL, check_id, customer_answer
from .backend import BillingBackend
from .customers import CustomerResolver, refuse_a_mappings_method
from .responses import Denial, problem_response
from .upstream import Budget, Upstream, door_of

__all__ = ["UsageEndpoints"]


DEFAULT_USAGE_TTL = 10.0
DEFAULT_USAGE_CACHE_SIZE = 10_000
DEFAULT_TOKEN_LIFETIME = 3600
#: One customer's answer: never stored by a browser or a shared cache (a CDN, a proxy) for the next caller.
PRIVATE = {"Cache-Control": "no-store"}


class UsageEndpoints:
    """``usage`` and ``session_token``: Starlette endpoints over a billing backend and a customer resolver.

    Usage metrics are cached per customer for ``usage_ttl`` seconds (front ends poll them), and a
    session token for half its lifetime.
    """

    def __init__(
        self,
        billing: BillingBackend,
        customer: CustomerResolver,
        *,
        usage_ttl: float = DEFAULT_USAGE_TTL,
        cache_size: int = DEFAULT_USAGE_CACHE_SIZE,
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
    ) -> None:
        if not callable(customer):
            raise ValueError("customer must be a callable taking the request and returning a customer id or None")
        refuse_a_mappings_method(customer)
        # Refused here, by name: each would otherwise fail every request (a 500, or upstream's 400 as a 503).
        if isinstance(usage_ttl, bool) or not isinstance(usage_ttl, int | float) or not 0 <= usage_ttl < math.inf:
            raise ValueError(f"usage_ttl must be a finite number of seconds >= 0, got {usage_ttl!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a whole number >= 1, got {cache_size!r}")
        if (
            isinstance(token_lifetime, bool)
            or not isinstance(token_lifetime, int)
            or not MIN_SESSION_TTL <= token_lifetime <= MAX_SESSION_TTL
        ):
            raise ValueError(
                f"token_lifetime must be a whole number of seconds from {MIN_SESSION_TTL} to {MAX_SESSION_TTL}"
                f" (what BillingOS accepts), got {token_lifetime!r}"
            )
        self._billing = billing
        self._own_door: Upstream | None = None
        self._resolve = customer
        self._token_lifetime = token_lifetime
        self._metrics: TTLCache[str, UsageMetrics] = TTLCache(cache_size, usage_ttl)
        # A customer's token is handed out again for half its lifetime: a client minting in a loop
        # must not spend the secret key's upstream call limit, which every customer shares.
        self._tokens: TTLCache[str, SessionToken] = TTLCache(cache_size, token_lifetime / 2)
        self._asking_metrics: dict[str, Flight[UsageMetrics]] = {}
        self._asking_tokens: dict[str, Flight[SessionToken]] = {}
        # Front ends poll these: a broken resolver or billing down fails every poll alike.
        self._log = Throttled().log

    def _door(self) -> Upstream:
        """The middleware's door to this backend, or (without one, as yet) this router's own."""
        door = door_of(self._billing)
        if door is None:
            if self._own_door is None:
                self._own_door = Upstream(self._billing, budget=Budget())
            door = self._own_door
        return door

    async def _customer(self, request: Request, endpoint: str) -> str | Response:
        """The signed-in customer, or the answer: 401 for nobody, 503 when the resolver fails.

        A resolver that raises or names no valid customer id is the app's fault, not the caller's:
        it is logged, and answered like the middleware's ``on_error="deny"``.
        """
        try:
            answer = self._resolve(request)
            if inspect.isawaitable(answer):
                answer = await answer
            customer = customer_answer(answer, "customer resolver")
            if customer is not None:
                return customer
        except Exception as exc:
            self._log(logging.ERROR, "customer resolver failed on %s: %s", request.url.path, without_message(exc))
            return problem_response(Denial(503, "the customer resolver failed", request, endpoint))
        detail = "sign in to see your usage" if endpoint == "usage" else "sign in to get a session token"
        return problem_response(Denial(401, detail, request, endpoint))

    async def usage(self, request: Request) -> Response:
        """The signed-in customer's usage metrics (every feature, or ``?feature_key=``)."""
        customer = await self._customer(request, "usage")
        if not isinstance(customer, str):
            return customer
        # Empty means every feature, as upstream reads it; anything else must be a feature key.
        feature = request.query_params.get("feature_key") or None
        if feature is not None:
            try:
                check_id("feature_key", feature)
            except ValidationError as exc:
                return problem_response(Denial(400, exc.message, request, "usage", customer))
        metrics = self._metrics.get(customer)
        if metrics is None:
            try:
                metrics = await once(self._asking_metrics, customer, lambda: self._door().get_usage_metrics(customer))
            except CustomerNotFoundError:
                return problem_response(Denial(403, "billing does not know this customer", request, "usage", customer))
            except Exception:  # any backend failure, as the middleware takes it: never a 500
                self._log(logging.WARNING, "usage metrics for %s failed", customer, exc_info=True)
                return problem_response(Denial(503, "billing is unavailable", request, "usage", customer))
            self._metrics[customer] = metrics
        if feature is not None:
            metrics = UsageMetrics(metrics.customer_id, tuple(m for m in metrics.metrics if m.feature_key == feature))
        return JSONResponse(_wire.metrics_to_json(metrics), headers=PRIVATE)

    async def session_token(self, request: Request) -> Response:
        """A BillingOS session token for the signed-in customer (for the React SDK), whatever the body says."""
        customer = await self._customer(request, "session-token")
        if not isinstance(customer, str):
            return customer
        token = self._tokens.get(customer)
        if token is None:
            try:
                token = await once(
                    self._asking_tokens,
                    customer,
                    lambda: self._door().create_session_token(customer, expires_in=self._token_lifetime),
                )
            except Exception:  # any backend failure, as the middleware takes it: never a 500
                self._log(logging.WARNING, "session token for %s failed", customer, exc_info=True)
                return problem_response(Denial(503, "billing is unavailable", request, "session-token", customer))
            self._tokens[customer] = token
        return JSONResponse(_wire.session_token_to_json(token), 201, headers=PRIVATE)
