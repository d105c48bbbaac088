"""Off-policy value: IPS/SNIPS rank policies as the planted truth says they should."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features import TABLES, ScenarioConfig, Snapshot, coerce_table, make_world
from features.candidates import CandidateGenerator
from policy import load_rules
from training.offpolicy import off_policy_value


def test_ips_prefers_the_policy_that_picks_high_lift_offers() -> None:
    world = make_world(ScenarioConfig(n_customers=250, n_days=120, seed=5))
    tables = {n: coerce_table(n, world.tables[n]) for n in TABLES}
    snapshot = Snapshot.from_tables(tables)
    lift = pd.Series(world.truth.offer_lift)
    offer_lift = lift.reindex(snapshot.offers.values).fillna(0).to_numpy()

    def by_lift(sign: float):  # type: ignore[no-untyped-def]
        return lambda s, requests, rows, offers: sign * offer_lift[offers] + 1e-6 * offers

    rules = load_rules().model_copy(update={"rules": []})
    start = pd.Timestamp(world.config.start) + pd.Timedelta(days=30)
    end = pd.Timestamp(world.config.start) + pd.Timedelta(days=120)
    generator = CandidateGenerator().fit(snapshot, start)
    good = off_policy_value(
        snapshot,
        tables["exposures"],
        tables["outcomes"],
        rules,
        by_lift(1),
        generator=generator,
        start=start,
        end=end,
        bootstrap_samples=200,
    )
    bad = off_policy_value(
        snapshot,
        tables["exposures"],
        tables["outcomes"],
        rules,
        by_lift(-1),
        generator=generator,
        start=start,
        end=end,
        bootstrap_samples=200,
    )
    assert good["available"] and good["slate_size"] == 3
    assert good["snips"]["estimate"] > 2 * bad["snips"]["estimate"]
    assert good["ips"]["ci95_low"] > bad["ips"]["ci95_high"]
    # the logging policy's own value is the plain accepted-per-request rate
    assert good["logging_policy"] == bad["logging_policy"]
    assert bad["ips"]["estimate"] < good["logging_policy"]["estimate"] < good["ips"]["estimate"]


def test_without_propensities_it_says_so() -> None:
    world = make_world(ScenarioConfig(n_customers=20, n_days=40, seed=1))
    tables = {n: coerce_table(n, world.tables[n]) for n in TABLES}
    tables["exposures"] = tables["exposures"].assign(propensity=np.nan)
    result = off_policy_value(
        Snapshot.from_tables(tables),
        tables["exposures"],
        tables["outcomes"],
        load_rules(),
        lambda *a: np.zeros(0),
        generator=CandidateGenerator(),
        start=pd.Timestamp("2025-01-01"),
        end=pd.Timestamp("2026-01-01"),
    )
    exposures = tables["exposures"]
    refused = int(
        (
            ~exposures["holdout"].astype(bool)
            & (exposures["shown_at"] >= pd.Timestamp("2025-01-01"))
            & (exposures["shown_at"] < pd.Timestamp("2026-01-01"))
        ).sum()
    )
    assert refused > 0
    assert result == {
        "available": False,
        "reason": "no exposures with a logging propensity in the evaluation period: "
        f"{refused} exposures refused, logged by a deterministic policy (no propensity); "
        "off-policy estimates need slates drawn with exploration",
        "refused": {"deterministic": refused},
    }
