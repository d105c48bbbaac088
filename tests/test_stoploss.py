"""The stop-loss: the rule by the interval on hand-made cycle frames, the stored and audited
kill with its learning record, and the kill excluding the offer from the next request on,
through the real service and in batch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from measurement.stoploss import (
    CYCLE_COLUMNS,
    decide,
    judge_cycles,
    read_cycles,
    revive,
    run_stoploss,
)
from policy.rules import StopLoss, parse_rules
from serving.ledger import SqlLedger

CONFIG = StopLoss()  # min_lift 0, min_margin_uplift 0, 50 per arm, 2 cycles
WEEK1, WEEK2, WEEK3 = (pd.Timestamp("2024-03-04") + pd.Timedelta(weeks=k) for k in range(3))
AFTER_WEEK2 = pd.Timestamp("2024-03-18")  # weeks 1 and 2 complete, week 3 not begun
AFTER_WEEK3 = pd.Timestamp("2024-03-25")

# (lift, lift_low, lift_high) and (margin, low, high) for hand-made cycles
LOSER = (-0.06, -0.10, -0.02)  # confidently below 0
WINNER = (0.05, 0.02, 0.08)
WIDE = (-0.04, -0.30, 0.22)  # a point estimate below 0, an interval that reaches above
MARGIN_OK = (1.5, 0.5, 2.5)
MARGIN_BAD = (-1.2, -2.0, -0.4)


def cycle(
    offer: str,
    week: pd.Timestamp,
    lift: tuple[float, float, float] = WINNER,
    margin: tuple[float, float, float] = MARGIN_OK,
    n: tuple[float, float] = (400, 300),
) -> dict[str, object]:
    return {
        "offer_id": offer,
        "week_start": week,
        "n_exposed": n[0],
        "n_control": n[1],
        "attach_exposed": 0.10 + lift[0],
        "attach_control": 0.10,
        "lift": lift[0],
        "lift_low": lift[1],
        "lift_high": lift[2],
        "margin_uplift": margin[0],
        "margin_low": margin[1],
        "margin_high": margin[2],
    }


def frame(*rows: dict[str, object]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=list(CYCLE_COLUMNS))


def killed(cycles: pd.DataFrame, as_of: pd.Timestamp = AFTER_WEEK2, **config: object) -> list:
    return [d.offer_id for d in decide(cycles, StopLoss(**config), as_of=as_of)]


# -- the rule, by the interval ------------------------------------------------------------
def test_a_loser_failing_two_consecutive_cycles_is_killed_and_a_winner_is_not() -> None:
    cycles = frame(
        cycle("LOSER", WEEK1, LOSER),
        cycle("LOSER", WEEK2, LOSER),
        cycle("WINNER", WEEK1, WINNER),
        cycle("WINNER", WEEK2, WINNER),
    )
    [decision] = decide(cycles, CONFIG, as_of=AFTER_WEEK2)
    assert decision.offer_id == "LOSER"
    assert decision.rule == "lift_high < min_lift (0.0)"
    assert [c["week_start"][:10] for c in decision.cycles] == ["2024-03-04", "2024-03-11"]
    assert [c["lift_high"] for c in decision.cycles] == [-0.02, -0.02]
    assert decision.last_cycle == WEEK2


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        ([cycle("X", WEEK1, WINNER), cycle("X", WEEK2, LOSER)], "failed the last cycle only"),
        ([cycle("X", WEEK1, LOSER), cycle("X", WEEK2, WINNER)], "failed the cycle before only"),
        ([cycle("X", WEEK2, LOSER)], "no row for the cycle before"),
        # weeks 1 and 3 fail, week 2 has no row: not consecutive
        ([cycle("X", WEEK1, LOSER), cycle("X", WEEK3, LOSER)], "a week without a row between"),
        (
            [cycle("X", WEEK1, LOSER), cycle("X", WEEK2, WINNER), cycle("X", WEEK3, LOSER)],
            "a passing week between",
        ),
        (
            [
                cycle("X", WEEK1, LOSER),
                cycle("X", WEEK2, LOSER, n=(49, 300)),
                cycle("X", WEEK3, LOSER),
            ],
            "an insufficient week between (exposed arm below 50)",
        ),
        (
            [
                cycle("X", WEEK1, LOSER),
                cycle("X", WEEK2, LOSER, n=(400, 10)),
                cycle("X", WEEK3, LOSER),
            ],
            "an insufficient week between (control arm below 50)",
        ),
    ],
)
def test_an_offer_not_failing_two_consecutive_cycles_is_not_killed(rows: list, why: str) -> None:
    assert killed(frame(*rows), AFTER_WEEK3) == [], why


def test_a_winner_with_a_wide_interval_is_never_killed() -> None:
    """Its point estimate is below the bar every week, but its interval reaches above."""
    rows = [cycle("WIDE", WEEK1 + pd.Timedelta(weeks=k), WIDE) for k in range(8)]
    for weeks_done in range(1, 9):
        as_of = WEEK1 + pd.Timedelta(weeks=weeks_done)
        assert killed(frame(*rows), as_of) == []
    assert set(judge_cycles(frame(*rows), CONFIG)["verdict"]) == {"pass"}


def test_the_margin_rule_kills_a_converting_offer_that_loses_money() -> None:
    cycles = frame(
        cycle("CHEAP", WEEK1, WINNER, MARGIN_BAD),
        cycle("CHEAP", WEEK2, WINNER, MARGIN_BAD),
        cycle("PAYS", WEEK1, WINNER, MARGIN_OK),
        cycle("PAYS", WEEK2, WINNER, MARGIN_OK),
    )
    [decision] = decide(cycles, CONFIG, as_of=AFTER_WEEK2)
    assert decision.offer_id == "CHEAP"
    assert decision.rule == "margin_high < min_margin_uplift (0.0)"
    # a bar of -0.5 lets a margin whose interval reaches -0.4 pass
    assert killed(cycles, min_margin_uplift=-0.5) == []
    # one cycle failing on lift, the next on margin: two failing cycles in a row
    mixed = frame(cycle("M", WEEK1, LOSER, MARGIN_OK), cycle("M", WEEK2, WINNER, MARGIN_BAD))
    [both] = decide(mixed, CONFIG, as_of=AFTER_WEEK2)
    assert both.rule == "lift_high < min_lift (0.0); margin_high < min_margin_uplift (0.0)"


def test_thresholds_and_the_week_in_progress() -> None:
    cycles = frame(cycle("X", WEEK1, WINNER), cycle("X", WEEK2, WINNER), cycle("X", WEEK3, LOSER))
    # a bar above the winner's upper bound (0.08) fails it
    assert killed(cycles, AFTER_WEEK2, min_lift=0.1) == ["X"]
    assert killed(cycles, AFTER_WEEK2, min_lift=0.08) == []  # 0.08 < 0.08 is false
    # week 3 is in progress at its own Wednesday: weeks 1 and 2 are judged
    wednesday = WEEK3 + pd.Timedelta(days=2)
    assert killed(cycles, wednesday, min_lift=0.1) == ["X"]
    # one cycle is enough when configured so
    assert killed(cycles, AFTER_WEEK3, consecutive_cycles=1) == ["X"]
    assert decide(cycles, CONFIG, as_of=WEEK1 + pd.Timedelta(days=6)) == []  # none complete


def test_unknown_figures() -> None:
    nan = (math.nan, math.nan, math.nan)
    # no costs: the margin is unknown, the lift still judges
    no_costs = frame(cycle("X", WEEK1, LOSER, nan), cycle("X", WEEK2, LOSER, nan))
    assert killed(no_costs) == ["X"]
    # nothing known: insufficient, never a kill
    unknown = frame(cycle("X", WEEK1, nan, nan), cycle("X", WEEK2, nan, nan))
    assert set(judge_cycles(unknown, CONFIG)["verdict"]) == {"insufficient"}
    assert killed(unknown) == []
    # a missing arm count: insufficient
    no_count = frame(cycle("X", WEEK1, LOSER), cycle("X", WEEK2, LOSER, n=(400, math.nan)))
    assert killed(no_count) == []


def test_the_false_kill_rate_of_a_null_offer_is_the_square_of_one_tail() -> None:
    """Offers whose true lift is exactly 0, with calibrated normal 95 % intervals: each
    cycle fails with probability P(Z > 1.96) = 0.025, two in a row with 0.025^2."""
    rng = np.random.default_rng(12)
    n_offers, se = 40_000, 0.02
    rows = []
    for week in (WEEK1, WEEK2):
        estimate = rng.normal(0.0, se, n_offers)
        rows.append(
            pd.DataFrame(
                {
                    "offer_id": [f"O{i}" for i in range(n_offers)],
                    "week_start": week,
                    "n_exposed": 500,
                    "n_control": 500,
                    "attach_exposed": 0.1 + estimate,
                    "attach_control": 0.1,
                    "lift": estimate,
                    "lift_low": estimate - 1.959964 * se,
                    "lift_high": estimate + 1.959964 * se,
                    "margin_uplift": math.nan,
                    "margin_low": math.nan,
                    "margin_high": math.nan,
                }
            )
        )
    cycles = pd.concat(rows, ignore_index=True)
    n_killed = len(decide(cycles, CONFIG, as_of=AFTER_WEEK2))
    expected = n_offers * 0.025**2  # 25
    assert abs(n_killed - expected) < 4 * math.sqrt(expected), n_killed  # binomial, 4 sd


def test_the_cycles_must_have_the_scorecards_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lack the columns lift_high, margin_high"):
        judge_cycles(frame(cycle("X", WEEK1)).drop(columns=["lift_high", "margin_high"]), CONFIG)
    twice = frame(cycle("X", WEEK1), cycle("X", WEEK1))
    with pytest.raises(ValueError, match="offer 'X' twice for the week of 2024-03-04"):
        judge_cycles(twice, CONFIG)
    with pytest.raises(ValueError, match=r"a cycles file is \.csv or \.parquet"):
        (tmp_path / "c.json").write_text("{}")
        read_cycles(tmp_path / "c.json")
    cycles = frame(cycle("007", WEEK1, LOSER), cycle("007", WEEK2, LOSER))
    cycles.to_csv(tmp_path / "c.csv", index=False)
    cycles.to_parquet(tmp_path / "c.parquet")
    for name in ("c.csv", "c.parquet"):
        assert killed(read_cycles(tmp_path / name)) == ["007"]  # the id stays text


def test_the_rules_file_configures_it() -> None:
    rules = parse_rules({"rules": [], "stoploss": {"min_lift": -0.01, "min_opportunities": 5}})
    assert rules.stoploss == StopLoss(min_lift=-0.01, min_opportunities=5)
    with pytest.raises(ValueError, match=r"stoploss\.min_opportunities"):
        parse_rules({"rules": [], "stoploss": {"min_opportunities": 0}})
    with pytest.raises(ValueError, match=r"stoploss\.min_lfit"):
        parse_rules({"rules": [], "stoploss": {"min_lfit": 0}})
    # the thresholds judge measurements, not eligibility: no new model version for them
    assert rules.content_hash == parse_rules({"rules": []}).content_hash


# -- a kill is stored, with its learning record, and audited ----------------------------
OFFERS = pd.DataFrame(
    {
        "offer_id": ["LOSER", "WINNER"],
        "kind": ["bundle", "item"],
        "title": ["Pasta night for two", "Fresh basil"],
        "product_ids": [["P1", "P2"], ["P3"]],
        "category": ["Pasta", "Herbs"],
        "discount": [1.5, 0.0],
        "value": [7.0, 2.0],
        "margin": [2.1, 0.8],
        "channels": [["web", "email"], []],
        "target_audiences": [["campaign-9"], []],
        "target_segments": [["families"], []],
        "lever": [1.0, 1.0],
    }
)
PRODUCTS = pd.DataFrame({"product_id": ["P1", "P2", "P3"], "price": [2.25, 4.5, 2.0]})
LOSING = frame(
    cycle("LOSER", WEEK1, LOSER, MARGIN_BAD),
    cycle("LOSER", WEEK2, LOSER, MARGIN_BAD),
    cycle("WINNER", WEEK1, WIDE),
    cycle("WINNER", WEEK2, WINNER),
)


def _seconds(moment: pd.Timestamp) -> int:
    return int(moment.value // 10**9)


def served(ledger: SqlLedger, offer: str, channel: str, placement: str, at: pd.Timestamp) -> None:
    from serving.ledger import ServedOffer

    ledger.log_slate(
        request_id=f"{offer}-{channel}-{placement}-{_seconds(at)}",
        customer_id="C1",
        channel=channel,
        placement=placement,
        model_version="1",
        mode="model",
        holdout=False,
        at_s=_seconds(at),
        offers=[ServedOffer(offer, 1, 0.5, 0.1)],
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqlLedger]:
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield ledger
    ledger.dispose()


def audit_entries(ledger: SqlLedger) -> list[dict]:
    from serving.review import ReviewStore

    return [e for e in ReviewStore(ledger).audit_log() if e["action"].startswith("stoploss")]


def test_dry_run_lists_what_would_be_killed_and_writes_nothing(ledger: SqlLedger) -> None:
    report = run_stoploss(LOSING, CONFIG, ledger, as_of=AFTER_WEEK2, dry_run=True)
    text = "\n".join(report.lines())
    assert "judged the weeks of 2024-03-04, 2024-03-11: 2 fail, 2 pass, 0 insufficient" in text
    assert (
        "would kill LOSER: lift_high < min_lift (0.0); margin_high < min_margin_uplift (0.0), "
        "2 cycles in a row (week 2024-03-04: n 400/300, lift -0.0600 [-0.1000, -0.0200], "
        "margin -1.20 [-2.00, -0.40]; week 2024-03-11:"
    ) in text
    assert "WINNER" not in text
    assert report.killed == {}
    assert ledger.offer_kills() == [] and ledger.stopped_offers() == frozenset()
    assert audit_entries(ledger) == []


def test_a_kill_is_stored_with_its_learning_record_and_audited(ledger: SqlLedger) -> None:
    served(ledger, "LOSER", "web", "pdp", WEEK1 + pd.Timedelta(days=1))
    served(ledger, "LOSER", "web", "pdp", WEEK2 + pd.Timedelta(days=2))
    served(ledger, "LOSER", "email", "home", WEEK2 + pd.Timedelta(days=3))
    served(ledger, "LOSER", "app", "cart", WEEK3 + pd.Timedelta(days=1))  # after the cycles
    report = run_stoploss(
        LOSING,
        CONFIG,
        ledger,
        as_of=AFTER_WEEK2,
        actor="stoploss/weekly-job",
        offers=OFFERS,
        products=PRODUCTS,
    )
    assert list(report.killed) == ["LOSER"]
    assert ledger.stopped_offers() == frozenset({"LOSER"})
    [kill] = ledger.offer_kills()
    assert kill["offer_id"] == "LOSER" and kill["killed_by"] == "stoploss/weekly-job"
    assert kill["rule"] == "lift_high < min_lift (0.0); margin_high < min_margin_uplift (0.0)"
    assert kill["last_cycle"] == WEEK2.to_pydatetime() and kill["revived_at"] is None
    assert [c["margin_high"] for c in kill["figures"]] == [-0.4, -0.4]
    learning = kill["learning"]
    assert {k: learning[k] for k in learning if k != "cycles"} == {
        "offer_id": "LOSER",
        "rule": kill["rule"],
        "kind": "bundle",
        "category": "Pasta",
        "message": "Pasta night for two",
        "price": 6.75,  # 2.25 + 4.5
        "discount": 1.5,
        "value": 7.0,
        "margin": 2.1,
        "lever": 1.0,
        "channels": ["web", "email"],
        "target_audiences": ["campaign-9"],
        "target_segments": ["families"],
        "placements": ["web/pdp (2)", "email/home (1)"],
    }
    assert [c["week_start"][:10] for c in learning["cycles"]] == ["2024-03-04", "2024-03-11"]
    assert [c["lift_high"] for c in learning["cycles"]] == [-0.02, -0.02]
    [entry] = audit_entries(ledger)
    assert entry["actor"] == "stoploss/weekly-job" and entry["action"] == "stoploss_kill"
    assert entry["target"] == "LOSER" and '"kill_id": 1' in entry["after"]


def test_a_rerun_is_idempotent_and_a_revival_holds_until_later_cycles_fail(
    ledger: SqlLedger,
) -> None:
    from serving.review import AccessError, ReviewStore

    first = run_stoploss(LOSING, CONFIG, ledger, as_of=AFTER_WEEK2)
    again = run_stoploss(LOSING, CONFIG, ledger, as_of=AFTER_WEEK2)
    assert list(first.killed) == ["LOSER"] and again.killed == {} and again.decisions == []
    assert again.already_killed == ["LOSER"]
    assert len(ledger.offer_kills()) == 1 and len(audit_entries(ledger)) == 1
    # a revival is a human's: a review approver
    store = ReviewStore(ledger)
    store.add_user("ann", "a long password", "approver")
    store.add_user("rick", "a long password", "reviewer")
    with pytest.raises(AccessError, match="'rick' is not an approver"):
        revive(ledger, "LOSER", actor="rick", reason="seasonal")
    with pytest.raises(LookupError, match="'WINNER' has no active stop-loss kill"):
        revive(ledger, "WINNER", actor="ann", reason="seasonal")
    revive(ledger, "LOSER", actor="ann", reason="the supplier fixed the price")
    assert ledger.stopped_offers() == frozenset()
    [kill] = ledger.offer_kills()
    assert kill["revived_by"] == "ann" and kill["revive_reason"] == "the supplier fixed the price"
    revived = audit_entries(ledger)[-1]
    assert (revived["actor"], revived["action"], revived["target"]) == (
        "ann",
        "stoploss_revive",
        "LOSER",
    )
    # the cycles that killed it do not kill it again; nor do they with one new failing week
    week3 = pd.concat([LOSING, frame(cycle("LOSER", WEEK3, LOSER))], ignore_index=True)
    assert run_stoploss(LOSING, CONFIG, ledger, as_of=AFTER_WEEK2).killed == {}
    assert run_stoploss(week3, CONFIG, ledger, as_of=AFTER_WEEK3).killed == {}
    # two failing weeks after the kill's: killed again
    week4 = pd.concat(
        [week3, frame(cycle("LOSER", WEEK3 + pd.Timedelta(weeks=1), LOSER))], ignore_index=True
    )
    later = run_stoploss(week4, CONFIG, ledger, as_of=AFTER_WEEK3 + pd.Timedelta(weeks=1))
    assert list(later.killed) == ["LOSER"] and later.killed["LOSER"] == 2
    assert ledger.stopped_offers() == frozenset({"LOSER"})


def test_one_active_kill_per_offer_on_postgresql(fresh_postgres: str) -> None:
    """The unique partial index holds on PostgreSQL too; JSON figures with NaN stored."""
    ledger = SqlLedger(fresh_postgres)
    try:
        nan = (math.nan, math.nan, math.nan)
        no_costs = frame(cycle("P", WEEK1, LOSER, nan), cycle("P", WEEK2, LOSER, nan))
        assert list(run_stoploss(no_costs, CONFIG, ledger, as_of=AFTER_WEEK2).killed) == ["P"]
        assert ledger.stopped_offers() == frozenset({"P"})
        [kill] = ledger.offer_kills(active_only=True)
        assert kill["figures"][0]["margin_high"] is None
        with pytest.raises(sa.exc.IntegrityError), ledger.engine.begin() as connection:
            connection.execute(
                sa.insert(sa.table("offer_kills", *(sa.column(c) for c in kill if c != "kill_id"))),
                {k: v for k, v in kill.items() if k != "kill_id"}
                | {"figures": "[]", "learning": "{}"},
            )
    finally:
        ledger.dispose()


# -- the kill, from the next request on: the real service and batch --------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from serving_helpers import train_and_register

    return train_and_register(tmp_path_factory.mktemp("stoploss"))


def failing(offer: str) -> pd.DataFrame:
    return frame(cycle(offer, WEEK1, LOSER), cycle(offer, WEEK2, LOSER))


def reasons_for(answer: dict, offer: str) -> list[str]:
    return [r for e in answer["excluded"] if e["offer_id"] == offer for r in e["reasons"]]


@pytest.mark.slow
def test_a_kill_excludes_the_offer_from_the_next_request_in_the_service_and_in_batch(
    world, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from serving_helpers import asgi_client, recommender_for

    from serving.batch import recommend_batch
    from serving.review import ReviewStore

    url = f"sqlite:///{tmp_path / 'ledger.db'}"  # the service's ledger (asgi_client's)
    body = {"customer_id": "S00003", "channel": "web", "k": 3, "debug": True}
    with asgi_client(world, tmp_path) as client:
        before = client.post("/recommend", json=body).json()
        target = before["offers"][0]["offer_id"]
        assert "stop_loss" not in reasons_for(before, target)
        batch = recommender_for(world, tmp_path / "ledger.db")
        customers = pd.DataFrame({"customer_id": [f"S{i:05d}" for i in range(1, 31)]})
        unkilled = recommend_batch(batch, customers, channel="web", placement="home", k=3)
        assert target in set(unkilled["offer_id"])
        # the weekly job, as another process would: its own connection to the database
        job = SqlLedger(url)
        assert list(run_stoploss(failing(target), CONFIG, job, as_of=AFTER_WEEK2).killed) == [
            target
        ]
        after = client.post("/recommend", json=body).json()
        assert target not in [o["offer_id"] for o in after["offers"]]
        assert "stop_loss" in reasons_for(after, target)
        other = client.post("/recommend", json=body | {"customer_id": "S00011"}).json()
        assert target not in [o["offer_id"] for o in other["offers"]]

        # batch reads the kills too (the CLI's recommend-batch is recommend_batch), with the
        # recommender it had before the kill
        rows = recommend_batch(batch, customers, channel="web", placement="home", k=3)
        assert len(rows) and target not in set(rows["offer_id"])
        [traced] = batch.recommend_many(["S00003"], channel="web", k=3, debug=True)
        assert "stop_loss" in reasons_for(traced, target)

        # a human revives it: eligible again from the next request on, no restart
        ReviewStore(job).add_user("ann", "a long password", "approver")
        revive(job, target, actor="ann", reason="the campaign changed")
        revived = client.post("/recommend", json=body).json()
        assert "stop_loss" not in reasons_for(revived, target)
        job.dispose()
        batch.ledger.dispose()


# -- the command line ---------------------------------------------------------------------
def test_nextbest_stoploss_run_dry_run_then_run_list_and_revive(
    small_workspace, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from nextbest.cli import app
    from serving.review import ReviewStore

    offers = small_workspace.read("offers")
    offer = str(offers["offer_id"].iloc[0])
    path = tmp_path / "cycles.csv"
    failing(offer).to_csv(path, index=False)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    common = ["--cycles", str(path), "--db-url", url, "--as-of", "2024-03-18"]
    runner = CliRunner()

    dry = runner.invoke(app, ["stoploss", "run", *common, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would kill {offer}: lift_high < min_lift (0.0), 2 cycles in a row" in dry.output
    ledger = SqlLedger(url)
    assert ledger.offer_kills() == []

    run = runner.invoke(
        app, ["stoploss", "run", *common, "-w", str(small_workspace.path), "--as", "cron"]
    )
    assert run.exit_code == 0, run.output
    assert f"killed {offer}: lift_high < min_lift (0.0)" in run.output
    [kill] = ledger.offer_kills()
    assert kill["killed_by"] == "cron"
    assert kill["learning"]["message"] == offers["title"].iloc[0]
    again = runner.invoke(app, ["stoploss", "run", *common])
    assert "nothing to kill" in again.output and f"killed already: {offer}" in again.output
    listed = runner.invoke(app, ["stoploss", "list", "--db-url", url])
    assert offer in listed.output and "cron" in listed.output

    ReviewStore(ledger).add_user("ann", "a long password", "approver")
    refused = runner.invoke(
        app, ["stoploss", "revive", offer, "--as", "bob", "--reason", "x", "--db-url", url]
    )
    assert refused.exit_code == 2 and "unknown user 'bob'" in refused.output
    revived = runner.invoke(
        app, ["stoploss", "revive", offer, "--as", "ann", "--reason", "relaunch", "--db-url", url]
    )
    assert revived.exit_code == 0, revived.output
    assert ledger.stopped_offers() == frozenset()
    assert runner.invoke(app, ["stoploss", "list", "--db-url", url]).output.strip() == "(no kills)"

    bad = runner.invoke(
        app, ["stoploss", "run", "--cycles", str(tmp_path / "none.csv"), "--db-url", url]
    )
    assert bad.exit_code == 2 and "no such cycles file" in bad.output
    ledger.dispose()
