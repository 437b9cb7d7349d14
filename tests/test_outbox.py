"""The durable outbox: on disk until confirmed, replayed unchanged, bounded, owned by one process."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from billingos_asgi import LocalBilling, NetworkError, TrackUsageResult, UsageEvent
from billingos_asgi.cache import EntitlementCache
from billingos_asgi.events import Batch, part_key
from billingos_asgi.outbox import Outbox, OutboxError
from billingos_asgi.tracker import IN_DOUBT, Tracker
from billingos_asgi.upstream import Upstream

from .test_tracker import (
    PLANS,
    Around,
    FlakyAfterForwarding,
    Gated,
    Unchecked,
    event,
    run_tracker,
    tracker_for,
    unaccounted,
)


@pytest.fixture
async def billing(tmp_path: Path) -> AsyncIterator[LocalBilling]:
    async with LocalBilling.from_dict(PLANS, tmp_path / "billing.db") as billing:
        yield billing


def test_events_round_trip_with_their_batches_and_first_attempts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_events=10)
    assert len(outbox.open()) == 0
    events = [event("k1", quantity=0.1), event("k2", quantity=2.5, metadata={"model": "x"}), event("k3", "c1")]
    assert outbox.add(events) == 3
    assert outbox.add([event("k1")]) == 1 and outbox.size == 3  # a key already there is kept once
    batch = Batch.of(tuple(events[:2]))
    outbox.fix(batch, 1234.5)
    outbox.close()

    again = Outbox(tmp_path / "outbox.db", max_events=10)
    stored = again.open()
    assert stored.batches == [(Batch.of(tuple(events[:2])), 1234.5)] and stored.events == [events[2]]
    again.remove([("c0", "k1"), ("c0", "k2")])
    assert again.size == 1
    again.close()
    assert len(Outbox(tmp_path / "outbox.db", max_events=10).open()) == 1


def test_the_outbox_is_bounded(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_events=2)
    outbox.open()
    assert outbox.add([event(f"k{i}") for i in range(3)]) == 2
    assert outbox.add([event("k9")]) == 0
    outbox.remove([("c0", "k0")])
    assert outbox.add([event("k9")]) == 1


def test_a_split_whose_part_is_the_whole_event_keeps_the_part_alone(tmp_path: Path) -> None:
    """The quota grew between the refusal and the check: the part is all of it. A rest of 0 kept in
    its row was replayed after a crash, and reported refused, for an event billed in full."""
    outbox = Outbox(tmp_path / "outbox.db", max_events=10)
    outbox.open()
    whole = event("k1", quantity=4.0)
    outbox.add([whole])
    outbox.split(whole, whole._replace(idempotency_key=part_key(whole)), time.time())
    assert outbox.size == 1
    outbox.close()
    stored = Outbox(tmp_path / "outbox.db", max_events=10).open()
    assert [(b.idempotency_key, b.quantity) for b, _ in stored.batches] == [(part_key(whole), 4.0)]
    assert not stored.events and not stored.refused


def test_its_count_of_events_holds_while_a_sender_splits_events_as_the_writer_writes(tmp_path: Path) -> None:
    """A split (a sender's thread) between the writer's read of the count and its update was lost:
    the count drifted below the rows held, and the bound let more in."""
    outbox = Outbox(tmp_path / "outbox.db", max_events=10_000)
    outbox.open()
    split = [UsageEvent("c0", "api_calls", 3.0, f"s{i}") for i in range(300)]
    outbox.add(split)

    def writer() -> None:
        for i in range(600):
            outbox.add([UsageEvent("c0", "api_calls", 1.0, f"w{i}-{j}") for j in range(3)])
            outbox.remove([("c0", f"w{i}-{j}") for j in range(3)])

    def sender() -> None:
        for whole in split:
            outbox.split(whole, whole._replace(quantity=1.0, idempotency_key=part_key(whole)), time.time())

    threads = [threading.Thread(target=writer), threading.Thread(target=sender)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counted = outbox.size
    outbox.close()
    with closing(sqlite3.connect(tmp_path / "outbox.db")) as db:
        assert counted == db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 600


def test_a_second_process_cannot_share_an_outbox(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "outbox.db", max_events=10)
    first.open()
    with pytest.raises(OutboxError, match="outbox.db"):
        Outbox(tmp_path / "outbox.db", max_events=10).open()
    first.close()
    Outbox(tmp_path / "outbox.db", max_events=10).open()


def test_a_file_that_is_not_an_outbox_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(OutboxError, match="junk.db"):
        Outbox(junk, max_events=10).open()
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE outbox (something_else TEXT)")
    db.close()
    with pytest.raises(OutboxError, match="other.db"):
        Outbox(other, max_events=10).open()
    with pytest.raises(ValueError, match="max_events"):
        Outbox(other, max_events=0)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("quantity", "lots"),
        ("quantity", "nan"),  # (a NaN, or any quantity upstream refuses, refused its batch's valid events too)
        ("quantity", "inf"),
        ("quantity", "-5.0"),
        ("quantity", "0"),
        ("metadata", "{not json"),
        ("first_attempt", "yesterday"),  # (a stamped batch's: a TypeError in the sender, at every start)
        ("first_attempt", None),
        ("refused", "bogus: reason"),  # (an outcome no counter has: start-up failed)
        ("refused", "in_flight: x"),  # (a gauge stuck at 1)
        ("refused", "dropped: x"),  # (never forgotten: reported again at every start)
    ],
)
def test_an_event_edited_into_nonsense_is_named_and_kept(tmp_path: Path, column: str, value: str | None) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_events=10)
    outbox.open()
    outbox.add([event("k1"), event("k2")])
    outbox.fix(Batch.of((event("k1"), event("k2"))), 1234.5)
    outbox.close()
    db = sqlite3.connect(tmp_path / "outbox.db")
    db.execute(f"UPDATE outbox SET {column} = ? WHERE idempotency_key = 'k2'", (value,))
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match=r"outbox\.db as the usage outbox: its event 'k2' is malformed"):
        Outbox(tmp_path / "outbox.db", max_events=10).open()
    db = sqlite3.connect(tmp_path / "outbox.db")  # not left locked, and nothing removed
    assert db.execute("SELECT count(*) FROM outbox").fetchone() == (2,)
    db.close()


def refused_as_an_outbox(path: Path, script: str, refusal: str) -> sqlite3.Connection:
    """Another application's database ``script`` makes, refused as an outbox: open again, to look at."""
    with closing(sqlite3.connect(path)) as db:
        db.executescript(script)
    with pytest.raises(OutboxError, match=refusal):
        Outbox(path, max_events=10).open()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not switched to WAL either
    return db


def test_another_applications_database_is_never_taken_over(tmp_path: Path) -> None:
    refused = refused_as_an_outbox(tmp_path / "app.db", "CREATE TABLE users (name TEXT);", "another application's")
    with closing(refused) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("users",)]


def test_another_applications_table_named_outbox_is_left_as_it_was(tmp_path: Path) -> None:
    """Unmarked, a lone "outbox" table reads as the first layout's, until its rows fail to move."""
    script = "CREATE TABLE outbox (id INTEGER PRIMARY KEY, topic TEXT); INSERT INTO outbox (topic) VALUES ('orders');"
    with closing(refused_as_an_outbox(tmp_path / "app.db", script, "app.db as the usage outbox")) as db:
        assert db.execute("SELECT * FROM outbox").fetchall() == [(1, "orders")]


def written(path: Path, script: str) -> Path:
    """A file as an older billingos-asgi left it (``script``: its SQL)."""
    db = sqlite3.connect(path)
    db.executescript(script)
    db.close()
    return path


def test_an_outbox_of_the_first_layout_keeps_its_events(tmp_path: Path) -> None:
    path = written(
        tmp_path / "outbox.db",
        """
        CREATE TABLE outbox (
            idempotency_key TEXT PRIMARY KEY, customer_id TEXT NOT NULL, feature_key TEXT NOT NULL,
            quantity TEXT NOT NULL, metadata TEXT, batch_key TEXT, first_attempt REAL
        ) WITHOUT ROWID;
        CREATE INDEX outbox_batch ON outbox (batch_key);
        INSERT INTO outbox VALUES ('k1', 'c0', 'api_calls', '1.0', NULL, 'b1', 1234.5);
        INSERT INTO outbox VALUES ('k2', 'c1', 'api_calls', '2.5', NULL, NULL, NULL);
        """,
    )
    stored = Outbox(path, max_events=10).open()
    assert stored.batches == [(Batch.of((event("k1"),), "b1"), 1234.5)]
    assert stored.events == [event("k2", "c1", quantity=2.5)]


def test_an_outbox_of_the_second_layout_keeps_its_events_and_marks_refusals(tmp_path: Path) -> None:
    path = written(
        tmp_path / "outbox.db",
        """
        CREATE TABLE outbox (
            customer_id TEXT NOT NULL, idempotency_key TEXT NOT NULL, feature_key TEXT NOT NULL,
            quantity TEXT NOT NULL, metadata TEXT, batch_key TEXT, first_attempt REAL,
            PRIMARY KEY (customer_id, idempotency_key)
        ) WITHOUT ROWID;
        CREATE INDEX outbox_batch ON outbox (batch_key);
        INSERT INTO outbox VALUES ('c0', 'k1', 'api_calls', '1.0', NULL, 'b1', 1234.5);
        INSERT INTO outbox VALUES ('c1', 'k2', 'api_calls', '2.5', NULL, NULL, NULL);
        PRAGMA application_id = 1868724273;
        PRAGMA user_version = 2;
        """,
    )
    outbox = Outbox(path, max_events=10)
    stored = outbox.open()
    assert stored.batches == [(Batch.of((event("k1"),), "b1"), 1234.5)]
    assert stored.events == [event("k2", "c1", quantity=2.5)] and stored.refused == []
    outbox.refuse([("c1", "k2")], "rejected: quota_exceeded")
    outbox.close()
    again = Outbox(path, max_events=10).open()
    refused = [(event("k2", "c1", quantity=2.5), "rejected: quota_exceeded")]
    assert again.events == [] and again.refused == refused
    assert len(again) == 1  # (the events to send)


def test_two_customers_may_use_one_key(tmp_path: Path) -> None:
    """Trusted request ids come from outside: two customers can send the same one."""
    outbox = Outbox(tmp_path / "outbox.db", max_events=10)
    outbox.open()
    assert outbox.add([event("gateway-id", "c0"), event("gateway-id", "c1")]) == 2 and outbox.size == 2
    outbox.remove([("c0", "gateway-id")])
    outbox.close()
    assert Outbox(tmp_path / "outbox.db", max_events=10).open().events == [event("gateway-id", "c1")]


def test_stamped_batches_of_two_customers_under_one_key_are_replayed_apart(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_events=10)
    outbox.open()
    alice, bob = event("gateway-id", "c0"), event("gateway-id", "c1")  # lone events: the batch key is theirs
    outbox.add([alice, bob])
    outbox.fix(Batch.of((alice,)), 1.0)
    outbox.fix(Batch.of((bob,)), 2.0)
    outbox.close()
    stored = Outbox(tmp_path / "outbox.db", max_events=10).open().batches
    assert sorted((batch.customer_id, batch.events, first) for batch, first in stored) == [
        ("c0", (alice,), 1.0),
        ("c1", (bob,), 2.0),
    ]


class StampFails(Outbox):
    """An outbox whose disk fills up after the events were written: stamps fail."""

    def fix(self, batch: Batch, first_attempt: float) -> None:
        raise sqlite3.OperationalError("database or disk is full")


class RemoveFailsOnce(Outbox):
    failures = 1

    def remove(self, events: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        super().remove(events)


async def test_a_batch_that_cannot_be_stamped_is_held(billing: LocalBilling, tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    first = tracker_for(billing, flush_interval=0.05, drain_timeout=0.5, outbox=StampFails(path, max_events=100))
    await run_tracker(first, [event("k1"), event("k2")])
    assert (first.stats.sent, first.stats.deferred) == (0, 2)
    assert await billing.recorded_units("c0", "api_calls") == 0  # unstamped, it could be re-formed after a crash
    second = tracker_for(billing, flush_interval=0.05, outbox=Outbox(path, max_events=100))
    await run_tracker(second, [])
    assert await billing.recorded_units("c0", "api_calls") == 2 and rows(path) == []


async def test_confirmed_events_that_could_not_be_forgotten_are_forgotten_later(
    billing: LocalBilling, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    outbox = RemoveFailsOnce(path, max_events=100)
    tracker = tracker_for(billing, flush_interval=0.05, outbox=outbox)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tracker.submit(event("k1"))
        await anyio.sleep(1.5)  # sent, forgetting failed once, tried again a second later
        assert outbox.size == 0
        await tracker.stop()
    assert rows(path) == [] and await billing.recorded_units("c0", "api_calls") == 1


async def test_a_batch_held_for_its_stamp_goes_up_without_after_a_while(
    billing: LocalBilling, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("billingos_asgi.tracker.STAMP_HOLD", 0.3)
    tracker = tracker_for(billing, flush_interval=0.05, outbox=StampFails(tmp_path / "outbox.db", max_events=100))
    await run_tracker(tracker, [event("k1"), event("k2")])
    assert tracker.stats.sent == 2 and await billing.recorded_units("c0", "api_calls") == 2
    assert "sent unstamped" in caplog.text


async def test_a_batch_held_for_its_stamp_goes_up_without_when_the_clock_steps_back(
    billing: LocalBilling, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold was timed on the wall clock: set back an hour (NTP, a VM resumed), it held for an hour."""
    monkeypatch.setattr("billingos_asgi.tracker.STAMP_HOLD", 0.3)
    readings = [time.time()] * 2  # the batch's first attempt, and the start of its hold; then an hour earlier

    def clock() -> float:
        return readings.pop() if readings else time.time() - 3600

    outbox = StampFails(tmp_path / "outbox.db", max_events=100)
    tracker = tracker_for(billing, flush_interval=0.05, drain_timeout=5, outbox=outbox, clock=clock)
    await run_tracker(tracker, [event("k1"), event("k2")])
    assert (tracker.stats.sent, tracker.stats.deferred) == (2, 0)
    assert await billing.recorded_units("c0", "api_calls") == 2


class RemoveFails(Outbox):
    def remove(self, events: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")


async def test_what_is_left_to_forget_stays_bounded_while_the_disk_fails(billing: LocalBilling, tmp_path: Path) -> None:
    outbox = RemoveFails(tmp_path / "outbox.db", max_events=100)
    tracker = tracker_for(billing, flush_interval=0.01, max_queue=5, outbox=outbox)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for second in range(4):  # the writer tries to forget once a second
            for i in range(5):
                assert tracker.submit(event(f"k{second}-{i}", feature="tokens"))
            await anyio.sleep(1.1)  # sent, and their rows not forgotten
        assert len(tracker._confirmed) <= 2 * 5  # kept, and confirmed since the last try
        await tracker.stop()
    assert await billing.recorded_units("c0", "tokens") == 20 and tracker.stats.sent == 20


async def test_what_is_kept_to_forget_is_bounded_by_the_queue_exactly(billing: LocalBilling) -> None:
    tracker = tracker_for(billing, max_queue=5)
    tracker._keep_to_forget([("c0", f"k{i}") for i in range(6)])
    assert tracker._confirmed == [("c0", f"k{i}") for i in range(1, 6)]  # the oldest is given up


async def test_a_failing_forget_does_not_hold_the_shutdown_to_its_deadline(
    billing: LocalBilling, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = tracker_for(
        billing, flush_interval=0.05, drain_timeout=5, outbox=RemoveFails(tmp_path / "outbox.db", max_events=100)
    )
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(3):
            tracker.submit(event(f"k{i}"))
        await anyio.sleep(0.5)  # sent; forgetting them fails, and is tried again
        await tracker.stop()
    assert tracker.stats.sent == 3 and "drain deadline" not in caplog.text


async def test_events_settled_during_the_drain_are_forgotten_though_the_disk_failed_once(
    billing: LocalBilling, tmp_path: Path
) -> None:
    # Left in the file, they would be resent at the next start: one refused (and reported) could be recorded then.
    path = tmp_path / "outbox.db"
    tracker = tracker_for(billing, flush_interval=60, outbox=RemoveFailsOnce(path, max_events=100))
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tracker.submit(event("k1"))
        await tracker.stop()  # flushed at once and sent; forgetting it fails once, during the drain
    assert tracker.stats.sent == 1 and rows(path) == []


class AddFailsOnce(Outbox):
    """An outbox whose first write fails: those events go on in memory only."""

    failures = 1

    def add(self, events: Any) -> int:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return super().add(events)


async def test_a_failing_disk_logs_one_line_a_second_not_one_per_write(
    billing: LocalBilling, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each write the outbox failed logged its traceback, and the writer writes whenever events
    arrive: a full disk under traffic flooded the log with one traceback per few requests."""
    outbox = AddFailsOnce(tmp_path / "outbox.db", max_events=100)
    outbox.failures = 10**6
    tracker = tracker_for(billing, flush_interval=0.05, outbox=outbox)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(20):
            assert tracker.submit(event(f"k{i}", customer=f"c{i % 10}"))
            with anyio.fail_after(10):
                while tracker.stats.not_durable <= i:  # noqa: ASYNC110
                    await anyio.sleep(0.001)  # until the writer has tried (and failed) to write it
        await tracker.stop()
    assert tracker.stats.sent == 20  # in memory only, and delivered
    lines = [r for r in caplog.records if r.getMessage().startswith("could not write")]
    assert len(lines) < 20 and lines[0].exc_info is not None, caplog.text
    held = sum(
        int(m.group(1)) for r in caplog.records if (m := re.search(r"(\d+) similar lines held back", r.getMessage()))
    )
    assert len(lines) + held == 20, caplog.text


async def test_events_the_outbox_could_not_write_are_not_said_to_be_kept_in_it(
    billing: LocalBilling, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    reported: list[str] = []
    tracker = tracker_for(
        Gated(billing),  # never answers: the drain deadline cuts everything off
        flush_interval=0.05,
        drain_timeout=0.3,
        max_concurrency=4,
        outbox=AddFailsOnce(path, max_events=100),
        on_rejected=lambda e, r: reported.append(r),
    )
    await run_tracker(tracker, [event(f"k{i}", customer=f"c{i}") for i in range(6)])
    # Four were on their way (possibly recorded: not written now, they could count twice), two waited
    # for a sender: written at the deadline, they are resent at the next start.
    assert (tracker.stats.in_doubt, tracker.stats.deferred, unaccounted(tracker)) == (4, 2, 0)
    assert reported == [f"shutdown deadline passed during its delivery ({IN_DOUBT}; outbox write failed)"] * 4
    assert len(rows(path)) == 2


class FirstGatedThenHangs(Around):
    """The first track waits for its gate, then is recorded; the others never answer."""

    def __init__(self, billing: LocalBilling) -> None:
        super().__init__(billing)
        self.gate = anyio.Event()
        self.calls = 0

    async def track_usage(self, *args: Any) -> TrackUsageResult:
        self.calls += 1
        if self.calls > 1:
            await anyio.sleep_forever()
        await self.gate.wait()
        return await self.billing.track_usage(*args)


async def test_an_unwritten_event_stays_unwritten_when_another_of_its_key_is_recorded(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """Two events of one key (no trusted ids to tell them for one), neither written to a failing
    disk: the first recorded, the second is still not on disk when the deadline cuts it off (a
    window's events are columns, but those its outbox could not write are kept as themselves)."""
    path = tmp_path / "outbox.db"
    outbox = AddFailsOnce(path, max_events=100)
    outbox.failures = 10**6
    backend = FirstGatedThenHangs(billing)
    tracker = tracker_for(backend, flush_interval=0.05, max_concurrency=1, drain_timeout=0.3, outbox=outbox)
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        assert tracker.submit(event("twice"))
        with anyio.fail_after(10):
            while backend.calls == 0:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert tracker.submit(event("twice"))  # another object, the same key
        with anyio.fail_after(10):
            while tracker.stats.not_durable < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)  # its window closed: it waits for the sender
        backend.gate.set()
        with anyio.fail_after(10):
            while tracker.stats.sent < 1:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await tracker.stop()
    assert rows(path) == []  # (the disk never took a write)
    assert (tracker.stats.sent, tracker.stats.in_doubt, tracker.stats.deferred, unaccounted(tracker)) == (1, 1, 0, 0)


class PartsHang(Around):
    """The part of an event that fits a quota never gets an answer."""

    async def track_usage(self, *args: Any) -> TrackUsageResult:
        if str(args[3]).startswith("part-"):
            await anyio.sleep_forever()
        return await self.billing.track_usage(*args)


async def test_the_part_of_an_unwritten_event_is_not_written_either(billing: LocalBilling, tmp_path: Path) -> None:
    """An event its outbox could not write, refused for quota: the part that fits is sent from
    memory too. Written to the outbox, a cut-off during its delivery reported the event in doubt
    (it is not on disk), and the next start resent the part all the same: recorded, after all,
    for an event reported otherwise."""
    path = tmp_path / "outbox.db"
    reported: list[str] = []
    tracker = tracker_for(
        PartsHang(billing),
        flush_interval=0.01,
        drain_timeout=0.3,
        outbox=AddFailsOnce(path, max_events=100),
        on_rejected=lambda e, r: reported.append(r),
    )
    await run_tracker(tracker, [event("big", quantity=12)])  # 10 fit "small"'s api_calls
    assert (tracker.stats.in_doubt, tracker.stats.deferred, unaccounted(tracker)) == (1, 0, 0)
    assert reported == [f"shutdown deadline passed during its delivery ({IN_DOUBT}; outbox write failed)"]
    assert rows(path) == []  # nothing for the next start to resend


async def test_without_a_worker_nothing_waits_to_be_forgotten_from_the_outbox(
    billing: LocalBilling, tmp_path: Path
) -> None:
    tracker = tracker_for(billing, outbox=Outbox(tmp_path / "outbox.db", max_events=100))  # never started
    for i in range(20):
        await tracker.send(event(f"k{i}", feature="tokens"))
    assert tracker.stats.sent == 20 and tracker._confirmed == []


class Unreachable:
    async def track_usage(self, *args: Any, **kwargs: Any) -> TrackUsageResult:
        raise NetworkError("connection refused")


def rows(path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT idempotency_key, batch_key FROM outbox ORDER BY idempotency_key").fetchall()
    finally:
        db.close()


async def test_confirmed_events_leave_the_outbox(billing: LocalBilling, tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    tracker = tracker_for(billing, flush_interval=0.05, outbox=Outbox(path, max_events=100))
    await run_tracker(tracker, [event(f"k{i}", customer=f"c{i % 2}") for i in range(6)])
    assert (tracker.stats.sent, tracker.stats.deferred) == (6, 0)
    assert rows(path) == []


async def test_what_the_deadline_cuts_off_stays_on_disk_and_is_resent_once(
    billing: LocalBilling, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    # Run 1: upstream records every call but the answers are lost: fixed batches stay on disk.
    flaky = FlakyAfterForwarding(billing, failures=10**6)
    first = tracker_for(flaky, flush_interval=0.05, drain_timeout=0.5, outbox=Outbox(path, max_events=100))
    await run_tracker(first, [event(f"k{i}", customer=f"c{i % 2}") for i in range(6)])
    assert (first.stats.sent, first.stats.deferred, first.stats.dropped, unaccounted(first)) == (0, 6, 0, 0)
    left = rows(path)
    assert len(left) == 6 and all(batch_key is not None for _, batch_key in left)
    recorded = [await billing.recorded_units(f"c{i}", "api_calls") for i in (0, 1)]
    assert recorded == [3, 3]  # recorded upstream already, under the batches' keys

    # Run 2: the same batches go up under the same keys, so nothing counts twice.
    second = tracker_for(billing, flush_interval=0.05, outbox=Outbox(path, max_events=100))
    await run_tracker(second, [event("k-new")])
    assert (second.stats.replayed, second.stats.sent, unaccounted(second)) == (6, 7, 0)
    assert [await billing.recorded_units(f"c{i}", "api_calls") for i in (0, 1)] == [4, 3]
    assert rows(path) == []


async def test_events_never_attempted_are_replayed_too(billing: LocalBilling, tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    first = tracker_for(Unreachable(), flush_interval=10, drain_timeout=0.2, outbox=Outbox(path, max_events=100))
    async with anyio.create_task_group() as tg:
        await first.start(tg)
        for i in range(4):
            first.submit(event(f"k{i}", quantity=0.5))
        await anyio.sleep(0.2)  # written, still in the flush window
        assert first.outbox is not None and first.outbox.size == 4
        tg.cancel_scope.cancel()  # torn down without a drain (a real SIGKILL is in test_crash.py)
    assert first.outbox is not None
    first.outbox.close()
    second = tracker_for(billing, flush_interval=0.05, outbox=Outbox(path, max_events=100))
    await run_tracker(second, [])
    assert await billing.recorded_units("c0", "api_calls") == 2
    assert rows(path) == []


async def test_an_event_of_a_request_finishing_during_the_drain_joins_it(billing: LocalBilling, tmp_path: Path) -> None:
    """A request the server lets finish during the shutdown drain: its event is taken (written first),
    not sent from its task past the outbox: upstream down, it stays on disk with the rest, never in doubt."""
    path = tmp_path / "outbox.db"
    first = tracker_for(Unreachable(), flush_interval=0.05, drain_timeout=1.0, outbox=Outbox(path, max_events=100))
    async with anyio.create_task_group() as tg:
        await first.start(tg)
        for i in range(3):
            assert first.submit(event(f"k{i}"))
        await anyio.sleep(0.2)  # failing, retried
        tg.start_soon(first.stop)
        await anyio.sleep(0.1)
        assert first.add("c0", "api_calls", 1.0, "late")
    assert (first.stats.deferred, first.stats.in_doubt, unaccounted(first), len(rows(path))) == (4, 0, 0, 4)
    second = tracker_for(billing, flush_interval=0.05, outbox=Outbox(path, max_events=100))
    await run_tracker(second, [])
    assert await billing.recorded_units("c0", "api_calls") == 4 and rows(path) == []


async def test_a_drain_cancelled_from_outside_leaves_the_outbox_unlocked(billing: LocalBilling, tmp_path: Path) -> None:
    """A server that stops waiting for the lifespan cancels the drain: the events stay on disk and
    the file is released, so the next start (in this process too) replays them."""
    path = tmp_path / "outbox.db"
    first = tracker_for(Unreachable(), flush_interval=0.01, drain_timeout=30, outbox=Outbox(path, max_events=100))
    async with anyio.create_task_group() as tg:
        await first.start(tg)
        assert first.submit(event("k1"))
        with anyio.move_on_after(0.3) as server:
            await first.stop()
        assert server.cancel_called
    assert first.outbox is not None and not first.outbox.is_open
    assert first.stats.deferred == 1
    second = tracker_for(billing, flush_interval=0.05, outbox=Outbox(path, max_events=100))
    await run_tracker(second, [])
    assert await billing.recorded_units("c0", "api_calls") == 1 and rows(path) == []


async def test_a_full_outbox_drops_and_reports(billing: LocalBilling, tmp_path: Path) -> None:
    reasons: list[str] = []
    tracker = tracker_for(
        Unreachable(),
        flush_interval=10,
        drain_timeout=0.2,
        max_queue=3,
        on_rejected=lambda e, r: reasons.append(r),
        outbox=Outbox(tmp_path / "outbox.db", max_events=3),
    )
    await run_tracker(tracker, [event(f"k{i}") for i in range(5)])
    assert reasons == ["queue full", "queue full"]
    assert (tracker.stats.queued, tracker.stats.dropped, tracker.stats.deferred, unaccounted(tracker)) == (5, 2, 3, 0)


async def test_events_a_full_outbox_dropped_leave_the_backlog(tmp_path: Path) -> None:
    """Counted in the backlog, they would take room in the queue for good (dropping, "queue full",
    events that fit)."""
    tracker = tracker_for(
        Unreachable(), flush_interval=10, drain_timeout=0.2, outbox=Outbox(tmp_path / "o.db", max_events=3)
    )
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(5):
            assert tracker.submit(event(f"k{i}"))
        while tracker.stats.dropped < 2:  # noqa: ASYNC110 - written in the writer's thread
            await anyio.sleep(0.01)
        assert tracker.backlog == 3
        await tracker.stop()
    assert tracker.stats.reasons == {"dropped: outbox full": 2} and tracker.stats.deferred == 3


async def test_a_locked_outbox_fails_the_start(billing: LocalBilling, tmp_path: Path) -> None:
    holder = Outbox(tmp_path / "outbox.db", max_events=10)
    holder.open()
    tracker = tracker_for(billing, outbox=Outbox(tmp_path / "outbox.db", max_events=10))
    with pytest.RaisesGroup(pytest.RaisesExc(OutboxError, match="another process")):
        async with anyio.create_task_group() as tg:
            await tracker.start(tg)


async def test_a_replay_resends_the_part_that_fitted_not_the_whole_event(billing: LocalBilling, tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    await billing.track_usage("c0", "api_calls", 7)  # 3 of 10 left
    reports: list[tuple[str, float]] = []
    first = tracker_for(
        billing,
        flush_interval=0.05,
        on_rejected=lambda e, r: reports.append((e.idempotency_key, e.quantity)),
        outbox=RemoveFails(path, max_events=100),  # what is confirmed stays on disk, as after a crash
    )
    await run_tracker(first, [event("req-1", quantity=5)])
    assert reports == [("req-1", 2.0)] and await billing.recorded_units("c0", "api_calls") == 10
    second = tracker_for(
        billing,
        on_rejected=lambda e, r: reports.append((e.idempotency_key, e.quantity)),
        outbox=Outbox(path, max_events=100),
    )
    await run_tracker(second, [])
    assert await billing.recorded_units("c0", "api_calls") == 10  # the part went up again under its own key
    assert reports[1:] == [("req-1", 2.0)] and rows(path) == []


@pytest.mark.parametrize("checked", [True, False])
async def test_what_fitted_of_a_refused_batch_is_replayed_under_the_key_it_went_up_with(
    tmp_path: Path, checked: bool
) -> None:
    """What fitted of a refused batch went up as batches of their own (what is left known, or
    halved), stamped so: replayed once the customer upgraded, it is not recorded a second time under
    the refused batch's key; the two events refused then (and reported so) are reported again, never
    sent, though they would fit now."""
    plans = {**PLANS, "plans": {**PLANS["plans"], "big": {"features": {"api_calls": 100}}}}
    path = tmp_path / "outbox.db"
    async with LocalBilling.from_dict(plans, tmp_path / "billing.db") as billing:
        await billing.track_usage("c0", "api_calls", 7)  # 3 of 10 left
        backend = billing if checked else Unchecked(billing)
        # What is confirmed stays on disk, as after a crash.
        first = tracker_for(backend, flush_interval=0.05, outbox=RemoveFails(path, max_events=100))
        await run_tracker(first, [event(f"k{i}") for i in range(5)])
        assert (first.stats.sent, first.stats.rejected) == (3, 2)
        await billing.set_plan("c0", "big")
        second = tracker_for(backend, outbox=Outbox(path, max_events=100))
        await run_tracker(second, [])
        assert (second.stats.replayed, second.stats.sent, second.stats.rejected) == (5, 3, 2)
        assert await billing.recorded_units("c0", "api_calls") == 7 + 3 and rows(path) == []


async def test_an_event_reported_refused_before_a_crash_is_reported_again_never_sent(tmp_path: Path) -> None:
    """Refused for quota and reported so, its row left on disk (a crash before the writer deleted
    it): the next start reports it again, and sends nothing, though the customer upgraded since."""
    plans = {**PLANS, "plans": {**PLANS["plans"], "big": {"features": {"api_calls": 100}}}}
    path = tmp_path / "outbox.db"
    reports: list[tuple[str, str]] = []
    async with LocalBilling.from_dict(plans, tmp_path / "billing.db") as billing:
        await billing.track_usage("c0", "api_calls", 10)  # used up
        first = tracker_for(
            billing,
            flush_interval=0.05,
            outbox=RemoveFails(path, max_events=100),
            on_rejected=lambda e, r: reports.append((e.idempotency_key, r)),
        )
        await run_tracker(first, [event("req-1", quantity=5)])
        assert first.stats.rejected == 1 and len(rows(path)) == 1
        await billing.set_plan("c0", "big")
        second = tracker_for(
            billing,
            outbox=Outbox(path, max_events=100),
            on_rejected=lambda e, r: reports.append((e.idempotency_key, r)),
        )
        await run_tracker(second, [])
        assert (second.stats.replayed, second.stats.sent, second.stats.rejected, unaccounted(second)) == (1, 0, 1, 0)
        assert await billing.recorded_units("c0", "api_calls") == 10 and rows(path) == []
    assert reports == [("req-1", "quota_exceeded"), ("req-1", "quota_exceeded (refused before a restart)")]


async def test_an_event_marked_dead_lettered_is_reported_so_again(billing: LocalBilling, tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, max_events=10)
    outbox.open()
    outbox.add([event("old")])
    outbox.refuse([("c0", "old")], "dead_lettered: first attempted more than 24 h ago")
    outbox.close()
    tracker = tracker_for(billing, outbox=Outbox(path, max_events=10))
    await run_tracker(tracker, [])
    assert (tracker.stats.dead_lettered, tracker.stats.rejected, tracker.stats.sent, unaccounted(tracker)) == (
        1,
        0,
        0,
        0,
    )
    assert tracker.stats.reasons == {"dead_lettered: before a restart": 1} and rows(path) == []


class PartStuck(Around):
    """The track of a split's part hangs, before or after it is recorded."""

    def __init__(self, billing: LocalBilling, *, recorded: bool) -> None:
        super().__init__(billing)
        self.recorded = recorded

    async def track_usage(
        self, customer: str, feature: str, quantity: float, key: str | None = None, metadata: Any = None
    ) -> TrackUsageResult:
        if key is not None and key.startswith("part-"):
            if self.recorded:
                await self.billing.track_usage(customer, feature, quantity, key, metadata)
            await anyio.sleep_forever()
        return await self.billing.track_usage(customer, feature, quantity, key, metadata)


@pytest.mark.parametrize(("quantity", "part_recorded"), [(3, False), (12, True)])
async def test_a_replayed_split_accounts_for_every_unit(tmp_path: Path, quantity: float, part_recorded: bool) -> None:
    """Stopped while a split's part is in flight, the event's rest and the part both stay on disk; the
    replay may split the rest again (the customer upgraded meanwhile): under a key of its own."""
    plans = {**PLANS, "plans": {**PLANS["plans"], "bigger": {"features": {"api_calls": 15}}}}
    rejected: list[float] = []
    path = tmp_path / "outbox.db"
    async with LocalBilling.from_dict(plans, tmp_path / "billing.db") as billing:
        await billing.track_usage("c0", "api_calls", 9)  # 1 of 10 left

        def tracker(backend: Any) -> Any:
            return tracker_for(
                backend,
                flush_interval=0,
                drain_timeout=0.5,
                max_concurrency=1,
                outbox=Outbox(path, max_events=100),
                on_rejected=lambda e, r: rejected.append(e.quantity),
            )

        first = tracker(PartStuck(billing, recorded=part_recorded))
        async with anyio.create_task_group() as tg:
            await first.start(tg)
            first.submit(event("req-1:api_calls", quantity=quantity))
            await anyio.sleep(0.3)  # refused: 1 unit split off, its track hanging
            await first.stop()  # the drain deadline cuts it off: both rows stay
        assert len(rows(path)) == 2 and unaccounted(first) == 0
        await billing.set_plan("c0", "bigger")  # 6 of 15 left, or 5 if the part was recorded
        second = tracker(billing)
        await run_tracker(second, [])
        assert unaccounted(second) == 0
        recorded = await billing.recorded_units("c0", "api_calls") - 9
    assert recorded + sum(rejected) == quantity and recorded == min(quantity, 6) and rows(path) == []


class Gates(Around):
    """Holds c1's tracks (the drain lasts) and split parts (until told)."""

    def __init__(self, billing: LocalBilling) -> None:
        super().__init__(billing)
        self.drain = anyio.Event()
        self.part = anyio.Event()

    async def track_usage(
        self, customer: str, feature: str, quantity: float, key: str | None = None, metadata: Any = None
    ) -> TrackUsageResult:
        if customer == "c1":
            await self.drain.wait()
        if key is not None and key.startswith("part-"):
            await self.part.wait()
        return await self.billing.track_usage(customer, feature, quantity, key, metadata)


async def test_an_inline_split_during_the_drain_leaves_no_row_behind(billing: LocalBilling, tmp_path: Path) -> None:
    """An event sent from its request's task while the drain still runs (one finishing as the drain
    ends), never written to disk: its split must not be either (confirmed after the writer has gone,
    the row would stay for good)."""
    path = tmp_path / "outbox.db"
    await billing.track_usage("c0", "api_calls", 8)  # 2 of 10 left
    gates = Gates(billing)
    tracker = tracker_for(gates, flush_interval=0, outbox=Outbox(path, max_events=100))
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        tracker.submit(event("w", "c1"))
        await anyio.sleep(0.1)
        tg.start_soon(tracker.stop)
        await anyio.sleep(0.01)
        tg.start_soon(tracker.send, event("r", quantity=5))
        await anyio.sleep(0.3)  # refused (8 + 5 > 10): 2 fit
        gates.drain.set()  # the drain ends: the writer is gone, the outbox closed
        await anyio.sleep(0.2)
        gates.part.set()
    assert await billing.recorded_units("c0", "api_calls") == 10 and rows(path) == []


async def test_a_batch_first_attempted_a_day_ago_is_dead_lettered_at_the_restart_not_resent(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """Its key may be forgotten upstream by now: resent, it could count twice. Its first attempt
    is the one stamped on disk before the crash, not the time of its replay."""
    path = tmp_path / "outbox.db"
    left_by_a_crash = Outbox(path, max_events=10)
    left_by_a_crash.open()
    events = [event("k1"), event("k2")]
    left_by_a_crash.add(events)
    left_by_a_crash.fix(Batch.of(tuple(events)), time.time() - 25 * 3600)
    left_by_a_crash.close()
    reasons: list[str] = []
    tracker = tracker_for(
        billing, flush_interval=0, outbox=Outbox(path, max_events=10), on_rejected=lambda e, r: reasons.append(r)
    )
    await run_tracker(tracker, [])
    assert (tracker.stats.replayed, tracker.stats.dead_lettered, tracker.stats.sent) == (2, 2, 0)
    assert reasons == ["first attempted more than 24 h ago: not resent blindly"] * 2
    assert await billing.recorded_units("c0", "api_calls") == 0
    assert rows(path) == []


class RemoveHeld(Outbox):
    """Forgetting confirmed rows blocks until the test lets it go."""

    def __init__(self, path: Path, *, max_events: int) -> None:
        super().__init__(path, max_events=max_events)
        self.entered = threading.Event()
        self.release = threading.Event()

    def remove(self, events: Any) -> None:
        self.entered.set()
        self.release.wait(30)
        super().remove(events)

    async def release_once_cut_off(self, tracker: Tracker) -> None:
        """Let the forgetting go once the drain deadline has cut ``tracker``'s workers off."""
        while tracker._scope is None or not tracker._scope.cancel_called:  # noqa: ASYNC110 - no event to wait on
            await anyio.sleep(0.01)
        self.release.set()


@pytest.mark.parametrize(("room", "kept"), [(100, 2), (1, 1)])
async def test_events_the_writer_took_as_the_deadline_passed_stay_on_disk(
    billing: LocalBilling, tmp_path: Path, room: int, kept: int
) -> None:
    """Cut off while it forgot confirmed rows (a thread call, shielded), the writer took the events
    queued meanwhile for its next write and was cancelled before it: neither written nor reported.
    The deadline writes them; what no longer fits in the outbox is reported dropped."""
    path = tmp_path / "outbox.db"
    outbox = RemoveHeld(path, max_events=room)
    reported: list[str] = []
    tracker = tracker_for(
        billing, flush_interval=0, drain_timeout=0, outbox=outbox, on_rejected=lambda e, r: reported.append(r)
    )

    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        assert tracker.submit(event("k1"))
        await anyio.to_thread.run_sync(outbox.entered.wait, 30)  # k1 recorded, its row being forgotten
        assert tracker.submit(event("k2")) and tracker.submit(event("k3"))  # wait for the writer
        tg.start_soon(outbox.release_once_cut_off, tracker)
        await tracker.stop()
    assert (tracker.stats.sent, tracker.stats.deferred) == (1, kept)
    assert reported == ["shutdown deadline passed (not in the outbox)"] * (2 - kept)
    await run_tracker(tracker_for(billing, flush_interval=0, outbox=Outbox(path, max_events=100)), [])
    assert await billing.recorded_units("c0", "api_calls") == 1 + kept


class AfterAForget(Around):
    """c3's tracks wait until the outbox is forgetting rows."""

    def __init__(self, billing: LocalBilling, outbox: RemoveHeld) -> None:
        super().__init__(billing)
        self.outbox = outbox

    async def track_usage(self, customer: str, *args: Any) -> TrackUsageResult:
        if customer == "c3":
            await anyio.to_thread.run_sync(self.outbox.entered.wait, 30)
        return await self.billing.track_usage(customer, *args)


async def test_an_event_refused_as_the_deadline_passed_is_not_resent_at_the_next_start(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """Its row, to forget when the deadline cut the writer off, stayed: replayed, it was recorded
    once the customer subscribed, after being reported rejected."""
    path = tmp_path / "outbox.db"
    await billing.cancel_subscription("c3")
    outbox = RemoveHeld(path, max_events=100)
    reported: list[str] = []
    tracker = tracker_for(
        AfterAForget(billing, outbox),
        flush_interval=0,
        drain_timeout=0,
        outbox=outbox,
        on_rejected=lambda e, r: reported.append(r),
    )

    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        assert tracker.submit(event("k1")) and tracker.submit(event("k2", customer="c3"))
        while not reported:  # noqa: ASYNC110 - refused once k1's row is being forgotten
            await anyio.sleep(0.01)
        tg.start_soon(outbox.release_once_cut_off, tracker)
        await tracker.stop()
    assert reported == ["No active subscription with this feature"] and rows(path) == []
    await billing.set_plan("c3", "small")
    await run_tracker(tracker_for(billing, flush_interval=0, outbox=Outbox(path, max_events=100)), [])
    assert await billing.recorded_units("c3", "api_calls") == 0


async def test_events_kept_in_the_outbox_at_shutdown_no_longer_hold_their_units(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """Deferred at the drain deadline, their units stayed among the cache's pending units for good:
    replayed and recorded by the next lifespan of the same process, they were counted twice, and
    requests that fitted the quota were refused."""
    path = tmp_path / "outbox.db"
    gated = Gated(billing)  # shut for the first lifespan
    upstream = Upstream(gated)
    cache = EntitlementCache(upstream)
    quota = await cache.fetch("c0", "api_calls")
    assert [quota.admit(1) for _ in range(5)] == [0] * 5  # five requests' units (limit 10), one still running
    first = Tracker(upstream, cache, flush_interval=0, drain_timeout=0.3, outbox=Outbox(path, max_events=10))
    cache.count_pending("c0", "api_calls", 1)  # a request let through (billing unreachable), its unit held
    await run_tracker(first, [event(f"k{i}") for i in range(5)])
    assert first.stats.deferred == 5 and quota.local == 1  # the running request's unit, still held
    gated.gate.set()
    second = Tracker(upstream, cache, flush_interval=0, outbox=Outbox(path, max_events=10))
    await run_tracker(second, [])
    assert second.stats.sent == 5 and await billing.recorded_units("c0", "api_calls") == 5
    assert quota.admit(4) == 0  # 5 used and 1 running, of 10


async def test_events_replayed_at_start_are_pending_until_recorded(billing: LocalBilling, tmp_path: Path) -> None:
    """A restart with 6 units of quota 10 in the outbox: until they are recorded, the quota checked
    meanwhile has 4 left, not 10 (upstream would refuse what was let through on top)."""
    path = tmp_path / "outbox.db"
    first = tracker_for(Gated(billing), flush_interval=0, drain_timeout=0.2, outbox=Outbox(path, max_events=10))
    await run_tracker(first, [event("k1", quantity=2), event("k2", quantity=4)])  # never answered: kept
    assert first.stats.deferred == 2 and len(rows(path)) == 2
    gated = Gated(billing)
    upstream = Upstream(gated)
    cache = EntitlementCache(upstream)
    second = Tracker(upstream, cache, flush_interval=0, outbox=Outbox(path, max_events=10))
    async with anyio.create_task_group() as tg:
        await second.start(tg)
        quota = await cache.fetch("c0", "api_calls")  # the replayed batch still on its way
        assert (quota.usage, quota.local, quota.admit(5), quota.admit(4)) == (0, 6, 429, 0)
        quota.release(4)
        gated.gate.set()
        await second.stop()
    assert second.stats.sent == 2 and quota.local == 0 and await billing.recorded_units("c0", "api_calls") == 6


def delete_outbox(path: Path) -> None:
    for file in path.parent.glob(f"{path.name}*"):  # with its -wal file
        file.unlink()


async def test_events_left_to_an_outbox_file_deleted_meanwhile_are_reported_given_up(
    billing: LocalBilling, tmp_path: Path
) -> None:
    """SQLite goes on writing to a deleted file: the events were said to stay for the next start,
    which found a new, empty outbox."""
    path = tmp_path / "outbox.db"
    reported: list[str] = []
    tracker = tracker_for(
        Gated(billing),  # never answers: the drain deadline cuts everything off
        flush_interval=0,
        drain_timeout=0.3,
        outbox=Outbox(path, max_events=100),
        on_rejected=lambda e, r: reported.append(r),
    )
    async with anyio.create_task_group() as tg:
        await tracker.start(tg)
        for i in range(3):
            assert tracker.submit(event(f"k{i}", customer=f"c{i}"))
        while tracker.outbox is None or tracker.outbox.size < 3:  # noqa: ASYNC110 - written in the writer's thread
            await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(delete_outbox, path)  # a clean-up script, a redeploy
        await tracker.stop()
    # Each was in a call (possibly recorded upstream) when the deadline passed.
    assert (tracker.stats.deferred, tracker.stats.in_doubt, tracker.stats.dropped) == (0, 3, 0)
    assert reported == [f"shutdown deadline passed (the outbox file was deleted or replaced; {IN_DOUBT})"] * 3
