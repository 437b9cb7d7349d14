"""Fixtures for a billing database another process has locked."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from billingos_asgi.local import store


@pytest.fixture
def busy_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """A short wait for locks, so that a test of a locked database takes a fraction of a second."""
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.3)
    return store.BUSY_TIMEOUT


@contextlib.contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """A write transaction held open on ``database``, as a backup, a migration or an open sqlite3 shell holds one."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
