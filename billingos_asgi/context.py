"""What a metered request's handler can see and do: its request id, customer, and reported units."""

from __future__ import annotations

from contextvars import ContextVar

from starlette.requests import Request

from ._models import Entitlement
from ._validation import check_quantity

__all__ = ["UsageContext", "get_usage_context", "report_usage"]


class UsageContext:
    """The billing side of one metered request, shared by reference between middleware and app.

    Also at ``request.state.billing``. ``entitlement`` is the customer's entitlement as the
    gate saw it. ``report(units)`` adds units the endpoint measured itself
    (tokens an LLM call used, bytes stored); they are billed after the response completes.
    """

    __slots__ = ("customer_id", "entitlement", "feature", "quantity", "reported", "request_id")

    def __init__(
        self,
        request_id: str,
        customer_id: str,
        feature: str,
        quantity: float,
        entitlement: Entitlement | None = None,
    ) -> None:
        self.request_id = request_id
        self.customer_id = customer_id
        self.feature = feature
        self.quantity = quantity
        self.entitlement = entitlement  # as cached when the request was admitted (None: billing was unreachable)
        self.reported = 0.0

    def __repr__(self) -> str:
        return (
            f"UsageContext(request_id={self.request_id!r}, customer_id={self.customer_id!r}, "
            f"feature={self.feature!r}, quantity={self.quantity!r}, reported={self.reported!r})"
        )

    def report(self, units: float) -> None:
        """Add ``units`` (a finite number > 0) to this request's usage."""
        self.reported += check_quantity(units)


_current: ContextVar[UsageContext | None] = ContextVar("billingos_usage_context", default=None)


def get_usage_context(request: Request | None = None) -> UsageContext | None:
    """The current metered request's context (from ``request.state`` or the running context), or None."""
    if request is not None:
        context = request.scope.get("state", {}).get("billing")
        return context if isinstance(context, UsageContext) else None
    return _current.get()


def report_usage(units: float) -> None:
    """Add ``units`` to the running metered request's usage (raises LookupError outside one)."""
    context = _current.get()
    if context is None:
        raise LookupError("report_usage() called outside a metered request")
    context.report(units)
