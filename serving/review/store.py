"""The review gate's records: users, reviews, decisions, segment blocks and the audit log.

They live in the ledger's database (SQLite by default, PostgreSQL with NEXTBEST_DB_URL),
beside the exposures, so the service that serves offers also serves the review page and
applies its blocks. The audit log is append-only: this module has no way to change or
delete an entry.

Passwords are hashed with scrypt (``hashlib.scrypt``, n = 2^14, r = 8, p = 1, a random
16-byte salt) and compared in constant time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from serving.ledger import SqlLedger

__all__ = [
    "REJECT_REASONS",
    "ROLES",
    "AccessError",
    "ReviewStore",
    "Session",
    "Throttled",
    "csv_safe",
    "hash_password",
    "segment_blocks",
    "verify_password",
]

ROLES = ("reviewer", "approver")
Role = Literal["reviewer", "approver"]
REJECT_REASONS = ("irrelevant", "wrong_timing", "inappropriate", "explanation_wrong", "other")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}

_metadata = sa.MetaData()
users = sa.Table(
    "review_users",
    _metadata,
    sa.Column("username", sa.String(64), primary_key=True),
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)
audit = sa.Table(
    "review_audit",
    _metadata,
    sa.Column("entry", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(256), nullable=False),
    sa.Column("before", sa.Text),
    sa.Column("after", sa.Text),
)
sessions = sa.Table(
    "review_sessions",
    _metadata,
    # Only a hash of the cookie's token is stored: a copy of the database opens no session.
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(64), nullable=False),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("flash", sa.Text),
)
failures = sa.Table(
    "review_sign_in_failures",
    _metadata,
    # failed sign-ins per username in the current window (the lockout's counter)
    sa.Column("username", sa.String(64), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("window_start", sa.DateTime, nullable=False),
)
addresses = sa.Table(
    "review_sign_in_addresses",
    _metadata,
    # sign-in attempts per client address in the current window (the per-address limit)
    sa.Column("address", sa.String(64), primary_key=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("window_start", sa.DateTime, nullable=False),
    sa.Column("refusal_audited", sa.Boolean, nullable=False),
)
blocks = sa.Table(
    "review_blocks",
    _metadata,
    sa.Column("offer_id", sa.String(128), primary_key=True),
    sa.Column("segment", sa.String(128), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("blocked_by", sa.String(64), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
)


SESSION_HOURS = 8
LOCKOUT_FAILURES = 5
LOCKOUT_MINUTES = 15
T = TypeVar("T")
ADDRESS_ATTEMPTS = 20
ADDRESS_WINDOW_SECONDS = 60
AUDIT_COLUMNS = ("entry", "at", "actor", "action", "target", "before", "after")


class Throttled(PermissionError):
    """Too many sign-in attempts from one client address: try again in ``retry_after`` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many sign-in attempts from this address: try again in {retry_after} s"
        )
        self.retry_after = retry_after


class AccessError(PermissionError):
    """The user may not do this (unknown, wrong password, or missing role)."""


@dataclass(frozen=True)
class Session:
    """A signed-in user, as the review page sees them on each request."""

    token: str
    username: str
    role: str
    csrf: str

    @property
    def is_approver(self) -> bool:
        return self.role == "approver"


def csv_safe(value: Any) -> Any:
    """A cell a spreadsheet shows as text, never runs as a formula (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64) for ``password``."""
    if len(password) < 8:
        raise ValueError("a password needs at least 8 characters")
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    encode = base64.b64encode
    return "scrypt${n}${r}${p}${salt}${hash}".format(
        **_SCRYPT, salt=encode(salt).decode(), hash=encode(digest).decode()
    )


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(
        password.encode(), salt=base64.b64decode(salt), dklen=32, n=int(n), r=int(r), p=int(p)
    )
    return hmac.compare_digest(digest, base64.b64decode(expected))


@functools.cache
def _dummy_hash() -> str:
    return hash_password("not anybody's password", salt=b"nextbest-dummy-1")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ReviewStore:
    """Users, blocks and the audit log, in the ledger's database.

    Given the :class:`~serving.ledger.SqlLedger` (as the service does), every call runs
    under the ledger's guard: refused at once while the ledger is down or its SQLite file
    was deleted or replaced (nothing recreates an empty file), and cut at the ledger's
    client-side deadline on a database that stopped answering; the tables are made when
    the database answers (at once, or when it is back). Given a bare engine (the command
    line), calls are unguarded and the tables are made now."""

    def __init__(self, database: sa.Engine | SqlLedger) -> None:
        self.ledger = database if isinstance(database, SqlLedger) else None
        self.engine = database.engine if isinstance(database, SqlLedger) else database
        self.when_ready(_metadata.create_all)

    def when_ready(self, prepare: Callable[[sa.Engine], None]) -> None:
        """``prepare(engine)`` before the tables are used: now, or (the ledger down) when
        the database is back (:meth:`serving.ledger.SqlLedger.when_ready`)."""
        if self.ledger is None:
            prepare(self.engine)
        else:
            self.ledger.when_ready(prepare)

    def begin(self) -> AbstractContextManager[sa.Connection]:
        """A transaction on the ledger's database, under the ledger's guard."""
        if self.ledger is None:
            return self.engine.begin()
        return self.ledger.connection("review page", transaction=True)

    def connect(self) -> AbstractContextManager[sa.Connection]:
        """A connection to the ledger's database, under the ledger's guard."""
        if self.ledger is None:
            return self.engine.connect()
        return self.ledger.connection("review page")

    # -- audit ---------------------------------------------------------------------------
    def record_audit(
        self,
        connection: sa.Connection,
        actor: str,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
    ) -> None:
        """One row of the audit log, written in the caller's transaction (so the change it
        records and its record commit together, or neither does): who did what to which
        target, with the state before and after as JSON."""
        connection.execute(
            audit.insert().values(
                at=_now(),
                actor=actor,
                action=action,
                target=target,
                before=None if before is None else json.dumps(before, default=str, sort_keys=True),
                after=None if after is None else json.dumps(after, default=str, sort_keys=True),
            )
        )

    def audit_csv(self) -> str:
        """The audit log as CSV, every cell safe to open in a spreadsheet."""
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(AUDIT_COLUMNS)
        for entry in self.audit_log():
            writer.writerow([csv_safe(entry[c]) for c in AUDIT_COLUMNS])
        return buffer.getvalue()

    def audit_log(self) -> list[dict[str, Any]]:
        with self.connect() as connection:
            rows = connection.execute(audit.select().order_by(audit.c.entry)).mappings().all()
        return [dict(row) for row in rows]

    # -- users ---------------------------------------------------------------------------
    def add_user(self, username: str, password: str, role: str, *, actor: str = "cli") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not username or len(username) > 64:
            raise ValueError("a username has 1 to 64 characters")
        record = {"username": username, "role": role}
        try:
            with self.begin() as connection:
                connection.execute(
                    users.insert().values(
                        username=username,
                        password_hash=hash_password(password),
                        role=role,
                        created_at=_now(),
                    )
                )
                self.record_audit(connection, actor, "add_user", username, after=record)
        except IntegrityError:
            raise ValueError(f"user {username!r} already exists") from None

    def authenticate(self, username: str, password: str) -> str:
        """The user's role, or AccessError (the same message whatever was wrong)."""
        with self.connect() as connection:
            row = connection.execute(users.select().where(users.c.username == username)).first()
        # an unknown user costs the same scrypt as a known one: timing tells nothing
        stored = _dummy_hash() if row is None else row.password_hash
        if not verify_password(password, stored) or row is None:
            raise AccessError("unknown user or wrong password")
        return str(row.role)

    def usernames(self) -> list[str]:
        with self.connect() as connection:
            return list(
                connection.execute(sa.select(users.c.username).order_by("username")).scalars()
            )

    def role_of(self, username: str) -> str | None:
        with self.connect() as connection:
            return connection.execute(
                sa.select(users.c.role).where(users.c.username == username)
            ).scalar()

    def require(self, username: str, role: Role) -> None:
        have = self.role_of(username)
        if have is None or (role == "approver" and have != "approver"):
            raise AccessError(
                f"{username!r} is not an {role}" if have else f"unknown user {username!r}"
            )

    # -- sessions ------------------------------------------------------------------------
    def sign_in(self, username: str, password: str) -> Session:
        """A new session for the right password (audited), or AccessError (also audited).

        Each attempt is counted before the password is checked, in one transaction per
        username, so concurrent guesses cannot pass the limit: after LOCKOUT_FAILURES
        failures within LOCKOUT_MINUTES even the right password is refused until the
        window ends (``nextbest review unlock`` ends it early). Success resets the count.
        """
        username = username[:64]
        if not self._count_attempt(username):
            with self.begin() as connection:
                self.record_audit(connection, username or "-", "sign_in_locked", "review page")
            raise AccessError(
                f"too many failed sign-ins for this user: try again in {LOCKOUT_MINUTES} minutes"
            )
        try:
            role = self.authenticate(username, password)
        except AccessError:
            with self.begin() as connection:
                self.record_audit(connection, username or "-", "sign_in_failed", "review page")
            raise
        with self.begin() as connection:
            connection.execute(failures.delete().where(failures.c.username == username))
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.begin() as connection:
            connection.execute(sessions.delete().where(sessions.c.expires_at < _now()))
            connection.execute(
                sessions.insert().values(
                    token_hash=_token_hash(token),
                    username=username,
                    csrf=csrf,
                    expires_at=_now() + timedelta(hours=SESSION_HOURS),
                )
            )
            self.record_audit(connection, username, "sign_in", "review page")
        return Session(token=token, username=username, role=role, csrf=csrf)

    def _count_attempt(self, username: str) -> bool:
        """Count a sign-in attempt; False when the user is locked out (not counted)."""
        key = failures.c.username == username

        def count(connection: sa.Connection, row: Any) -> bool:
            if row.failures >= LOCKOUT_FAILURES:
                return False
            connection.execute(failures.update().where(key).values(failures=row.failures + 1))
            return True

        first = {"username": username, "failures": 1, "window_start": _now()}
        window = timedelta(minutes=LOCKOUT_MINUTES)
        return self._in_window(failures, key, first, window, count, fresh=True)

    def admit_address(self, address: str) -> None:
        """Count one sign-in attempt from a client address, before anything else is
        checked. Past ADDRESS_ATTEMPTS in ADDRESS_WINDOW_SECONDS raises :class:`Throttled`
        with the seconds until the window ends; the first refusal of a window is audited,
        the others are not (a flood writes one row, not one per attempt). A refused
        attempt never reaches the password or the user's lockout counter, so one address
        cannot lock a reviewer out faster than the limit lets it guess."""
        now, address = _now(), address[:64]
        window = timedelta(seconds=ADDRESS_WINDOW_SECONDS)
        key = addresses.c.address == address

        def count(connection: sa.Connection, row: Any) -> int | None:
            if row.attempts < ADDRESS_ATTEMPTS:
                connection.execute(addresses.update().where(key).values(attempts=row.attempts + 1))
                return None
            if not row.refusal_audited:
                connection.execute(addresses.update().where(key).values(refusal_audited=True))
                self.record_audit(connection, "-", "sign_in_throttled", f"address {address}")
            return max(1, math.ceil((row.window_start + window - now).total_seconds()))

        first = {"address": address, "attempts": 1, "window_start": now, "refusal_audited": False}
        retry_after = self._in_window(addresses, key, first, window, count, fresh=None)
        if retry_after is not None:
            raise Throttled(retry_after)

    def _in_window(
        self,
        table: sa.Table,
        key: Any,
        first: dict[str, Any],
        window: timedelta,
        count: Callable[[sa.Connection, Any], T],
        *,
        fresh: T,
    ) -> T:
        """One attempt on a per-window counter row, in one transaction: the window's first
        attempt (no row, or its window over) writes ``first`` and gives ``fresh``; else
        ``count`` decides on the row, locked, so concurrent attempts cannot pass a limit
        together. Rows of ended windows are deleted on the way."""
        now = first["window_start"]
        for _ in range(2):  # a concurrent first attempt may insert the row before us
            try:
                with self.begin() as connection:
                    # the no-op update takes the row (PostgreSQL) or write (SQLite) lock
                    touched = connection.execute(
                        table.update().where(key).values(window_start=table.c.window_start)
                    ).rowcount
                    if not touched:
                        connection.execute(
                            table.delete().where(table.c.window_start < now - window)
                        )
                        connection.execute(table.insert().values(**first))
                        return fresh
                    row = connection.execute(table.select().where(key)).one()
                    if row.window_start <= now - window:
                        connection.execute(table.update().where(key).values(**first))
                        return fresh
                    return count(connection, row)
            except IntegrityError:
                continue
        return fresh

    def unlock(self, username: str, *, actor: str = "cli") -> None:
        """End a user's lockout now (audited)."""
        with self.begin() as connection:
            connection.execute(failures.delete().where(failures.c.username == username))
            self.record_audit(connection, actor, "unlock", username)

    def session(self, token: str | None) -> Session | None:
        """The live session behind a cookie's token (the role as it is now), or None."""
        if not token:
            return None
        with self.connect() as connection:
            row = connection.execute(
                sa.select(sessions, users.c.role)
                .join(users, users.c.username == sessions.c.username)
                .where(sessions.c.token_hash == _token_hash(token))
            ).first()
        if row is None or row.expires_at < _now():
            return None
        return Session(token=token, username=row.username, role=row.role, csrf=row.csrf)

    def sign_out(self, session: Session) -> None:
        with self.begin() as connection:
            connection.execute(
                sessions.delete().where(sessions.c.token_hash == _token_hash(session.token))
            )
            self.record_audit(connection, session.username, "sign_out", "review page")

    def flash(self, session: Session, message: str) -> None:
        """A message for the session's next page (the page after a form's redirect)."""
        with self.begin() as connection:
            connection.execute(
                sessions.update()
                .where(sessions.c.token_hash == _token_hash(session.token))
                .values(flash=message)
            )

    def pop_flash(self, session: Session) -> str | None:
        key = sessions.c.token_hash == _token_hash(session.token)
        with self.begin() as connection:
            message = connection.execute(sa.select(sessions.c.flash).where(key)).scalar()
            if message is not None:
                connection.execute(sessions.update().where(key).values(flash=None))
        return message

    # -- blocks --------------------------------------------------------------------------
    def block(self, offer_id: str, segment: str, reason: str, *, actor: str) -> bool:
        """Block an offer for a segment: it becomes an eligibility rule for serving.
        False when that block was already in force (nothing changes)."""
        self.require(actor, "reviewer")
        record = {"offer_id": offer_id, "segment": segment, "reason": reason}
        try:
            with self.begin() as connection:
                existing = connection.execute(
                    blocks.select().where(
                        (blocks.c.offer_id == offer_id) & (blocks.c.segment == segment)
                    )
                ).first()
                if existing is not None:
                    return False
                connection.execute(
                    blocks.insert().values(
                        offer_id=offer_id,
                        segment=segment,
                        reason=reason,
                        blocked_by=actor,
                        at=_now(),
                    )
                )
                self.record_audit(connection, actor, "block", f"{offer_id}@{segment}", after=record)
        except IntegrityError:  # the same block, added at the same moment by someone else
            return False
        return True

    def unblock(self, offer_id: str, segment: str, *, actor: str) -> None:
        """Lift a block (the audit log keeps what it was)."""
        self.require(actor, "reviewer")
        key = (blocks.c.offer_id == offer_id) & (blocks.c.segment == segment)
        with self.begin() as connection:
            existing = connection.execute(blocks.select().where(key)).mappings().first()
            if existing is None:
                return
            connection.execute(blocks.delete().where(key))
            self.record_audit(
                connection,
                actor,
                "unblock",
                f"{offer_id}@{segment}",
                before={k: existing[k] for k in ("offer_id", "segment", "reason", "blocked_by")},
            )

    def blocks(self) -> list[dict[str, Any]]:
        with self.connect() as connection:
            rows = connection.execute(blocks.select().order_by(blocks.c.at)).mappings().all()
        return [dict(row) for row in rows]


def segment_blocks(store: ReviewStore) -> list[Any]:
    """The reviewers' blocks as eligibility rules (``blocked_for_segment``)."""
    from policy.rules import SegmentBlock

    return [
        SegmentBlock(
            offer=b["offer_id"], segment=b["segment"], reason=b["reason"], by=b["blocked_by"]
        )
        for b in store.blocks()
    ]
