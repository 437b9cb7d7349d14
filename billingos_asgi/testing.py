"""Helpers for testing (and benchmarking) ASGI apps that use the middleware, without a server."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from decimal import Decimal

import anyio
from starlette.types import ASGIApp, Message

from ._exceptions import CustomerNotFoundError
from .local import LocalBilling

__all__ = ["assert_recorded", "lifespan"]

#: How many ``lifespan`` blocks enclose the running code: usage is only all recorded once they have exited.
_lifespans_open: ContextVar[int] = ContextVar("billingos_asgi_testing_lifespans_open", default=0)


@contextlib.contextmanager
def _inside_lifespan() -> Iterator[None]:
    depth = _lifespans_open.get()
    _lifespans_open.set(depth + 1)
    try:
        yield
    finally:
        _lifespans_open.set(depth)  # not token.reset: an async fixture may exit in another context


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan as a server does: startup on entry, shutdown (and the usage drain) on exit.

    An app that returns without answering does not support lifespan: the block runs without it,
    as under a server; one that returns after its startup, without answering the shutdown, is done.
    An app that fails, or answers with a failure, raises ``RuntimeError``.
    """
    to_app, app_inbox = anyio.create_memory_object_stream[Message](4)
    app_outbox, from_app = anyio.create_memory_object_stream[Message](4)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    failed: list[Exception] = []

    async def run() -> None:
        try:
            await app(scope, app_inbox.receive, app_outbox.send)
        except Exception as exc:
            failed.append(exc)
        finally:
            app_outbox.close()  # the app is done: nothing more will come

    async def answer() -> Message | None:
        with contextlib.suppress(anyio.EndOfStream):
            return await from_app.receive()
        return None  # the app has returned (or raised)

    # Exceptions are raised after the task group has closed, so that they come out as they are.
    raised: BaseException | None = None
    failure: str | None = None
    async with anyio.create_task_group() as tg, to_app, from_app, app_inbox, app_outbox:
        tg.start_soon(run)
        await to_app.send({"type": "lifespan.startup"})
        started = await answer()
        supported = started is not None and started["type"] == "lifespan.startup.complete"
        if supported or (started is None and not failed):  # not supported: run the block without it
            try:
                with _inside_lifespan():
                    yield
            except BaseException as exc:
                raised = exc
            if supported and not isinstance(raised, anyio.get_cancelled_exc_class()):
                await to_app.send({"type": "lifespan.shutdown"})
                stopped = await answer()
                # An app that returns without answering has not failed: uvicorn takes that as done too.
                completed = stopped["type"] == "lifespan.shutdown.complete" if stopped else not failed
                if not completed:
                    failure = f"the app's lifespan shutdown failed: {stopped or failed}"
        else:
            failure = f"the app's lifespan startup failed: {started or failed}"
        tg.cancel_scope.cancel()
    if raised is not None:
        raise raised
    if failure is not None:
        raise RuntimeError(failure) from (failed[0] if failed else None)


async def assert_recorded(billing: LocalBilling, customer_id: str, expected: Mapping[str, float | Decimal]) -> None:
    """Assert the units recorded for ``customer_id``, by feature (run it after the lifespan has drained).

    A customer or feature the billing does not know fails, rather than pass as "nothing recorded";
    so does a call inside ``async with lifespan(app)``, where the tracker has not delivered the
    usage yet and an expected 0 would pass whatever the app did. A feature that never records
    usage (a ``boolean_flag`` or ``numeric_limit``) is refused for the same reason.
    """
    if _lifespans_open.get():
        raise RuntimeError(
            "assert_recorded inside `async with lifespan(app)`: usage is delivered in the background "
            "and drained when the block exits; assert after the block"
        )
    wanted = _expected_units(expected)
    unknown = sorted(set(wanted) - set(billing.catalog.features))
    if unknown:
        raise AssertionError(f"unknown features {unknown}: the plans declare {sorted(billing.catalog.features)}")
    for feature in wanted:  # a flag or a ceiling records nothing: 0 would pass whatever the app did
        kind = billing.catalog.features[feature].type
        if kind != "usage_quota":
            raise ValueError(f"{feature!r} is a {kind} feature: only usage_quota features record usage")
    try:
        await billing.get_usage_metrics(customer_id)
    except CustomerNotFoundError:
        raise AssertionError(f"unknown customer {customer_id!r}") from None
    recorded = {feature: await billing.recorded_units(customer_id, feature) for feature in wanted}
    wrong = {f: (recorded[f], units) for f, units in wanted.items() if abs(recorded[f] - units) > 1e-9}
    if wrong:
        details = ", ".join(f"{f}: recorded {_units(got)}, expected {_units(want)}" for f, (got, want) in wrong.items())
        if not any(recorded.values()):  # the usual cause: the app under test bills another engine
            details += (
                " (nothing at all: does the app bill this `billing`? One that builds its own LocalBilling"
                " at import bills that one: build the app from the fixture, create_app(billing))"
            )
        raise AssertionError(f"usage of {customer_id!r}: {details}")


def _units(value: float) -> str:
    """Units as exactly as the float holds them (``:g`` said 1.23457e+06 for both 1234567 and 1234568)."""
    return repr(float(value)).removesuffix(".0")


def _expected_units(expected: Mapping[str, float | Decimal]) -> dict[str, float]:
    """``expected`` as float units, refusing an expectation that no usage could fail: none at all, or
    units that compare with nothing (NaN). A ``Decimal`` is taken, as ``track_usage`` takes it."""
    if not isinstance(expected, Mapping) or not expected:
        raise ValueError(f"expected must name units by feature, e.g. {{'api_calls': 3}}; got {expected!r}")
    wanted: dict[str, float] = {}
    for feature, units in expected.items():
        number = math.nan
        if isinstance(units, (int, float, Decimal)) and not isinstance(units, bool):
            with contextlib.suppress(OverflowError, ValueError):  # an int beyond a float's range; Decimal("sNaN")
                number = float(units)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"expected units of {feature!r} must be a finite number >= 0, got {units!r}")
        wanted[feature] = number
    return wanted
