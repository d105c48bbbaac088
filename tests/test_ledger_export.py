"""`nextbest ledger export`: the live ledger's served offers and outcomes back into the
workspace, idempotently, through the contract, so that the next training learns from them.

The ledger is a real SQLite ledger written by a real recommender (the one factory,
``build_recommender``; rules-only ranking, so no model needs training) through
``recommend`` and ``post_feedback``. The oracles are plain SQL on the ledger file (the
standard library's ``sqlite3``, not the export's SQLAlchemy tables) and times written by
hand.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from features import FeatureBuilder, Requests, Workspace, load_snapshot, write_workspace
from features.contract import TABLES
from nextbest.cli import app
from policy import SnapshotLedger
from serving.assembly import build_recommender
from serving.export import EXPOSURE_PREFIX, LedgerExportError, export_ledger
from serving.ledger import SqlLedger
from serving.settings import ServingSettings

runner = CliRunner()

SERVED_AT = "2025-05-13 10:00:00"  # after the small world's last event (checked below)
NEXT_DAY = "2025-05-14 10:00:00"
DECLINED_AT = "2025-05-13 11:00:00"
TWO_DAYS_LATER = "2025-05-15 11:00:00"  # exactly 2 days after the decline
NEW_CUSTOMERS = ("NEW-1", "NEW-2")  # served (cold start), unknown to the workspace


def _seconds(moment: str) -> int:
    return int(pd.Timestamp(moment).timestamp())  # a naive time read as UTC: the epoch count


@dataclass
class Traffic:
    ledger_file: Path
    url: str
    workspace: Workspace  # a fresh copy per test
    declined: tuple[str, str]  # (customer, offer) served at SERVED_AT and declined
    ghost_requests: list[str]


def _copy(workspace: Workspace, target: Path) -> Workspace:
    shutil.copytree(workspace.path, target)
    return Workspace(target)


@pytest.fixture(scope="module")
def ledger_traffic(
    small_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Traffic]:
    """Two days of traffic on a copy of the small world: 40 known customers and two new
    ones, on web at SERVED_AT and email the next day, a 30 % holdout whose control is
    nothing (ghost slates), and feedback of every kind (one on a ghost slate)."""
    base = tmp_path_factory.mktemp("ledger-export")
    workspace = _copy(small_workspace, base / "served")
    assert workspace.read("orders")["ordered_at"].max() < pd.Timestamp(SERVED_AT)
    ledger_file = base / "ledger.db"
    url = f"sqlite:///{ledger_file}"
    recommender = build_recommender(
        ServingSettings(holdout_share=0.3, holdout_control="nothing", db_url=url),
        workspace=workspace,
        bundle=None,
    )
    ledger: SqlLedger = recommender.ledger
    customers = [*workspace.read("customers")["customer_id"].head(40), *NEW_CUSTOMERS]
    declined: tuple[str, str] | None = None
    ghosts: list[str] = []
    for day, (moment, channel) in enumerate(((SERVED_AT, "web"), (NEXT_DAY, "email"))):
        for n, customer in enumerate(customers):
            answer = recommender.recommend(customer, channel=channel, as_of=moment, k=3)
            request = answer["request_id"]
            if answer["holdout"]:
                ghosts.append(request)
                continue
            offers = [o["offer_id"] for o in answer["offers"]]
            if not offers:
                continue
            at = _seconds(moment)
            ledger.post_feedback(
                request_id=request, offer_id=offers[0], outcome="viewed", value=None, at_s=at + 5
            )
            if day == 0 and n % 3 == 0:
                ledger.post_feedback(
                    request_id=request,
                    offer_id=offers[0],
                    outcome="declined",
                    value=None,
                    at_s=_seconds(DECLINED_AT),
                )
                if declined is None and customer not in NEW_CUSTOMERS:
                    declined = (customer, offers[0])
            if n % 4 == 1 and len(offers) > 1:
                ledger.post_feedback(
                    request_id=request,
                    offer_id=offers[1],
                    outcome="accepted",
                    value=19.5,
                    at_s=at + 600,
                )
    assert declined is not None and ghosts
    ghost = ledger.slate(ghosts[0])
    assert ghost is not None and ghost["offers"], "a ghost slate logs what it would have served"
    ledger.post_feedback(
        request_id=ghosts[0],
        offer_id=ghost["offers"][0]["offer_id"],
        outcome="purchased",
        value=5.0,
        at_s=_seconds(NEXT_DAY),
    )
    ledger.dispose()
    yield Traffic(ledger_file, url, workspace, declined, ghosts)


@pytest.fixture
def traffic(ledger_traffic: Traffic, tmp_path: Path) -> Traffic:
    """The module's ledger with a fresh copy of the workspace it served."""
    copy = _copy(ledger_traffic.workspace, tmp_path / "ws")
    return Traffic(
        ledger_traffic.ledger_file,
        ledger_traffic.url,
        copy,
        ledger_traffic.declined,
        ledger_traffic.ghost_requests,
    )


# -- the oracle: plain SQL on the ledger file ------------------------------------------------
def _sql(ledger_file: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(ledger_file) as connection:
        return connection.execute(query).fetchall()


_DELIVERED = "NOT (s.holdout = 1 AND s.mode = 'holdout_nothing')"


def _ledger_exposures(ledger_file: Path) -> list[tuple[str, str, str, int, str, int]]:
    """Delivered offers: (request, customer, offer, at_s, channel, rank)."""
    return [
        (str(r), str(c), str(o), int(t), str(ch), int(k))
        for r, c, o, t, ch, k in _sql(
            ledger_file,
            "SELECT s.request_id, s.customer_id, o.offer_id, s.at_s, s.channel, o.rank "
            f"FROM slates s JOIN slate_offers o ON o.request_id = s.request_id WHERE {_DELIVERED}",
        )
    ]


def _ledger_feedback(ledger_file: Path) -> list[tuple[str, str, str, str, int]]:
    """Feedback on delivered slates: (request, customer, offer, outcome, at_s)."""
    return [
        (str(r), str(c), str(o), str(k), int(t))
        for r, c, o, k, t in _sql(
            ledger_file,
            "SELECT f.request_id, f.customer_id, f.offer_id, f.outcome, f.at_s FROM feedback f "
            f"JOIN slates s ON s.request_id = f.request_id WHERE {_DELIVERED}",
        )
    ]


def _exported(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["exposure_id"].astype("object").fillna("").str.startswith(EXPOSURE_PREFIX)]


# -- the tests -------------------------------------------------------------------------------
def test_export_adds_every_delivered_row_the_workspace_knows(traffic: Traffic) -> None:
    before = {name: traffic.workspace.read(name) for name in ("exposures", "outcomes")}
    known = set(traffic.workspace.read("customers")["customer_id"])
    report = export_ledger(traffic.url, traffic.workspace)
    after = {name: traffic.workspace.read(name) for name in ("exposures", "outcomes")}

    ledger_rows = _ledger_exposures(traffic.ledger_file)
    expected = [row for row in ledger_rows if row[1] in known]
    unknown_customer = [row for row in ledger_rows if row[1] not in known]
    assert unknown_customer, "the new customers were served"
    ghost_rows = _sql(
        traffic.ledger_file,
        "SELECT count(*) FROM slates s JOIN slate_offers o ON o.request_id = s.request_id "
        f"WHERE NOT ({_DELIVERED})",
    )[0][0]
    assert report.exposures.added == len(expected)
    assert report.exposures.present == 0
    assert report.exposures.unknown_customer == len(unknown_customer)
    assert report.exposures.unknown_offer == 0
    assert report.exposures.ghost == ghost_rows > 0
    assert len(after["exposures"]) == len(before["exposures"]) + len(expected)
    # the workspace's own rows are untouched
    pd.testing.assert_frame_equal(
        after["exposures"].iloc[: len(before["exposures"])], before["exposures"]
    )

    added = _exported(after["exposures"])
    assert Counter(zip(added["customer_id"], added["offer_id"], strict=True)) == Counter(
        (c, o) for _, c, o, *_ in expected
    )
    by_id = {f"ledger:{r}:{o}": (c, t, ch, k) for r, c, o, t, ch, k in expected}
    for row in added.itertuples():
        customer, at_s, channel, rank = by_id[row.exposure_id]
        assert (row.customer_id, row.channel, row.rank) == (customer, channel, rank)
        assert row.shown_at == pd.Timestamp(at_s, unit="s")
        assert not row.holdout
    assert set(added["shown_at"]) == {pd.Timestamp(SERVED_AT), pd.Timestamp(NEXT_DAY)}
    assert set(added["exposure_id"]).isdisjoint(before["exposures"]["exposure_id"])

    feedback = [row for row in _ledger_feedback(traffic.ledger_file) if row[1] in known]
    outcomes = _exported(after["outcomes"])
    assert report.outcomes.added == len(feedback) == len(outcomes)
    assert report.outcomes.ghost == 1  # the purchase after a ghost slate
    assert Counter(outcomes["outcome"]) == Counter(k for *_, k, _ in feedback)
    assert Counter(outcomes["outcome"])["declined"] > 0
    assert Counter(outcomes["outcome"])["accepted"] > 0
    assert set(outcomes["exposure_id"]) <= set(added["exposure_id"])
    assert (outcomes.loc[outcomes["outcome"] == "accepted", "value"] == 19.5).all()


def test_a_second_export_adds_nothing_and_new_traffic_only_itself(
    traffic: Traffic, tmp_path: Path
) -> None:
    first = export_ledger(traffic.url, traffic.workspace)
    manifest = traffic.workspace.manifest
    files = {p.name: p.read_bytes() for p in traffic.workspace.path.iterdir()}

    second = export_ledger(traffic.url, traffic.workspace)
    assert (second.exposures.added, second.outcomes.added) == (0, 0)
    assert second.exposures.present == first.exposures.added > 0
    assert second.outcomes.present == first.outcomes.added > 0
    assert not second.written
    assert {p.name: p.read_bytes() for p in traffic.workspace.path.iterdir()} == files
    assert traffic.workspace.manifest == manifest

    # more traffic on a copy of the ledger: only the new slate and its feedback are added
    ledger_copy = tmp_path / "more.db"
    shutil.copy(traffic.ledger_file, ledger_copy)
    url = f"sqlite:///{ledger_copy}"
    recommender = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=url), workspace=traffic.workspace, bundle=None
    )
    customer = traffic.declined[0]
    answer = recommender.recommend(customer, channel="app", as_of="2025-05-16 09:00:00", k=2)
    recommender.ledger.post_feedback(
        request_id=answer["request_id"],
        offer_id=answer["offers"][0]["offer_id"],
        outcome="viewed",
        value=None,
        at_s=_seconds("2025-05-16 09:00:30"),
    )
    recommender.ledger.dispose()
    third = export_ledger(url, traffic.workspace)
    assert third.exposures.added == len(answer["offers"]) == 2
    assert third.exposures.present == first.exposures.added
    assert (third.outcomes.added, third.outcomes.present) == (1, first.outcomes.added)
    exposures = _exported(traffic.workspace.read("exposures"))
    assert exposures["exposure_id"].is_unique
    assert len(exposures) == first.exposures.added + 2


def test_a_declined_offer_reaches_days_since_offer_declined(traffic: Traffic) -> None:
    """The feature the next training reads: 2 days after the decline it says 2.0."""
    customer, offer = traffic.declined

    def feature(workspace: Workspace) -> float:
        snapshot = load_snapshot(workspace)
        moment = pd.Timestamp(TWO_DAYS_LATER)
        builder = FeatureBuilder().fit(snapshot, moment)
        requests = Requests.build(snapshot, [customer], [moment])
        column = np.array([int(snapshot.offers.encode(pd.Series([offer]))[0])])
        matrix = builder.build(snapshot, requests, np.array([0]), column)
        return float(matrix.frame()["days_since_offer_declined"].iloc[0])

    before = feature(traffic.workspace)
    export_ledger(traffic.url, traffic.workspace)
    after = feature(traffic.workspace)
    assert after == pytest.approx(2.0, abs=1e-9)
    assert np.isnan(before) or before > 2.0  # the workspace's last decline was earlier


def test_unknown_offers_are_counted_not_dropped_silently(traffic: Traffic, tmp_path: Path) -> None:
    """A catalogue that lost an offer the ledger served: its rows are counted and left out."""
    gone = traffic.declined[1]
    tables = traffic.workspace.read_all()
    for name, frame in tables.items():
        if "offer_id" in frame.columns and name in ("offers", "exposures", "outcomes"):
            tables[name] = frame[frame["offer_id"] != gone]
    manifest = traffic.workspace.manifest
    smaller = write_workspace(
        tmp_path / "smaller", tables, source=manifest["source"], synthetic=True
    )
    known = set(smaller.read("customers")["customer_id"])

    report = export_ledger(traffic.url, smaller)
    rows = [r for r in _ledger_exposures(traffic.ledger_file) if r[1] in known]
    lost = [r for r in rows if r[2] == gone]
    assert lost
    assert report.exposures.unknown_offer == len(lost)
    assert report.exposures.unknown_offer_ids == [gone]
    assert report.exposures.added == len(rows) - len(lost)
    lost_feedback = [r for r in _ledger_feedback(traffic.ledger_file) if r[2] == gone]
    assert report.outcomes.unknown_offer == len(lost_feedback) > 0
    assert f"unknown offer ({gone})" in report.line()
    assert gone not in set(smaller.read("exposures")["offer_id"])


def test_exported_rows_survive_a_table_import_and_come_back_after_a_rewrite(
    traffic: Traffic, small_workspace: Workspace, tmp_path: Path
) -> None:
    from features import import_table

    export_ledger(traffic.url, traffic.workspace)
    exported = {n: _exported(traffic.workspace.read(n)) for n in ("exposures", "outcomes")}

    # a refreshed table (consent, here) keeps every other table, exported rows included
    consent = tmp_path / "consent.csv"
    traffic.workspace.read("consent").to_csv(consent, index=False)
    import_table("consent", consent, traffic.workspace.path)
    for name, frame in exported.items():
        pd.testing.assert_frame_equal(_exported(traffic.workspace.read(name)), frame)

    # a workspace written anew from its source has none of them; the next export puts
    # the same rows back
    tables = small_workspace.read_all()
    write_workspace(traffic.workspace.path, tables, source={"name": "rewrite"}, synthetic=True)
    assert _exported(traffic.workspace.read("exposures")).empty
    again = export_ledger(traffic.url, traffic.workspace)
    assert again.exposures.added == len(exported["exposures"])
    for name, frame in exported.items():
        pd.testing.assert_frame_equal(
            _exported(traffic.workspace.read(name)).reset_index(drop=True),
            frame.reset_index(drop=True),
        )


def test_the_command_prints_one_line_and_refuses_a_missing_ledger(
    traffic: Traffic, tmp_path: Path
) -> None:
    workspace = str(traffic.workspace.path)
    first = runner.invoke(app, ["ledger", "export", "-w", workspace, "--db-url", traffic.url])
    assert first.exit_code == 0, first.output
    assert len(first.stdout.strip().splitlines()) == 1
    exposures = len(_exported(traffic.workspace.read("exposures")))
    assert f"exposures {exposures} added, 0 already present" in first.stdout
    second = runner.invoke(
        app, ["ledger", "export", "-w", workspace, "--db-url", traffic.url, "--json"]
    )
    assert second.exit_code == 0, second.output
    assert '"added": 0' in second.stdout and f'"present": {exposures}' in second.stdout

    missing = runner.invoke(
        app, ["ledger", "export", "-w", workspace, "--db-url", f"sqlite:///{tmp_path}/none.db"]
    )
    assert missing.exit_code == 2
    assert "no ledger at" in missing.stderr and "Traceback" not in missing.output
    assert not (tmp_path / "none.db").exists()

    not_a_ledger = tmp_path / "other.db"
    sqlite3.connect(not_a_ledger).close()
    with pytest.raises(LedgerExportError, match="is not a nextbest ledger: it has no table"):
        export_ledger(f"sqlite:///{not_a_ledger}", traffic.workspace)
    nowhere = runner.invoke(
        app, ["ledger", "export", "-w", str(tmp_path / "nope"), "--db-url", traffic.url]
    )
    assert nowhere.exit_code == 2 and "not a nextbest workspace" in nowhere.stderr


def test_the_exported_tables_pass_the_contract(traffic: Traffic) -> None:
    from features.contract import validate_tables

    export_ledger(traffic.url, traffic.workspace)
    tables = traffic.workspace.read_all()
    assert set(tables) == set(TABLES)
    validate_tables(tables)  # raises on any breach


def test_export_from_a_postgresql_ledger(
    small_workspace: Workspace, fresh_postgres: str, tmp_path: Path
) -> None:
    """The same export from a real PostgreSQL ledger (--db-url), counted by plain SQL there."""
    import sqlalchemy as sa

    workspace = _copy(small_workspace, tmp_path / "ws")
    recommender = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=fresh_postgres), workspace=workspace, bundle=None
    )
    customers = list(workspace.read("customers")["customer_id"].head(5))
    for customer in customers:
        answer = recommender.recommend(customer, channel="web", as_of=SERVED_AT, k=2)
        recommender.ledger.post_feedback(
            request_id=answer["request_id"],
            offer_id=answer["offers"][0]["offer_id"],
            outcome="declined",
            value=None,
            at_s=_seconds(DECLINED_AT),
        )
    recommender.ledger.dispose()
    engine = sa.create_engine(fresh_postgres)
    with engine.connect() as connection:
        served = connection.exec_driver_sql("SELECT count(*) FROM slate_offers").scalar_one()
        given = connection.exec_driver_sql("SELECT count(*) FROM feedback").scalar_one()
    engine.dispose()
    assert (served, given) == (10, 5)

    result = runner.invoke(
        app, ["ledger", "export", "-w", str(workspace.path), "--db-url", fresh_postgres]
    )
    assert result.exit_code == 0, result.output
    assert "exposures 10 added" in result.stdout and "outcomes 5 added" in result.stdout
    outcomes = _exported(workspace.read("outcomes"))
    assert list(outcomes["occurred_at"].unique()) == [pd.Timestamp(DECLINED_AT)]
    assert sorted(outcomes["customer_id"]) == sorted(customers)


def test_a_service_on_the_exported_workspace_counts_each_serving_once(traffic: Traffic) -> None:
    from serving.ledger import CombinedLedger

    export_ledger(traffic.url, traffic.workspace)
    customer, offer = traffic.declined
    served = [
        r
        for r in _ledger_exposures(traffic.ledger_file)
        if r[1] == customer and r[2] == offer and r[3] < _seconds("2025-05-13 12:00:00")
    ]
    assert len(served) == 1  # served once, at SERVED_AT
    recommender = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=traffic.url),
        workspace=traffic.workspace,
        bundle=None,
    )
    snapshot = recommender.snapshot
    end = _seconds("2025-05-13 12:00:00")
    query = (
        np.asarray(snapshot.customers.encode(pd.Series([customer]))),
        np.array([customer], dtype=object),
        np.asarray(snapshot.offers.encode(pd.Series([offer]))),
        np.array([end - 86400]),
        np.array([end]),
    )
    counted = CombinedLedger(snapshot, recommender.ledger).offer_counts("served", *query)
    # the workspace alone (training's view) has the exported serving: once
    alone = SnapshotLedger(snapshot).offer_counts("served", *query)
    recommender.ledger.dispose()
    assert list(alone) == [1]
    assert list(counted) == [1]


def test_an_empty_ledger_adds_nothing_and_an_outcome_outside_the_contract_is_counted(
    traffic: Traffic, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.db"
    SqlLedger(f"sqlite:///{empty}").dispose()  # the ledger's tables, no rows
    fingerprint = traffic.workspace.fingerprint
    report = export_ledger(f"sqlite:///{empty}", traffic.workspace)
    assert (report.exposures.added, report.outcomes.added, report.written) == (0, 0, False)
    assert traffic.workspace.fingerprint == fingerprint

    # an older ledger's row that today's ledger would refuse ('clicked' is no outcome)
    older = tmp_path / "older.db"
    shutil.copy(traffic.ledger_file, older)
    request, offer = _sql(
        older,
        "SELECT s.request_id, o.offer_id FROM slates s JOIN slate_offers o "
        f"ON o.request_id = s.request_id WHERE {_DELIVERED} AND s.customer_id = "
        f"'{traffic.declined[0]}' LIMIT 1",
    )[0]
    with sqlite3.connect(older) as connection:
        connection.execute(
            "INSERT INTO feedback VALUES (?, ?, 'clicked', ?, NULL, ?)",
            (request, offer, traffic.declined[0], _seconds(NEXT_DAY)),
        )
    report = export_ledger(f"sqlite:///{older}", traffic.workspace)
    assert report.outcomes.unknown_outcome == 1
    assert "1 unknown outcome skipped" in report.line()
    assert "clicked" not in set(traffic.workspace.read("outcomes")["outcome"])


def test_the_next_training_reads_the_exported_declines(
    small_workspace: Workspace, tmp_path: Path
) -> None:
    """Traffic served in the past (inside the history), every served offer declined an
    hour later: after the export, the training rows of those pairs at the test split's
    orders (six weeks on, past the 30-day decline cooldown) carry the ledger's decline."""
    from serving_helpers import CONFIG

    from policy import load_rules
    from training.config import load_config
    from training.pipeline import train

    workspace = _copy(small_workspace, tmp_path / "ws")
    ledger_file = tmp_path / "ledger.db"
    url = f"sqlite:///{ledger_file}"
    recommender = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=url), workspace=workspace, bundle=None
    )
    served_at, declined_at = "2025-03-10 10:00:00", "2025-03-10 11:00:00"
    for customer in workspace.read("customers")["customer_id"]:
        answer = recommender.recommend(customer, channel="web", as_of=served_at, k=5)
        for offer in answer["offers"]:
            recommender.ledger.post_feedback(
                request_id=answer["request_id"],
                offer_id=offer["offer_id"],
                outcome="declined",
                value=None,
                at_s=_seconds(declined_at),
            )
    recommender.ledger.dispose()

    def test_rows(ws: Workspace) -> pd.DataFrame:
        result = train(load_snapshot(ws), load_rules(), load_config(None, **CONFIG))
        rows, snapshot = result.test, load_snapshot(ws)
        return pd.DataFrame(
            {
                "customer_id": snapshot.customers.decode(rows.customer),
                "offer_id": snapshot.offers.decode(rows.offer),
                "t": rows.as_of_s,
                "days": rows.values[:, rows.names.index("days_since_offer_declined")],
            }
        ).drop_duplicates(["customer_id", "offer_id", "t"])

    before = test_rows(workspace)
    export_ledger(url, workspace)
    after = test_rows(workspace)

    # the oracle: the last decline before each row's moment, from the raw tables
    own = small_workspace.read("outcomes")
    own = own[own["outcome"] == "declined"]
    declines = pd.concat(
        [
            pd.DataFrame(
                {
                    "customer_id": own["customer_id"].astype("object"),
                    "offer_id": own["offer_id"].astype("object"),
                    "at": (own["occurred_at"] - pd.Timestamp(0)) // pd.Timedelta(seconds=1),
                }
            ),
            pd.DataFrame(
                _sql(ledger_file, "SELECT customer_id, offer_id, at_s FROM feedback"),
                columns=["customer_id", "offer_id", "at"],
            ),
        ]
    )
    ledger_pairs = set(_sql(ledger_file, "SELECT customer_id, offer_id FROM feedback"))
    pairs = zip(after["customer_id"], after["offer_id"], strict=True)
    mine = after[[pair in ledger_pairs for pair in pairs]]
    assert len(mine) >= 10, "test-split rows of pairs declined through the ledger"
    assert (mine["t"] > _seconds(declined_at) + 30 * 86400).all()
    for row in mine.itertuples():
        same = declines[
            (declines["customer_id"] == row.customer_id)
            & (declines["offer_id"] == row.offer_id)
            & (declines["at"] < row.t)
        ]
        assert row.days == pytest.approx((row.t - same["at"].max()) / 86400)
    joined = mine.merge(before, on=["customer_id", "offer_id", "t"], suffixes=("", "_before"))
    assert len(joined) >= 10
    changed = joined["days_before"].isna() | (joined["days_before"] != joined["days"])
    assert changed.sum() >= 10


def test_an_explored_slates_inclusion_is_exported_as_the_contracts_propensity() -> None:
    """The ledger's propensity of an explored offer is its draw's at that rank (0.4 for the
    second of the slate below); the contract's is the probability it was shown in the
    request, which training/offpolicy.py weighs by: the ledger's inclusion (0.75 here).
    The export left it empty, so a served week could not be weighed at all. A slate
    without inclusions (deterministic, or cut by a cap) stays empty."""
    from serving.export import LedgerRows, ledger_to_tables

    served = pd.DataFrame(
        {
            "request_id": ["r1", "r1", "r2"],
            "offer_id": ["o1", "o2", "o1"],
            "rank": [1, 2, 1],
            "propensity": [0.9, 0.4, None],
            "inclusion": [0.9, 0.75, None],
            "customer_id": ["c1", "c1", "c1"],
            "channel": ["web", "web", "web"],
            "placement": ["home", "home", "home"],
            "model_version": ["3", "3", "3"],
            "mode": ["model", "model", "model"],
            "holdout": [False, False, False],
            "at_s": [1_700_000_000, 1_700_000_000, 1_700_000_100],
        }
    )
    feedback = pd.DataFrame(
        columns=["request_id", "offer_id", "outcome", "customer_id", "value", "at_s"]
    )
    exposures, *_ = ledger_to_tables(
        LedgerRows(served, feedback),
        offers=pd.Series(["o1", "o2"]),
        customers=pd.Series(["c1"]),
    )
    assert exposures["offer_id"].tolist() == ["o1", "o2", "o1"]
    assert exposures["propensity"].tolist()[:2] == [0.9, 0.75]
    assert np.isnan(exposures["propensity"].tolist()[2])


def test_a_real_ledgers_inclusions_come_out_as_the_exposures_propensities(tmp_path: Path) -> None:
    """Read back from a SQLite ledger: the exported propensity of each served offer is the
    inclusion the ledger stored for it (plain SQL is the oracle), never its per-rank draw."""
    import sqlalchemy as sa

    from serving.export import ledger_to_tables, read_ledger
    from serving.ledger import ServedOffer, SqlLedger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url)
    ledger.log_slate(
        request_id="r1",
        customer_id="c1",
        channel="web",
        placement="home",
        model_version="3",
        mode="model",
        holdout=False,
        at_s=1_700_000_000,
        offers=[ServedOffer("o1", 1, 2.0, 0.3, 0.6, 0.6), ServedOffer("o2", 2, 1.0, 0.2, 0.5, 0.8)],
    )
    ledger.dispose()
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        stored = dict(
            connection.exec_driver_sql("SELECT offer_id, inclusion FROM slate_offers").all()
        )
    engine.dispose()
    assert stored == {"o1": 0.6, "o2": 0.8}
    exposures, *_ = ledger_to_tables(
        read_ledger(url), offers=pd.Series(["o1", "o2"]), customers=pd.Series(["c1"])
    )
    assert dict(zip(exposures["offer_id"], exposures["propensity"], strict=True)) == stored
