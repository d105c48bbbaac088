"""The exposure ledger: every served slate and every outcome, in a SQL database.

SQLite (with WAL) is the embedded default; ``NEXTBEST_DB_URL`` points it at PostgreSQL
(``postgresql+psycopg://user:pass@host/db``). Frequency caps, cooldowns and sequencing
read it at request time, so they hold across channels and across workers.

Times are integer seconds on the service's clock (the moment each request was served).
What the live ledger holds has already happened, so its reads include the current second
(a fixed clock serves many requests in the same second); the workspace's history stays
strictly before the moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from features import Snapshot
from features.contract import CHANNELS, OUTCOMES
from features.snapshot import ACCEPTED_OUTCOMES
from policy import SnapshotLedger

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
    sa.Column("mode", sa.String(16), nullable=False),
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


class SqlLedger:
    """The ledger tables in any SQLAlchemy database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        _metadata.create_all(self.engine)

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

    def log_slates(self, slates_to_log: Sequence[dict[str, Any]]) -> None:
        """Log many slates in one transaction (keyword arguments of :meth:`log_slate`)."""
        if not slates_to_log:
            return
        with self.engine.begin() as connection:
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

    def touches(self, customer_id: str, start_s: int, end_s: int, channel: str | None) -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(slates)
            .where(
                slates.c.customer_id == customer_id,
                slates.c.holdout.is_(False),
                slates.c.at_s >= start_s,
                slates.c.at_s <= end_s,
            )
        )
        if channel is not None:
            query = query.where(slates.c.channel == channel)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def last_outcomes(
        self, customer_id: str, outcomes: Sequence[str], before_s: int
    ) -> dict[str, int]:
        """offer_id → last time (seconds) the customer had one of ``outcomes`` with it."""
        query = (
            sa.select(feedback.c.offer_id, sa.func.max(feedback.c.at_s))
            .where(
                feedback.c.customer_id == customer_id,
                feedback.c.outcome.in_(list(outcomes)),
                feedback.c.at_s <= before_s,
            )
            .group_by(feedback.c.offer_id)
        )
        with self.engine.connect() as connection:
            return {offer: int(at) for offer, at in connection.execute(query)}

    def shown_offers(self, customer_id: str, before_s: int) -> set[str]:
        query = (
            sa.select(slate_offers.c.offer_id)
            .select_from(slates.join(slate_offers))
            .where(
                slates.c.customer_id == customer_id,
                slates.c.holdout.is_(False),
                slates.c.at_s <= before_s,
            )
            .distinct()
        )
        with self.engine.connect() as connection:
            return {offer for (offer,) in connection.execute(query)}

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
    engine's :class:`policy.Ledger` interface (customer and offer codes of a snapshot)."""

    def __init__(self, snapshot: Snapshot, sql: SqlLedger) -> None:
        self.snapshot = snapshot
        self.history = SnapshotLedger(snapshot)
        self.sql = sql

    def _ids(self, codes: np.ndarray) -> np.ndarray:
        return self.snapshot.customers.decode(codes)

    def touches(
        self, customers: np.ndarray, start_s: np.ndarray, end_s: np.ndarray, channel: int | None
    ) -> np.ndarray:
        counts = self.history.touches(customers, start_s, end_s, channel).astype(np.int64)
        name = None if channel is None else CHANNELS[channel]
        ids = self._ids(customers)
        live = [
            self.sql.touches(str(c), int(s), int(e), name)
            for c, s, e in zip(ids, start_s, end_s, strict=True)
        ]
        return counts + np.asarray(live, dtype=np.int64)

    def last_declined_s(
        self, customers: np.ndarray, offers: np.ndarray, before_s: np.ndarray
    ) -> np.ndarray:
        out = self.history.last_declined_s(customers, offers, before_s).copy()
        ids = self._ids(customers)
        for customer, before in {(str(c), int(b)) for c, b in zip(ids, before_s, strict=True)}:
            live = self.sql.last_outcomes(customer, ["declined"], before)
            if not live:
                continue
            rows = np.flatnonzero((ids == customer) & (before_s == before))
            declined = self.snapshot.offers.encode(list(live), missing=-1)
            at = dict(zip(declined.tolist(), live.values(), strict=True))
            for row in rows[np.isin(offers[rows], declined)]:
                moment = at[int(offers[row])]
                out[row] = moment if np.isnan(out[row]) else max(out[row], moment)
        return out

    def had_offer(
        self, customers: np.ndarray, offers: np.ndarray, before_s: np.ndarray, event: str
    ) -> np.ndarray:
        had = self.history.had_offer(customers, offers, before_s, event).copy()
        ids = self._ids(customers)
        offer_ids = self.snapshot.offers.decode(offers)
        for i, (customer, before) in enumerate(zip(ids, before_s, strict=True)):
            if had[i]:
                continue
            if event == "accepted":
                live = self.sql.last_outcomes(str(customer), list(ACCEPTED_OUTCOMES), int(before))
                had[i] = str(offer_ids[i]) in live
            else:
                had[i] = str(offer_ids[i]) in self.sql.shown_offers(str(customer), int(before))
        return had
