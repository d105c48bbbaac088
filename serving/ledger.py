"""The exposure ledger: every served slate and every outcome, in a SQL database.

SQLite (with WAL) is the embedded default; ``NEXTBEST_DB_URL`` points it at PostgreSQL
(``postgresql+psycopg://user:pass@host/db``). Frequency caps, cooldowns and sequencing
read it at request time, so they hold across channels and across workers.

Caps count what customers received (see ``policy.rules.Cap``): sends (a slate with at
least one offer), offers served, or 'viewed' feedback; a holdout's ghost slate (shown to
nobody) never counts, a rules-only holdout's slate (shown) does. When a
slate is logged with its hard caps, they are counted again inside the same transaction,
with the customer locked, so concurrent requests cannot overrun a cap together.

Times are integer seconds on the service's clock (the moment each request was served).
What the live ledger holds has already happened, so its reads include the current second
(a fixed clock serves many requests in the same second); the workspace's history stays
strictly before the moment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from features import Snapshot
from features.contract import CHANNELS, OUTCOMES
from features.snapshot import ACCEPTED_OUTCOMES
from policy import SnapshotLedger
from policy.eligibility import Limit, Unit

__all__ = ["CombinedLedger", "ServedOffer", "SqlLedger"]

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
slate_offers = sa.Table(
    "slate_offers",
    _metadata,
    sa.Column("request_id", sa.String(64), sa.ForeignKey("slates.request_id"), primary_key=True),
    sa.Column("offer_id", sa.String(128), primary_key=True),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("probability", sa.Float),
    sa.Column("propensity", sa.Float, nullable=False),
)
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


GHOST_MODE = "holdout_nothing"
"""A holdout slate whose control is "nothing": logged as what would have been served, and
shown to nobody. Every other slate was delivered (a rules-only holdout's slate too)."""
_DELIVERED = sa.or_(slates.c.holdout.is_(False), slates.c.mode != GHOST_MODE)

_LAST_BY_KIND = (
    sa.select(
        feedback.c.customer_id,
        feedback.c.offer_id,
        feedback.c.outcome,
        sa.func.max(feedback.c.at_s),
    )
    .where(
        feedback.c.customer_id.in_(sa.bindparam("customers", expanding=True)),
        feedback.c.at_s <= sa.bindparam("before"),
    )
    .group_by(feedback.c.customer_id, feedback.c.offer_id, feedback.c.outcome)
)


@dataclass(frozen=True)
class ServedOffer:
    offer_id: str
    rank: int
    score: float | None
    probability: float | None
    propensity: float = 1.0


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
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


class SqlLedger:
    """The ledger tables in any SQLAlchemy database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        _metadata.create_all(self.engine)
        _widen_mode(self.engine)

    @property
    def backend(self) -> str:
        return str(self.engine.dialect.name)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

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
                }
            ]
        )

    def log_slates(
        self,
        slates_to_log: Sequence[dict[str, Any]],
        limits: Mapping[str, Sequence[Limit]] | None = None,
    ) -> dict[str, list[str]]:
        """Log many slates in one transaction (keyword arguments of :meth:`log_slate`);
        return, per request, the offers actually logged.

        ``limits`` (request id → its hard caps) makes the caps atomic: the slates are
        written, the caps counted again with them in, and whatever would exceed a cap is
        taken out before the transaction commits. Each capped customer is locked first
        (an advisory lock on PostgreSQL; SQLite runs one writer at a time), so two
        requests at once cannot both pass a cap only one may pass.
        """
        if not slates_to_log:
            return {}
        limits = limits or {}
        with self.engine.begin() as connection:
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
                slates.insert(),
                [
                    {key: value for key, value in slate.items() if key != "offers"}
                    for slate in slates_to_log
                ],
            )
            items = [
                {
                    "request_id": slate["request_id"],
                    "offer_id": o.offer_id,
                    "rank": o.rank,
                    "score": o.score,
                    "probability": o.probability,
                    "propensity": o.propensity,
                }
                for slate in slates_to_log
                for o in slate["offers"]
            ]
            if items:
                connection.execute(slate_offers.insert(), items)
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
            for rank, offer in enumerate(kept, start=1):
                connection.execute(
                    slate_offers.update()
                    .where(
                        (slate_offers.c.request_id == request) & (slate_offers.c.offer_id == offer)
                    )
                    .values(rank=rank)
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
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; use one of {', '.join(OUTCOMES)}")
        with self.engine.begin() as connection:
            row = connection.execute(
                sa.select(slates.c.customer_id)
                .select_from(slates.join(slate_offers))
                .where(slates.c.request_id == request_id, slate_offers.c.offer_id == offer_id)
            ).first()
            if row is None:
                raise LookupError(f"request {request_id!r} did not serve offer {offer_id!r}")
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    feedback.insert().values(
                        request_id=request_id,
                        offer_id=offer_id,
                        outcome=outcome,
                        customer_id=row.customer_id,
                        value=value,
                        at_s=at_s,
                    )
                )
            return True
        except IntegrityError:
            return False

    # -- what caps, cooldowns and sequencing read (batched over customers) ---------------
    def counts(
        self, unit: str, customers: Sequence[str], start_s: int, end_s: int, channels: Sequence[str]
    ) -> dict[str, int]:
        """customer → sends, offers served or 'viewed' outcomes in [start, end] on
        ``channels`` (ghost and empty slates never count)."""
        with self.engine.connect() as connection:
            return self._count(connection, unit, customers, start_s, end_s, channels)

    @staticmethod
    def _count(
        connection: sa.Connection,
        unit: str,
        customers: Sequence[str],
        start_s: int,
        end_s: int,
        channels: Sequence[str],
    ) -> dict[str, int]:
        window = (
            slates.c.customer_id.in_(list(customers)),
            _DELIVERED,
            slates.c.channel.in_(list(channels)),
        )
        if unit == "sends":
            carried = sa.exists().where(slate_offers.c.request_id == slates.c.request_id)
            query = sa.select(slates.c.customer_id, sa.func.count()).where(
                *window, slates.c.at_s >= start_s, slates.c.at_s <= end_s, carried
            )
        elif unit == "served":
            query = (
                sa.select(slates.c.customer_id, sa.func.count())
                .select_from(slates.join(slate_offers))
                .where(*window, slates.c.at_s >= start_s, slates.c.at_s <= end_s)
            )
        else:
            query = (
                sa.select(slates.c.customer_id, sa.func.count())
                .select_from(slates.join(feedback, feedback.c.request_id == slates.c.request_id))
                .where(
                    *window,
                    feedback.c.outcome == "viewed",
                    feedback.c.at_s >= start_s,
                    feedback.c.at_s <= end_s,
                )
            )
        rows = connection.execute(query.group_by(slates.c.customer_id))
        return {str(customer): int(n) for customer, n in rows}

    def offer_counts(
        self, unit: str, customers: Sequence[str], start_s: int, end_s: int
    ) -> dict[tuple[str, str], int]:
        """(customer, offer) → times served (or viewed) in [start, end]."""
        with self.engine.connect() as connection:
            return self._offer_counts(connection, unit, customers, start_s, end_s)

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
        base = slates.join(slate_offers)
        if unit == "viewed":
            base = base.join(
                feedback,
                (feedback.c.request_id == slate_offers.c.request_id)
                & (feedback.c.offer_id == slate_offers.c.offer_id)
                & (feedback.c.outcome == "viewed"),
            )
            at = feedback.c.at_s
        else:
            at = slates.c.at_s
        query = (
            sa.select(slates.c.customer_id, slate_offers.c.offer_id, sa.func.count())
            .select_from(base)
            .where(
                _DELIVERED,
                at >= start_s,
                at <= end_s,
                slates.c.customer_id.in_(list(customers)),
            )
        )
        if offers is not None:
            query = query.where(slate_offers.c.offer_id.in_(list(offers)))
        rows = connection.execute(query.group_by(slates.c.customer_id, slate_offers.c.offer_id))
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
        with self.engine.connect() as connection:
            rows = connection.execute(
                _LAST_BY_KIND, {"customers": list(customers), "before": before_s}
            )
            return {(str(c), str(o), str(k)): int(at) for c, o, k, at in rows}

    def shown_offers(self, customers: Sequence[str], before_s: int) -> set[tuple[str, str]]:
        """(customer, offer) pairs the customers were shown up to ``before_s``."""
        query = (
            sa.select(slates.c.customer_id, slate_offers.c.offer_id)
            .select_from(slates.join(slate_offers))
            .where(
                slates.c.customer_id.in_(list(customers)),
                _DELIVERED,
                slates.c.at_s <= before_s,
            )
            .distinct()
        )
        with self.engine.connect() as connection:
            return {(str(c), str(o)) for c, o in connection.execute(query)}

    def slate(self, request_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            head = (
                connection.execute(slates.select().where(slates.c.request_id == request_id))
                .mappings()
                .first()
            )
            if head is None:
                return None
            offers = (
                connection.execute(
                    slate_offers.select()
                    .where(slate_offers.c.request_id == request_id)
                    .order_by(slate_offers.c.rank)
                )
                .mappings()
                .all()
            )
            outcomes = (
                connection.execute(feedback.select().where(feedback.c.request_id == request_id))
                .mappings()
                .all()
            )
        return dict(head) | {
            "offers": [dict(o) for o in offers],
            "feedback": [dict(f) for f in outcomes],
        }

    def dispose(self) -> None:
        self.engine.dispose()


class CombinedLedger:
    """The workspace's recorded history plus the live SQL ledger, behind the eligibility
    engine's :class:`policy.Ledger` interface. History is read by snapshot code, the live
    ledger by each customer's own id (so a customer the snapshot does not know is still
    capped as themself). Make one per call: it keeps what it read for that moment."""

    def __init__(self, snapshot: Snapshot, sql: SqlLedger) -> None:
        self.snapshot = snapshot
        self.history = SnapshotLedger(snapshot)
        self.sql = sql
        self._outcomes: dict[tuple[tuple[str, ...], int], dict[tuple[str, str, str], int]] = {}

    def _last_outcomes(
        self, ids: Sequence[str], outcomes: Sequence[str], before: int
    ) -> dict[tuple[str, str], int]:
        # one read of the customers' outcomes, shared by the cooldown, the redemption check
        # and sequencing (an instance serves one call, so nothing here goes stale)
        key = (tuple(ids), before)
        if key not in self._outcomes:
            self._outcomes[key] = self.sql.last_outcomes_by_kind(ids, before)
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
            live = self.sql.counts(unit, list(dict.fromkeys(ids[rows])), start, end, names)
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
            live = self.sql.offer_counts(unit, list(dict.fromkeys(ids[rows])), start, end)
            if live:
                offer_ids = self.snapshot.offers.decode(offers[rows])
                out[rows] += np.array(
                    [
                        live.get((str(c), str(o)), 0)
                        for c, o in zip(ids[rows], offer_ids, strict=True)
                    ],
                    dtype=np.int64,
                )
        return out

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
                pairs = self.sql.shown_offers(who, before)
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
