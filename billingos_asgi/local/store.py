"""SQLite state of the embedded engine: subscriptions, usage totals, events and idempotency keys.

Synchronous on purpose: :class:`~billingos_asgi.local.engine.LocalBilling` runs every call in a
worker thread. Each call is one ``BEGIN IMMEDIATE`` transaction under a process lock, so the
read-check-write of a track is atomic against other tasks, threads and processes sharing the file.
SQLite's own errors leave this module as they are; the engine translates them (:func:`unavailable`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from math import ceil, floor
from typing import Any

from .._exceptions import CustomerNotFoundError, NotFoundError, QuotaExceededError, ServerError, ValidationError
from .._models import Entitlement, TrackUsageResult, UsageMetric, UsageMetrics, UsageSnapshot
from .._sqlite import claim
from .periods import current_period
from .plans import Catalog, Grant, Plan, from_micro

IDEMPOTENCY_WINDOW = timedelta(hours=24)
_PURGE_EVERY = 1000
#: Seconds a call waits for the process lock, then as long for a lock another process holds on the
#: file: twice this stays under the client's 10 s read timeout, so a locked file answers 503 in time.
BUSY_TIMEOUT = 4.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
    customer_id TEXT PRIMARY KEY,
    plan_key    TEXT,
    status      TEXT NOT NULL DEFAULT 'active',
    started_at  REAL NOT NULL,
    interval    TEXT  -- the billing interval its periods follow from started_at (kept through no plan)
);
CREATE TABLE IF NOT EXISTS usage_totals (
    customer_id  TEXT NOT NULL,
    feature_key  TEXT NOT NULL,
    period_start REAL NOT NULL,
    consumed     TEXT NOT NULL,  -- micro-units as decimal text: DECIMAL(20,6) overflows SQLite's int64
    PRIMARY KEY (customer_id, feature_key, period_start)
);
CREATE TABLE IF NOT EXISTS usage_events (
    id              INTEGER PRIMARY KEY,
    customer_id     TEXT NOT NULL,
    feature_key     TEXT NOT NULL,
    quantity        TEXT NOT NULL,
    recorded_at     REAL NOT NULL,
    idempotency_key TEXT,
    metadata        TEXT
);
CREATE TABLE IF NOT EXISTS idempotency (
    customer_id TEXT NOT NULL,
    key         TEXT NOT NULL,
    created_at  REAL NOT NULL,
    response    TEXT NOT NULL,
    PRIMARY KEY (customer_id, key)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at);
"""
_TABLES = {"subscriptions", "usage_totals", "usage_events", "idempotency"}
#: Marks our files (``PRAGMA application_id``): another application's database is never written to.
_APPLICATION_ID = 0x626F736C  # "bosl"
#: ``PRAGMA user_version`` of the layout above; a file a newer billingos-asgi laid out is refused, not misread.
#: Layout 1 had no ``subscriptions.interval``: added on opening, NULL (the plan's own interval).
_LAYOUT = 2

_NO_SUBSCRIPTION = "No active subscription with this feature"


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


class Store:
    """One SQLite connection, used by one thread at a time."""

    def __init__(self, database: str, catalog: Catalog, now: datetime) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()
        self._tracks = 0
        try:
            self._db = sqlite3.connect(database, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            try:
                self._prepare(database != ":memory:", catalog, now)
            except BaseException:
                self._db.close()
                raise
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{database}: cannot open the billing database: {exc}") from None

    def _prepare(self, on_disk: bool, catalog: Catalog, now: datetime) -> None:
        """Check the file is ours, create or mark its tables, and assign the catalog's customers."""
        tables, _, _ = claim(self._db, _APPLICATION_ID, _LAYOUT, _TABLES)  # before anything is written
        if on_disk:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction(write=True):  # a file locked by another process is refused here too
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(subscriptions)")}
            if "subscriptions" in tables and "interval" not in columns:  # (layout 1)
                self._db.execute("ALTER TABLE subscriptions ADD COLUMN interval TEXT")
            for statement in _SCHEMA.split(";"):
                self._db.execute(statement)
            self._db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            self._db.execute(f"PRAGMA user_version = {_LAYOUT}")
            for customer_id, plan_key in catalog.customers.items():  # a cancellation outlives a restart
                self._assign(customer_id, plan_key, None, now, activate=False)
            # A plan whose interval the file changes starts a new period now for every customer on it,
            # those assigned at run time too (as for a plan change; its periods would start elsewhere).
            intervals = {key: plan.interval for key, plan in catalog.plans.items()}
            for customer_id, plan_key, interval in self._db.execute(
                "SELECT customer_id, plan_key, interval FROM subscriptions WHERE plan_key IS NOT NULL"
            ).fetchall():
                if interval is not None and intervals.get(plan_key, interval) != interval:
                    self._assign(customer_id, plan_key, None, now, activate=False)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[None]:
        """One transaction (``BEGIN IMMEDIATE`` for writes) under the process lock; rolled back on any error."""
        # The lock's wait is bounded too: calls queued behind one that waits for another process
        # must not each add a busy timeout to theirs.
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            raise sqlite3.OperationalError("database is locked (this process's other calls hold it)")
        try:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # not after a failed BEGIN, nor when SQLite rolled back itself
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._lock.release()

    # -- subscriptions --

    def set_plan(self, customer_id: str, plan_key: str | None, started_at: datetime | None, now: datetime) -> None:
        if plan_key is not None and plan_key not in self.catalog.plans:
            raise ValidationError(f"unknown plan {plan_key!r} (known: {', '.join(sorted(self.catalog.plans))})")
        with self._transaction(write=True):
            self._assign(customer_id, plan_key, started_at, now, activate=True)

    def _assign(
        self, customer_id: str, plan_key: str | None, started_at: datetime | None, now: datetime, *, activate: bool
    ) -> None:
        """Subscribe ``customer_id`` to ``plan_key`` in the caller's transaction (reactivated if ``activate``).

        A new subscription starts now; a changed plan keeps its anchor (its period and usage) unless
        started_at moves it, or its interval differs: usage is kept per period start, and the other
        interval's periods would start elsewhere (a new period starts now, as a billing cycle does).
        No plan has no interval: the anchor's stays, so that a customer dropped to none and back
        keeps the period's usage (as after a cancellation, rather than getting a fresh quota), and
        one put on another interval's plan meanwhile starts a new period.
        """
        row = self._db.execute(
            "SELECT plan_key, interval FROM subscriptions WHERE customer_id = ?", (customer_id,)
        ).fetchone()
        new = self._interval(plan_key)
        old = None if row is None else row[1] or self._interval(row[0])
        if started_at is None and row is not None and new is not None and old != new:
            started_at = now  # another interval, or the first plan of a customer made without one
        self._db.execute(
            "INSERT INTO subscriptions (customer_id, plan_key, status, started_at, interval) "
            "VALUES (?, ?, 'active', ?, ?) "
            "ON CONFLICT (customer_id) DO UPDATE SET plan_key = excluded.plan_key, "
            "status = CASE WHEN ? THEN 'active' ELSE status END, started_at = COALESCE(?, started_at), "
            "interval = excluded.interval",
            (
                customer_id,
                plan_key,
                _ts(started_at or now),
                new or old,
                activate,
                None if started_at is None else _ts(started_at),
            ),
        )

    def _interval(self, plan_key: str | None) -> str | None:
        plan = None if plan_key is None else self.catalog.plans.get(plan_key)
        return None if plan is None else plan.interval

    def cancel(self, customer_id: str) -> None:
        with self._transaction(write=True):
            if (
                self._db.execute(
                    "UPDATE subscriptions SET status = 'canceled' WHERE customer_id = ?", (customer_id,)
                ).rowcount
                == 0
            ):
                raise CustomerNotFoundError(f"Customer not found: {customer_id}", status=400)

    def _subscription(self, customer_id: str) -> tuple[Plan | None, str, datetime]:
        row = self._db.execute(
            "SELECT plan_key, status, started_at FROM subscriptions WHERE customer_id = ?", (customer_id,)
        ).fetchone()
        if row is None:
            raise CustomerNotFoundError(f"Customer not found: {customer_id}", status=400)
        plan_key, status, started_at = row
        return self.catalog.plans.get(plan_key) if plan_key else None, status, _dt(started_at)

    def _consumed(self, customer_id: str, feature_key: str, period_start: datetime) -> int:
        row = self._db.execute(
            "SELECT consumed FROM usage_totals WHERE customer_id = ? AND feature_key = ? AND period_start = ?",
            (customer_id, feature_key, _ts(period_start)),
        ).fetchone()
        return int(row[0]) if row else 0  # decimal text, see the schema

    # -- the three calls --

    def check(self, customer_id: str, feature_key: str, now: datetime) -> Entitlement:
        with self._transaction():
            plan, status, started_at = self._subscription(customer_id)
            grant = plan.grants.get(feature_key) if plan else None
            if plan is None or grant is None:
                return Entitlement(feature_key, has_access=False, reason="no_active_subscription")
            if status != "active":
                return Entitlement(feature_key, has_access=False, reason="subscription_not_active")
            kind = grant.feature.type
            if kind == "boolean_flag":
                return Entitlement(feature_key, has_access=True, type=kind)
            if kind == "numeric_limit":
                limit = None if grant.limit is None else from_micro(grant.limit)
                return Entitlement(feature_key, has_access=True, limit=limit, type=kind)
            start, end = current_period(started_at, plan.interval, now)
            consumed = self._consumed(customer_id, feature_key, start)
            if grant.limit is None:
                return Entitlement(feature_key, has_access=True, usage=from_micro(consumed), resets_at=end, type=kind)
            exhausted = consumed >= grant.limit
            return Entitlement(
                feature_key,
                has_access=not exhausted,
                reason="quota_exceeded" if exhausted else None,
                limit=from_micro(grant.limit),
                usage=from_micro(consumed),
                remaining=from_micro(max(0, grant.limit - consumed)),
                resets_at=end,
                type=kind,
            )

    def track(
        self,
        customer_id: str,
        feature_key: str,
        quantity: int,
        idempotency_key: str | None,
        metadata: Mapping[str, Any] | None,
        now: datetime,
        *,
        finer: bool = False,
    ) -> TrackUsageResult:
        """Record ``quantity`` micro-units; ``finer``: the quantity sent was a little more (a remainder
        below a micro-unit, which is not stored), so that it is refused where it went past the limit."""
        with self._transaction(write=True):
            plan, status, started_at = self._subscription(customer_id)
            if idempotency_key is not None:
                row = self._db.execute(
                    "SELECT response FROM idempotency WHERE customer_id = ? AND key = ? AND created_at > ?",
                    (customer_id, idempotency_key, _ts(now - IDEMPOTENCY_WINDOW)),
                ).fetchone()
                if row is not None:
                    return _decode_result(row[0])
            grant = plan.grants.get(feature_key) if plan else None
            if plan is None or grant is None or status != "active":
                raise NotFoundError(_NO_SUBSCRIPTION, status=404)
            if grant.feature.type != "usage_quota":
                raise ValidationError("Feature is not a usage quota type", status=400)
            start, end = current_period(started_at, plan.interval, now)
            consumed = self._consumed(customer_id, feature_key, start) + quantity
            if grant.limit is not None and (consumed > grant.limit or (finer and consumed == grant.limit)):
                raise QuotaExceededError("quota_exceeded", status=400)
            self._db.execute(
                "INSERT INTO usage_totals (customer_id, feature_key, period_start, consumed) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (customer_id, feature_key, period_start) DO UPDATE SET consumed = excluded.consumed",
                (customer_id, feature_key, _ts(start), str(consumed)),
            )
            self._db.execute(
                "INSERT INTO usage_events (customer_id, feature_key, quantity, recorded_at, idempotency_key, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    customer_id,
                    feature_key,
                    str(quantity),
                    _ts(now),
                    idempotency_key,
                    None if metadata is None else json.dumps(metadata),
                ),
            )
            result = TrackUsageResult(
                success=True,
                feature_key=feature_key,
                quantity=from_micro(quantity),
                recorded_at=now,
                usage=_snapshot(grant, consumed, start, end),
            )
            if idempotency_key is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO idempotency (customer_id, key, created_at, response) VALUES (?, ?, ?, ?)",
                    (customer_id, idempotency_key, _ts(now), _encode_result(result)),
                )
                self._tracks += 1
                if self._tracks % _PURGE_EVERY == 0:
                    self._db.execute("DELETE FROM idempotency WHERE created_at <= ?", (_ts(now - IDEMPOTENCY_WINDOW),))
            return result

    def metrics(self, customer_id: str, feature_key: str | None, now: datetime) -> UsageMetrics:
        with self._transaction():
            plan, status, started_at = self._subscription(customer_id)
            if plan is None or status != "active":
                return UsageMetrics(customer_id=customer_id, metrics=())
            start, end = current_period(started_at, plan.interval, now)
            metrics = []
            for key, grant in plan.grants.items():
                if grant.feature.type != "usage_quota" or (feature_key is not None and key != feature_key):
                    continue
                consumed = self._consumed(customer_id, key, start)
                snapshot = _snapshot(grant, consumed, start, end)
                # Math.round, as the reference service rounds (Python's round() halves to even); a
                # quota of 0 is used up from the start, as the check says (an unlimited one never is).
                if grant.limit is None:
                    percentage = 0
                else:
                    percentage = floor(100 * consumed / grant.limit + 0.5) if grant.limit else 100
                metrics.append(
                    UsageMetric(
                        feature_key=key,
                        feature_title=grant.feature.title,
                        product_name=plan.name,
                        consumed=snapshot.consumed_units,
                        limit=snapshot.limit_units,
                        remaining=snapshot.remaining_units,
                        percentage_used=percentage,
                        period_start=start,
                        period_end=end,
                        resets_in_days=max(0, ceil((end - now) / timedelta(days=1))),
                    )
                )
            return UsageMetrics(customer_id=customer_id, metrics=tuple(metrics))

    def recorded_units(self, customer_id: str, feature_key: str) -> float:
        """Every unit ever recorded for a customer's feature, across periods (for tests and tools)."""
        with self._transaction():
            rows = self._db.execute(
                "SELECT quantity FROM usage_events WHERE customer_id = ? AND feature_key = ?",
                (customer_id, feature_key),
            )
            return from_micro(sum(int(quantity) for (quantity,) in rows))


def _encode_result(result: TrackUsageResult) -> str:
    """A track answer kept for idempotent replay, exact to the microsecond (the wire keeps ms)."""
    usage = result.usage
    return json.dumps(
        [
            result.feature_key,
            result.quantity,
            result.recorded_at.isoformat(),
            [usage.consumed_units, usage.limit_units, usage.remaining_units],
            [usage.period_start.isoformat(), usage.period_end.isoformat()],
        ]
    )


def _decode_result(text: str) -> TrackUsageResult:
    feature_key, quantity, recorded_at, (consumed, limit, remaining), (start, end) = json.loads(text)
    return TrackUsageResult(
        success=True,
        feature_key=feature_key,
        quantity=quantity,
        recorded_at=datetime.fromisoformat(recorded_at),
        usage=UsageSnapshot(consumed, limit, remaining, datetime.fromisoformat(start), datetime.fromisoformat(end)),
    )


def _snapshot(grant: Grant, consumed: int, start: datetime, end: datetime) -> UsageSnapshot:
    return UsageSnapshot(
        consumed_units=from_micro(consumed),
        limit_units=None if grant.limit is None else from_micro(grant.limit),
        remaining_units=None if grant.limit is None else from_micro(max(0, grant.limit - consumed)),
        period_start=start,
        period_end=end,
    )


def unavailable(exc: sqlite3.DatabaseError) -> ServerError | None:
    """The 503 a database failure means to callers (locked: try again shortly; damaged, full,
    read-only: say why), or None for an error that is a bug (a constraint, a misuse)."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        message = "the billing database is locked by another connection; try again shortly"
        return ServerError(message, status=503, retry_after=1.0)
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return ServerError(f"the billing database cannot be used: {exc}", status=503)
    return None
