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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from serving_helpers import Served, asgi_client, train_and_register

from measurement.simulation import PlantedLift, Traffic, simulate_traffic

CONTROL_RATE = 0.3
LIFT = {"A1": 0.2, "A2": 0.0, "C1": -0.25}  # by the offer's product code's last two letters
VISITS = 14  # two weekly cycles of daily visits


@dataclass
class Loop:
    served: Served
    folder: Path
    rules: Path
    client: Any
    truth: dict[str, PlantedLift]
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
        yield Loop(served, folder, rules, client, truth, traffic, start)
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
