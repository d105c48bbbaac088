"""From the ledger back to the data: the served offers and their outcomes, appended to the
workspace's ``exposures`` and ``outcomes`` tables, so that the next training (and the next
snapshot the service loads) learns from live traffic.

``read_ledger`` is the I/O on the ledger's database (reads only: it never creates a table,
a buffer or a file); ``ledger_to_tables`` is a pure mapping from its rows to contract
rows; ``export_ledger`` wires them to :func:`features.workspace.rewrite_workspace`, which
coerces and validates every table against the contract before it writes anything.

What is exported, and under which ids:

* **exposures**: one row per offer of a delivered slate, ``exposure_id`` =
  ``ledger:<request_id>:<offer_id>`` (the ledger's own key, under a prefix no source id
  carries). A holdout's ghost slate (:data:`serving.ledger.GHOST_MODE`: logged, shown to
  nobody) is not exported, nor is its feedback; both are counted. A rules-only holdout's
  slate was shown, so it is exported as shown (``holdout`` false: in the workspace a
  holdout exposure is a ghost, which features and caps never count).
* **outcomes**: one row per ledger feedback (request, offer, outcome), with the exposure
  it follows; the ledger only accepts the contract's outcomes, and a row outside them (an
  older ledger, a hand-made one) is counted, not exported.
* Times: the ledger's integer seconds are the service's clock, in the same naive local
  time as the workspace (``pd.Timestamp(at_s, unit="s")``, as the service states its
  ``as_of``).

Idempotent: a row whose key (exposure id; exposure id and outcome) is already in the
workspace is counted as present and not added again, so exporting twice adds nothing the
second time, and a workspace written anew (a fresh import) gets the same rows back from
the next export. A row whose offer or customer the workspace does not know is counted and
left out (the contract refuses unknown ids); it is exported by a later run once the
workspace knows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from features.contract import LEDGER_EXPOSURE_PREFIX, OUTCOMES, coerce_table
from features.workspace import Workspace, rewrite_workspace
from serving.ledger import (
    CONNECT_TIMEOUT_S,
    GHOST_MODE,
    engine_url,
    feedback,
    slate_offers,
    slates,
)

__all__ = [
    "EXPOSURE_PREFIX",
    "ExportReport",
    "LedgerExportError",
    "LedgerRows",
    "TableCounts",
    "export_ledger",
    "exposure_id",
    "ledger_to_tables",
    "read_ledger",
]

EXPOSURE_PREFIX = LEDGER_EXPOSURE_PREFIX
"""Every exported exposure id starts with it; the workspace's own sources never do."""


class LedgerExportError(RuntimeError):
    """The ledger cannot be read (no database there, not a ledger, unreachable)."""


def exposure_id(request_id: Any, offer_id: Any) -> str:
    """The exported id of one served offer: the ledger's key, under :data:`EXPOSURE_PREFIX`."""
    return f"{EXPOSURE_PREFIX}{request_id}:{offer_id}"


@dataclass(frozen=True)
class LedgerRows:
    """The ledger's rows as frames.

    * ``served``: request_id, offer_id, rank, propensity, inclusion, customer_id,
      channel, placement, model_version, mode, holdout, at_s (one row per offer of a
      slate; ``inclusion``: the probability the offer was in its slate, NULL for a
      deterministic slate or one a cap cut);
    * ``feedback``: request_id, offer_id, outcome, customer_id, value, at_s.
    """

    served: pd.DataFrame
    feedback: pd.DataFrame


@dataclass
class TableCounts:
    """What became of the ledger's rows for one table."""

    added: int = 0
    present: int = 0
    ghost: int = 0
    unknown_offer: int = 0
    unknown_customer: int = 0
    unknown_outcome: int = 0
    unknown_offer_ids: list[str] = field(default_factory=list)

    def text(self, name: str) -> str:
        skipped = [
            f"{count} {what}"
            for count, what in (
                (self.ghost, "holdout ghosts"),
                (self.unknown_offer, "unknown offer" + _examples(self.unknown_offer_ids)),
                (self.unknown_customer, "unknown customer"),
                (self.unknown_outcome, "unknown outcome"),
            )
            if count
        ]
        line = f"{name} {self.added} added, {self.present} already present"
        return line + (f" ({', '.join(skipped)} skipped)" if skipped else "")


def _examples(ids: list[str], most: int = 3) -> str:
    if not ids:
        return ""
    more = f", … {len(ids) - most} more" if len(ids) > most else ""
    return f" ({', '.join(ids[:most])}{more})"


@dataclass
class ExportReport:
    """Counts per table; ``written``: whether the workspace was written (something new)."""

    workspace: Path
    exposures: TableCounts
    outcomes: TableCounts
    written: bool = False

    def line(self) -> str:
        return (
            f"ledger → {self.workspace}: {self.exposures.text('exposures')}; "
            f"{self.outcomes.text('outcomes')}."
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace),
            "written": self.written,
            "exposures": vars(self.exposures),
            "outcomes": vars(self.outcomes),
        }


def read_ledger(url: str) -> LedgerRows:
    """Every slate offer and every feedback row in the ledger at ``url``.

    Raises :class:`LedgerExportError` when there is no ledger there: a SQLite file that
    does not exist (it is not created), a database without the ledger's tables, or one
    that cannot be reached.
    """
    url = engine_url(url)
    parsed = sa.make_url(url)
    options: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database.startswith("file:") and not Path(database or ":memory:").is_file():
            raise LedgerExportError(
                f"no ledger at {url}: there is no such file. Give the service's ledger with "
                "--db-url (default: NEXTBEST_DB_URL, else ledger.db in the data folder)"
            )
    elif parsed.get_backend_name() == "postgresql":
        # both reads see one moment of a ledger the service keeps writing (SQLite's one
        # transaction does already): no feedback without the slate it follows
        options["isolation_level"] = "REPEATABLE READ"
        if "connect_timeout" not in parsed.query:
            options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    engine = sa.create_engine(url, **options)
    shown = parsed.render_as_string(hide_password=True)
    try:
        with engine.connect() as connection:
            missing = [
                table.name
                for table in (slates, slate_offers, feedback)
                if not sa.inspect(connection).has_table(table.name)
            ]
            if missing:
                raise LedgerExportError(
                    f"{shown} is not a nextbest ledger: it has no table "
                    + ", ".join(repr(name) for name in missing)
                )
            served = pd.DataFrame(
                connection.execute(
                    sa.select(
                        slate_offers.c.request_id,
                        slate_offers.c.offer_id,
                        slate_offers.c.rank,
                        slate_offers.c.propensity,
                        slate_offers.c.inclusion,
                        slates.c.customer_id,
                        slates.c.channel,
                        slates.c.placement,
                        slates.c.model_version,
                        slates.c.mode,
                        slates.c.holdout,
                        slates.c.at_s,
                    )
                    .select_from(slates.join(slate_offers))
                    .order_by(slates.c.at_s, slate_offers.c.request_id, slate_offers.c.rank)
                )
                .mappings()
                .all(),
                columns=_SERVED_COLUMNS,
            )
            given = pd.DataFrame(
                connection.execute(
                    sa.select(
                        feedback.c.request_id,
                        feedback.c.offer_id,
                        feedback.c.outcome,
                        feedback.c.customer_id,
                        feedback.c.value,
                        feedback.c.at_s,
                    ).order_by(feedback.c.at_s, feedback.c.request_id, feedback.c.offer_id)
                )
                .mappings()
                .all(),
                columns=_FEEDBACK_COLUMNS,
            )
    except sa.exc.SQLAlchemyError as error:
        first = str(getattr(error, "orig", None) or error).splitlines()[0]
        raise LedgerExportError(f"cannot read the ledger at {shown}: {first}") from error
    finally:
        engine.dispose()
    return LedgerRows(served, given)


_SERVED_COLUMNS = [
    "request_id",
    "offer_id",
    "rank",
    "propensity",
    "inclusion",
    "customer_id",
    "channel",
    "placement",
    "model_version",
    "mode",
    "holdout",
    "at_s",
]
_FEEDBACK_COLUMNS = ["request_id", "offer_id", "outcome", "customer_id", "value", "at_s"]


def _moment(seconds: pd.Series) -> pd.Series:
    return pd.to_datetime(seconds.astype("int64"), unit="s").astype("datetime64[us]")


def _triage(
    frame: pd.DataFrame,
    ghost: np.ndarray,
    known_kind: np.ndarray,
    offers: pd.Series,
    customers: pd.Series,
) -> tuple[np.ndarray, TableCounts]:
    """Which rows of ``frame`` (offer_id, customer_id) to export, and how many are left out
    under each reason, a row counted under its first: a holdout ghost's, an outcome outside
    the contract's, an offer the workspace does not know, then an unknown customer."""
    offer_ok = frame["offer_id"].isin(offers).to_numpy()
    customer_ok = frame["customer_id"].isin(customers).to_numpy()
    counts = TableCounts(ghost=int(ghost.sum()))
    rest = ~ghost
    counts.unknown_outcome = int((rest & ~known_kind).sum())
    rest &= known_kind
    counts.unknown_offer = int((rest & ~offer_ok).sum())
    counts.unknown_offer_ids = sorted(set(frame.loc[rest & ~offer_ok, "offer_id"]))
    rest &= offer_ok
    counts.unknown_customer = int((rest & ~customer_ok).sum())
    return rest & customer_ok, counts


def ledger_to_tables(
    rows: LedgerRows, *, offers: pd.Series, customers: pd.Series
) -> tuple[pd.DataFrame, pd.DataFrame, TableCounts, TableCounts]:
    """The ledger's rows as contract ``exposures`` and ``outcomes`` (raw columns, for
    :func:`features.contract.coerce_table`), and what was left out and why.

    ``offers`` and ``customers`` are the ids the workspace knows. The input is not
    modified; the counts' ``added``/``present`` are left for the caller.
    """
    served, given = rows.served, rows.feedback
    ghost = (served["holdout"].astype(bool) & (served["mode"] == GHOST_MODE)).to_numpy()
    keep, exposure_counts = _triage(served, ghost, np.ones(len(served), bool), offers, customers)
    kept = served[keep]
    exposures = pd.DataFrame(
        {
            "exposure_id": [
                exposure_id(r, o) for r, o in zip(kept["request_id"], kept["offer_id"], strict=True)
            ],
            "customer_id": kept["customer_id"].to_numpy(),
            "offer_id": kept["offer_id"].to_numpy(),
            "shown_at": _moment(kept["at_s"]).to_numpy(),
            "channel": kept["channel"].to_numpy(),
            "placement": kept["placement"].to_numpy(),
            "model_version": kept["model_version"].to_numpy(),
            "holdout": np.zeros(len(kept), dtype=bool),
            # the contract's propensity is the probability the offer was shown in the
            # request, which IPS weighs by: the ledger's inclusion probability. Its own
            # propensity is the draw's at that rank, given the ranks before
            # (policy.exploration), and is never exported. No inclusion (a deterministic
            # slate, one a cap cut, a ledger older than the column): none, and the
            # estimators refuse the row rather than weigh it wrongly
            "propensity": pd.to_numeric(kept["inclusion"], errors="coerce").to_numpy(dtype=float),
            "request_id": kept["request_id"].to_numpy(),
            "rank": kept["rank"].to_numpy(),
        }
    )

    ghost_requests = set(served.loc[ghost, "request_id"])
    from_ghost = given["request_id"].isin(ghost_requests).to_numpy()
    known_kind = given["outcome"].isin(OUTCOMES).to_numpy()
    keep, outcome_counts = _triage(given, from_ghost, known_kind, offers, customers)
    chosen = given[keep]
    outcomes = pd.DataFrame(
        {
            "customer_id": chosen["customer_id"].to_numpy(),
            "offer_id": chosen["offer_id"].to_numpy(),
            "outcome": chosen["outcome"].to_numpy(),
            "occurred_at": _moment(chosen["at_s"]).to_numpy(),
            "value": chosen["value"].astype("float64").to_numpy(),
            "exposure_id": [
                exposure_id(r, o)
                for r, o in zip(chosen["request_id"], chosen["offer_id"], strict=True)
            ],
        }
    )
    return exposures, outcomes, exposure_counts, outcome_counts


def _outcome_keys(frame: pd.DataFrame) -> pd.Series:
    return frame["exposure_id"].astype("object").fillna("") + "\x1f" + frame["outcome"]


def export_ledger(url: str, workspace: Workspace | Path | str) -> ExportReport:
    """Append the ledger's exposures and outcomes (see the module's docstring) to the
    workspace, through the contract's validation; write it only if something is new.

    Raises :class:`LedgerExportError` if the ledger cannot be read, and
    :class:`features.WorkspaceError` / :class:`features.ContractError` if the workspace
    is missing or the result breaks the contract (then nothing is written).
    """
    existing = (
        workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
    ).require()
    rows = read_ledger(url)
    tables = existing.read_all()
    exposures, outcomes, exposure_counts, outcome_counts = ledger_to_tables(
        rows,
        offers=tables["offers"]["offer_id"],
        customers=tables["customers"]["customer_id"],
    )
    new_exposures = ~exposures["exposure_id"].isin(tables["exposures"]["exposure_id"])
    new_outcomes = ~_outcome_keys(outcomes).isin(_outcome_keys(tables["outcomes"]))
    exposure_counts.added = int(new_exposures.sum())
    exposure_counts.present = int((~new_exposures).sum())
    outcome_counts.added = int(new_outcomes.sum())
    outcome_counts.present = int((~new_outcomes).sum())
    report = ExportReport(existing.path, exposure_counts, outcome_counts)
    if not (exposure_counts.added or outcome_counts.added):
        return report
    for name, frame in (
        ("exposures", exposures[new_exposures]),
        ("outcomes", outcomes[new_outcomes]),
    ):
        if len(frame):
            tables[name] = pd.concat(
                [tables[name], coerce_table(name, frame.reset_index(drop=True))],
                ignore_index=True,
            )
    given = existing.manifest["source"]
    exports = list(given.get("ledger_exports", []))
    exports.append(
        {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "ledger": sa.make_url(url).render_as_string(hide_password=True),
            "exposures": exposure_counts.added,
            "outcomes": outcome_counts.added,
        }
    )
    rewrite_workspace(existing, tables, source=dict(given) | {"ledger_exports": exports})
    report.written = True
    return report
