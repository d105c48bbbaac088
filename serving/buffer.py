"""The ledger's local buffer: slates and feedback that could not reach the database.

While the ledger's database is down, slow or gone, what the service served and what the
storefront reported is kept here, in a SQLite file of its own (stdlib ``sqlite3``, WAL,
``synchronous=FULL``: every accepted row is fsynced before the caller hears "buffered"),
so it survives a restart of the process. :meth:`serving.ledger.SqlLedger.flush` writes it
to the database when the database is back, oldest first, and removes each row only once
it is in the database; the database's own keys (a slate's request id, feedback's
(request, offer, outcome)) make a row written twice (a crash between the two steps) a
no-op, so nothing is lost and nothing is duplicated.

Bounded: at most ``max_rows`` rows (default :data:`MAX_ROWS`). When it is full, a new
slate or feedback is refused, counted (``refused_slates``, ``refused_feedback``: the
counts are kept in the file too) and logged; the database's rows are never affected.
The same key buffered twice is one row (a repeated feedback is a duplicate here too).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["MAX_ROWS", "BufferFull", "LedgerBuffer"]

log = logging.getLogger("nextbest.serving")

MAX_ROWS = 100_000
"""Default bound on buffered rows: at the measured 40-50 requests/s, about half an hour of
slates and feedback of one worker (a few hundred bytes each: tens of MB on disk)."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pending ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " kind TEXT NOT NULL,"  # 'slate' or 'feedback'
    " key TEXT NOT NULL UNIQUE,"
    " request_id TEXT NOT NULL,"
    " body TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS pending_request ON pending (request_id)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL)",
)


class BufferFull(RuntimeError):
    """The buffer holds its maximum: nothing more is accepted until it is flushed."""


class LedgerBuffer:
    """Pending ledger rows in a SQLite file at ``path`` (made on first use)."""

    def __init__(self, path: Path, max_rows: int = MAX_ROWS) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._connection is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=5
                )
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")  # fsync at every commit
                for statement in _SCHEMA:
                    connection.execute(statement)
                self._connection = connection
            yield self._connection

    def exists(self) -> bool:
        """Whether a buffer file is there (one left by an earlier process, perhaps)."""
        return self._connection is not None or self.path.exists()

    def __len__(self) -> int:
        if not self.exists():
            return 0
        with self._db() as db:
            return int(db.execute("SELECT count(*) FROM pending").fetchone()[0])

    def _add(self, kind: str, key: str, request_id: str, body: dict[str, Any]) -> bool:
        """True if added, False if the key is already buffered; BufferFull when full."""
        with self._db() as db:
            if db.execute("SELECT 1 FROM pending WHERE key = ?", (key,)).fetchone():
                return False
            (held,) = db.execute("SELECT count(*) FROM pending").fetchone()
            if held >= self.max_rows:
                _increment(db, f"refused_{'slates' if kind == 'slate' else 'feedback'}")
                raise BufferFull(
                    f"the ledger buffer {self.path} holds its maximum of {self.max_rows} rows"
                )
            try:
                db.execute(
                    "INSERT INTO pending (kind, key, request_id, body) VALUES (?, ?, ?, ?)",
                    (kind, key, request_id, json.dumps(body, allow_nan=False)),
                )
            except sqlite3.IntegrityError:  # another process buffered the same key meanwhile
                return False
            return True

    def add_slate(self, slate: dict[str, Any]) -> bool:
        """Buffer a slate (the keyword arguments of ``SqlLedger.log_slate``, offers as
        dicts); False if it was already buffered."""
        request = str(slate["request_id"])
        return self._add("slate", f"slate:{request}", request, slate)

    def add_feedback(self, outcome: dict[str, Any]) -> bool:
        """Buffer feedback (``request_id``, ``offer_id``, ``outcome``, ``value``, ``at_s``);
        False if this (request, offer, outcome) is already buffered."""
        key = f"feedback:{outcome['request_id']}:{outcome['offer_id']}:{outcome['outcome']}"
        return self._add("feedback", key, str(outcome["request_id"]), outcome)

    def slate(self, request_id: str) -> dict[str, Any] | None:
        """The buffered slate of a request, if it is buffered."""
        if not self.exists():
            return None
        with self._db() as db:
            row = db.execute(
                "SELECT body FROM pending WHERE kind = 'slate' AND request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def oldest(self, n: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Up to ``n`` rows, oldest first: (sequence number, kind, body)."""
        if not self.exists():
            return []
        with self._db() as db:
            rows = db.execute(
                "SELECT seq, kind, body FROM pending ORDER BY seq LIMIT ?", (n,)
            ).fetchall()
        return [(int(seq), str(kind), dict(json.loads(body))) for seq, kind, body in rows]

    def remove(self, seq: int, counter: str | None = None) -> None:
        """Forget a row (it is in the database now, or was refused there), counting why."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM pending WHERE seq = ?", (seq,))
            if counter:
                _increment(db, counter)
            db.execute("COMMIT")

    def counters(self) -> dict[str, int]:
        """What the buffer refused when full, and what flushing wrote, found already there
        or rejected (kept in the file, so they survive a restart)."""
        if not self.exists():
            return {}
        with self._db() as db:
            return {str(k): int(n) for k, n in db.execute("SELECT name, n FROM counters")}

    def erase_customer(self, customer_id: str) -> tuple[int, int]:
        """Item 7 (privacy): forget one customer's buffered slates and the feedback on
        them; (slates, feedback) removed. The file is vacuumed after (WAL checkpointed),
        so the rows do not linger in its free pages."""
        if not self.exists():
            return 0, 0
        with self._db() as db:
            requests = [
                str(request)
                for request, body in db.execute(
                    "SELECT request_id, body FROM pending WHERE kind = 'slate'"
                )
                if json.loads(body).get("customer_id") == customer_id
            ]
            db.execute("BEGIN IMMEDIATE")
            slates = feedback = 0
            for request in requests:
                slates += db.execute(
                    "DELETE FROM pending WHERE kind = 'slate' AND request_id = ?", (request,)
                ).rowcount
                feedback += db.execute(
                    "DELETE FROM pending WHERE kind = 'feedback' AND request_id = ?", (request,)
                ).rowcount
            db.execute("COMMIT")
            if slates or feedback:
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return slates, feedback

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _increment(db: sqlite3.Connection, name: str) -> None:
    db.execute(
        "INSERT INTO counters (name, n) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET n = n + 1",
        (name,),
    )
