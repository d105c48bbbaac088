"""The seeded synthetic world generator: complete, deterministic, with findable structure."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from features import TABLES, ScenarioConfig, Workspace, World, make_world, validate_tables
from features.contract import EVENT_TYPES, OUTCOMES


def test_world_fills_every_table_and_validates(small_world: World) -> None:
    for name in TABLES:
        assert len(small_world.tables[name]) > 0, name
    assert set(small_world.tables["events"]["event_type"]) == set(EVENT_TYPES)
    assert set(small_world.tables["outcomes"]["outcome"]) == set(OUTCOMES) - {
        "purchased",
        "redeemed",
    }


def test_workspace_is_marked_synthetic(small_workspace: Workspace) -> None:
    manifest = small_workspace.manifest
    assert manifest["synthetic"] is True
    assert manifest["source"]["name"] == "synthetic scenario"
    validate_tables(small_workspace.read_all())


def test_same_seed_same_world_other_seed_other_world() -> None:
    config = ScenarioConfig(n_customers=30, n_days=60, seed=3)
    first, again = make_world(config), make_world(config)
    for name in TABLES:
        pd.testing.assert_frame_equal(first.tables[name], again.tables[name])
    other = make_world(ScenarioConfig(n_customers=30, n_days=60, seed=4))
    assert not first.tables["orders"].equals(other.tables["orders"])


def test_some_customers_have_unknown_consent(small_world: World) -> None:
    customers = set(small_world.tables["customers"]["customer_id"])
    stated = set(small_world.tables["consent"]["customer_id"])
    assert 0 < len(customers - stated) < len(customers) / 4


def _first_purchase(orders: pd.DataFrame) -> pd.Series:
    bought = orders[orders["quantity"] > 0]
    return bought.groupby(["customer_id", "product_id"])["ordered_at"].min()


def test_completion_pairs_are_bought_soon_after_the_device(small_world: World) -> None:
    first = _first_purchase(small_world.tables["orders"])
    followed, pairs = 0, 0
    for device, accessory in small_world.truth.completion_pairs:
        device_buyers = first.xs(device, level="product_id")
        for customer, at in device_buyers.items():
            pairs += 1
            when = first.get((customer, accessory))
            if when is not None and at <= when <= at + pd.Timedelta(days=14):
                followed += 1
    assert pairs > 20
    # 60 % of device buyers schedule each accessory within days; strangers rarely buy it.
    assert followed / pairs > 0.4
    customers = small_world.tables["customers"]["customer_id"]
    accessories = {a for _, a in small_world.truth.completion_pairs}
    device_owners = set(
        first.index.get_level_values(0)[
            first.index.get_level_values(1).isin({d for d, _ in small_world.truth.completion_pairs})
        ]
    )
    strangers = set(customers) - device_owners
    stranger_buys = sum(1 for c in strangers for a in accessories if (c, a) in first.index)
    assert stranger_buys / max(len(strangers) * len(accessories), 1) < 0.1


def test_organic_upgrades_climb_the_ladder_after_heavy_usage(small_world: World) -> None:
    first = _first_purchase(small_world.tables["orders"])
    events = small_world.tables["events"]
    usage = events[events["event_type"] == "usage"]
    outcomes = small_world.tables["outcomes"]
    accepted = outcomes[outcomes["outcome"] == "accepted"]
    from_offers = set(zip(accepted["customer_id"], accepted["occurred_at"], strict=True))
    upgrades, climbed, after_heavy_usage = 0, 0, 0
    for steps in small_world.truth.upgrade_ladders.values():
        for lower, upper in itertools.pairwise(steps):
            for customer in first.xs(upper, level="product_id").index:
                bought = first[(customer, upper)]
                if (customer, bought - pd.Timedelta(minutes=1)) in from_offers:
                    continue  # bought through an accepted offer, not by climbing
                upgrades += 1
                if (customer, lower) in first.index and first[(customer, lower)] < first[
                    (customer, upper)
                ]:
                    climbed += 1
                    heavy = usage[
                        (usage["customer_id"] == customer)
                        & (usage["product_id"] == lower)
                        & (usage["value"] >= 0.75)
                    ]
                    after_heavy_usage += int(
                        (heavy["occurred_at"] <= first[(customer, upper)]).any()
                    )
    assert upgrades > 5
    assert climbed == upgrades
    assert after_heavy_usage == climbed


def test_true_lift_shows_in_acceptance_rates(small_world: World) -> None:
    outcomes = small_world.tables["outcomes"]
    viewed = outcomes[outcomes["outcome"] == "viewed"].groupby("offer_id").size()
    accepted = outcomes[outcomes["outcome"] == "accepted"].groupby("offer_id").size()
    rate = (accepted.reindex(viewed.index, fill_value=0) / viewed).rename("rate")
    lift = pd.Series(small_world.truth.offer_lift).reindex(rate.index)
    by_lift = rate.groupby(lift).sum() / rate.groupby(lift).size()
    assert by_lift.loc[0.0] < small_world.truth.offer_base_rate * 2
    assert by_lift.loc[0.3] > 2 * by_lift.loc[0.0]


def test_holdout_customers_get_ghost_exposures_and_no_outcomes(small_world: World) -> None:
    exposures = small_world.tables["exposures"]
    holdout = set(small_world.truth.holdout_customers)
    assert holdout
    assert exposures.loc[exposures["customer_id"].isin(holdout), "holdout"].all()
    assert not exposures.loc[~exposures["customer_id"].isin(holdout), "holdout"].any()
    shown = small_world.tables["outcomes"]
    assert not shown.loc[shown["outcome"] != "returned", "customer_id"].isin(holdout).any()


def test_bundles_form_good_better_best_ladders(small_world: World) -> None:
    offers = small_world.tables["offers"].set_index("offer_id")
    for ladder, members in small_world.truth.bundle_ladders.items():
        tiers = offers.loc[members]
        assert tiers["bundle_tier"].tolist() == ["good", "better", "best"]
        assert set(tiers["bundle_ladder"]) == {ladder}
        assert tiers["product_ids"].map(len).is_monotonic_increasing
    missions = offers[offers["mission"].notna()]
    assert len(missions) == len(small_world.truth.mission_bundles)


@pytest.mark.parametrize("families", [1, 8])
def test_family_count_is_configurable(families: int) -> None:
    world = make_world(ScenarioConfig(n_customers=20, n_days=30, n_families=families, seed=1))
    assert len(world.truth.families) == families
