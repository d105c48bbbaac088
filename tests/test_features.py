"""Point-in-time features: no leakage, one code path, and the numbers mean what they say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from features import (
    FEATURES,
    TABLES,
    FeatureBuilder,
    Requests,
    ScenarioConfig,
    Snapshot,
    World,
    coerce_table,
    make_world,
    phrase,
)
from features.registry import FAMILIES
from nextbest.cli import app

WORLD = make_world(ScenarioConfig(n_customers=60, n_days=100, seed=11))
START = pd.Timestamp(WORLD.config.start)


def _tables(world: World) -> dict[str, pd.DataFrame]:
    return {name: coerce_table(name, world.tables[name]) for name in TABLES}


TABLES_0 = _tables(WORLD)
SNAPSHOT = Snapshot.from_tables(TABLES_0)
OFFERS = TABLES_0["offers"]["offer_id"].tolist()
CUSTOMERS = TABLES_0["customers"]["customer_id"].tolist()


def _queries(customers: list[str], as_of: pd.Timestamp, **context: object) -> pd.DataFrame:
    rows = [(c, o, as_of) for c in customers for o in OFFERS]
    frame = pd.DataFrame(rows, columns=["customer_id", "offer_id", "as_of"])
    for name, value in context.items():
        frame[name] = [value] * len(frame)
    return frame


def _future_changes(
    tables: dict[str, pd.DataFrame], as_of: pd.Timestamp, how: str, rng: np.random.Generator
) -> dict[str, pd.DataFrame]:
    """Change only what happens at or after ``as_of``."""
    changed = {name: frame.copy() for name, frame in tables.items()}
    for name, column in (
        ("orders", "ordered_at"),
        ("events", "occurred_at"),
        ("exposures", "shown_at"),
        ("outcomes", "occurred_at"),
    ):
        frame = changed[name]
        future = frame[column] >= as_of
        if how == "remove":
            keep = ~future | (rng.random(len(frame)) < 0.5)
            changed[name] = frame[keep].reset_index(drop=True)
        elif how == "add":
            extra = frame.sample(n=min(40, len(frame)), random_state=int(rng.integers(1 << 30)))
            extra = extra.assign(
                **{
                    column: as_of
                    + pd.to_timedelta(rng.integers(0, 30 * 86400, len(extra)), unit="s")
                }
            )
            if name == "exposures":
                extra = extra.assign(exposure_id=[f"X{i}" for i in range(len(extra))])
            changed[name] = pd.concat([frame, extra], ignore_index=True)
        elif how == "alter":
            if name == "orders":
                frame.loc[future, "amount"] = frame.loc[future, "amount"] * 3 + 1
                frame.loc[future, "product_id"] = rng.permutation(
                    frame.loc[future, "product_id"].to_numpy()
                )
            if name == "events":
                frame.loc[future, "value"] = 0.99
            if name == "outcomes":
                frame.loc[future, "outcome"] = "accepted"
    # an exact tie: an event stamped at the very moment is not "before" it
    tie = changed["orders"].iloc[[0]].assign(ordered_at=as_of)
    changed["orders"] = pd.concat([changed["orders"], tie], ignore_index=True)
    return changed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    day=st.integers(min_value=20, max_value=95),
    second=st.integers(min_value=0, max_value=86_399),
    how=st.sampled_from(["remove", "add", "alter"]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_no_feature_changes_when_the_future_changes(
    day: int, second: int, how: str, seed: int
) -> None:
    as_of = START + pd.Timedelta(days=day, seconds=second)
    rng = np.random.default_rng(seed)
    customers = list(rng.choice(CUSTOMERS, size=8, replace=False))
    queries = _queries(customers, as_of, channel="web", cart=["F1-A1"])
    before = FeatureBuilder(min_pair_orders=3).fit(SNAPSHOT, as_of).transform(SNAPSHOT, queries)
    changed = Snapshot.from_tables(_future_changes(TABLES_0, as_of, how, rng))
    after = FeatureBuilder(min_pair_orders=3).fit(changed, as_of).transform(changed, queries)
    pd.testing.assert_frame_equal(before, after)


def test_the_past_does_change_features() -> None:
    """The leakage test could pass vacuously if nothing ever changed features."""
    as_of = START + pd.Timedelta(days=60)
    queries = _queries(CUSTOMERS[:10], as_of)
    before = FeatureBuilder(min_pair_orders=3).fit(SNAPSHOT, as_of).transform(SNAPSHOT, queries)
    past = {name: frame.copy() for name, frame in TABLES_0.items()}
    early = past["orders"]["ordered_at"] < as_of
    past["orders"] = past["orders"][~early | (np.arange(len(early)) % 2 == 0)]
    changed = Snapshot.from_tables(past)
    after = FeatureBuilder(min_pair_orders=3).fit(changed, as_of).transform(changed, queries)
    assert not before.equals(after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_equals_online(seed: int) -> None:
    """Many customers at many moments in one batch = each one alone, as the service asks."""
    rng = np.random.default_rng(seed)
    builder = FeatureBuilder(min_pair_orders=3).fit(SNAPSHOT, START + pd.Timedelta(days=15))
    n = 25
    customers = [*rng.choice(CUSTOMERS, size=n - 1), "never-seen"]
    moments = START + pd.to_timedelta(rng.integers(16 * 86400, 100 * 86400, n), unit="s")
    channels = rng.choice(["web", "app", "email", None], size=n)
    carts = [
        list(rng.choice(["F1-A1", "F2-D1", "G-BAK1"], size=int(rng.integers(0, 3))))
        for _ in range(n)
    ]
    batch = Requests.build(SNAPSHOT, customers, moments, channel=list(channels), cart=carts)
    offers = np.flatnonzero(SNAPSHOT.offer_known)
    rows = np.repeat(np.arange(n), len(offers))
    together = builder.build(SNAPSHOT, batch, rows, np.tile(offers, n)).values
    for i in range(n):
        one = Requests.build(
            SNAPSHOT, [customers[i]], [moments[i]], channel=[channels[i]], cart=[carts[i]]
        )
        alone = builder.build(SNAPSHOT, one, np.zeros(len(offers), dtype=np.int64), offers).values
        np.testing.assert_array_equal(together[rows == i], alone)


def test_window_counts_match_a_pandas_reference() -> None:
    """Orders, spend and category recency recomputed the slow, obvious way."""
    as_of = START + pd.Timedelta(days=70, hours=5)
    builder = FeatureBuilder(min_pair_orders=3).fit(SNAPSHOT, as_of)
    queries = _queries(CUSTOMERS[:20], as_of)
    got = builder.transform(SNAPSHOT, queries)
    orders = TABLES_0["orders"]
    orders = orders[(orders["quantity"] > 0) & (orders["ordered_at"] < as_of)]
    category = TABLES_0["products"].set_index("product_id")["category"]
    offer_category = TABLES_0["offers"].set_index("offer_id")["category"]
    for i, query in queries.iterrows():
        mine = orders[orders["customer_id"] == query["customer_id"]]
        last30 = mine[mine["ordered_at"] >= as_of - pd.Timedelta(days=30)]
        assert got.at[i, "orders_30d"] == last30["order_id"].nunique()
        assert got.at[i, "spend_30d"] == pytest.approx(last30["amount"].sum(), rel=1e-5)
        in_category = mine[mine["product_id"].map(category) == offer_category[query["offer_id"]]]
        expected = (as_of - in_category["ordered_at"].max()).total_seconds() / 86400
        if in_category.empty:
            assert np.isnan(got.at[i, "days_since_category_purchase"])
            assert got.at[i, "category_is_new"] == 1
        else:
            assert got.at[i, "days_since_category_purchase"] == pytest.approx(expected, rel=1e-5)
            assert got.at[i, "category_is_new"] == 0


def test_planted_completion_and_evolution_are_visible(small_world: World) -> None:
    tables = _tables(small_world)
    snapshot = Snapshot.from_tables(tables)
    as_of = pd.Timestamp(small_world.config.start) + pd.Timedelta(days=100)
    builder = FeatureBuilder(min_pair_orders=3).fit(snapshot, as_of)
    anchors = builder.category_anchors_.set_index(["target", "anchor"])["lift"]
    for family in small_world.truth.families:
        assert anchors[(f"{family} Accessories", f"{family} Devices")] > 2.0
    queries = _queries(tables["customers"]["customer_id"].tolist(), as_of)
    features = builder.transform(snapshot, queries)
    next_step = features["is_next_ladder_step"] == 1
    assert next_step.any()
    offers = queries.loc[next_step, "offer_id"]
    # the next device up, alone or as the first product of a better/best bundle
    assert offers.str.endswith(("-D2", "-D3", ":better", ":best")).all()
    assert offers.str.startswith("item:").any()


def test_as_of_before_the_reference_time_is_refused() -> None:
    builder = FeatureBuilder().fit(SNAPSHOT, START + pd.Timedelta(days=50))
    with pytest.raises(ValueError, match=r"is before the reference time .* would leak"):
        builder.transform(SNAPSHOT, _queries(CUSTOMERS[:1], START + pd.Timedelta(days=49)))


def test_registry_is_complete_and_readable() -> None:
    names = [spec.name for spec in FEATURES]
    assert len(names) == len(set(names))
    assert {spec.family for spec in FEATURES} == set(FAMILIES)
    builder = FeatureBuilder().fit(SNAPSHOT, START + pd.Timedelta(days=30))
    assert builder.get_feature_names_out() == names
    skincare = {"category": "Skincare"}
    assert phrase("days_since_category_purchase", 2.0, skincare) == (
        "you bought Skincare 2 days ago"
    )
    # whole elapsed days, never "0 days" or "1 days"
    assert phrase("days_since_category_purchase", 0.4, skincare) == (
        "you bought Skincare less than a day ago"
    )
    assert phrase("days_since_category_purchase", 1.97, skincare) == (
        "you bought Skincare a day ago"
    )
    assert phrase("category_spend_share", 0.33, skincare) == (
        "Skincare is 33% of what you spent with us in the past year"
    )
    # a share below its stated level is not a reason, and is never printed as 0 %
    assert phrase("category_spend_share", 0.02, skincare) is None
    assert phrase("category_spend_share", 0.0999, skincare) is None
    assert phrase("category_orders_365d", 1.0, skincare) == (
        "you bought Skincare once in the past year"
    )
    assert phrase("category_orders_365d", 2.0, skincare) == (
        "you bought Skincare twice in the past year"
    )
    assert phrase("category_orders_365d", 0.0, skincare) is None
    # a flag speaks only when it is 1
    assert phrase("in_cart_abandon_window", 0.0, {}, {"cart_abandon_hours": 4}) is None
    assert phrase("in_cart_abandon_window", 1.0, {}, {"cart_abandon_hours": 4}) == (
        "you left items in a cart in the last 4 hours"
    )
    assert phrase("category_is_new", 0.0, skincare) is None
    # "popular" and "most" are relative to the catalogue at the moment, never absolute
    kind = {"kind_offers": "coupons"}
    popular = {"popularity_top_fifth": 40.0, "popularity_days": 30}
    assert phrase("offer_popularity_30d", 39.0, kind, popular) is None
    assert phrase("offer_popularity_30d", 40.0, kind, popular) == (
        "it is in the top fifth of our coupons by purchases in the last 30 days"
    )
    assert phrase("offer_popularity_30d", 40.0, kind) is None  # no catalogue: nothing said
    taken = {"acceptance_median": 0.02, "offer_accepted": 3.0}
    assert phrase("offer_acceptance_rate", 0.0026, kind, taken) is None
    assert phrase("offer_acceptance_rate", 0.02, kind, taken) is None
    assert phrase("offer_acceptance_rate", 0.05, kind, taken | {"offer_accepted": 0}) is None
    assert phrase("offer_acceptance_rate", 0.05, kind, taken) == (
        "customers accept it more often than most of our coupons"
    )
    # a count over many products is not attributed to one of them
    coffee = {"offer_product": "Ground Coffee"}
    assert phrase("offer_product_purchases_365d", 5.0, coffee, {"offer_products": 1}) == (
        "you bought Ground Coffee 5 times in the past year"
    )
    assert phrase("offer_product_purchases_365d", 5.0, coffee, {"offer_products": 40}) == (
        "you bought products this offer covers 5 times in the past year"
    )
    assert phrase("copurchase_lift", 1.49, {"anchor_category": "Tea", "category": "Mugs"}) is None
    assert phrase("copurchase_lift", 2.37, {"anchor_category": "Tea", "category": "Mugs"}) == (
        "baskets with Tea, which you bought in the past year, hold Mugs 2.3 times as often "
        "as the average basket"
    )
    replenish = {"category_cycle_days": 12.6, "days_since_category_purchase": 13.2}
    assert phrase("category_replenishment_due", 13.2 / 12.6, {"category": "Coffee"}, replenish) == (
        "you buy Coffee about every 12 days and last bought it 13 days ago"
    )
    assert phrase("category_replenishment_due", 0.6, {"category": "Coffee"}, replenish) is None
    assert phrase("days_since_anchor_purchase", 2.0, {}) is None
    assert phrase("days_since_category_purchase", float("nan"), {"category": "x"}) is None
    listed = CliRunner().invoke(app, ["features", "--list"])
    assert listed.exit_code == 0
    for spec in FEATURES:
        assert spec.name in listed.stdout
        for claim in spec.claims:
            assert f'says "{claim.template}"' in listed.stdout
            assert f"when {' and '.join(map(str, claim.when))}" in listed.stdout


def test_features_command_writes_the_table(small_workspace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "who.csv").write_text("customer_id\nS00001\nS00002\n")
    out = tmp_path / "features.parquet"
    result = CliRunner().invoke(
        app,
        [
            "features",
            "-w",
            str(small_workspace.path),
            "--as-of",
            "2025-04-01",
            "--customers",
            str(tmp_path / "who.csv"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    offers = small_workspace.read("offers")
    assert len(table) == 2 * len(offers)
    assert set(table["customer_id"]) == {"S00001", "S00002"}
    assert [c for c in table.columns[3:]] == [spec.name for spec in FEATURES]


def test_acceptance_rate_is_out_of_fold_in_training() -> None:
    """fit_transform's acceptance rate for a customer = the plain rate computed without
    any customer of that customer's fold (TargetEncoder's pattern)."""
    from features.builder import _customer_fold

    as_of = START + pd.Timedelta(days=90)
    builder = FeatureBuilder(min_pair_orders=3, n_folds=5)
    queries = _queries(CUSTOMERS[:12], as_of)
    oof = builder.fit_transform(SNAPSHOT, queries, as_of)["offer_acceptance_rate"]
    plain = builder.transform(SNAPSHOT, queries)["offer_acceptance_rate"]
    assert not np.allclose(oof, plain)
    folds = _customer_fold(np.asarray(CUSTOMERS), 5)
    fold_of = dict(zip(CUSTOMERS, folds, strict=True))
    for fold in sorted({fold_of[c] for c in CUSTOMERS[:12]}):
        members = {c for c, f in fold_of.items() if f == fold}
        tables = {name: frame.copy() for name, frame in TABLES_0.items()}
        for name in ("exposures", "outcomes"):
            tables[name] = tables[name][~tables[name]["customer_id"].isin(members)]
        without = Snapshot.from_tables(tables)
        reference = FeatureBuilder(min_pair_orders=3, n_folds=5).fit(without, as_of)
        reference.global_acceptance_ = builder.global_acceptance_  # same prior
        rows = queries["customer_id"].map(fold_of) == fold
        expected = reference.transform(without, queries[rows])["offer_acceptance_rate"]
        np.testing.assert_allclose(oof[rows], expected, rtol=1e-6)


def test_a_name_in_a_sentence_is_title_case_with_single_spaces() -> None:
    from features.registry import display_name

    assert display_name("CHRISTMAS  SEASONAL") == "Christmas Seasonal"
    assert display_name(" ICE CREAM/MILK/SHERBTS ") == "Ice Cream/Milk/Sherbts"
    assert display_name("Coffee Accessories") == "Coffee Accessories"


def test_basket_lift_anchors_by_hand() -> None:
    """Seven baskets worked out by hand: lift(a → b) = orders with both × orders /
    (orders with a × orders with b), pairs in at least 2 orders, an item once per order,
    item 4 excluded, ties between anchors by the anchor's code, rows padded with -1."""
    from features.builder import cooccurrence_anchors

    baskets = {1: [0, 0, 1], 2: [0, 1, 2], 3: [0, 2], 4: [1, 2], 5: [3], 6: [0, 1, 4], 7: [2, 4]}
    orders = np.array([o for o, items in baskets.items() for _ in items])
    items = np.array([i for basket in baskets.values() for i in basket])
    anchors, lift, confidence = cooccurrence_anchors(
        orders, items, 5, top_k=3, min_pair_orders=2, exclude=4
    )
    # items 0, 1 and 2 are each in 4 of the 7 orders; {0,1} in 3, {0,2} and {1,2} in 2
    assert anchors.tolist() == [[1, 2, -1], [0, 2, -1], [0, 1, -1], [-1, -1, -1], [-1, -1, -1]]
    high, low = 3 * 7 / (4 * 4), 2 * 7 / (4 * 4)
    np.testing.assert_allclose(lift[:3, :2], [[high, low], [high, low], [low, low]])
    np.testing.assert_allclose(confidence[:3, :2], [[3 / 4, 2 / 4], [3 / 4, 2 / 4], [2 / 4, 2 / 4]])
    assert (lift[3:] == 0).all() and (lift[:, 2] == 0).all()
    # one anchor per item: the tie for item 2 goes to the lower code
    top, _, _ = cooccurrence_anchors(orders, items, 5, top_k=1, min_pair_orders=2, exclude=4)
    assert top[:, 0].tolist() == [1, 0, 0, -1, -1]
    # a threshold no pair reaches, and no orders at all
    none, _, _ = cooccurrence_anchors(orders, items, 5, top_k=2, min_pair_orders=4)
    assert (none == -1).all()
    empty, _, _ = cooccurrence_anchors(orders[:0], items[:0], 5, top_k=2, min_pair_orders=1)
    assert (empty == -1).all()


def test_one_basket_lift_serves_the_builder_and_the_generator_as_their_own_fits_do() -> None:
    """Training and the service fit the basket lift once for both (top 20 an item) where
    each fit computed its own (the builder's top 10, the generator's top 20): the same
    anchors, lifts and candidates either way. A lift of another moment is refused."""
    from features import BasketLift
    from features.candidates import CandidateGenerator, fit_with_one_lift

    at = START + pd.Timedelta(days=60)
    given, with_shared = fit_with_one_lift(  # what training and the service call
        SNAPSHOT, at, FeatureBuilder(min_pair_orders=3), CandidateGenerator(min_pair_orders=3)
    )
    own = FeatureBuilder(min_pair_orders=3).fit(SNAPSHOT, at)
    assert len(own.product_anchors_) and len(own.category_anchors_)
    pd.testing.assert_frame_equal(own.product_anchors_, given.product_anchors_)
    pd.testing.assert_frame_equal(own.category_anchors_, given.category_anchors_)
    queries = _queries(CUSTOMERS[:10], at + pd.Timedelta(days=1))
    pd.testing.assert_frame_equal(
        own.transform(SNAPSHOT, queries), given.transform(SNAPSHOT, queries)
    )
    alone = CandidateGenerator(min_pair_orders=3).fit(SNAPSHOT, at)
    assert len(alone.product_links_) and len(alone.category_links_)
    pd.testing.assert_frame_equal(alone.product_links_, with_shared.product_links_)
    pd.testing.assert_frame_equal(alone.category_links_, with_shared.category_links_)
    with pytest.raises(ValueError, match="one basket lift cannot serve both"):
        fit_with_one_lift(
            SNAPSHOT, at, FeatureBuilder(min_pair_orders=3), CandidateGenerator(min_pair_orders=5)
        )
    shared = BasketLift.fit(SNAPSHOT, at, min_pair_orders=3, top_k=20)
    later = at + pd.Timedelta(days=1)
    with pytest.raises(ValueError, match="fitted at"):
        FeatureBuilder(min_pair_orders=3).fit(SNAPSHOT, later, shared)
    with pytest.raises(ValueError, match="min_pair_orders 3"):
        CandidateGenerator(min_pair_orders=5).fit(SNAPSHOT, at, shared)
    too_few = BasketLift.fit(SNAPSHOT, at, min_pair_orders=3, top_k=10)
    with pytest.raises(ValueError, match="10 anchors an item"):
        CandidateGenerator(min_pair_orders=3).fit(SNAPSHOT, at, too_few)
