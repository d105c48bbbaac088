"""Reviews: a frozen sample of what a challenger would serve, decided item by item, then
released (champion moves) or rejected (champion stays) by an approver.

``open_review`` takes a stratified sample of customers (segment × tenure band, channels
in turn, plus a few cold-start customers) and freezes, for each, the challenger's top-k
with its because text, contributions and eligibility trace, beside what the current
champion serves the same customer.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from runtime.registry import ModelBundle
from serving.engine import Recommender
from serving.review.store import REJECT_REASONS, ReviewStore, _metadata

__all__ = ["ReleaseError", "Reviews"]

log = logging.getLogger("nextbest.review")

TENURE_BANDS = ((90, "under 90 days"), (365, "90 days to a year"), (10**9, "over a year"))
REVIEW_CHANNELS = ("web", "app", "email")

reviews = sa.Table(
    "reviews",
    _metadata,
    sa.Column("review_id", sa.String(32), primary_key=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("champion_version", sa.String(32)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)
review_slates = sa.Table(
    "review_slates",
    _metadata,
    sa.Column("review_id", sa.String(32), sa.ForeignKey("reviews.review_id"), primary_key=True),
    sa.Column("slate_no", sa.Integer, primary_key=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("segment", sa.String(128)),
    sa.Column("tenure_band", sa.String(32), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("cold_start", sa.Boolean, nullable=False),
    sa.Column("challenger", sa.Text, nullable=False),
    sa.Column("champion", sa.Text),
)
review_items = sa.Table(
    "review_items",
    _metadata,
    # what has to be decided: one row per offer of a frozen challenger slate
    sa.Column("review_id", sa.String(32), primary_key=True),
    sa.Column("slate_no", sa.Integer, primary_key=True),
    sa.Column("offer_id", sa.String(128), primary_key=True),
)
review_gate = sa.Table(
    "review_gate",
    _metadata,
    # one row; every opening and release claim locks it first, so they run one at a time
    sa.Column("name", sa.String(16), primary_key=True),
    sa.Column("touched_at", sa.DateTime),
)
review_decisions = sa.Table(
    "review_decisions",
    _metadata,
    sa.Column("review_id", sa.String(32), primary_key=True),
    sa.Column("slate_no", sa.Integer, primary_key=True),
    sa.Column("offer_id", sa.String(128), primary_key=True),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32)),
    sa.Column("comment", sa.Text),
    sa.Column("reviewer", sa.String(64), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
)


class ReleaseError(ValueError):
    """The release decision is not allowed yet (and why)."""


class NotOpen(ValueError):
    """The review is not open any more (decided, or being released)."""

    def __init__(self, review_id: str, status: str) -> None:
        super().__init__(f"review {review_id} is {status}, not open")
        self.status = status


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Reviews:
    """Reviews on top of a :class:`ReviewStore` (same database, same audit log)."""

    def __init__(self, store: ReviewStore) -> None:
        self.store = store
        store.when_ready(_prepare)

    def _lock_gate(self, connection: sa.Connection) -> None:
        """Serialise openings and release claims (row lock on PostgreSQL, write lock on
        SQLite), for the rest of ``connection``'s transaction."""
        connection.execute(review_gate.update().values(touched_at=_now()))

    def open_review(
        self,
        challenger: Recommender,
        champion: Recommender | None,
        *,
        actor: str,
        sample: int = 50,
        k: int = 3,
        threshold: float = 0.2,
        seed: int = 0,
    ) -> str:
        """Freeze a stratified sample of the challenger's slates (and the champion's)."""
        self.store.require(actor, "reviewer")
        if challenger.model.bundle is None:
            raise ValueError("the challenger has no model to review")
        if not 0 < threshold <= 1:
            raise ValueError(f"the rejection threshold must be in (0, 1], not {threshold}")
        chosen = _stratified_sample(challenger, sample, seed)
        review_id = uuid.uuid4().hex
        name, version = challenger.model.bundle.name, challenger.model.bundle.version
        champion_version = (
            None
            if champion is None or champion.model.bundle is None
            else champion.model.bundle.version
        )
        rows = []
        for slate_no, (customer, segment, band, channel, cold) in enumerate(chosen, start=1):
            frozen = challenger.recommend(
                customer, channel=channel, k=k, debug=True, log_exposure=False
            )
            current = (
                None
                if champion is None
                else champion.recommend(customer, channel=channel, k=k, log_exposure=False)
            )
            rows.append(
                {
                    "review_id": review_id,
                    "slate_no": slate_no,
                    "customer_id": customer,
                    "segment": segment,
                    "tenure_band": band,
                    "channel": channel,
                    "cold_start": cold,
                    "challenger": json.dumps(frozen, default=str),
                    "champion": None if current is None else json.dumps(current, default=str),
                }
            )
        with self.store.begin() as connection:
            self._lock_gate(connection)
            pending = connection.execute(
                sa.select(reviews.c.review_id).where(
                    (reviews.c.model_name == name)
                    & (reviews.c.version == version)
                    & reviews.c.status.in_(("open", "releasing"))
                )
            ).scalar()
            if pending is not None:
                raise ValueError(f"version {version} already has an open review ({pending})")
            connection.execute(
                reviews.insert().values(
                    review_id=review_id,
                    model_name=name,
                    version=version,
                    champion_version=champion_version,
                    status="open",
                    threshold=threshold,
                    created_by=actor,
                    created_at=_now(),
                )
            )
            connection.execute(review_slates.insert(), rows)
            items = [
                {"review_id": review_id, "slate_no": row["slate_no"], "offer_id": o["offer_id"]}
                for row in rows
                for o in json.loads(str(row["challenger"]))["offers"]
            ]
            if items:
                connection.execute(review_items.insert(), items)
            self.store.record_audit(
                connection,
                actor,
                "open_review",
                review_id,
                after={
                    "model": name,
                    "version": version,
                    "champion": champion_version,
                    "slates": len(rows),
                    "threshold": threshold,
                },
            )
        return review_id

    def open_against(
        self,
        current: Recommender,
        bundle: ModelBundle,
        *,
        actor: str,
        sample: int = 50,
        k: int = 3,
        threshold: float = 0.2,
    ) -> str:
        """Review ``bundle`` beside what ``current`` serves: the same snapshot, ledger and
        reviewers' blocks, its model (or its rules-only ranking, before any champion) as
        the champion column, and no holdout (reviewers see every sampled customer's
        slate)."""
        self.store.require(actor, "reviewer")
        from serving.assembly import build_recommender

        settings = replace(current.settings, holdout_share=0.0)

        def beside(version: ModelBundle | None) -> Recommender:
            return build_recommender(
                settings,
                workspace=current.workspace,
                bundle=version,
                blocks=current.blocks,
                snapshot=current.snapshot,
                ledger=current.ledger,
            )

        challenger, champion = beside(bundle), beside(current.model.bundle)
        return self.open_review(
            challenger, champion, actor=actor, sample=sample, k=k, threshold=threshold
        )

    def review(self, review_id: str) -> dict[str, Any]:
        with self.store.connect() as connection:
            head = (
                connection.execute(reviews.select().where(reviews.c.review_id == review_id))
                .mappings()
                .first()
            )
            if head is None:
                raise KeyError(f"no review {review_id!r}")
            slates = (
                connection.execute(
                    review_slates.select()
                    .where(review_slates.c.review_id == review_id)
                    .order_by(review_slates.c.slate_no)
                )
                .mappings()
                .all()
            )
            decisions = (
                connection.execute(
                    review_decisions.select().where(review_decisions.c.review_id == review_id)
                )
                .mappings()
                .all()
            )
            counts = _count(connection, review_id)
        decided = {(d["slate_no"], d["offer_id"]): dict(d) for d in decisions}
        out = []
        for slate in slates:
            challenger = json.loads(slate["challenger"])
            for offer in challenger["offers"]:
                offer["decision"] = decided.get((slate["slate_no"], offer["offer_id"]))
            out.append(
                dict(slate)
                | {
                    "challenger": challenger,
                    "champion": None
                    if slate["champion"] is None
                    else json.loads(slate["champion"]),
                }
            )
        return dict(head) | {"slates": out, "counts": counts}

    def list_reviews(self) -> list[dict[str, Any]]:
        """Every review, newest first, with its counts (from two aggregates, not the slates)."""
        with self.store.connect() as connection:
            rows = (
                connection.execute(reviews.select().order_by(reviews.c.created_at.desc()))
                .mappings()
                .all()
            )
            counts = _tally(connection)
        return [
            dict(row) | {"counts": counts.get(row["review_id"], _rates(0, 0, 0))} for row in rows
        ]

    def _slate(self, connection: sa.Connection, review_id: str, slate_no: int) -> dict[str, Any]:
        """One slate of an open review, with its current decisions (KeyError if none).
        The review's row stays locked until the caller's transaction ends, so a decision
        and the release decision never interleave."""
        self._lock_open(connection, review_id)
        row = (
            connection.execute(
                review_slates.select().where(
                    (review_slates.c.review_id == review_id)
                    & (review_slates.c.slate_no == slate_no)
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise KeyError(f"review {review_id} has no slate {slate_no}")
        decided = {
            d["offer_id"]: dict(d)
            for d in connection.execute(
                review_decisions.select().where(
                    (review_decisions.c.review_id == review_id)
                    & (review_decisions.c.slate_no == slate_no)
                )
            ).mappings()
        }
        offers = json.loads(row["challenger"])["offers"]
        return {"offers": offers, "decided": decided}

    def decide(
        self,
        review_id: str,
        slate_no: int,
        offer_id: str,
        decision: str,
        *,
        actor: str,
        reason: str | None = None,
        comment: str | None = None,
    ) -> None:
        """Approve, or reject with a reason (``other`` needs a comment)."""
        self.store.require(actor, "reviewer")
        if decision not in ("approve", "reject"):
            raise ValueError(f"decision must be approve or reject, not {decision!r}")
        if decision == "reject" and reason not in REJECT_REASONS:
            raise ValueError(f"a rejection needs a reason: one of {', '.join(REJECT_REASONS)}")
        if reason == "other" and not (comment or "").strip():
            raise ValueError("a rejection for 'other' needs a comment")
        record = {
            "decision": decision,
            "reason": reason if decision == "reject" else None,
            "comment": comment,
        }
        with self.store.begin() as connection:
            slate = self._slate(connection, review_id, slate_no)
            if offer_id not in {o["offer_id"] for o in slate["offers"]}:
                raise KeyError(f"slate {slate_no} of review {review_id} has no offer {offer_id!r}")
            self._record(connection, review_id, slate_no, offer_id, record, slate, actor)

    def approve_rest(self, review_id: str, slate_no: int, *, actor: str) -> int:
        """Approve every offer of a slate not decided yet (one audit entry each); how many."""
        self.store.require(actor, "reviewer")
        record = {"decision": "approve", "reason": None, "comment": None}
        with self.store.begin() as connection:
            slate = self._slate(connection, review_id, slate_no)
            rest = [o["offer_id"] for o in slate["offers"] if o["offer_id"] not in slate["decided"]]
            for offer_id in rest:
                self._record(connection, review_id, slate_no, offer_id, record, slate, actor)
        return len(rest)

    def _record(
        self,
        connection: sa.Connection,
        review_id: str,
        slate_no: int,
        offer_id: str,
        record: dict[str, Any],
        slate: dict[str, Any],
        actor: str,
    ) -> None:
        key = (
            (review_decisions.c.review_id == review_id)
            & (review_decisions.c.slate_no == slate_no)
            & (review_decisions.c.offer_id == offer_id)
        )
        connection.execute(review_decisions.delete().where(key))
        connection.execute(
            review_decisions.insert().values(
                review_id=review_id,
                slate_no=slate_no,
                offer_id=offer_id,
                reviewer=actor,
                at=_now(),
                **record,
            )
        )
        before = slate["decided"].get(offer_id)
        self.store.record_audit(
            connection,
            actor,
            "decide",
            f"{review_id}/{slate_no}/{offer_id}",
            before=None
            if before is None
            else {k: before[k] for k in ("decision", "reason", "comment")},
            after=record,
        )

    def _lock_open(self, connection: sa.Connection, review_id: str) -> None:
        """Lock an open review's row for this transaction (a no-op write takes the row lock
        on PostgreSQL and the write lock on SQLite); KeyError or ValueError otherwise."""
        touched = connection.execute(
            reviews.update()
            .where((reviews.c.review_id == review_id) & (reviews.c.status == "open"))
            .values(status="open")
        ).rowcount
        if touched == 1:
            return
        status = connection.execute(
            sa.select(reviews.c.status).where(reviews.c.review_id == review_id)
        ).scalar()
        if status is None:
            raise KeyError(f"no review {review_id!r}")
        raise NotOpen(review_id, status)

    def release(
        self, review_id: str, *, approve: bool, actor: str, override_baseline: bool = False
    ) -> dict[str, Any]:
        """The release decision. Approval needs every item reviewed, a rejection rate under
        the review's threshold, an approver, and the champion the reviewers compared with
        still serving; it moves ``champion`` to the version and tags it. Rejection tags the
        version and leaves ``champion`` where it is.

        One transaction claims the review (status ``releasing``, audited as
        ``release_started``) after checking and counting it, and only one review in the
        database can be releasing at a time: a double submit, a second approver, another
        review's release or a decision arriving meanwhile is refused. The registry is
        called after that transaction. If it fails, the real outcome is read back from the
        registry; a release that did not happen leaves the review open again.

        A version whose served slate did not beat its best baseline (registry tag
        ``quality.beats_best_baseline=false``) is released only with
        ``override_baseline``, which the audit log and the version's tags record."""
        self.store.require(actor, "approver")
        quality = _quality(self._model_of(review_id)) if approve else {}
        with self.store.begin() as connection:
            self._lock_gate(connection)
            busy = connection.execute(
                sa.select(reviews.c.review_id).where(
                    (reviews.c.status == "releasing") & (reviews.c.review_id != review_id)
                )
            ).scalar()
            if busy is not None:
                raise ReleaseError(
                    f"review {busy} is being released; try again in a moment (if it stays "
                    f"so, an approver runs: nextbest review resolve {busy})"
                )
            try:
                self._lock_open(connection, review_id)
            except NotOpen as error:
                raise ReleaseError(f"review {review_id} is already {error.status}") from None
            head = connection.execute(
                reviews.select().where(reviews.c.review_id == review_id)
            ).first()
            assert head is not None
            counts = _count(connection, review_id)
            if approve:
                _check_counts(head, counts)
                if quality.get("beats") is False and not override_baseline:
                    raise ReleaseError(
                        f"version {quality['version']} does not beat its best baseline "
                        f"({quality['summary']}); tick the override to release it anyway"
                    )
            connection.execute(
                reviews.update().where(reviews.c.review_id == review_id).values(status="releasing")
            )
            overridden = bool(approve and quality.get("beats") is False)
            self.store.record_audit(
                connection,
                actor,
                "release_started",
                review_id,
                after={"approve": approve, "version": head.version}
                | counts
                | ({"baseline_override": quality["summary"]} if overridden else {})
                | (
                    {"fairness_breaches": len(quality["fairness"])}
                    if approve and quality.get("fairness")
                    else {}
                ),
            )
        if approve:
            try:
                serving = _champion(head.model_name)
            except Exception as error:
                self._reopen(head, actor, str(error))
                raise ReleaseError(f"the model registry is unreachable ({error})") from error
            if serving != head.champion_version:
                then = head.champion_version or "none"
                message = (
                    f"the champion changed since this review opened (then {then}, now "
                    f"{serving or 'none'}): open a new review to compare with it"
                )
                self._reopen(head, actor, message)
                raise ReleaseError(message)
        try:
            status = self._publish(
                head, counts, approve=approve, actor=actor, overridden=overridden
            )
        except Exception as error:
            if self._settle(head, approve=approve, actor=actor, error=error):
                return {"review_id": review_id, "version": head.version, "status": "approved"}
            raise ReleaseError(
                f"the model registry could not be updated ({error}); nothing was released"
            ) from error
        self._finish(head, counts, status=status, actor=actor)
        return {"review_id": review_id, "version": head.version, "status": status, **counts}

    def resolve(self, review_id: str, *, actor: str) -> str:
        """Settle a review left ``releasing`` (the process died mid-release): approved if
        the registry shows its version as champion, open again otherwise."""
        self.store.require(actor, "approver")
        with self.store.connect() as connection:
            head = connection.execute(
                reviews.select().where(reviews.c.review_id == review_id)
            ).first()
        if head is None:
            raise KeyError(f"no review {review_id!r}")
        if head.status != "releasing":
            return str(head.status)
        self._settle(head, approve=True, actor=actor, error=None)
        with self.store.connect() as connection:
            return str(
                connection.execute(
                    sa.select(reviews.c.status).where(reviews.c.review_id == review_id)
                ).scalar()
            )

    def _model_of(self, review_id: str) -> tuple[str, str]:
        with self.store.connect() as connection:
            head = connection.execute(
                sa.select(reviews.c.model_name, reviews.c.version).where(
                    reviews.c.review_id == review_id
                )
            ).first()
        if head is None:
            raise KeyError(f"no review {review_id!r}")
        return str(head.model_name), str(head.version)

    def quality(self, review_id: str) -> dict[str, Any]:
        """Whether the reviewed version beat its best baseline (what the page shows)."""
        model = self._model_of(review_id)
        try:
            return _quality(model)
        except ReleaseError as error:
            return {"version": model[1], "beats": None, "summary": str(error), "fairness": None}

    @staticmethod
    def _publish(
        head: Any, counts: dict[str, Any], *, approve: bool, actor: str, overridden: bool = False
    ) -> str:
        from runtime.registry import CHAMPION, set_alias, set_version_tags

        status = "approved" if approve else "rejected"
        tags = {
            "review.id": head.review_id,
            "review.status": status,
            "review.by": actor,
            "review.at": _now().isoformat(timespec="seconds"),
            "review.items": str(counts["items"]),
            "review.rejected": str(counts["rejected"]),
        }
        if overridden:
            tags["review.baseline_override"] = actor
        set_version_tags(head.model_name, head.version, tags)
        if approve:
            set_alias(head.model_name, CHAMPION, head.version)
        return status

    def _finish(self, head: Any, counts: dict[str, Any], *, status: str, actor: str) -> None:
        with self.store.begin() as connection:
            connection.execute(
                reviews.update().where(reviews.c.review_id == head.review_id).values(status=status)
            )
            self.store.record_audit(
                connection,
                actor,
                "release" if status == "approved" else "reject_release",
                head.review_id,
                before={"champion": head.champion_version, "status": "open"},
                after={
                    "champion": head.version if status == "approved" else head.champion_version,
                    "status": status,
                }
                | counts,
            )

    def _settle(self, head: Any, *, approve: bool, actor: str, error: Exception | None) -> bool:
        """After a failed (or interrupted) release: if the registry shows the version as
        champion, the release happened (True); otherwise the review is open again and the
        ``review.*`` tags this attempt may have written are removed (False)."""
        from runtime.registry import delete_version_tags, version_tags

        try:
            happened = approve and _champion(head.model_name) == head.version
        except Exception:  # the registry still unreachable: assume it did not happen
            happened = False
        if happened:
            with self.store.connect() as connection:
                counts = _count(connection, head.review_id)
            self._finish(head, counts, status="approved", actor=actor)
            return True
        try:
            tags = version_tags(head.model_name, head.version)
            if tags.get("review.id") == head.review_id:
                delete_version_tags(
                    head.model_name, head.version, [k for k in tags if k.startswith("review.")]
                )
        except Exception:  # best effort: the audit entry below says what happened
            log.warning(
                "could not remove the review tags of %s version %s",
                head.model_name,
                head.version,
                exc_info=True,
            )
        self._reopen(head, actor, "interrupted" if error is None else str(error))
        return False

    def _reopen(self, head: Any, actor: str, why: str) -> None:
        """A release that did not happen: the review is open again (audited)."""
        with self.store.begin() as connection:
            connection.execute(
                reviews.update()
                .where((reviews.c.review_id == head.review_id) & (reviews.c.status == "releasing"))
                .values(status="open")
            )
            self.store.record_audit(
                connection, actor, "release_failed", head.review_id, after={"error": why}
            )


LEGACY_MODEL_NAME = "nextbest-ranker"
"""The one registered model before each workspace had its own: reviews opened then
reviewed its versions."""


def _prepare(engine: sa.Engine) -> None:
    """The review tables, brought up to date, and the gate's one row (on the raw engine:
    run when the ledger's database first answers, before anything else uses it)."""
    _metadata.create_all(engine)
    _add_model_name(engine)
    _ensure_gate(engine)
    _backfill_items(engine)


def _ensure_gate(engine: sa.Engine) -> None:
    try:
        with engine.begin() as connection:
            if connection.execute(sa.select(review_gate.c.name)).first() is None:
                connection.execute(review_gate.insert().values(name="gate", touched_at=_now()))
    except IntegrityError:  # another process made it at the same moment
        pass


def _backfill_items(engine: sa.Engine) -> None:
    """Reviews opened before ``review_items`` existed get their items listed once."""
    try:
        with engine.begin() as connection:
            listed = sa.select(review_items.c.review_id).distinct()
            rows = connection.execute(
                sa.select(
                    review_slates.c.review_id,
                    review_slates.c.slate_no,
                    review_slates.c.challenger,
                ).where(review_slates.c.review_id.not_in(listed))
            ).all()
            items = [
                {"review_id": r.review_id, "slate_no": r.slate_no, "offer_id": o["offer_id"]}
                for r in rows
                for o in json.loads(r.challenger)["offers"]
            ]
            if items:
                connection.execute(review_items.insert(), items)
    except IntegrityError:  # another process backfilled them at the same moment
        pass


def _add_model_name(engine: sa.Engine) -> None:
    """Reviews tables made before ``model_name`` existed get the column, their rows the
    name every version had then."""
    columns = {c["name"] for c in sa.inspect(engine).get_columns("reviews")}
    if "model_name" in columns:
        return
    try:
        # DDL takes no bound parameters: the default is rendered by the dialect's own
        # literal quoting, never pasted into the statement
        default = sa.literal(LEGACY_MODEL_NAME).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True}
        )
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "ALTER TABLE reviews ADD COLUMN model_name VARCHAR(128) NOT NULL "
                    f"DEFAULT {default}"
                )
            )
    except sa.exc.DBAPIError:  # another process added it at the same moment
        if "model_name" not in {c["name"] for c in sa.inspect(engine).get_columns("reviews")}:
            raise


def _check_counts(head: Any, counts: dict[str, Any]) -> None:
    if counts["items"] == 0:
        raise ReleaseError("the review has no recommendations to approve")
    if counts["decided"] < counts["items"]:
        raise ReleaseError(
            f"{counts['items'] - counts['decided']} of {counts['items']} items are not reviewed yet"
        )
    if counts["rejection_rate"] >= head.threshold:
        raise ReleaseError(
            f"the rejection rate {counts['rejection_rate']:.0%} is not under "
            f"the threshold {head.threshold:.0%}"
        )


def _quality(model: tuple[str, str]) -> dict[str, Any]:
    """The version's baseline verdict from its registry tags: ``beats`` is True, False,
    or None for a version registered before the served-slate evaluation."""
    from runtime.registry import BEATS_BASELINE_TAG, QUALITY_SUMMARY_TAG, version_tags

    name, version = model
    try:
        tags = version_tags(name, version)
    except Exception as error:  # an unreachable registry: the release itself will say so
        raise ReleaseError(f"the model registry is unreachable ({error})") from error
    verdict = tags.get(BEATS_BASELINE_TAG)
    return {
        "version": version,
        "beats": None if verdict is None else verdict == "true",
        "summary": tags.get(QUALITY_SUMMARY_TAG, "not evaluated"),
        "fairness": _fairness(tags),
    }


def _fairness(tags: dict[str, str]) -> list[dict[str, Any]] | None:
    """The version's fairness breaches from its training (``policy.fairness``), each with
    its ``text``; None for a version trained before fairness was judged."""
    from policy.fairness import FAIRNESS_TAG, breaches_from_tag

    breaches = breaches_from_tag(tags.get(FAIRNESS_TAG))
    if breaches is None:
        return None
    return [vars(b) | {"text": b.describe()} for b in breaches]


def _champion(name: str) -> str | None:
    from runtime.registry import CHAMPION, resolve_version

    try:
        version, _ = resolve_version(name, alias=CHAMPION)
    except LookupError:
        return None
    return str(version)


def _rates(items: int, decided: int, rejected: int) -> dict[str, Any]:
    return {
        "items": items,
        "decided": decided,
        "rejected": rejected,
        "rejection_rate": rejected / items if items else 0.0,
    }


def _tally(connection: sa.Connection, review_id: str | None = None) -> dict[str, dict[str, Any]]:
    """Items, decisions and rejections per review (one review, or all), in SQL."""
    items = sa.select(review_items.c.review_id, sa.func.count().label("n")).group_by(
        review_items.c.review_id
    )
    decided = sa.select(
        review_decisions.c.review_id,
        sa.func.count().label("n"),
        sa.func.sum(sa.case((review_decisions.c.decision == "reject", 1), else_=0)).label("r"),
    ).group_by(review_decisions.c.review_id)
    if review_id is not None:
        items = items.where(review_items.c.review_id == review_id)
        decided = decided.where(review_decisions.c.review_id == review_id)
    out = {r.review_id: _rates(r.n, 0, 0) for r in connection.execute(items)}
    for r in connection.execute(decided):
        out[r.review_id] = _rates(out.get(r.review_id, _rates(0, 0, 0))["items"], r.n, int(r.r))
    return out


def _count(connection: sa.Connection, review_id: str) -> dict[str, Any]:
    """One review's items, decisions and rejections."""
    return _tally(connection, review_id).get(review_id, _rates(0, 0, 0))


def _stratified_sample(
    recommender: Recommender, sample: int, seed: int
) -> list[tuple[str, str | None, str, str, bool]]:
    """(customer, segment, tenure band, channel, cold start) rows, spread over the strata."""
    s = recommender.snapshot
    rng = np.random.default_rng(seed)
    now = recommender.now_s()
    known = sorted(recommender.known_customers())
    codes = s.customers.encode(known)
    first = s.orders_by_customer.seconds_at(
        s.orders_by_customer.first_of_group(codes, np.full(len(codes), now))
    )
    tenure_days = (now - np.nan_to_num(first, nan=now)) / 86_400
    bands = [next(name for limit, name in TENURE_BANDS if days < limit) for days in tenure_days]
    segments = [
        None if code == s.segments.unknown else str(s.segments.values[code])
        for code in s.customer_segment[codes]
    ]
    strata: dict[tuple[str, str], list[int]] = {}
    for i, (segment, band) in enumerate(zip(segments, bands, strict=True)):
        strata.setdefault((str(segment), band), []).append(i)
    for members in strata.values():
        rng.shuffle(members)
    cold = max(1, sample // 10)
    picked: list[int] = []
    keys = sorted(strata)
    while len(picked) < min(sample - cold, len(known)):
        for key in keys:
            if strata[key] and len(picked) < sample - cold:
                picked.append(strata[key].pop())
    rows = [
        (known[i], segments[i], bands[i], REVIEW_CHANNELS[n % len(REVIEW_CHANNELS)], False)
        for n, i in enumerate(picked)
    ]
    rows += [
        (f"cold-start-{n + 1}", None, "new", REVIEW_CHANNELS[n % len(REVIEW_CHANNELS)], True)
        for n in range(cold)
    ]
    return rows
