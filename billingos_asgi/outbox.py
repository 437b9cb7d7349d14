"""The durable outbox: usage events on disk from the moment they are queued until billing confirms them.

One SQLite file in WAL mode, owned by one process at a time (an exclusive lock: a second
process opening it gets a clear error instead of sending the same events twice). An event's
row is written before the event joins the delivery queue and deleted once upstream has recorded
(or definitively refused) it. Before a batch's first attempt its rows are stamped with the
batch's key and the attempt time, so that after a crash the same events are resent as the same
batch under the same key, and upstream's 24 h idempotency keeps them counted once. An event
refused for good is marked with its reason before it is reported: a crash before its row is
deleted leaves it to be reported again at the next start, never to be sent (and recorded) after
it was reported refused.

All methods block on disk: the tracker calls them from a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ._sqlite import claim
from ._validation import check_quantity
from .events import Batch, UsageEvent

__all__ = ["Outbox", "OutboxError", "Stored"]

#: Marks our files (``PRAGMA application_id``): another SQLite database is never taken over.
_APPLICATION_ID = 0x6F627831  # "obx1"
#: ``PRAGMA user_version``: 3 marks refused events; 2 keys rows by customer and key (upstream's
#: idempotency is per customer); the first, unmarked layout keyed them by key alone. Older
#: layouts are brought up to date on open.
_LAYOUT = 3
_TABLE = """
CREATE TABLE outbox (
    customer_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    feature_key TEXT NOT NULL,
    quantity TEXT NOT NULL,
    metadata TEXT,
    batch_key TEXT,
    first_attempt REAL,
    refused TEXT,
    PRIMARY KEY (customer_id, idempotency_key)
) WITHOUT ROWID;
CREATE INDEX outbox_batch ON outbox (batch_key);
"""
_COLUMNS = "customer_id, idempotency_key, feature_key, quantity, metadata, batch_key, first_attempt"
_INSERT = f"INSERT OR IGNORE INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"


#: What a refused row's ``refused`` column starts with (the outcomes the tracker gives up events as).
_REFUSALS = ("rejected: ", "dead_lettered: ")


def _check_stamp(batch_key: object, first_attempt: object, refusal: object) -> None:
    """Refuse a row's batch stamp or refusal that the tracker never writes (a file edited by hand)."""
    stamped = isinstance(batch_key, str) and isinstance(first_attempt, float) and math.isfinite(first_attempt)
    if batch_key is not None and not stamped:
        raise ValueError(f"batch {batch_key!r} first attempted at {first_attempt!r}, not a time in seconds")
    if refusal is not None and not (isinstance(refusal, str) and refusal.startswith(_REFUSALS)):
        raise ValueError(f"refused as {refusal!r}, not 'rejected: <reason>' or 'dead_lettered: <reason>'")


def _row(event: UsageEvent, batch_key: str | None = None, first_attempt: float | None = None) -> tuple[object, ...]:
    """``event`` as a row, in the order of ``_COLUMNS``."""
    metadata = None if event.metadata is None else json.dumps(event.metadata)
    quantity = repr(event.quantity)
    return (event.customer_id, event.idempotency_key, event.feature_key, quantity, metadata, batch_key, first_attempt)


@contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
    db.execute(begin)
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # (SQLite rolls back itself on some errors: a full disk's)
            db.execute("ROLLBACK")
        raise


def _prepare(db: sqlite3.Connection, tables: set[str], application_id: int, layout: int) -> None:
    """Create, or bring up to date, the layout of the file (in one transaction)."""
    if application_id == _APPLICATION_ID and layout == _LAYOUT:
        return
    with _transaction(db, "BEGIN IMMEDIATE"):
        if application_id == _APPLICATION_ID and layout == 2:
            db.execute("ALTER TABLE outbox ADD COLUMN refused TEXT")
        else:
            first = "outbox" in tables  # the first layout (or a new file)
            if first:
                db.execute("ALTER TABLE outbox RENAME TO outbox_first")
                db.execute("DROP INDEX IF EXISTS outbox_batch")
            for statement in _TABLE.split(";"):
                if statement.strip():
                    db.execute(statement)
            if first:
                db.execute(f"INSERT INTO outbox ({_COLUMNS}) SELECT {_COLUMNS} FROM outbox_first")
                db.execute("DROP TABLE outbox_first")
        db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {_LAYOUT}")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class OutboxError(RuntimeError):
    """The outbox file cannot be used (locked by another process, not an outbox, unwritable)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """What a previous run left: fixed batches (attempted before; resent as they were), fresh
    events, and events refused for good (with the reason), to report and never to send."""

    batches: list[tuple[Batch, float]]  # with the time of their first attempt
    events: list[UsageEvent]
    refused: list[tuple[UsageEvent, str]] = field(default_factory=list)

    def __len__(self) -> int:
        """The events to send."""
        return sum(len(batch) for batch, _ in self.batches) + len(self.events)


class Outbox:
    """Unconfirmed usage events in a SQLite file, bounded to ``max_events`` rows."""

    def __init__(self, path: str | Path, *, max_events: int) -> None:
        if max_events < 1:
            raise ValueError(f"outbox: max_events must be >= 1, got {max_events!r}")
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.RLock()  # (held around a write that updates the count of rows)
        self._db: sqlite3.Connection | None = None
        # (a later chdir cannot move it; SQLite's ":memory:" is no file, and holds nothing past a crash)
        self._where = str(path) if str(path) == ":memory:" else os.path.abspath(self.path)
        self._file: tuple[int, int] | None = None  # (device, inode) of the file opened
        self.size = 0

    def open(self) -> Stored:
        """Lock the file for this process and read what a previous run left unconfirmed."""
        db = None
        try:
            db = sqlite3.connect(self._where, isolation_level=None, check_same_thread=False)  # (the file named)
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            found = claim(db, _APPLICATION_ID, _LAYOUT, {"outbox"})
            db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at the first write
            db.execute("COMMIT")
            _prepare(db, *found)  # (before WAL mode: a table named "outbox" of another's is not ours to change)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash; WAL keeps it consistent
            rows = db.execute(
                "SELECT idempotency_key, customer_id, feature_key, quantity, metadata, batch_key, first_attempt,"
                " refused FROM outbox ORDER BY first_attempt IS NULL, batch_key, customer_id, idempotency_key"
            ).fetchall()
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            hint = " (another process has it open?)" if "locked" in str(exc) else ""
            raise OutboxError(f"cannot use {self.path} as the usage outbox: {exc}{hint}") from exc
        # A batch is one customer's (two may send the same trusted request id) and one feature's.
        groups: dict[tuple[str, str, str], list[UsageEvent]] = {}
        attempted: dict[tuple[str, str, str], float] = {}
        fresh: list[UsageEvent] = []
        refused: list[tuple[UsageEvent, str]] = []
        for key, customer, feature, quantity, metadata, batch_key, first_attempt, reason in rows:
            try:
                units = check_quantity(float(quantity), finer_ok=True)  # (one NaN would refuse its batch whole)
                event = UsageEvent(customer, feature, units, key, json.loads(metadata) if metadata else None)
                _check_stamp(batch_key, first_attempt, reason)
            except (TypeError, ValueError) as exc:  # edited by hand: left for whoever edited it to mend
                db.close()
                where = f"cannot use {self.path} as the usage outbox: its event {key!r} is malformed"
                raise OutboxError(f"{where}: {exc}") from exc
            if reason is not None:
                refused.append((event, reason))
            elif batch_key is None:
                fresh.append(event)
            else:
                groups.setdefault((customer, feature, batch_key), []).append(event)
                attempted[customer, feature, batch_key] = first_attempt
        self._db = db
        self._file = _identity(self._where)
        self.size = len(rows)
        batches = [(Batch.of(tuple(e), g[2]), attempted[g]) for g, e in groups.items()]
        return Stored(batches, fresh, refused)

    def add(self, events: Sequence[UsageEvent]) -> int:
        """Write ``events`` (in one transaction); returns how many fitted under ``max_events``.

        Refused (an :class:`OutboxError`) where the file opened is no longer at its path: written
        there, they would be gone at the next start (the caller keeps them in memory, and says so)."""
        if self._file is not None and not self.is_in_place:  # (no file for SQLite's ":memory:")
            raise OutboxError(f"the usage outbox {self.path} was deleted or replaced while in use")
        with self._lock:  # the count of rows too: a split() runs in another thread
            room = max(0, self.max_events - self.size)
            rows = [_row(event) for event in events[:room]]
            self.size += self._write(_INSERT, rows)
        return len(rows)  # (an event already there, same customer and key, is there once)

    def fix(self, batch: Batch, first_attempt: float) -> None:
        """Stamp ``batch`` on its events before its first attempt: a replay resends it unchanged."""
        self._write(
            "UPDATE outbox SET batch_key = ?, first_attempt = ? WHERE customer_id = ? AND idempotency_key = ?",
            [(batch.idempotency_key, first_attempt, batch.customer_id, key) for key in batch.keys],
        )

    def refuse(self, events: Iterable[tuple[str, str]], refusal: str) -> None:
        """Mark events (by customer id and idempotency key) refused for good (``refusal``: "outcome:
        reason"), before they are reported so: left by a crash, they are reported again, never sent."""
        self._write(
            "UPDATE outbox SET refused = ? WHERE customer_id = ? AND idempotency_key = ?",
            [(refusal, customer, key) for customer, key in events],
        )

    def remove(self, events: Iterable[tuple[str, str]]) -> None:
        """Forget confirmed (or definitively refused) events, by (customer id, idempotency key)."""
        with self._lock:
            self.size -= self._write("DELETE FROM outbox WHERE customer_id = ? AND idempotency_key = ?", list(events))

    def split(self, event: UsageEvent, part: UsageEvent, first_attempt: float) -> None:
        """``event`` was refused for quota and ``part`` of it fits: keep the part, stamped (a replay
        resends it under its own key) and what is left of the event, in one transaction; the whole of
        it (the quota grew since the refusal): the part alone, or a replay reports a rest of 0 refused."""
        rest = round(event.quantity - part.quantity, 6)
        where = (event.customer_id, event.idempotency_key)
        with self._lock:
            with self._writing() as db:
                added = db.execute(_INSERT, _row(part, part.idempotency_key, first_attempt)).rowcount
                if rest > 0:
                    sql = "UPDATE outbox SET quantity = ? WHERE customer_id = ? AND idempotency_key = ?"
                    db.execute(sql, (repr(rest), *where))
                else:
                    added -= db.execute(
                        "DELETE FROM outbox WHERE customer_id = ? AND idempotency_key = ?", where
                    ).rowcount
            self.size += added  # (once committed)

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def is_in_place(self) -> bool:
        """Whether the file opened is still at :attr:`path`: SQLite goes on writing to a file deleted
        (or replaced) while open, and what it holds is gone once it is closed."""
        return self._file is not None and _identity(self._where) == self._file

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _write(self, sql: str, rows: Sequence[tuple[object, ...]]) -> int:
        """Run ``sql`` for every row in one transaction; the number of rows changed."""
        with self._writing() as db:
            return db.executemany(sql, rows).rowcount

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """The open file, in a transaction, for one thread at a time."""
        with self._lock:
            if self._db is None:
                raise OutboxError(f"the outbox {self.path} is not open")
            with _transaction(self._db) as db:
                yield db
