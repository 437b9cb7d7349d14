"""``LocalBilling``: the embedded billing engine, with the hosted service's semantics, on SQLite."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from anyio import to_thread

from .._models import Entitlement, SessionToken, TrackUsageResult, UsageMetrics
from .._validation import check_expires_in, check_id, check_metadata, check_operations, check_quantity, micro_units
from .plans import Catalog, load_plans, parse_plans
from .store import Store, unavailable

__all__ = ["LocalBilling"]

Clock = Callable[[], datetime]
T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class LocalBilling:
    """A BillingOS-compatible backend in-process: plans from TOML or a dict, state in SQLite.

    Every call runs in a worker thread, so the event loop never blocks on disk, and each call is
    one SQLite transaction, so concurrent tracks can never push usage past a limit nor count an
    idempotency key twice. ``database`` is a file path (WAL mode) or ``":memory:"``. A file that
    cannot serve a call (locked by another process, damaged, full) raises :class:`ServerError` (503).
    """

    def __init__(self, catalog: Catalog, database: str | Path = ":memory:", *, clock: Clock = utc_now) -> None:
        self.catalog = catalog
        self.database = str(database)
        self._clock = clock
        self._store = Store(self.database, catalog, clock())
        self._closed = False

    @classmethod
    def from_file(cls, path: str | Path, database: str | Path = ":memory:", *, clock: Clock = utc_now) -> LocalBilling:
        """Load plans from a TOML file; an invalid file raises :class:`PlansError` naming key and fault."""
        return cls(load_plans(path), database, clock=clock)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], database: str | Path = ":memory:", *, clock: Clock = utc_now
    ) -> LocalBilling:
        return cls(parse_plans(data, source="<dict>"), database, clock=clock)

    def __repr__(self) -> str:
        return f"LocalBilling(database={self.database!r}, plans={sorted(self.catalog.plans)!r})"

    async def __aenter__(self) -> LocalBilling:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await to_thread.run_sync(self._store.close)

    def close(self) -> None:
        """Close the database from synchronous code (a sync test fixture's teardown, say)."""
        self._closed = True
        self._store.close()

    def _check_open(self) -> None:
        """Closed, every call is refused, session tokens too: none is answered as if billing still ran."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    async def _run(self, func: Callable[[], T]) -> T:
        """``func`` in a worker thread; a database that cannot serve it raises ServerError (503)."""
        self._check_open()
        try:
            return await to_thread.run_sync(func)
        except sqlite3.DatabaseError as exc:
            self._check_open()  # closed while the call waited for the database: refused as if it came later
            error = unavailable(exc)
            if error is None:
                raise
            raise error from exc

    # -- the BillingBackend protocol --

    async def check_entitlement(self, customer_id: str, feature_key: str) -> Entitlement:
        check_id("customer_id", customer_id)
        check_id("feature_key", feature_key)
        return await self._run(partial(self._store.check, customer_id, feature_key, self._clock()))

    async def track_usage(
        self,
        customer_id: str,
        feature_key: str,
        quantity: float,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TrackUsageResult:
        check_id("customer_id", customer_id)
        check_id("feature_key", feature_key)
        units, finer = micro_units(check_quantity(quantity))
        if idempotency_key is not None:
            check_id("idempotency_key", idempotency_key)
        checked = check_metadata(metadata)
        return await self._run(
            partial(
                self._store.track,
                customer_id,
                feature_key,
                units,
                idempotency_key,
                checked,
                self._clock(),
                finer=finer,
            )
        )

    async def get_usage_metrics(self, customer_id: str, feature_key: str | None = None) -> UsageMetrics:
        check_id("customer_id", customer_id)
        if feature_key is not None:
            check_id("feature_key", feature_key)
        return await self._run(partial(self._store.metrics, customer_id, feature_key, self._clock()))

    async def create_session_token(
        self,
        external_user_id: str,
        *,
        external_organization_id: str | None = None,
        expires_in: int = 3600,
        allowed_operations: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SessionToken:
        """Mint an opaque session token; the embedded engine keeps no session state."""
        self._check_open()
        check_id("externalUserId", external_user_id)
        if external_organization_id is not None:
            check_id("externalOrganizationId", external_organization_id)
        check_operations(allowed_operations)
        check_metadata(metadata)
        ttl = check_expires_in(expires_in)
        expires_at = self._clock() + timedelta(seconds=ttl)
        return SessionToken(token=f"bos_sess_{secrets.token_urlsafe(32)}", expires_at=expires_at)

    # -- what a self-hoster needs beyond the hosted API --

    async def set_plan(self, customer_id: str, plan_key: str | None, *, started_at: datetime | None = None) -> None:
        """Subscribe a customer (created if new) to ``plan_key``, or to nothing with None.

        A changed plan keeps the current period and its usage unless ``started_at`` re-anchors it,
        or the new plan bills by another interval (month, year...): then a new period starts now.
        Periods fall on the anchor's day and time before it too: a ``started_at`` on the 1st of next
        month aligns billing on the 1st, the current period ending then.
        """
        check_id("customer_id", customer_id)
        if started_at is not None:
            _check_start(started_at)
        await self._run(partial(self._store.set_plan, customer_id, plan_key, started_at, self._clock()))

    async def cancel_subscription(self, customer_id: str) -> None:
        """Mark the customer's subscription inactive: checks answer ``subscription_not_active``."""
        check_id("customer_id", customer_id)
        await self._run(partial(self._store.cancel, customer_id))

    async def recorded_units(self, customer_id: str, feature_key: str) -> float:
        """Every unit ever recorded for the customer's feature, across all periods."""
        return await self._run(partial(self._store.recorded_units, customer_id, feature_key))


def _check_start(started_at: datetime) -> None:
    """Refuse a subscription start that every later call would fail to read back, in UTC as it is
    stored (year 1 at 02:00+05:00 is year 0 there), or whose periods would end past the last datetime."""
    if started_at.tzinfo is None:
        raise ValueError("started_at must be timezone-aware")
    try:
        year = started_at.astimezone(timezone.utc).year
    except OverflowError:
        year = 0
    if not 1 <= year < 9999:
        raise ValueError(f"started_at must fall between the years 1 and 9999 (UTC), got {started_at.isoformat()}")
