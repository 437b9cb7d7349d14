"""Our SQLite files (the billing database, the usage outbox) carry a mark, so that another
application's database, or one a newer billingos-asgi laid out, is never written to or misread."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection


def claim(db: sqlite3.Connection, application_id: int, layout: int, ours: Collection[str]) -> tuple[set[str], int, int]:
    """The file's tables, application id and layout, once it is known to be ours: call it before
    anything (WAL mode included) is written. A file from before the mark (``ours`` tables only, or
    none yet: a new file) is ours; SQLite's own tables (ANALYZE's ``sqlite_stat1``) are nobody's."""
    (found_id,) = db.execute("PRAGMA application_id").fetchone()
    rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!'")
    tables = {name for (name,) in rows}
    if found_id != application_id and (found_id or tables - set(ours)):
        what = f"tables: {', '.join(sorted(tables))}" if tables else f"application_id {found_id:#x}"
        raise sqlite3.DatabaseError(f"it is another application's database ({what})")
    (found_layout,) = db.execute("PRAGMA user_version").fetchone()
    if found_layout > layout:
        raise sqlite3.DatabaseError(
            f"its layout {found_layout} is from a newer billingos-asgi (this one reads {layout})"
        )
    return tables, found_id, found_layout
