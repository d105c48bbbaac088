"""A client-side deadline on PostgreSQL calls.

PostgreSQL's ``statement_timeout`` is enforced by the server: a server that has stopped
answering (hung, frozen, a network path that swallows packets) never sends it, and
psycopg waits on the socket for ever. :class:`Deadlines` watches every call in flight:
when one overruns, it shuts the connection's socket down, so the waiting call fails at
once with a disconnect error (and SQLAlchemy discards the connection). A shut-down socket
is one connection lost; a held request is a storefront page lost.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Deadlines"]

log = logging.getLogger("nextbest.serving")


@dataclass
class _Call:
    deadline: float
    sockets: set[int] = field(default_factory=set)
    overrun: bool = False


class Deadlines:
    """Calls in flight, each with its deadline and the sockets of the connections it has
    checked out (:meth:`attach`, from the pool's checkout event)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._by_id: dict[int, _Call] = {}
        self._local = threading.local()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def call(self) -> Iterator[_Call]:
        """Bound what runs inside: its connections are cut at the deadline (``overrun``
        says whether they were)."""
        outer = getattr(self._local, "call", None)
        if outer is not None:  # nested: the outer bound holds
            yield outer
            return
        record = _Call(time.monotonic() + self.seconds)
        with self._changed:
            self._by_id[id(record)] = record
            self._local.call = record
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._watch, daemon=True, name="nextbest-ledger-deadline"
                )
                self._thread.start()
            self._changed.notify()
        try:
            yield record
        finally:
            with self._changed:
                self._by_id.pop(id(record), None)
                self._local.call = None

    def attach(self, dbapi_connection: Any) -> None:
        """The current call checked this connection out (a pool 'checkout' event)."""
        record = getattr(self._local, "call", None)
        fd = _socket_of(dbapi_connection)
        if record is None or fd is None:
            return
        with self._changed:
            if record.overrun:  # cut before it even started: fail it now
                _shut(fd)
            record.sockets.add(fd)

    def detach(self, dbapi_connection: Any) -> None:
        """The connection went back to the pool or was closed: never cut it later."""
        fd = _socket_of(dbapi_connection)
        if fd is None:
            return
        with self._changed:
            for record in self._by_id.values():
                record.sockets.discard(fd)

    def _watch(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                pending = [r for r in self._by_id.values() if not r.overrun]
                for record in pending:
                    if record.deadline <= now:
                        record.overrun = True
                        for fd in record.sockets:
                            _shut(fd)
                        if record.sockets:
                            log.warning(
                                "a ledger call ran past its %.1f s deadline: connection cut",
                                self.seconds,
                            )
                waiting = [r.deadline for r in pending if r.deadline > now]
                self._changed.wait(timeout=(min(waiting) - now) if waiting else 5.0)


def _socket_of(dbapi_connection: Any) -> int | None:
    pgconn = getattr(dbapi_connection, "pgconn", None)  # psycopg 3
    try:
        return None if pgconn is None else int(pgconn.socket)
    except Exception:  # a closed connection has no socket
        return None


def _shut(fd: int) -> None:
    """Shut the socket down (not close: the fd stays the connection's own), so a read
    blocked on it returns at once."""
    try:
        duplicate = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()
