"""What a metered request's handler can see and do: its request id, customer, and reported units."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio.from_thread
import anyio.lowlevel
from starlette.requests import Request

from ._exceptions import ValidationError
from ._models import Entitlement
from ._validation import EXACT, QUANTITY_BOUND, QUANTITY_DECIMALS, RESOLUTION, check_id, check_quantity, customer_answer

if TYPE_CHECKING:
    from .cache import Quota

__all__ = ["UsageContext", "get_usage_context", "report_usage", "set_customer"]


Subject = TypeVar("Subject")
_NONE_YET = Decimal(0)


class Gate(Protocol):
    """The middleware's gate for a late-identified request."""

    async def admit(self, context: UsageContext, customer_id: str | None) -> None:
        """Admit the request for ``customer_id``, or raise BillingDenied (401, 403, 429, 503)."""

    def hook_failed(self, context: UsageContext, hook: object, exc: Exception) -> None:
        """The app's customer function ``hook`` failed: logged (one line a second, as every request's
        may fail alike), then return (on_error="allow") or raise BillingDenied (503)."""


class UsageContext:
    """The billing side of one metered request, shared by reference between middleware and app.

    Also at ``request.state.billing``. ``entitlement`` is the customer's entitlement as this
    process knows it. ``report(units)`` adds units the endpoint measured itself
    (tokens an LLM call used, bytes stored); they are billed after the response completes.
    On a route identified late (``Metered(late=True)``, or no ``customer=`` resolver),
    ``customer_id`` is None until the app calls :meth:`identify` (or :func:`set_customer`).
    """

    __slots__ = (
        "_exact",
        "_failed",
        "_gate",
        "_loop",
        "customer_id",
        "feature",
        "quantity",
        "quota",
        "reported",
        "request_id",
        "routed",
        "settled",
    )

    def __init__(
        self,
        request_id: str,
        customer_id: str | None,
        feature: str,
        quantity: float,
        quota: Quota | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.request_id = request_id
        self.customer_id = customer_id
        self.feature = feature
        self.quantity = quantity
        self.quota = quota  # this process's accounting of the customer's feature; None: not gated
        self.reported = 0.0  # the reports' exact sum at upstream's resolution: what is billed
        self._exact = _NONE_YET  # (a constant: a Decimal made per request would cost it 1,000s of instructions)
        self._gate = gate
        self._loop: tuple[anyio.lowlevel.EventLoopToken, int] | None = None  # see bind_loop()
        self.settled = False  # billed (or not) once the app returned: too late to report or identify
        self._failed = False  # see mark_failed()
        self.routed = False  # see mark_routed()

    def __repr__(self) -> str:
        return (
            f"UsageContext(request_id={self.request_id!r}, customer_id={self.customer_id!r}, "
            f"feature={self.feature!r}, quantity={self.quantity!r}, reported={self.reported!r})"
        )

    @property
    def entitlement(self) -> Entitlement | None:
        """The cached entitlement (None: the customer is unknown, or billing was unreachable)."""
        return None if self.quota is None else self.quota.entitlement

    def report(self, units: float) -> None:
        """Add ``units`` (a finite number > 0) to this request's usage. The reports are summed exactly
        and their sum billed at upstream's resolution (1e-6): a report per chunk of an upload, finer
        than that, counts as the whole upload does."""
        exact = _exact_units(units)
        try:  # from a sync endpoint's worker thread: added on the event loop, which owns the quotas
            added = anyio.from_thread.run_sync(self._add, exact)
        except RuntimeError:  # on the event loop already, or in a thread that AnyIO did not start
            loop = self._loop
            if loop is not None and loop[1] != threading.get_ident():
                added = anyio.from_thread.run_sync(self._add, exact, token=loop[0])
            else:
                added = self._add(exact)
        if not added:
            self._still_open("report_usage()")

    def bind_loop(self) -> None:
        """Called on the event loop serving this request, by an adapter whose framework runs sync
        endpoints in threads that AnyIO did not start: what they report is added on this loop. Once:
        the middleware binds a Django or Quart app's requests itself, and their adapters again."""
        if self._loop is None:
            self._loop = (anyio.lowlevel.current_token(), threading.get_ident())

    def _add(self, units: Decimal) -> bool:
        if self.settled:
            return False
        exact = EXACT.add(self._exact, units)
        reported = float(exact.quantize(RESOLUTION, ROUND_HALF_UP, context=EXACT))
        if self.quantity + reported >= QUANTITY_BOUND:  # one event: upstream would refuse it all
            raise ValidationError(
                f"report_usage({float(units):g}): the request's units would reach upstream's bound of {QUANTITY_BOUND}"
            )
        added = round(reported - self.reported, QUANTITY_DECIMALS)
        self._exact, self.reported = exact, reported
        quota = self.quota
        if added and quota is not None and quota.tracked:  # pending from now on: requests admitted meanwhile see them
            self.quota = quota.hold(added)
        return True

    async def identify(self, customer_id: str | None) -> None:
        """Name the paying customer and run the gate, where the app's own auth has just run.

        Raises :class:`~billingos_asgi.BillingDenied` (401 for None or blank, 403, 429, or 503) for the
        middleware to answer with; returns when the request is admitted. Naming the customer the
        request already has is a no-op; naming another one is a ``ValueError``.
        """
        if isinstance(customer_id, str) and not customer_id.strip():
            customer_id = None  # blank: nobody (a 401), as a resolver's answer
        if self._same_customer(customer_id):
            return
        await self._the_gate().admit(self, customer_id)

    async def identify_by(
        self, customer_of: Callable[[Subject], str | None | Awaitable[str | None]], subject: Subject
    ) -> None:
        """:meth:`identify` with the customer that ``customer_of(subject)`` (sync or async) names.

        For framework adapters calling the app's own function: one that raises, or answers
        anything but a customer id (a non-empty string) or None, is logged and handled by the
        middleware's ``on_error`` policy (the request goes on unbilled, or a 503), never a 500.
        Not called at all when the request already has its customer.
        """
        if self.customer_id is not None:
            return
        gate = self._the_gate()
        try:
            answer = customer_of(subject)
            if inspect.isawaitable(answer):
                answer = await answer
            customer_id = customer_answer(answer, "the customer function")
        except Exception as exc:
            gate.hook_failed(self, customer_of, exc)
            return
        await gate.admit(self, customer_id)

    def mark_failed(self) -> None:
        """Bill nothing for this request, whatever its final answer: the app failed it, and a layer
        of the app's own outside made a success of that failure (Django's ``LocaleMiddleware`` and
        ``CommonMiddleware`` answer a 404 with a redirect to the language's or the slashed URL,
        whose request is then billed). Its units are released as a failed request's are."""
        self._failed = True

    def mark_routed(self) -> None:
        """The framework routed the request to a view or handler, which runs: its answer is billed,
        even a redirect to its own URL with a slash added (a form's next page), which is otherwise
        taken for the framework's canonical redirect. For framework adapters (Starlette names the
        endpoint in the scope itself)."""
        self.routed = True

    def _still_open(self, call: str) -> None:
        """Refuse a change once the request is billed: a task outliving it (one the handler started)
        would have its units or customer ignored in silence, or hold units of the quota for good."""
        if self.settled:
            raise RuntimeError(f"{call} after the {self.feature!r} request it belongs to was billed")

    def _the_gate(self) -> Gate:
        self._still_open("identify()")
        if self._gate is None:
            raise RuntimeError("identify() needs a request that BillingMiddleware is metering")
        return self._gate

    def _same_customer(self, customer_id: str | None) -> bool:
        if self.customer_id is None:
            return False
        if customer_id != self.customer_id:
            raise ValueError(f"this request is billed to {self.customer_id!r}; it cannot be billed to {customer_id!r}")
        return True


_current: ContextVar[UsageContext | None] = ContextVar("billingos_usage_context", default=None)
#: The running context of a request let through unmetered on purpose (excluded, or a user hook
#: failed with ``on_error="allow"``): what its handler reports has no one to bill.
LET_THROUGH = UsageContext("", None, "let through unmetered", 0.0)


def get_usage_context(request: Request | None = None) -> UsageContext | None:
    """The current metered request's context (from ``request.state`` or the running context), or None."""
    if request is not None:
        context = request.scope.get("state", {}).get("billing")
        return context if isinstance(context, UsageContext) else None
    context = _current.get()
    return None if context is LET_THROUGH else context


def declared_context(scope: Mapping[str, Any] | None, feature: str, where: str) -> UsageContext | None:
    """The usage context of a request to a route or view declared metered as ``feature``, failing
    closed (RuntimeError: a 500, not a free request) where the middleware did not meter it so.
    None: let through unmetered on purpose (excluded, or ``on_error="allow"``). ``scope`` None:
    the running request's (a handler called without its request: a FastAPI path operation's)."""
    if scope is None:
        running = _current.get()
        state = {} if running is None else {"billing": None if running is LET_THROUGH else running}
    else:
        state = scope.get("state") or {}
    if "billing" not in state:  # the middleware did not take this request for the route
        raise RuntimeError(f"metered({feature!r}) {where} reached unmetered")
    context: UsageContext | None = state["billing"]
    if context is not None and context.feature != feature:  # the table took it for another route
        raise RuntimeError(f"metered({feature!r}) {where} reached metered as {context.feature!r}")
    return context


def _running() -> UsageContext | None:
    """The running metered request's context; None for one let through unmetered on purpose."""
    context = _current.get()
    if context is None:
        raise LookupError("called outside a metered request")
    return None if context is LET_THROUGH else context


def _exact_units(units: object) -> Decimal:
    """``units`` reported, exactly (a float's shortest decimal, as upstream reads it); finer than
    upstream's resolution is allowed, as part of a sum. (Through the float ``check_quantity`` makes
    of it: numpy's float64 is a float whose repr names its type.)"""
    return Decimal(repr(check_quantity(units, finer_ok=True)))


def report_usage(units: float) -> None:
    """Add ``units`` to the running metered request's usage (raises LookupError outside one).

    Nothing to add for a request let through unmetered (excluded, or a user hook failed with
    ``on_error="allow"``), but the units are checked all the same.
    """
    context = _running()
    if context is None:
        _exact_units(units)
    else:
        context.report(units)


def set_customer(customer_id: str) -> None:
    """Name the running request's paying customer, without a gate (the handler is already running).

    For routes identified late whose handler learns the customer itself; use
    ``await context.identify(...)`` where the answer may still be a refusal.
    """
    check_id("customer_id", customer_id)
    context = _running()
    if context is None:  # let through unmetered: no one to bill
        return
    context._still_open("set_customer()")
    if not context._same_customer(customer_id):
        context.customer_id = customer_id
