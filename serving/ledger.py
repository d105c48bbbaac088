"""The exposure ledger: every served slate and every outcome, in a SQL database.

SQLite (with WAL) is the embedded default; ``NEXTBEST_DB_URL`` points it at PostgreSQL
(``postgresql+psycopg://user:pass@host/db``). Frequency caps, cooldowns and sequencing
read it at request time, so they hold across channels and across workers.

Caps count what customers received (see ``policy.rules.Cap``): sends (a slate with at
least one offer), offers served, or 'viewed' feedback; a holdout's ghost slate (shown to
nobody) never counts, a rules-only holdout's slate (shown) does, and neither do the
offer-level holdout's ghosts (``ghost_offers``: the offers a slate withheld, at the rank
each would have had). Each served offer carries its propensity (the probability its
slate's exploration drew it at its rank; NULL for a deterministic slate). When a
slate is logged with its hard caps, they are counted again inside the same transaction,
with the customer locked, so concurrent requests cannot overrun a cap together.

Times are integer seconds on the service's clock (the moment each request was served).
What the live ledger holds has already happened, so its reads include the current second
(a fixed clock serves many requests in the same second); the workspace's history stays
strictly before the moment.

Degrade, never fail. Every database call is bounded (:data:`CONNECT_TIMEOUT_S`,
:data:`STATEMENT_TIMEOUT_MS`, :data:`CALL_DEADLINE_S`, :data:`POOL_TIMEOUT_S`,
:data:`SQLITE_BUSY_TIMEOUT_MS`). The first call that fails (or a SQLite file that was
deleted or replaced under the service) marks the ledger down: from then on no call
touches the database (each raises :class:`LedgerUnavailable` at once), a background
thread probes it every :data:`RETRY_AFTER_S`, and slates and feedback go to a local,
durable, bounded buffer (:class:`serving.buffer.LedgerBuffer`) that the same thread
writes to the database, oldest first and exactly once, when it is back. Until the buffer
is empty the database lacks what was served meanwhile, so the ledger stays unavailable
(``behind``): caps are never read from it, and new slates and feedback join the buffer
behind the older rows. Readers
(:class:`CombinedLedger`) fall back to the workspace's history and say so
(``degraded``); a slate under a hard cap that cannot be admitted atomically is logged
empty: it fails closed. A ledger made while its database is down starts down: what must
exist before it is used (its tables, the review page's: :meth:`SqlLedger.when_ready`) is
made by the same thread when the database answers, before the buffer is flushed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from features import Snapshot
from features.contract import CHANNELS, OUTCOMES
from features.snapshot import ACCEPTED_OUTCOMES
from policy import SnapshotLedger
from policy.eligibility import Limit, Unit
from serving.buffer import MAX_ROWS, BufferFull, LedgerBuffer
from serving.deadline import Deadlines

__all__ = [
    "BufferFull",
    "CombinedLedger",
    "FeedbackReceipt",
    "LedgerUnavailable",
    "Logged",
    "ServedOffer",
    "SqlLedger",
    "engine_url",
    "erasures",
    "ghost_offers",
    "offer_kills",
]

log = logging.getLogger("nextbest.serving")
_T = TypeVar("_T")

# The bounds on one database call. The storefront gives a page a few hundred ms; only the
# call that finds the database gone pays one of these, every later one is refused at once.
CONNECT_TIMEOUT_S = 2
"""PostgreSQL connect timeout (libpq's minimum: it reads 1 as 2)."""
STATEMENT_TIMEOUT_MS = 500
"""PostgreSQL ``statement_timeout`` (and ``lock_timeout``): the server cancels a slow call."""
CALL_DEADLINE_S = 1.0
"""Client-side bound on a PostgreSQL call in flight (:mod:`serving.deadline`), for a
server that stopped answering and so never cancels anything itself."""
POOL_TIMEOUT_S = 1.0
"""Waiting for a free pooled connection (SQLAlchemy's default is 30 s)."""
SQLITE_BUSY_TIMEOUT_MS = 1000
"""Waiting for another SQLite writer's lock."""
RETRY_AFTER_S = 1.0
"""Once down, the database is left alone this long between probes (a circuit breaker)."""

_metadata = sa.MetaData()
slates = sa.Table(
    "slates",
    _metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("customer_id", sa.String(128), nullable=False, index=True),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("placement", sa.String(32), nullable=False),
    sa.Column("model_version", sa.String(32)),
    sa.Column("mode", sa.String(32), nullable=False),
    sa.Column("holdout", sa.Boolean, nullable=False),
    sa.Column("at_s", sa.BigInteger, nullable=False, index=True),
)


def engine_url(url: str) -> str:
    """A ledger URL as it is opened: PostgreSQL named without a driver (``postgresql://``,
    or the ``postgres://`` many hosting services hand out, which SQLAlchemy does not know)
    is opened with psycopg 3, the driver installed and the one the client-side deadline
    watches (:mod:`serving.deadline`), whatever SQLAlchemy's own default driver (psycopg2
    before 2.1). Any other URL is returned as given."""
    parsed = sa.make_url(url)
    if parsed.drivername not in ("postgresql", "postgres"):
        return url
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def _offer_columns() -> list[sa.Column[Any]]:
    """What a slate's offer carries: its request, offer, rank, score and probability."""
    return [
        sa.Column(
            "request_id", sa.String(64), sa.ForeignKey("slates.request_id"), primary_key=True
        ),
        sa.Column("offer_id", sa.String(128), primary_key=True),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("score", sa.Float),
        sa.Column("probability", sa.Float),
    ]


slate_offers = sa.Table(
    "slate_offers",
    _metadata,
    *_offer_columns(),
    # the probability the offer was drawn at its rank; NULL: a deterministic slate
    sa.Column("propensity", sa.Float),
    # the probability the draw put the offer in the slate at any rank (what per-offer
    # off-policy estimators weigh by); NULL likewise
    sa.Column("inclusion", sa.Float),
)
ghost_offers = sa.Table(
    "ghost_offers",
    _metadata,
    *_offer_columns(),
    sa.Column("reason", sa.String(32), nullable=False),
)
"""Offers a request would have served and withheld (the offer-level holdout: reason
``offer_holdout``), at the rank each would have had: shown to nobody, never counted by a
cap, never given feedback (a table apart from ``slate_offers``, which caps read)."""
feedback = sa.Table(
    "feedback",
    _metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("offer_id", sa.String(128), primary_key=True),
    sa.Column("outcome", sa.String(16), primary_key=True),
    sa.Column("customer_id", sa.String(128), nullable=False, index=True),
    sa.Column("value", sa.Float),
    sa.Column("at_s", sa.BigInteger, nullable=False),
)

offer_kills = sa.Table(
    "offer_kills",
    _metadata,
    sa.Column("kill_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("offer_id", sa.String(128), nullable=False),
    sa.Column("killed_at", sa.DateTime, nullable=False),
    sa.Column("killed_by", sa.String(64), nullable=False),
    sa.Column("rule", sa.String(256), nullable=False),
    # the start of the last failing cycle: a later kill of the same offer needs later cycles
    sa.Column("last_cycle", sa.DateTime, nullable=False),
    sa.Column("figures", sa.JSON, nullable=False),
    sa.Column("learning", sa.JSON, nullable=False),
    sa.Column("revived_at", sa.DateTime),
    sa.Column("revived_by", sa.String(64)),
    sa.Column("revive_reason", sa.Text),
)
"""The stop-loss's kills (:mod:`measurement.stoploss`): an offer with a kill not revived
is excluded by eligibility (reason ``stop_loss``) from the next request on. At most one
kill per offer is active (a unique index), so two runs at once store one."""
sa.Index(
    "offer_kills_one_active",
    offer_kills.c.offer_id,
    unique=True,
    sqlite_where=offer_kills.c.revived_at.is_(None),
    postgresql_where=offer_kills.c.revived_at.is_(None),
)

_STOPPED = sa.select(offer_kills.c.offer_id).where(offer_kills.c.revived_at.is_(None))

erasures = sa.Table(
    "erasures",
    _metadata,
    sa.Column("erasure_id", sa.String(64), primary_key=True),
    sa.Column("erased_at", sa.DateTime, nullable=False),
    sa.Column("removed", sa.Text, nullable=False),  # JSON: rows removed per table
    # HMAC-SHA256 of the customer's id under a secret kept apart (NULL without one): a
    # re-import can be told, the id cannot be found from the table alone
    sa.Column("keyed_hash", sa.String(64), index=True),
)
"""Item 7 (privacy): each erasure (``nextbest customer erase``), without the erased data:
no id, no attribute; what was removed, counted per table."""

_OFFER_LISTS = ("offers", "ghosts")  # a logged slate's lists of offers, not its columns

GHOST_MODE = "holdout_nothing"
"""A holdout slate whose control is "nothing": logged as what would have been served, and
shown to nobody. Every other slate was delivered (a rules-only holdout's slate too)."""
_DELIVERED = sa.or_(slates.c.holdout.is_(False), slates.c.mode != GHOST_MODE)

_CUSTOMERS: sa.BindParameter[Any] = sa.bindparam("customers", expanding=True)
_START: sa.BindParameter[int] = sa.bindparam("start")
_END: sa.BindParameter[int] = sa.bindparam("end")

_LAST_BY_KIND = (
    sa.select(
        feedback.c.customer_id,
        feedback.c.offer_id,
        feedback.c.outcome,
        sa.func.max(feedback.c.at_s),
    )
    .where(
        feedback.c.customer_id.in_(_CUSTOMERS),
        feedback.c.at_s <= sa.bindparam("before"),
    )
    .group_by(feedback.c.customer_id, feedback.c.offer_id, feedback.c.outcome)
)


_SHOWN = (
    sa.select(slates.c.customer_id, slate_offers.c.offer_id)
    .select_from(slates.join(slate_offers))
    .where(
        slates.c.customer_id.in_(_CUSTOMERS), _DELIVERED, slates.c.at_s <= sa.bindparam("before")
    )
    .distinct()
)


_SERVED_TO = (
    sa.select(slates.c.customer_id)
    .select_from(slates.join(slate_offers))
    .where(
        slates.c.request_id == sa.bindparam("request_id"),
        slate_offers.c.offer_id == sa.bindparam("offer_id"),
    )
)
_INSERT_FEEDBACK = feedback.insert()
_INSERT_SLATES = slates.insert()
_INSERT_SLATE_OFFERS = slate_offers.insert()
_INSERT_GHOSTS = ghost_offers.insert()


# The caps' reads, built once (bound: customers, start, end, and channels or offers): a
# statement built for each call cost more than the database's own work on it (0.23 of
# 0.31 ms, the per-offer counts on a demo ledger), and every request makes them
@functools.cache
def _count_query(unit: str) -> sa.Select[Any]:
    """customer → sends, offers served or 'viewed' outcomes in [start, end] on the
    channels (ghost and empty slates never count)."""
    window = (
        slates.c.customer_id.in_(_CUSTOMERS),
        _DELIVERED,
        slates.c.channel.in_(sa.bindparam("channels", expanding=True)),
    )
    if unit == "sends":
        carried = sa.exists().where(slate_offers.c.request_id == slates.c.request_id)
        query = sa.select(slates.c.customer_id, sa.func.count()).where(
            *window, slates.c.at_s >= _START, slates.c.at_s <= _END, carried
        )
    elif unit == "served":
        query = (
            sa.select(slates.c.customer_id, sa.func.count())
            .select_from(slates.join(slate_offers))
            .where(*window, slates.c.at_s >= _START, slates.c.at_s <= _END)
        )
    elif unit == "viewed":
        query = (
            sa.select(slates.c.customer_id, sa.func.count())
            .select_from(slates.join(feedback, feedback.c.request_id == slates.c.request_id))
            .where(
                *window,
                feedback.c.outcome == "viewed",
                feedback.c.at_s >= _START,
                feedback.c.at_s <= _END,
            )
        )
    else:
        raise ValueError(f"unknown cap unit {unit!r}")
    return query.group_by(slates.c.customer_id)


@functools.cache
def _offer_count_query(unit: str, by_offer: bool) -> sa.Select[Any]:
    """(customer, offer) → times served (or viewed) in [start, end]; for the bound
    offers only if ``by_offer``."""
    base = slates.join(slate_offers)
    if unit == "viewed":
        base = base.join(
            feedback,
            (feedback.c.request_id == slate_offers.c.request_id)
            & (feedback.c.offer_id == slate_offers.c.offer_id)
            & (feedback.c.outcome == "viewed"),
        )
        at = feedback.c.at_s
    elif unit == "served":
        at = slates.c.at_s
    else:
        raise ValueError(f"unknown per-offer cap unit {unit!r}")
    query = (
        sa.select(slates.c.customer_id, slate_offers.c.offer_id, sa.func.count())
        .select_from(base)
        .where(_DELIVERED, at >= _START, at <= _END, slates.c.customer_id.in_(_CUSTOMERS))
    )
    if by_offer:
        query = query.where(slate_offers.c.offer_id.in_(sa.bindparam("offers", expanding=True)))
    return query.group_by(slates.c.customer_id, slate_offers.c.offer_id)


@dataclass(frozen=True)
class ServedOffer:
    """One offer of a logged slate. ``propensity``: the probability that the slate's
    exploration drew it at its rank, given the ranks before it (the slate's probability
    is the product over its ranks: :mod:`policy.exploration`); None for a deterministic
    slate. None rather than 1.0: a deterministic policy never risked showing anything
    else, so its rows support no off-policy estimate, and a 1.0 would read as a real
    probability (``training.offpolicy`` refuses such rows)."""

    offer_id: str
    rank: int
    score: float | None
    probability: float | None
    propensity: float | None = None
    inclusion: float | None = None
    """The probability that the slate's draw included the offer at any rank
    (:func:`policy.exploration.inclusion_probabilities`); None for a deterministic slate."""


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _widen_mode(engine: sa.Engine) -> None:
    """Ledgers made before a rules-only holdout's mode ("holdout_rules_only", 18
    characters) fitted: widen the column (PostgreSQL checks lengths; SQLite does not)."""
    if engine.dialect.name != "postgresql":
        return
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns("slates")}
    length = getattr(columns["mode"]["type"], "length", None)
    if length is not None and length < 32:
        with engine.begin() as connection:
            connection.execute(sa.text("ALTER TABLE slates ALTER COLUMN mode TYPE VARCHAR(32)"))


def _nullable_propensity(engine: sa.Engine) -> None:
    """Ledgers made before exploration held ``slate_offers.propensity`` NOT NULL, with
    1.0 for every (deterministic) slate: drop the constraint, and say what those rows were
    (no slate was drawn before then) with NULL. PostgreSQL alters the column; SQLite
    cannot, so the table is rebuilt in one transaction. Done once: afterwards the column
    is nullable."""
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns("slate_offers")}
    if columns["propensity"]["nullable"]:
        return
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                sa.text("ALTER TABLE slate_offers ALTER COLUMN propensity DROP NOT NULL")
            )
        else:
            connection.execute(sa.text("ALTER TABLE slate_offers RENAME TO slate_offers_old"))
            slate_offers.create(connection)
            names = [c.name for c in slate_offers.columns if c.name in columns]
            previous = sa.table("slate_offers_old", *(sa.column(n) for n in names))
            connection.execute(slate_offers.insert().from_select(names, sa.select(*previous.c)))
            connection.execute(sa.text("DROP TABLE slate_offers_old"))
        connection.execute(slate_offers.update().values(propensity=None))


def _inclusion_column(engine: sa.Engine) -> None:
    """Ledgers made before inclusion probabilities were logged lack
    ``slate_offers.inclusion``: add it, NULL for their rows (a per-rank propensity does not
    give it back). Done once: afterwards the column is there."""
    columns = {c["name"] for c in sa.inspect(engine).get_columns("slate_offers")}
    if "inclusion" in columns:
        return
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE slate_offers ADD COLUMN inclusion FLOAT"))


class LedgerUnavailable(RuntimeError):
    """The ledger's database cannot be used now (down, too slow, or its file gone)."""


_BEHIND = "catching up: the rows buffered while its database was down are being written"


class _Stale(Exception):
    """A pooled connection turned out dead (the database restarted since it was pooled)."""


class Logged(dict[str, list[str]]):
    """request id → the offers logged; ``buffered`` if they went to the local buffer."""

    buffered: bool = False


@dataclass(frozen=True)
class FeedbackReceipt:
    """``recorded``: new (False: this outcome was already recorded or buffered);
    ``buffered``: held locally until the database is back."""

    recorded: bool
    buffered: bool = False


def _is_outage(error: sa.exc.SQLAlchemyError) -> bool:
    """A database that cannot be reached or answered in time, as opposed to a statement
    the database refused (bad data must not mark the ledger down for everyone)."""
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError)


def _file_identity(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


class SqlLedger:
    """The ledger tables in any SQLAlchemy database, bounded and buffered (see the
    module's docstring). ``buffer_path`` defaults to ``<ledger file>.buffer`` beside a
    SQLite ledger, else ``$NEXTBEST_HOME/ledger-buffer-<hash of the url>.db``.
    ``read_only`` (a what-if replay): nothing is made (the tables must be there), and
    logging a slate or an outcome is refused (``PermissionError``)."""

    def __init__(
        self,
        url: str,
        *,
        buffer_path: Path | None = None,
        buffer_max_rows: int = MAX_ROWS,
        retry_after_s: float = RETRY_AFTER_S,
        read_only: bool = False,
    ) -> None:
        # the buffer's name comes from the URL as given, as before engine_url: a buffer left
        # by an earlier process under a driverless URL is found and flushed
        self._given_url = sa.make_url(url)
        url = engine_url(url)
        self.url = url
        self.read_only = read_only
        self.retry_after_s = retry_after_s
        options: dict[str, Any] = {"future": True, "pool_timeout": POOL_TIMEOUT_S}
        self._deadlines: Deadlines | None = None
        parsed = sa.make_url(url)
        if parsed.get_backend_name() == "postgresql":
            # connect_args replace the URL's own parameters: the URL's `options` (a
            # search_path, say) come after the timeouts (the last setting wins), and its
            # connect_timeout stays
            given = parsed.query.get("options", ())
            given = (given,) if isinstance(given, str) else given
            timeouts = (
                f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
                f"-c lock_timeout={STATEMENT_TIMEOUT_MS}"
            )
            connect: dict[str, Any] = {"options": " ".join((timeouts, *given))}
            if "connect_timeout" not in parsed.query:
                connect["connect_timeout"] = CONNECT_TIMEOUT_S
            options["connect_args"] = connect
            # no pre-ping: it runs before a call's deadline can watch the connection; a
            # stale connection fails its read, which is tried once more (see _read)
            self._deadlines = Deadlines(CALL_DEADLINE_S)
        else:
            options["pool_pre_ping"] = True
        self.engine = sa.create_engine(url, **options)
        # SQLite runs one writer at a time, and a writer that finds the file locked sleeps
        # in its busy handler (1, 2, 5 … 100 ms): this process's own writers take turns on
        # a lock instead (under load, their sleeps made /recommend's latency climb while
        # the CPU idled); other processes still meet the busy timeout
        self._writing: Any = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        )
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if self._deadlines is not None:
            deadlines = self._deadlines
            event.listen(self.engine, "checkout", lambda c, *_: deadlines.attach(c))
            for name in ("checkin", "invalidate", "close"):
                event.listen(self.engine, name, lambda c, *_: deadlines.detach(c))
        self.file = self._sqlite_file()
        self._identity: tuple[int, int] | None = None  # the file's, once the tables are made
        self.buffer = LedgerBuffer(
            buffer_path or self._default_buffer_path(), max_rows=buffer_max_rows
        )
        self.down: str | None = None  # why the database is not used now, if it is not
        # the buffer holds rows the database lacks: nothing reads it until they are written
        self.behind = False
        self._stopped: frozenset[str] = frozenset()  # the kills last read (stopped_offers)
        self._state = threading.Lock()
        self._buffering = threading.Lock()  # a row added, or the buffer found empty
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._recovery: threading.Thread | None = None
        # what the database needs before it is used (the tables: the ledger's, the review
        # page's); with the database down at start, made when it is back, before the flush
        self._unprepared: list[Callable[[sa.Engine], None]] = []
        if read_only:
            self._identity = _file_identity(self.file)
        else:
            self.when_ready(self._create_tables)
        if self.down is None and len(self.buffer):  # left by an earlier process
            log.warning(
                "ledger buffer %s holds %d rows: flushing", self.buffer.path, len(self.buffer)
            )
            self.behind = True
            self.flush()  # now: a command started after an outage reads all of it
            if self.behind:  # rows left (the database failed again, say): in the background
                self._recover()

    def _create_tables(self, engine: sa.Engine) -> None:
        _metadata.create_all(engine)
        _widen_mode(engine)
        _nullable_propensity(engine)
        _inclusion_column(engine)
        self._identity = _file_identity(self.file)  # the file the ledger writes, from now

    def when_ready(self, prepare: Callable[[sa.Engine], None]) -> None:
        """Run ``prepare(engine)`` (make tables, say) before the database is used: now if
        it answers, else when it is back, before anything buffered is written. Until then
        the ledger is down (every call refused at once; slates and feedback buffered)."""
        with self._state:
            self._unprepared.append(prepare)
        if self.down is None:
            with suppress(LedgerUnavailable):  # down now, and said so: the recovery prepares
                self._prepare()

    def _prepare(self) -> None:
        """What :meth:`when_ready` holds, bounded; each step is taken out once it is done
        (raises LedgerUnavailable, and marks the ledger down, if the database fails)."""
        while self._unprepared:
            with self._guard("prepare the ledger's tables", while_down=True):
                self._unprepared[0](self.engine)
            with self._state:
                self._unprepared.pop(0)

    def _sqlite_file(self) -> Path | None:
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return None
        if database.startswith("file:"):
            return None
        return Path(database).resolve()

    def _default_buffer_path(self) -> Path:
        if self.file is not None:
            return self.file.with_name(self.file.name + ".buffer")
        from runtime.settings import Settings

        safe = self._given_url.render_as_string(hide_password=True)
        digest = hashlib.sha256(safe.encode()).hexdigest()[:12]
        return Settings.load().home / f"ledger-buffer-{digest}.db"

    @property
    def backend(self) -> str:
        return str(self.engine.dialect.name)

    # -- the guard around every call --------------------------------------------------------
    def _vanished(self) -> str | None:
        """Why the SQLite file open at the start is not the one at its path any more."""
        if self.file is None or self._identity is None:
            return None
        now = _file_identity(self.file)
        if now == self._identity:
            return None
        what = "deleted" if now is None else "replaced by another file"
        return (
            f"the ledger file {self.file} was {what} while the service ran; nothing is "
            "written there (restore it, or restart the service to open what is there now)"
        )

    @property
    def unavailable(self) -> str | None:
        """Why the ledger's calls are refused now, if they are, to follow "the ledger is":
        "down: …", or "catching up: …" (the database is back, and the rows buffered
        meanwhile are not all written yet)."""
        if self.down is not None:
            return f"down: {self.down}"
        return _BEHIND if self.behind else None

    def _mark_down(self, reason: str) -> None:
        with self._state:
            if self.down is not None:
                return
            self.down, self.behind = reason, True
        log.error(
            "ledger unavailable (%s): serving degraded, slates and feedback buffered in %s; "
            "/readyz says not ready until it is back",
            reason,
            self.buffer.path,
        )
        self._recover()

    @contextmanager
    def _guard(
        self,
        what: str,
        *,
        stale: bool = False,
        while_down: bool = False,
        behind_ok: bool = False,
    ) -> Iterator[None]:
        """Refuse at once while the ledger is down (unless ``while_down``: the recovery's
        own calls) or behind its buffer (unless ``behind_ok``: the writes that catch it
        up, and an erasure, which takes the customer's rows out of the buffer first);
        otherwise run bounded, and mark the ledger down if the database fails to answer
        (``stale``: a pooled connection found dead raises :class:`_Stale` instead, for the
        caller to try a fresh one)."""
        if self.down is not None and not while_down:
            raise LedgerUnavailable(self.down)
        if self.behind and not (while_down or behind_ok):
            self._recover()  # a no-op while the recovery runs; a new one if it died
            raise LedgerUnavailable(_BEHIND)
        vanished = self._vanished()
        if vanished is not None:
            self._mark_down(vanished)
            raise LedgerUnavailable(vanished)
        cut = False
        try:
            if self._deadlines is None:
                yield
            else:
                with self._deadlines.call() as call:
                    try:
                        yield
                    finally:
                        cut = call.overrun
        except sa.exc.SQLAlchemyError as error:
            if not _is_outage(error):
                raise
            dead = isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated
            if stale and dead and not cut:  # found dead, not cut for silence: try a fresh one
                raise _Stale() from error
            cause = getattr(error, "orig", None) or error
            reason = f"{what}: {type(cause).__name__}: {str(error).splitlines()[0]}"
            self._mark_down(reason)
            raise LedgerUnavailable(reason) from error

    @contextmanager
    def connection(self, what: str, *, transaction: bool = False) -> Iterator[sa.Connection]:
        """A connection for other SQL on the ledger's database (the review page's), under
        the guard of the ledger's own calls: refused at once while the ledger is down or
        its SQLite file vanished (so nothing recreates an empty file), cut at the call's
        deadline, and a database that fails to answer marks the ledger down
        (:class:`LedgerUnavailable`). ``transaction``: committed at the end, rolled back
        on an error. A pooled connection the database dropped (it restarted since) is
        found before use and swapped for a fresh one, as the ledger's own reads are. The
        review page's tables are never buffered: answered while the buffer is flushed."""
        with self._guard(what, behind_ok=True):
            connection = self._checked(what)
            with connection, connection.begin() if transaction else nullcontext():
                yield connection

    def _checked(self, what: str) -> sa.Connection:
        """A pooled connection that answers (PostgreSQL: one round trip, inside the call's
        deadline; SQLite's pool pings on checkout itself), else a fresh one."""
        if self._deadlines is None:
            return self.engine.connect()
        try:
            with self._guard(what, stale=True, behind_ok=True):  # nested: the outer deadline
                connection = self.engine.connect()
                try:
                    connection.exec_driver_sql("SELECT 1")
                    connection.rollback()  # the ping's own transaction, so one can begin
                except BaseException:
                    connection.close()
                    raise
                return connection
        except _Stale:
            return self.engine.connect()

    def _read(
        self, what: str, read: Callable[[sa.Connection], _T], *, behind_ok: bool = False
    ) -> _T:
        """A read, bounded; tried once more on a connection that turned out stale (the
        database restarted since it was pooled). ``behind_ok``: a read of tables the
        buffer never holds (kills, erasures), answered while it is flushed."""
        try:
            with (
                self._guard(what, stale=True, behind_ok=behind_ok),
                self.engine.connect() as connection,
            ):
                return read(connection)
        except _Stale:
            pass
        with self._guard(what, behind_ok=behind_ok), self.engine.connect() as connection:
            return read(connection)

    # -- recovery: probe, then flush the buffer ------------------------------------------------
    def _recover(self) -> None:
        with self._state:
            if self._recovery is not None and self._recovery.is_alive():
                return
            self._recovery = threading.Thread(
                target=self._recovering, daemon=True, name="nextbest-ledger-recovery"
            )
            self._recovery.start()

    @contextmanager
    def _write_turn(self) -> Iterator[None]:
        """This process's turn to write (SQLite), waited for no longer than SQLite's own
        busy timeout; the database found down meanwhile is not tried."""
        if isinstance(self._writing, nullcontext):
            yield
            return
        if not self._writing.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
            raise sa.exc.OperationalError(
                "write turn", None, Exception("database is locked (this process's writers)")
            )
        try:
            if self.down is not None:
                raise LedgerUnavailable(self.down)
            yield
        finally:
            self._writing.release()

    def _recovering(self) -> None:
        while True:
            failed = False
            try:
                if self.down is not None and self._probe():
                    with self._state:
                        reason, self.down = self.down, None
                    log.warning(
                        "ledger back (was: %s): flushing %d buffered rows",
                        reason,
                        len(self.buffer),
                    )
                if self.down is None:
                    self.flush()
                if self._catch_up(ending_recovery=True):
                    return
            except Exception:  # the buffer file busy, say: tried again, the thread lives on
                log.exception("ledger recovery failed this round; trying again")
                failed = True
            # rows that landed during the flush, with the database answering: at once
            if (failed or self.down is not None) and self._stop.wait(self.retry_after_s):
                return
            if self._stop.is_set():
                return

    def _probe(self) -> bool:
        """Whether the database answers, bounded, on the file the ledger opened; what
        :meth:`when_ready` still holds (the tables, at a start without the database) is
        made first."""
        if self._vanished() is not None:
            return False
        try:
            self._prepare()
            with self._guard("probe", while_down=True), self.engine.connect() as connection:
                connection.execute(sa.select(slates.c.request_id).limit(1))
            return True
        except (LedgerUnavailable, sa.exc.SQLAlchemyError):
            return False

    def flush(self, batch: int = 500) -> int:
        """Write the buffer to the database, oldest first; stop at the first failure (the
        rest waits for the next try). Once it is empty, the ledger is no longer behind.
        Returns the rows taken out of the buffer."""
        done = 0
        with self._flushing:
            while rows := self.buffer.oldest(batch):
                for seq, kind, body in rows:
                    try:
                        with self._guard("flush", behind_ok=True):
                            outcome = self._write_buffered(kind, body)
                    except LedgerUnavailable:
                        return done
                    except Exception as error:  # a row the database refuses (bad data):
                        # dropped and counted, or it would block every later row for good
                        log.error(
                            "buffered %s %s refused at flush, dropped: %s: %s",
                            kind,
                            body.get("request_id"),
                            type(error).__name__,
                            str(error).splitlines()[0] if str(error) else "",
                        )
                        outcome = "rejected_slates" if kind == "slate" else "rejected_feedback"
                    self.buffer.remove(seq, outcome)
                    done += 1
        if done:
            log.warning("ledger buffer flushed: %d rows (%s)", done, self.buffer.counters())
        self._catch_up()
        return done

    def _catch_up(self, *, ending_recovery: bool = False) -> bool:
        """Whether the ledger has caught up (the database answers and the buffer is
        empty); it is then no longer behind, and with ``ending_recovery`` the recovery
        thread is done. Checked under the lock rows are buffered under (see
        :meth:`_hold`), so none lands in between."""
        with self._buffering, self._state:
            if self.down is not None or len(self.buffer):
                return False
            if self.behind:
                self.behind = False
                log.warning("ledger caught up: every buffered row is written")
            if ending_recovery:
                self._recovery = None
            return True

    def _write_buffered(self, kind: str, body: dict[str, Any]) -> str:
        """One buffered row into the database; the counter that says what became of it."""
        if kind == "slate":
            slate = body | {
                "offers": [ServedOffer(**o) for o in body["offers"]],
                "ghosts": [ServedOffer(**o) for o in body.get("ghosts", ())],
            }
            try:
                self._log_slates([slate], {})
            except IntegrityError:  # written before (a crash between write and removal)
                return "flushed_already_there"
            return "flushed_slates"
        try:
            recorded = self._record_feedback(**body)
        except LookupError as error:
            log.warning("buffered feedback refused at flush: %s", error)
            return "rejected_feedback"
        return "flushed_feedback" if recorded else "flushed_already_there"

    def ping(self) -> bool:
        """Whether the ledger's database is in use: False at once while it is down (or its
        file was deleted or replaced), else a bounded round trip."""
        try:
            self._read("ping", lambda connection: connection.execute(sa.text("SELECT 1")))
            return True
        except LedgerUnavailable:
            return False

    def status(self) -> dict[str, Any]:
        """Down or not (and why), behind its buffer or not, and the buffer: rows held,
        and its counters."""
        return {
            "down": self.down,
            "behind": self.behind,
            "buffered": len(self.buffer),
            "buffer": str(self.buffer.path),
            **self.buffer.counters(),
        }

    def log_slate(
        self,
        *,
        request_id: str,
        customer_id: str,
        channel: str,
        placement: str,
        model_version: str | None,
        mode: str,
        holdout: bool,
        at_s: int,
        offers: Sequence[ServedOffer],
        ghosts: Sequence[ServedOffer] = (),
    ) -> None:
        self.log_slates(
            [
                {
                    "request_id": request_id,
                    "customer_id": customer_id,
                    "channel": channel,
                    "placement": placement,
                    "model_version": model_version,
                    "mode": mode,
                    "holdout": holdout,
                    "at_s": at_s,
                    "offers": offers,
                    "ghosts": ghosts,
                }
            ]
        )

    def log_slates(
        self,
        slates_to_log: Sequence[dict[str, Any]],
        limits: Mapping[str, Sequence[Limit]] | None = None,
    ) -> Logged:
        """Log many slates in one transaction (keyword arguments of :meth:`log_slate`);
        return, per request, the offers actually logged. A slate's ``ghosts`` (optional)
        go to ``ghost_offers``: logged as they are, never counted by a cap.

        ``limits`` (request id → its hard caps) makes the caps atomic: the slates are
        written, the caps counted again with them in, and whatever would exceed a cap is
        taken out before the transaction commits. Each capped customer is locked first
        (an advisory lock on PostgreSQL; SQLite runs one writer at a time), so two
        requests at once cannot both pass a cap only one may pass.

        With the database down, the slates go to the buffer (``buffered``), and a slate
        under a hard cap, which cannot be admitted, is logged empty (it fails closed).
        """
        self._refuse_if_read_only()
        if not slates_to_log:
            return Logged()
        limits = limits or {}
        try:
            with self._guard("log slates"):
                return Logged(self._log_slates(slates_to_log, limits))
        except LedgerUnavailable:
            return self._buffer_slates(slates_to_log, limits)

    def _buffer_slates(
        self, slates_to_log: Sequence[dict[str, Any]], limits: Mapping[str, Sequence[Limit]]
    ) -> Logged:
        logged = Logged()
        logged.buffered = True
        for slate in slates_to_log:
            request = str(slate["request_id"])
            offers = [] if limits.get(request) else list(slate["offers"])
            logged[request] = [o.offer_id for o in offers]
            body = slate | {
                "offers": [asdict(o) for o in offers],
                "ghosts": [asdict(o) for o in slate.get("ghosts", ())],
            }
            try:
                self._hold(self.buffer.add_slate, body)
            except BufferFull as error:
                log.error("slate %s served but not logged: %s", request, error)
        return logged

    def _log_slates(
        self, slates_to_log: Sequence[dict[str, Any]], limits: Mapping[str, Sequence[Limit]]
    ) -> dict[str, list[str]]:
        with self._write_turn(), self.engine.begin() as connection:
            if limits and self.engine.dialect.name == "postgresql":
                capped = sorted(
                    {str(x["customer_id"]) for x in slates_to_log if x["request_id"] in limits}
                )
                for customer in capped:
                    connection.execute(
                        sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                        {"key": f"nextbest-caps:{customer}"},
                    )
            connection.execute(
                _INSERT_SLATES,
                [
                    {key: value for key, value in slate.items() if key not in _OFFER_LISTS}
                    for slate in slates_to_log
                ],
            )
            withheld = [
                {
                    "request_id": slate["request_id"],
                    "offer_id": o.offer_id,
                    "rank": o.rank,
                    "score": o.score,
                    "probability": o.probability,
                    "reason": "offer_holdout",
                }
                for slate in slates_to_log
                for o in slate.get("ghosts", ())
            ]
            if withheld:
                connection.execute(_INSERT_GHOSTS, withheld)
            items = [
                {
                    "request_id": slate["request_id"],
                    "offer_id": o.offer_id,
                    "rank": o.rank,
                    "score": o.score,
                    "probability": o.probability,
                    "propensity": o.propensity,
                    "inclusion": o.inclusion,
                }
                for slate in slates_to_log
                for o in slate["offers"]
            ]
            if items:
                connection.execute(_INSERT_SLATE_OFFERS, items)
            logged = {
                str(slate["request_id"]): [o.offer_id for o in slate["offers"]]
                for slate in slates_to_log
            }
            for slate in slates_to_log:
                request = str(slate["request_id"])
                if request in limits and logged[request]:
                    logged[request] = self._admit(connection, slate, limits[request])
        return logged

    def _admit(
        self, connection: sa.Connection, slate: Mapping[str, Any], limits: Sequence[Limit]
    ) -> list[str]:
        """Recount this slate's caps with it written; take out what exceeds them: first each
        offer over its own cap, then, for a cap on offers served, the lowest-ranked offers
        beyond what is left, and for a cap on sends, the whole slate. The offers kept are
        ranked again from 1, as the customer sees them."""
        request, customer, at_s = slate["request_id"], str(slate["customer_id"]), slate["at_s"]
        kept = [o.offer_id for o in slate["offers"]]
        per_offer = [limit for limit in limits if limit.offer_id is not None]
        windows = {(limit.unit, limit.start_s) for limit in per_offer}
        seen_offers: dict[tuple[str, str, int], int] = {}
        for unit, start in windows:  # one read for every offer of the slate
            counted = self._offer_counts(connection, unit, [customer], start, at_s, kept)
            seen_offers |= {(unit, o, start): n for (_, o), n in counted.items()}
        for limit in per_offer:
            key = (limit.unit, str(limit.offer_id), limit.start_s)
            if limit.offer_id in kept and seen_offers.get(key, 0) > limit.allowed:
                kept.remove(limit.offer_id)
        for limit in limits:
            if limit.offer_id is not None or not kept:
                continue
            seen = self._count(
                connection, limit.unit, [customer], limit.start_s, at_s, limit.channels
            ).get(customer, 0)
            over = seen - limit.allowed
            if over > 0:
                kept = [] if limit.unit == "sends" else kept[: max(len(kept) - over, 0)]
        dropped = [o.offer_id for o in slate["offers"] if o.offer_id not in kept]
        if dropped:
            self._drop(connection, request, dropped)
            # what is left is no longer the draw those probabilities were of: deterministic
            # (the caps' cut), not a propensity an estimator could weigh by
            for rank, offer in enumerate(kept, start=1):
                connection.execute(
                    slate_offers.update()
                    .where(
                        (slate_offers.c.request_id == request) & (slate_offers.c.offer_id == offer)
                    )
                    .values(rank=rank, propensity=None, inclusion=None)
                )
        return kept

    @staticmethod
    def _drop(connection: sa.Connection, request_id: str, offers: Sequence[str]) -> None:
        connection.execute(
            slate_offers.delete().where(
                (slate_offers.c.request_id == request_id)
                & slate_offers.c.offer_id.in_(list(offers))
            )
        )

    def record_feedback(
        self, *, request_id: str, offer_id: str, outcome: str, value: float | None, at_s: int
    ) -> bool:
        """Record an outcome; False if this (request, offer, outcome) was already recorded.

        Raises LookupError if the request did not serve that offer.
        """
        return self.post_feedback(
            request_id=request_id, offer_id=offer_id, outcome=outcome, value=value, at_s=at_s
        ).recorded

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise PermissionError(
                f"the ledger at {self.engine.url.render_as_string(hide_password=True)} was "
                "opened read-only (a what-if replay): nothing is logged"
            )

    def post_feedback(
        self, *, request_id: str, offer_id: str, outcome: str, value: float | None, at_s: int
    ) -> FeedbackReceipt:
        """:meth:`record_feedback`, or, with the database down, into the buffer.

        Whether the request served the offer is checked against the buffered slates,
        then the database: a slate without the offer, or none, is a LookupError. While
        the ledger is behind, the feedback is buffered after that check. While the
        database is down, feedback for a request the buffer does not hold (it may be in
        the database) is buffered and checked when it is flushed (refused then, and
        counted as ``rejected_feedback``). Raises BufferFull if it cannot be held.
        """
        self._refuse_if_read_only()
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; use one of {', '.join(OUTCOMES)}")
        body: dict[str, Any] = {
            "request_id": request_id,
            "offer_id": offer_id,
            "outcome": outcome,
            "value": value,
            "at_s": at_s,
        }
        try:
            with self._guard("record feedback"):
                return FeedbackReceipt(self._record_feedback(**body))
        except LookupError:
            buffered = self.buffer.slate(request_id)  # served while the database was down
            if buffered is None:  # or flushed meanwhile: the database has it now, or never
                try:
                    with self._guard("record feedback"):
                        return FeedbackReceipt(self._record_feedback(**body))
                except LedgerUnavailable:
                    pass  # down again meanwhile: held in the buffer, checked at the flush
            elif offer_id not in {o["offer_id"] for o in buffered["offers"]}:
                raise
        except LedgerUnavailable:
            buffered = self.buffer.slate(request_id)
            if buffered is not None and offer_id not in {o["offer_id"] for o in buffered["offers"]}:
                raise LookupError(
                    f"request {request_id!r} did not serve offer {offer_id!r}"
                ) from None
            if buffered is None:
                # behind, the database answering: a slate not in the buffer was written
                # before it (the buffer is read first, and a slate leaves it only once it
                # is written), so the database says whether it served the offer. The
                # feedback itself still queues behind the buffered rows
                try:
                    with self._guard("check feedback", behind_ok=True):
                        self._served_to(request_id, offer_id)
                except LedgerUnavailable:
                    pass  # down: held in the buffer, checked at the flush
        return FeedbackReceipt(self._hold(self.buffer.add_feedback, body), buffered=True)

    def _hold(self, add: Callable[[dict[str, Any]], bool], body: dict[str, Any]) -> bool:
        """``add(body)`` to the buffer, and the ledger behind until it is written. A row
        that lands just after the recovery found the buffer empty is flushed at once (it
        would wait for the next outage otherwise)."""
        with self._buffering:
            added = add(body)
            with self._state:
                self.behind = True
        if self.down is None:  # no recovery thread may be left to flush it
            self._recover()
        return added

    def _record_feedback(
        self, *, request_id: str, offer_id: str, outcome: str, value: float | None, at_s: int
    ) -> bool:
        customer_id = self._served_to(request_id, offer_id)
        try:
            with self._write_turn(), self.engine.begin() as connection:
                connection.execute(
                    _INSERT_FEEDBACK,
                    {
                        "request_id": request_id,
                        "offer_id": offer_id,
                        "outcome": outcome,
                        "customer_id": customer_id,
                        "value": value,
                        "at_s": at_s,
                    },
                )
            return True
        except IntegrityError:
            return False

    def _served_to(self, request_id: str, offer_id: str) -> str:
        """The customer the database's slate ``request_id`` served ``offer_id`` to; a
        LookupError if it holds no such slate, or that slate did not serve it."""
        with self.engine.connect() as connection:
            row = connection.execute(
                _SERVED_TO, {"request_id": request_id, "offer_id": offer_id}
            ).first()
        if row is None:
            raise LookupError(f"request {request_id!r} did not serve offer {offer_id!r}")
        return str(row.customer_id)

    # -- what caps, cooldowns and sequencing read (batched over customers) ---------------
    def counts(
        self, unit: str, customers: Sequence[str], start_s: int, end_s: int, channels: Sequence[str]
    ) -> dict[str, int]:
        """customer → sends, offers served or 'viewed' outcomes in [start, end] on
        ``channels`` (ghost and empty slates never count)."""
        return self._read(
            "counts", lambda c: self._count(c, unit, customers, start_s, end_s, channels)
        )

    @staticmethod
    def _count(
        connection: sa.Connection,
        unit: str,
        customers: Sequence[str],
        start_s: int,
        end_s: int,
        channels: Sequence[str],
    ) -> dict[str, int]:
        parameters = {
            "customers": list(customers),
            "channels": list(channels),
            "start": start_s,
            "end": end_s,
        }
        rows = connection.execute(_count_query(unit), parameters)
        return {str(customer): int(n) for customer, n in rows}

    def offer_counts(
        self, unit: str, customers: Sequence[str], start_s: int, end_s: int
    ) -> dict[tuple[str, str], int]:
        """(customer, offer) → times served (or viewed) in [start, end]."""
        return self._read(
            "offer counts", lambda c: self._offer_counts(c, unit, customers, start_s, end_s)
        )

    @staticmethod
    def _offer_counts(
        connection: sa.Connection,
        unit: str,
        customers: Sequence[str],
        start_s: int,
        end_s: int,
        offers: Sequence[str] | None = None,
    ) -> dict[tuple[str, str], int]:
        """:meth:`offer_counts` on a connection, for these offers only if given."""
        parameters: dict[str, Any] = {"customers": list(customers), "start": start_s, "end": end_s}
        if offers is not None:
            parameters["offers"] = list(offers)
        rows = connection.execute(_offer_count_query(unit, offers is not None), parameters)
        return {(str(c), str(o)): int(n) for c, o, n in rows}

    def last_outcomes(
        self, customers: Sequence[str], outcomes: Sequence[str], before_s: int
    ) -> dict[tuple[str, str], int]:
        """(customer, offer) → last time (seconds) the customer had one of ``outcomes``."""
        return _latest(self.last_outcomes_by_kind(customers, before_s), outcomes)

    def last_outcomes_by_kind(
        self, customers: Sequence[str], before_s: int
    ) -> dict[tuple[str, str, str], int]:
        """(customer, offer, outcome) → last time, for every outcome: one read that a call's
        cooldown, redemption and sequencing checks share."""
        parameters = {"customers": list(customers), "before": before_s}
        return self._read(
            "last outcomes",
            lambda c: {
                (str(who), str(o), str(k)): int(at)
                for who, o, k, at in c.execute(_LAST_BY_KIND, parameters)
            },
        )

    def shown_offers(self, customers: Sequence[str], before_s: int) -> set[tuple[str, str]]:
        """(customer, offer) pairs the customers were shown up to ``before_s``."""
        parameters = {"customers": list(customers), "before": before_s}
        return self._read(
            "shown offers",
            lambda c: {(str(who), str(o)) for who, o in c.execute(_SHOWN, parameters)},
        )

    def slate(self, request_id: str) -> dict[str, Any] | None:
        return self._read("slate", lambda connection: self._slate(connection, request_id))

    @staticmethod
    def _slate(connection: sa.Connection, request_id: str) -> dict[str, Any] | None:
        head = (
            connection.execute(slates.select().where(slates.c.request_id == request_id))
            .mappings()
            .first()
        )
        if head is None:
            return None
        outcomes = (
            connection.execute(feedback.select().where(feedback.c.request_id == request_id))
            .mappings()
            .all()
        )

        def ranked(table: sa.Table) -> list[dict[str, Any]]:
            query = table.select().where(table.c.request_id == request_id)
            rows = connection.execute(query.order_by(table.c.rank)).mappings().all()
            return [dict(row) for row in rows]

        return dict(head) | {
            "offers": ranked(slate_offers),
            "feedback": [dict(f) for f in outcomes],
            "ghosts": ranked(ghost_offers),
        }

    # -- the stop-loss's kills -------------------------------------------------------------
    def stopped_offers(self) -> frozenset[str]:
        """The offers the stop-loss killed and nobody revived. One small read, made for
        every request, so that a kill holds from the very next request in every process
        on this database, without a restart. While the database cannot be read: the set
        last read (a kill stays in force; never read, none)."""
        try:
            current = self._read(
                "stop-loss kills",
                lambda c: frozenset(c.execute(_STOPPED).scalars()),
                behind_ok=True,
            )
        except LedgerUnavailable:
            return self._stopped
        self._stopped = current
        return current

    def offer_kills(self, *, active_only: bool = False) -> list[dict[str, Any]]:
        """Every kill, oldest first (``active_only``: those not revived), as stored."""
        query = offer_kills.select().order_by(offer_kills.c.kill_id)
        if active_only:
            query = query.where(offer_kills.c.revived_at.is_(None))
        return self._read(
            "stop-loss kills",
            lambda c: [dict(row) for row in c.execute(query).mappings()],
            behind_ok=True,
        )

    @staticmethod
    def insert_kill(connection: sa.Connection, kill: Mapping[str, Any]) -> int | None:
        """Store a kill (``offer_kills``' columns but the revival's) in the caller's
        transaction, where the caller audits it too; its id, or None when the offer has
        an active kill already (a concurrent run's insert fails on the unique index)."""
        active = connection.execute(
            sa.select(offer_kills.c.kill_id).where(
                offer_kills.c.offer_id == kill["offer_id"], offer_kills.c.revived_at.is_(None)
            )
        ).first()
        if active is not None:
            return None
        result = connection.execute(offer_kills.insert().values(**kill))
        key = result.inserted_primary_key
        assert key is not None  # an insert of one row has one
        return int(key[0])

    @staticmethod
    def revive_kill(
        connection: sa.Connection, offer_id: str, *, by: str, reason: str, at: Any
    ) -> dict[str, Any] | None:
        """End the offer's active kill in the caller's transaction: the kill as it was, or
        None if the offer has none."""
        key = (offer_kills.c.offer_id == offer_id) & offer_kills.c.revived_at.is_(None)
        row = connection.execute(offer_kills.select().where(key)).mappings().first()
        if row is None:
            return None
        connection.execute(
            offer_kills.update()
            .where(offer_kills.c.kill_id == row["kill_id"])
            .values(revived_at=at, revived_by=by, revive_reason=reason)
        )
        return dict(row)

    def placements_served(
        self, offer_ids: Sequence[str], start_s: int, end_s: int
    ) -> dict[str, list[str]]:
        """offer → the ``channel/placement`` pairs where slates delivered it in
        [start_s, end_s), with how many times each (for the stop-loss's learning record)."""
        count = sa.func.count()
        query = (
            sa.select(slate_offers.c.offer_id, slates.c.channel, slates.c.placement, count)
            .select_from(slates.join(slate_offers))
            .where(
                slate_offers.c.offer_id.in_(list(offer_ids)),
                _DELIVERED,
                slates.c.at_s >= start_s,
                slates.c.at_s < end_s,
            )
            .group_by(slate_offers.c.offer_id, slates.c.channel, slates.c.placement)
            .order_by(slate_offers.c.offer_id, count.desc(), slates.c.channel, slates.c.placement)
        )

        def read(connection: sa.Connection) -> dict[str, list[str]]:
            placed: dict[str, list[str]] = {}
            for offer, channel, placement, n in connection.execute(query):
                placed.setdefault(str(offer), []).append(f"{channel}/{placement} ({n})")
            return placed

        return self._read("placements served", read)

    def dispose(self) -> None:
        self._stop.set()
        self.engine.dispose()
        self.buffer.close()

    # -- item 7 (privacy): erasure ---------------------------------------------------------------
    def erase_customer(self, customer_id: str) -> dict[str, int]:
        """Delete every row of one customer: what the local buffer holds of them (their
        buffered slates and the feedback on those), then their slates in the database with
        those slates' offers, ghosts and feedback (feedback by the customer's id too).
        Returns the rows removed per table (``buffer_slates`` and ``buffer_feedback`` for
        the buffer); all zeros when nothing is left.

        The buffer goes first, with this process's flushes held off, so that nothing of
        the customer is written to the database after it was erased there. The database
        part needs the database (:class:`LedgerUnavailable` while it is down: run it
        again when it is back; the buffer's part is done). A SQLite ledger is vacuumed
        after, so the deleted rows do not linger in its free pages."""
        with self._flushing:
            held_slates, held_feedback = self.buffer.erase_customer(customer_id)
            if self.down is not None:
                raise LedgerUnavailable(self.down)
            with (
                self._guard("erase a customer", behind_ok=True),
                self._write_turn(),
                self.engine.begin() as c,
            ):
                mine = sa.select(slates.c.request_id).where(slates.c.customer_id == customer_id)
                removed = {}
                for table in (slate_offers, ghost_offers):
                    removed[table.name] = c.execute(
                        sa.delete(table).where(table.c.request_id.in_(mine))
                    ).rowcount
                removed["feedback"] = c.execute(
                    sa.delete(feedback).where(
                        sa.or_(
                            feedback.c.customer_id == customer_id,
                            feedback.c.request_id.in_(mine),
                        )
                    )
                ).rowcount
                removed["slates"] = c.execute(
                    sa.delete(slates).where(slates.c.customer_id == customer_id)
                ).rowcount
        removed |= {"buffer_slates": held_slates, "buffer_feedback": held_feedback}
        if self.engine.dialect.name == "sqlite" and any(removed.values()):
            with (
                self._guard("vacuum the ledger", behind_ok=True),
                self.engine.connect() as connection,
            ):
                raw = connection.execution_options(isolation_level="AUTOCOMMIT")
                raw.exec_driver_sql("VACUUM")
                raw.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").all()  # nor in the WAL
        return {name: int(n) for name, n in removed.items()}

    def record_erasure(
        self, erasure_id: str, erased_at: Any, removed: Mapping[str, int], keyed_hash: str | None
    ) -> None:
        """Store one erasure (no id, no attribute: see :data:`erasures`)."""
        import json

        with (
            self._guard("record an erasure", behind_ok=True),
            self._write_turn(),
            self.engine.begin() as c,
        ):
            c.execute(
                sa.insert(erasures).values(
                    erasure_id=erasure_id,
                    erased_at=erased_at,
                    removed=json.dumps(dict(removed), sort_keys=True),
                    keyed_hash=keyed_hash,
                )
            )

    def erasure_log(self) -> list[dict[str, Any]]:
        """Every recorded erasure, oldest first (``removed`` as a dict)."""
        import json

        rows = self._read(
            "read the erasures",
            lambda c: c.execute(sa.select(erasures).order_by(erasures.c.erased_at)).all(),
            behind_ok=True,
        )
        return [
            {
                "erasure_id": row.erasure_id,
                "erased_at": row.erased_at,
                "removed": json.loads(row.removed),
                "keyed_hash": row.keyed_hash,
            }
            for row in rows
        ]


class CombinedLedger:
    """The workspace's recorded history plus the live SQL ledger, behind the eligibility
    engine's :class:`policy.Ledger` interface. History is read by snapshot code, the live
    ledger by each customer's own id (so a customer the snapshot does not know is still
    capped as themself). Make one per call: it keeps what it read for that moment.

    With the live ledger unavailable, it reads the history alone and says so
    (``degraded``): live counts are taken as none, and no live outcome is known."""

    def __init__(self, snapshot: Snapshot, sql: SqlLedger) -> None:
        self.snapshot = snapshot
        self.history = SnapshotLedger(snapshot, ledger_rows=False)  # the SQL side has those
        self.sql = sql
        self.degraded = False
        self._outcomes: dict[tuple[tuple[str, ...], int], dict[tuple[str, str, str], int]] = {}

    def _live(self, nothing: _T, read: Callable[..., _T], *args: Any) -> _T:
        """``read(*args)`` from the live ledger, or ``nothing`` once it is unavailable."""
        if self.degraded:
            return nothing
        try:
            return read(*args)
        except LedgerUnavailable:
            self.degraded = True
            return nothing

    def _last_outcomes(
        self, ids: Sequence[str], outcomes: Sequence[str], before: int
    ) -> dict[tuple[str, str], int]:
        # one read of the customers' outcomes, shared by the cooldown, the redemption check
        # and sequencing (an instance serves one call, so nothing here goes stale)
        key = (tuple(ids), before)
        if key not in self._outcomes:
            self._outcomes[key] = self._live({}, self.sql.last_outcomes_by_kind, ids, before)
        return _latest(self._outcomes[key], outcomes)

    def counts(
        self,
        unit: Unit,
        customers: np.ndarray,
        ids: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
        channels: Sequence[int],
    ) -> np.ndarray:
        out = self.history.counts(unit, customers, ids, start_s, end_s, channels).copy()
        names = [CHANNELS[code] for code in channels]
        for rows, start, end in _windows(start_s, end_s):
            who = list(dict.fromkeys(ids[rows]))
            none: dict[str, int] = {}
            live = self._live(none, self.sql.counts, unit, who, start, end, names)
            out[rows] += np.array([live.get(str(i), 0) for i in ids[rows]], dtype=np.int64)
        return out

    def offer_counts(
        self,
        unit: Literal["served", "viewed"],
        customers: np.ndarray,
        ids: np.ndarray,
        offers: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
    ) -> np.ndarray:
        out = self.history.offer_counts(unit, customers, ids, offers, start_s, end_s).copy()
        for rows, start, end in _windows(start_s, end_s):
            who = list(dict.fromkeys(ids[rows]))
            nothing: dict[tuple[str, str], int] = {}
            live = self._live(nothing, self.sql.offer_counts, unit, who, start, end)
            if live:
                out[rows] += self._per_row(live, ids[rows], offers[rows])
        return out

    def _per_row(
        self, live: dict[tuple[str, str], int], ids: np.ndarray, offers: np.ndarray
    ) -> np.ndarray:
        """Each (customer id, offer code) row's live count: per customer, the counts laid
        out by offer code and read at the rows' codes (a request's ~200 candidate rows read
        without a Python loop over them; an offer the snapshot does not know is no row's)."""
        n_offers, ids = len(self.snapshot.offers), np.asarray(ids).astype("str")
        by_customer: dict[str, tuple[list[str], list[int]]] = {}
        for (customer, offer), n in live.items():
            names, counts = by_customer.setdefault(str(customer), ([], []))
            names.append(str(offer))
            counts.append(n)
        total = np.zeros(len(ids), dtype=np.int64)
        for customer, (names, counts) in by_customer.items():
            rows = np.flatnonzero(ids == customer)
            if not len(rows):
                continue
            codes = self.snapshot.offers.encode(names, missing=-1)
            known = codes >= 0
            table = np.zeros(n_offers, dtype=np.int64)
            np.add.at(table, codes[known], np.asarray(counts, dtype=np.int64)[known])
            total[rows] = table[offers[rows]]
        return total

    def last_declined_s(
        self, customers: np.ndarray, ids: np.ndarray, offers: np.ndarray, before_s: np.ndarray
    ) -> np.ndarray:
        out = self.history.last_declined_s(customers, ids, offers, before_s).copy()
        for rows, _, before in _windows(before_s, before_s):
            live = self._last_outcomes(list(dict.fromkeys(ids[rows])), ["declined"], before)
            if not live:
                continue
            offer_ids = self.snapshot.offers.decode(offers[rows])
            moment = np.array(
                [
                    live.get((str(i), str(o)), np.nan)
                    for i, o in zip(ids[rows], offer_ids, strict=True)
                ]
            )
            out[rows] = np.fmax(out[rows], moment)
        return out

    def had_offer(
        self,
        customers: np.ndarray,
        ids: np.ndarray,
        offers: np.ndarray,
        before_s: np.ndarray,
        event: str,
    ) -> np.ndarray:
        had = self.history.had_offer(customers, ids, offers, before_s, event).copy()
        for rows, _, before in _windows(before_s, before_s):
            who = list(dict.fromkeys(ids[rows]))
            if event == "accepted":
                pairs = set(self._last_outcomes(who, list(ACCEPTED_OUTCOMES), before))
            else:
                pairs = self._live(set(), self.sql.shown_offers, who, before)
            if pairs:
                offer_ids = self.snapshot.offers.decode(offers[rows])
                had[rows] |= [
                    (str(i), str(o)) in pairs for i, o in zip(ids[rows], offer_ids, strict=True)
                ]
        return had


def _latest(
    by_kind: Mapping[tuple[str, str, str], int], outcomes: Sequence[str]
) -> dict[tuple[str, str], int]:
    """(customer, offer) → the last time of any of ``outcomes``."""
    last: dict[tuple[str, str], int] = {}
    for (customer, offer, outcome), at in by_kind.items():
        if outcome in outcomes:
            last[(customer, offer)] = max(at, last.get((customer, offer), at))
    return last


def _windows(start_s: np.ndarray, end_s: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """Rows grouped by their (start, end) window: one query per window, not per row (a
    call serves one moment, so there is usually one)."""
    start_s, end_s = np.asarray(start_s, dtype=np.int64), np.asarray(end_s, dtype=np.int64)
    if not len(start_s):
        return []
    if (start_s == start_s[0]).all() and (end_s == end_s[0]).all():
        return [(np.arange(len(start_s)), int(start_s[0]), int(end_s[0]))]
    keys = np.stack([start_s, end_s], 1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    return [
        (np.flatnonzero(inverse.ravel() == i), int(start), int(end))
        for i, (start, end) in enumerate(unique)
    ]
