"""The measurement loop on a world with planted true lifts, served by the real service.

A trained world is served through the service's ASGI app (the real endpoints, the
coalescer, the ledger) with epsilon-greedy exploration and a 50 % offer-level holdout,
for two simulated weekly cycles of daily visits. Customers respond by a planted truth
(:mod:`measurement.simulation`): per offer a conversion rate when withheld, plus a lift
when shown, fixed here by hand: the accessories lift attach by 0.2 (winners), the second
accessories by nothing, and the consumables' offers *lower* it by 0.25 (losers: the offer
puts customers off the thing they would have bought anyway).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from serving_helpers import Served, asgi_client, recommender_for, train_and_register

from measurement.simulation import PlantedLift, Traffic, simulate_traffic, true_value

CONTROL_RATE = 0.3
LIFT = {"A1": 0.2, "A2": 0.0, "C1": -0.25}  # by the offer's product code's last two letters
VISITS = 14  # two weekly cycles of daily visits
WINDOW = pd.Timedelta(days=1)  # the attribution window: a day, the time between visits


@dataclass
class Loop:
    served: Served
    folder: Path
    rules: Path
    client: Any
    truth: dict[str, PlantedLift]
    prices: dict[str, float]
    traffic: Traffic
    start: pd.Timestamp

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.folder / 'ledger.db'}"


def _planted(served: Served, home: Path) -> tuple[dict[str, PlantedLift], Path]:
    """The truth, and a rules file that serves only the planted offers (item offers of
    accessories and consumables: one product each, none in another's, so one offer's
    conversion is never another's)."""
    offers = served.workspace.read("offers")["offer_id"].tolist()
    planted = [o for o in offers if o.startswith("item:") and o[-2:] in LIFT]
    assert len(planted) == 12, planted
    rules = yaml.safe_load((Path(__file__).parents[1] / "policy/default_rules.yaml").read_text())
    for rule in rules["rules"]:
        if rule["type"] == "killed":
            rule["offers"] = [o for o in offers if o not in planted]
    path = home / "planted-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return {o: PlantedLift(CONTROL_RATE, LIFT[o[-2:]]) for o in planted}, path


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from serving.ledger import ghost_offers

    home = tmp_path_factory.mktemp("loop")
    served = train_and_register(home)
    truth, rules = _planted(served, home)
    products = served.workspace.read("products")
    prices = dict(zip(products["product_id"], products["price"], strict=True))
    folder = home / "service"
    folder.mkdir()
    engine = sa.create_engine(f"sqlite:///{folder / 'ledger.db'}")

    def ghosts(request_ids: list[str]) -> list[tuple[str, str]]:
        query = sa.select(ghost_offers.c.request_id, ghost_offers.c.offer_id).where(
            ghost_offers.c.request_id.in_(request_ids)
        )
        with engine.connect() as connection:
            return [(r, o) for r, o in connection.execute(query)]

    env = {
        "NEXTBEST_RULES": str(rules),
        "NEXTBEST_EXPLORATION": "epsilon",
        "NEXTBEST_EXPLORATION_RATES": "0.3",
        "NEXTBEST_OFFER_HOLDOUT_SHARE": "0.5",
        "NEXTBEST_REQUEST_SEED": "measurement-loop",  # a replayable run: ids seed the draws
    }
    with asgi_client(served, folder, **env) as client, ThreadPoolExecutor(8) as pool:

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            answer = client.post(path, json=body)
            assert answer.status_code == 200, answer.text
            return dict(answer.json())

        end = pd.Timestamp(client.get("/metadata").json()["data_end"])
        start = end.normalize() + pd.Timedelta(days=7 - end.day_of_week, hours=10)  # a Monday
        traffic = simulate_traffic(
            lambda bodies: list(pool.map(lambda b: post("/recommend", b), bodies)),
            lambda bodies: list(pool.map(lambda b: post("/feedback", b), bodies)) and None,
            ghosts,
            customers=served.workspace.read("customers")["customer_id"].tolist(),
            start=start,
            visits=VISITS,
            truth=truth,
            products={o: o.removeprefix("item:") for o in truth},
            prices=prices,
            seed=1,
        )
        yield Loop(served, folder, rules, client, truth, prices, traffic, start)
    engine.dispose()


def test_the_simulated_customers_respond_as_planted(loop: Loop) -> None:
    """The harness itself: every arm's observed attach rate is its planted rate within
    four standard errors, and the ledger holds exactly the slates and ghosts it drew."""
    opportunities = loop.traffic.opportunities
    arms = opportunities.groupby(["offer_id", "arm"]).agg(
        n=("converted", "size"), rate=("converted", "mean"), planted=("rate", "first")
    )
    assert len(arms) == 2 * len(loop.truth)  # every planted offer shown and withheld
    se = (arms["planted"] * (1 - arms["planted"]) / arms["n"]) ** 0.5
    assert ((arms["rate"] - arms["planted"]).abs() <= 4 * se).all(), arms
    for (offer, arm), row in arms.iterrows():
        assert row["planted"] == loop.truth[str(offer)].rate(arm == "exposed")
    with sa.create_engine(loop.ledger_url).connect() as connection:
        shown = connection.execute(sa.text("select count(*) from slate_offers")).scalar()
        ghosts = connection.execute(sa.text("select count(*) from ghost_offers")).scalar()
    assert shown == (opportunities["arm"] == "exposed").sum()
    assert ghosts == (opportunities["arm"] == "control").sum()
    assert len(loop.traffic.requests) == VISITS * len(loop.served.workspace.read("customers"))


def _inputs(loop: Loop) -> Any:
    """The scorecard's inputs: the workspace and the ledger (as `nextbest scorecard
    --db-url` reads them), with the simulated customers' orders added to the world's."""
    from measurement.scorecard import load_inputs

    inputs = load_inputs(loop.served.workspace.path, loop.ledger_url)
    orders = pd.concat([inputs.orders, loop.traffic.orders], ignore_index=True)
    return replace(inputs, orders=orders)


def test_the_scorecard_recovers_every_planted_lift(loop: Loop) -> None:
    """Per offer over both cycles, each planted lift lies inside the scorecard's 95 %
    interval (12 intervals), and the winners' and losers' intervals exclude zero."""
    from measurement.scorecard import by_group, measure, opportunities

    inputs = _inputs(loop)
    opps = opportunities(inputs.exposures, inputs.ledger_opportunities)
    opps = opps[opps["at"] >= loop.start]  # the experiment: the world's own history is not
    measured = measure(opps, inputs, window=WINDOW)
    table = by_group(measured, "offer", inputs.customers).set_index("offer")
    assert set(table.index) == set(loop.truth)
    for offer, truth in loop.truth.items():
        row = table.loc[offer]
        assert row["low"] <= truth.lift <= row["high"], (offer, truth, row.to_dict())
        if truth.lift > 0:
            assert row["low"] > 0, (offer, row.to_dict())
        if truth.lift < 0:
            assert row["high"] < 0, (offer, row.to_dict())


def test_stop_loss_kills_exactly_the_losers_and_the_next_request_goes_without(
    loop: Loop, tmp_path: Path
) -> None:
    """After the two weekly cycles, `nextbest stoploss run --dry-run` (the scorecard's
    cycles measured from the workspace and the ledger) lists the four planted losers and
    nothing else; `run_stoploss` kills them; the very next /recommend leaves them out,
    with the reason code stop_loss."""
    from measurement.scorecard import offer_cycles
    from measurement.stoploss import run_stoploss
    from policy import load_rules
    from serving.ledger import SqlLedger

    inputs = _inputs(loop)
    cycles = offer_cycles(inputs, weeks=2, window=WINDOW)
    assert len(cycles) == 2 * len(loop.truth)
    losers = sorted(o for o, t in loop.truth.items() if t.lift < 0)
    as_of = loop.start + pd.Timedelta(days=VISITS)
    # the command, on a copy of the workspace that holds the simulated orders (dry run)
    import json
    import shutil

    from typer.testing import CliRunner

    from features import Workspace
    from features.workspace import rewrite_workspace
    from nextbest.cli import app

    copy = Workspace(shutil.copytree(loop.served.workspace.path, tmp_path / "ws"))
    tables = copy.read_all() | {"orders": inputs.orders}
    rewrite_workspace(copy, tables, source={"name": "the loop's simulated orders"})
    common = [
        "--workspace",
        str(copy.path),
        "--db-url",
        loop.ledger_url,
        "--rules",
        str(loop.rules),
    ]
    command = ["stoploss", "run", *common, "--as-of", as_of.isoformat(), "--window-days", "1"]
    listed = CliRunner().invoke(app, [*command, "--dry-run", "--json"])
    assert listed.exit_code == 0, listed.output
    assert sorted(d["offer_id"] for d in json.loads(listed.output)["decisions"]) == losers
    ledger = SqlLedger(loop.ledger_url)
    try:
        dry = run_stoploss(
            cycles, load_rules(loop.rules).stoploss, ledger, as_of=as_of, dry_run=True
        )
        assert sorted(d.offer_id for d in dry.decisions) == losers
        assert not dry.killed and not ledger.stopped_offers()
        report = run_stoploss(cycles, load_rules(loop.rules).stoploss, ledger, as_of=as_of)
        assert sorted(report.killed) == losers
        assert sorted(ledger.stopped_offers()) == losers
    finally:
        ledger.dispose()
    customers = loop.served.workspace.read("customers")["customer_id"].tolist()[:20]
    seen: set[str] = set()
    for customer in customers:
        body = {"customer_id": customer, "channel": "web", "k": 3, "debug": True}
        answer = loop.client.post("/recommend", json=body | {"as_of": as_of.isoformat()}).json()
        assert not {o["offer_id"] for o in answer["offers"]} & set(losers), answer["offers"]
        stopped = {e["offer_id"] for e in answer["excluded"] if "stop_loss" in e["reasons"]}
        assert stopped <= set(losers)
        seen |= stopped
    assert seen == set(losers)


def test_the_doubly_robust_estimate_of_a_second_policy_covers_its_served_value(
    loop: Loop, tmp_path: Path
) -> None:
    """A second policy (the planted rules with the four losers switched off, ranked
    deterministically) is estimated from the explored logs by `measurement.replay`; then
    it is served itself, through the same simulator on a fresh ledger, and its true
    accepted offers per request computed from the planted truth. The doubly robust
    interval holds that value (IPS and SNIPS are reported beside it)."""
    from measurement.replay import replay
    from serving.settings import ServingSettings

    losers = sorted(o for o, t in loop.truth.items() if t.lift < 0)
    rules = yaml.safe_load(loop.rules.read_text())
    for rule in rules["rules"]:
        if rule["type"] == "killed":
            rule["offers"] = [*rule["offers"], *losers]
    second = tmp_path / "second-rules.yaml"
    second.write_text(yaml.safe_dump(rules))
    settings = ServingSettings(
        db_url=loop.ledger_url, holdout_share=0.0, offer_holdout_share=0.5, rules_path=loop.rules
    )
    report = replay(settings, workspace=loop.served.workspace.path, rules=second)
    estimate = report.estimates["accepted"]["doubly_robust"]

    served = recommender_for(
        loop.served, tmp_path / "second.db", offer_holdout_share=0.5, rules_path=second
    )
    truth = simulate_traffic(
        lambda bodies: served.recommend_many(
            [b["customer_id"] for b in bodies], channel="web", k=3, as_of=bodies[0]["as_of"]
        ),
        lambda bodies: None,
        lambda ids: [],
        customers=loop.served.workspace.read("customers")["customer_id"].tolist(),
        start=loop.start,
        visits=VISITS,
        truth=loop.truth,
        products={o: o.removeprefix("item:") for o in loop.truth},
        prices=loop.prices,
        batch=1000,
    )
    value = true_value(truth, loop.truth)
    logged = report.estimates["accepted"]["logging_policy"]["estimate"]
    assert value > logged  # the second policy is better: the losers are gone
    assert estimate["ci95_low"] <= value <= estimate["ci95_high"], (value, report.estimates)
