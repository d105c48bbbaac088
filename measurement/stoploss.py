"""The stop-loss: switch off an offer that confidently fails to pay, two weeks in a row.

Input: the scorecard's weekly cycles (``measurement.scorecard.offer_cycles``), one row per
(offer_id, week_start) with the columns of :data:`CYCLE_COLUMNS`: the opportunities per arm
(``n_exposed``, ``n_control``), the attach rates, the ``lift`` (attach-rate difference,
exposed - control) and the ``margin_uplift`` (contribution margin per opportunity, exposed
- control), each with the bounds of its 95 % bootstrap interval by customer (NaN where
unknown, e.g. margin without costs).

**The rule, by the interval.** A cycle *fails* when the upper bound of the offer's lift
interval is below ``min_lift``, or the upper bound of its margin-uplift interval is below
``min_margin_uplift`` (the rules file's ``stoploss:`` section, :class:`policy.rules.StopLoss`;
0.0 for both by default: "confidently harmful or useless"). The upper bound, not the point
estimate: an offer is killed only when even the best case its data allows misses the bar,
so noise never kills a winner, and a winner with a wide interval (few opportunities) is
never killed; only a bar the interval clears is a pass. A cycle with fewer than
``min_opportunities`` in either arm, or with neither interval known, is *insufficient*:
it neither fails nor passes. An offer is killed when it fails each of the last
``consecutive_cycles`` (2) complete weekly cycles, calendar weeks in a row: a week that
passed, is insufficient, or has no row breaks the run. For an offer whose true lift sits
exactly on the bar, each cycle fails with probability 2.5 % (one side of a calibrated 95 %
interval), so two independent cycles falsely kill it with probability (2.5 %)^2, about
0.06 %; a real winner (true lift above the bar) less often still. A cycle is complete when
``week_start + 7 days <= as_of``: the week in progress is never judged.

**A kill is stored and audited.** :func:`run_stoploss` stores each kill in the ledger's
database (table ``offer_kills``, :meth:`serving.ledger.SqlLedger.insert_kill`) with the
rule that fired, the figures of the failing cycles, and a learning record (the offer, its
message, price, discount, value and margin, its audiences and segments, the channels and
placements it was served on, the figures per cycle), and writes an entry to the review
gate's append-only audit log (``review_audit``, action ``stoploss_kill``, the actor who ran
it) in the same transaction. From the next request on, eligibility excludes the offer with
the reason ``stop_loss``, in the service and in batch
(:meth:`serving.ledger.SqlLedger.stopped_offers`). Runs are idempotent: cycles that killed
an offer never kill it again, so :func:`revive` (a review approver, audited as
``stoploss_revive``) holds until two *later* cycles fail.
"""

from __future__ import annotations

import getpass
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from measurement.scorecard import CYCLE_COLUMNS
from policy.rules import StopLoss
from serving.ledger import SqlLedger

__all__ = [
    "CYCLE_COLUMNS",
    "CYCLE_DAYS",
    "KillDecision",
    "StopLossReport",
    "decide",
    "default_actor",
    "judge_cycles",
    "judged_weeks",
    "learning_record",
    "read_cycles",
    "revive",
    "run_stoploss",
]

CYCLE_DAYS = 7
WEEK = pd.Timedelta(days=CYCLE_DAYS)
_RULES = {
    "lift": ("lift_high", "min_lift"),
    "margin_uplift": ("margin_high", "min_margin_uplift"),
}


def _checked(cycles: pd.DataFrame) -> pd.DataFrame:
    """A copy with the cycle columns typed (week_start naive UTC), or a ValueError."""
    missing = [c for c in CYCLE_COLUMNS if c not in cycles.columns]
    if missing:
        raise ValueError(
            f"the cycles lack the columns {', '.join(missing)}: the stop-loss reads the "
            f"scorecard's offer cycles ({', '.join(CYCLE_COLUMNS)})"
        )
    frame = cycles.loc[:, list(CYCLE_COLUMNS)].copy()
    frame["offer_id"] = frame["offer_id"].astype("str")
    week = pd.to_datetime(frame["week_start"])
    if isinstance(week.dtype, pd.DatetimeTZDtype):
        week = week.dt.tz_convert("UTC").dt.tz_localize(None)
    frame["week_start"] = week
    for column in CYCLE_COLUMNS[2:]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    duplicated = frame.duplicated(["offer_id", "week_start"])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise ValueError(
            f"the cycles hold offer {row['offer_id']!r} twice for the week of "
            f"{row['week_start'].date()}: one row per (offer_id, week_start)"
        )
    return frame


def judge_cycles(cycles: pd.DataFrame, config: StopLoss) -> pd.DataFrame:
    """Each cycle's verdict: the cycle columns plus ``verdict`` (``fail``, ``pass`` or
    ``insufficient``) and ``fails`` (the rules that failed: ``lift``, ``margin_uplift``).
    The input is not changed."""
    frame = _checked(cycles)
    enough = (frame["n_exposed"] >= config.min_opportunities) & (
        frame["n_control"] >= config.min_opportunities
    )
    known = frame["lift_high"].notna() | frame["margin_high"].notna()
    failing = {
        name: frame[bound].notna() & (frame[bound] < getattr(config, bar))
        for name, (bound, bar) in _RULES.items()
    }
    insufficient = ~(enough & known)
    any_fail = failing["lift"] | failing["margin_uplift"]
    frame["verdict"] = np.select(
        [insufficient.to_numpy(), any_fail.to_numpy()], ["insufficient", "fail"], "pass"
    )
    judged = [(failing[name] & ~insufficient).to_numpy() for name in _RULES]
    fails = [
        [name for name, hit in zip(_RULES, hits, strict=True) if hit]
        for hits in zip(*judged, strict=True)
    ]
    frame["fails"] = pd.Series(fails, index=frame.index, dtype="object")
    return frame


@dataclass(frozen=True)
class KillDecision:
    """An offer to kill: the rules that fired (``rule``) and its failing cycles, oldest
    first (``cycles``: the cycle columns, ``verdict`` and ``fails``, JSON-ready)."""

    offer_id: str
    rule: str
    cycles: list[dict[str, Any]]
    last_cycle: pd.Timestamp

    def line(self) -> str:
        weeks = "; ".join(_cycle_text(cycle) for cycle in self.cycles)
        return f"{self.offer_id}: {self.rule}, {len(self.cycles)} cycles in a row ({weeks})"


def judged_weeks(cycles: pd.DataFrame, config: StopLoss, as_of: Any) -> list[pd.Timestamp]:
    """The week starts the stop-loss judges at ``as_of``: the last complete week in the
    cycles and the ``consecutive_cycles - 1`` calendar weeks before it, oldest first
    (empty if no week is complete)."""
    weeks = pd.to_datetime(pd.Series(cycles["week_start"]).drop_duplicates())
    complete = weeks[weeks + WEEK <= pd.Timestamp(as_of)]
    if complete.empty:
        return []
    last = complete.max()
    return [last - WEEK * k for k in reversed(range(config.consecutive_cycles))]


def decide(
    cycles: pd.DataFrame,
    config: StopLoss,
    *,
    as_of: Any,
    judged_before: Mapping[str, Any] | None = None,
) -> list[KillDecision]:
    """The offers to kill at ``as_of``: those failing every one of the judged weeks
    (:func:`judged_weeks`). ``judged_before``: offer → the last cycle an earlier kill
    judged; only cycles after it count again (idempotent runs; a revival holds until
    later cycles fail)."""
    verdicts = judge_cycles(cycles, config)
    return _decide(verdicts, config, judged_weeks(verdicts, config, as_of), judged_before or {})


def _decide(
    verdicts: pd.DataFrame,
    config: StopLoss,
    weeks: list[pd.Timestamp],
    judged_before: Mapping[str, Any],
) -> list[KillDecision]:
    if not weeks:
        return []
    judged = verdicts[verdicts["week_start"].isin(weeks)]
    failed = judged[judged["verdict"] == "fail"]
    counts = failed.groupby("offer_id")["week_start"].nunique()
    decisions = []
    for offer_id in sorted(counts.index[counts == len(weeks)]):
        before = judged_before.get(offer_id)
        if before is not None and weeks[0] <= pd.Timestamp(before):
            continue
        rows = failed[failed["offer_id"] == offer_id].sort_values("week_start")
        fired = [name for name in _RULES if any(name in f for f in rows["fails"])]
        rule = "; ".join(
            f"{_RULES[name][0]} < {_RULES[name][1]} ({getattr(config, _RULES[name][1])})"
            for name in fired
        )
        decisions.append(
            KillDecision(
                offer_id=offer_id,
                rule=rule,
                cycles=[_json_ready(row) for row in rows.to_dict("records")],
                last_cycle=pd.Timestamp(weeks[-1]),
            )
        )
    return decisions


def _json_ready(record: Mapping[str, Any]) -> dict[str, Any]:
    """NaN as None, times as ISO text, numpy scalars as Python's (PostgreSQL's JSON
    refuses NaN)."""
    ready: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, pd.Timestamp | datetime):
            ready[key] = value.isoformat()
        elif isinstance(value, np.generic):
            ready[key] = _json_value(value.item())
        elif isinstance(value, list | tuple | np.ndarray):
            ready[key] = [_json_value(v.item() if isinstance(v, np.generic) else v) for v in value]
        else:
            ready[key] = _json_value(value)
    return ready


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _figure(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cycle_text(cycle: Mapping[str, Any]) -> str:
    return (
        f"week {str(cycle['week_start'])[:10]}: n {_figure(cycle['n_exposed'], 0)}/"
        f"{_figure(cycle['n_control'], 0)}, lift {_figure(cycle['lift'], 4)} "
        f"[{_figure(cycle['lift_low'], 4)}, {_figure(cycle['lift_high'], 4)}], margin "
        f"{_figure(cycle['margin_uplift'], 2)} [{_figure(cycle['margin_low'], 2)}, "
        f"{_figure(cycle['margin_high'], 2)}]"
    )


def learning_record(
    decision: KillDecision,
    *,
    offers: pd.DataFrame | None = None,
    products: pd.DataFrame | None = None,
    placements: Sequence[str] = (),
) -> dict[str, Any]:
    """What the kill teaches: the offer (kind, category), its message (title), price (its
    products' prices summed), discount, value, margin and lever, its audiences, segments
    and allowed channels, where it was served (``placements``), the rule and the figures
    per cycle. ``offers`` and ``products``: the workspace's tables (None: unknown)."""
    record: dict[str, Any] = {
        "offer_id": decision.offer_id,
        "rule": decision.rule,
        "placements": list(placements),
        "cycles": decision.cycles,
    }
    row = None
    if offers is not None and "offer_id" in offers.columns:
        match = offers[offers["offer_id"].astype("str") == decision.offer_id]
        row = None if match.empty else match.iloc[0]
    fields = ("kind", "category", "title", "discount", "value", "margin", "lever")
    lists = ("target_audiences", "target_segments", "channels")
    for name in fields:
        value = None if row is None or name not in row.index else row[name]
        record[name] = None if value is None or _missing(value) else _json_value(_scalar(value))
    for name in lists:
        value = None if row is None or name not in row.index else row[name]
        record[name] = [] if value is None or _missing(value) else [str(v) for v in value]
    record["message"] = record.pop("title")
    record["price"] = None
    if row is not None and products is not None and "product_ids" in row.index:
        ids = [str(p) for p in (row["product_ids"] if not _missing(row["product_ids"]) else [])]
        prices = products.set_index(products["product_id"].astype("str"))["price"]
        known = [float(prices[p]) for p in ids if p in prices.index and not _missing(prices[p])]
        record["price"] = round(sum(known), 2) if ids and len(known) == len(ids) else None
    return record


def _missing(value: Any) -> bool:
    return bool(np.ndim(value) == 0 and pd.isna(value))


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class StopLossReport:
    """One run: what was judged (``verdicts``: the judged weeks' cycles with their
    verdicts), the decisions, which were stored now (``killed``: offer → kill id),
    and the offers whose kill is active already (``already_killed``)."""

    as_of: pd.Timestamp
    weeks: list[pd.Timestamp]
    verdicts: pd.DataFrame
    decisions: list[KillDecision]
    dry_run: bool
    killed: dict[str, int] = field(default_factory=dict)
    already_killed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What the run did (or, dry, would do), and why: one line per offer."""
        if not self.weeks:
            return [f"no complete weekly cycle before {self.as_of}: nothing judged"]
        counts = self.verdicts["verdict"].value_counts()
        said = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("fail", "pass", "insufficient"))
        weeks = ", ".join(str(w.date()) for w in self.weeks)
        lines = [f"judged the weeks of {weeks}: {said} offer-cycles"]
        verb = "would kill" if self.dry_run else "killed"
        for decision in self.decisions:
            lines.append(f"{verb} {decision.line()}")
        if not self.decisions:
            lines.append("nothing to kill")
        if self.already_killed:
            lines.append(f"killed already: {', '.join(self.already_killed)}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of.isoformat(),
            "weeks": [w.isoformat() for w in self.weeks],
            "dry_run": self.dry_run,
            "decisions": [
                {"offer_id": d.offer_id, "rule": d.rule, "cycles": d.cycles} for d in self.decisions
            ],
            "killed": self.killed,
            "already_killed": self.already_killed,
        }


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def default_actor() -> str:
    """``stoploss/<the user running it>``: an audit entry names who ran the kill."""
    return f"stoploss/{getpass.getuser()}"[:64]


def run_stoploss(
    cycles: pd.DataFrame,
    config: StopLoss,
    ledger: SqlLedger,
    *,
    as_of: Any,
    dry_run: bool = False,
    actor: str | None = None,
    offers: pd.DataFrame | None = None,
    products: pd.DataFrame | None = None,
) -> StopLossReport:
    """Judge the scorecard's ``cycles`` at ``as_of`` and store (unless ``dry_run``) a
    kill, with its learning record and an audit entry naming ``actor`` (default
    :func:`default_actor`), for each offer that fails the configured rule in the last
    consecutive complete cycles. ``dry_run`` writes nothing. ``offers`` and ``products``:
    the workspace's tables, for the learning record."""
    from serving.review import ReviewStore

    as_of = pd.Timestamp(as_of)
    actor = actor or default_actor()
    kills = ledger.offer_kills()
    judged_before: dict[str, pd.Timestamp] = {}
    for kill in kills:  # the latest kill of each offer, revived or not
        judged_before[str(kill["offer_id"])] = pd.Timestamp(kill["last_cycle"])
    active = sorted({str(k["offer_id"]) for k in kills if k["revived_at"] is None})
    verdicts = judge_cycles(cycles, config)
    weeks = judged_weeks(verdicts, config, as_of)
    decisions = _decide(verdicts, config, weeks, judged_before)
    report = StopLossReport(
        as_of=as_of,
        weeks=weeks,
        verdicts=verdicts[verdicts["week_start"].isin(weeks)].reset_index(drop=True),
        decisions=decisions,
        dry_run=dry_run,
        already_killed=active,
    )
    if dry_run or not decisions:
        return report
    start_s = int(weeks[0].value // 10**9)
    end_s = int((weeks[-1] + WEEK).value // 10**9)
    placed = ledger.placements_served([d.offer_id for d in decisions], start_s, end_s)
    store = ReviewStore(ledger)
    for decision in decisions:
        learning = learning_record(
            decision, offers=offers, products=products, placements=placed.get(decision.offer_id, [])
        )
        at = _now()
        with store.begin() as connection:
            kill_id = ledger.insert_kill(
                connection,
                {
                    "offer_id": decision.offer_id,
                    "killed_at": at,
                    "killed_by": actor,
                    "rule": decision.rule,
                    "last_cycle": decision.last_cycle.to_pydatetime(),
                    "figures": decision.cycles,
                    "learning": learning,
                },
            )
            if kill_id is None:  # killed meanwhile by another run
                report.already_killed.append(decision.offer_id)
                continue
            store.record_audit(
                connection,
                actor,
                "stoploss_kill",
                decision.offer_id,
                after={"kill_id": kill_id, "rule": decision.rule, "cycles": decision.cycles},
            )
        report.killed[decision.offer_id] = kill_id
    return report


def revive(ledger: SqlLedger, offer_id: str, *, actor: str, reason: str) -> dict[str, Any]:
    """A human ends a kill: ``actor`` must be a review approver (``nextbest review
    add-user``); audited as ``stoploss_revive`` with the kill as it was. The offer is
    eligible again from the next request on; it is killed again only on cycles later than
    the ones that killed it. Raises AccessError (not an approver), LookupError (no kill)."""
    from serving.review import ReviewStore

    if not reason.strip():
        raise ValueError("say why the offer is revived (--reason): the audit log keeps it")
    store = ReviewStore(ledger)
    store.require(actor, "approver")
    with store.begin() as connection:
        before = ledger.revive_kill(connection, offer_id, by=actor, reason=reason, at=_now())
        if before is None:
            raise LookupError(f"offer {offer_id!r} has no active stop-loss kill")
        summary = {k: before[k] for k in ("kill_id", "offer_id", "killed_at", "killed_by", "rule")}
        store.record_audit(
            connection, actor, "stoploss_revive", offer_id, before=summary, after={"reason": reason}
        )
    return summary


def read_cycles(path: Any) -> pd.DataFrame:
    """The cycles frame from a CSV or parquet file (``nextbest stoploss run --cycles``)."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such cycles file")
    if file.suffix.lower() in (".parquet", ".pq"):
        frame = pd.read_parquet(file)
    elif file.suffix.lower() == ".csv":
        frame = pd.read_csv(file, dtype={"offer_id": "str"})
    else:
        raise ValueError(f"{file}: a cycles file is .csv or .parquet, not {file.suffix!r}")
    try:
        return _checked(frame)
    except ValueError as error:
        raise ValueError(f"{file}: {error}") from None
