"""The real demo: dunnhumby's Complete Journey, mapped into the contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from model_helpers import (
    DemoModel,
    assert_same_rows,
    rows_with_and_without_the_future,
)
from typer.testing import CliRunner

from features import Workspace, load_complete_journey, map_complete_journey, summarize
from nextbest.cli import app

pytestmark = pytest.mark.demo


def test_summary_reports_the_real_counts(demo_workspace: Workspace) -> None:
    result = CliRunner().invoke(
        app, ["data", "summary", "--json", "--workspace", str(demo_workspace.path)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["customers_with_orders"] == 2469
    assert summary["order_lines"] == 1_469_307
    assert summary["products"] == 92_331
    assert summary["coupon_offers"] == 981
    assert summary["offers_by_kind"] == {"category": 242, "coupon": 981}
    assert summary["redemptions"] == 2102
    assert summary["synthetic"] is False
    assert summary["date_range"]["first"].startswith("2017-01-01")


def test_orphan_order_lines_are_kept_and_counted(demo_workspace: Workspace) -> None:
    raw = load_complete_journey(("transactions", "products"))
    expected = int((~raw["transactions"]["product_id"].isin(raw["products"]["product_id"])).sum())
    quality = summarize(demo_workspace)["data_quality"]
    assert quality["orders_with_unknown_product"]["lines"] == expected == 4836
    assert quality["unknown_ids.orders.product_id"] == expected
    orders = demo_workspace.read("orders", columns=["product_id"])
    products = demo_workspace.read("products", columns=["product_id"])
    assert int((~orders["product_id"].isin(products["product_id"])).sum()) == expected


def test_ids_are_strings_exactly_as_the_source_gives_them(demo_workspace: Workspace) -> None:
    raw = load_complete_journey(("transactions",))["transactions"].head(1000)
    orders = demo_workspace.read("orders").head(1000)
    assert orders["customer_id"].tolist() == raw["household_id"].astype(str).tolist()
    assert orders["order_id"].tolist() == raw["basket_id"].astype(str).tolist()
    assert orders["product_id"].tolist() == raw["product_id"].astype(str).tolist()
    assert pd.api.types.is_string_dtype(orders["customer_id"])


def test_coupons_carry_their_campaign_windows_products_and_audiences(
    demo_workspace: Workspace,
) -> None:
    raw = load_complete_journey(("coupons", "campaign_descriptions", "campaigns"))
    offers = demo_workspace.read("offers").set_index("offer_id")
    coupons = offers[offers["kind"] == "coupon"]
    # Coupon 10000085207 covers products of campaign 26 only.
    upc = 10000085207
    rows = raw["coupons"][raw["coupons"]["coupon_upc"] == upc]
    campaign = (
        raw["campaign_descriptions"].set_index("campaign_id").loc[rows["campaign_id"].iloc[0]]
    )
    coupon = coupons.loc[str(upc)]
    assert coupon["target_audiences"] == sorted({str(c) for c in rows["campaign_id"]})
    assert coupon["valid_from"] == campaign["start_date"]
    assert coupon["valid_to"].date() == campaign["end_date"].date()
    assert coupon["channels"] == ["mailer"]
    assert set(coupon["product_ids"]) <= set(rows["product_id"].astype(str))
    assert len(coupon["product_ids"]) >= len(rows) - 16


def test_exposures_and_outcomes_link_up(demo_workspace: Workspace) -> None:
    exposures = demo_workspace.read("exposures", columns=["exposure_id", "channel"])
    outcomes = demo_workspace.read("outcomes")
    assert set(exposures["channel"]) == {"mailer"}
    assert outcomes["exposure_id"].isin(exposures["exposure_id"]).all()
    assert set(outcomes["outcome"]) == {"redeemed"}


# The demo's categories that are not products (features.catalog), as the source names them.
NOT_PRODUCTS = {
    "COUPON/MISC ITEMS": "coupon lines; miscellaneous till lines (open-ring keys)",
    "COUPONS/STORE & MFG": "coupon lines",
    "COUPON": "coupon lines",
    "FUEL": "fuel (forecourt sales)",
    "BOTTLE DEPOSITS": "fees, charges and deposits",
    "PREPAID WIRELESS&ACCESSORIES": "prepaid phone cards and top-ups (stored value)",
    "LONG DISTANCE CALLING CARDS": "prepaid phone cards and top-ups (stored value)",
}


def _raw_lines_by_category() -> pd.DataFrame:
    """Plain pandas on the raw tables: lines, households and amount per category."""
    raw = load_complete_journey(("transactions", "products"))
    lines = raw["transactions"].merge(
        raw["products"][["product_id", "product_category"]], on="product_id", how="inner"
    )
    return lines.groupby("product_category").agg(
        lines=("basket_id", "size"),
        households=("household_id", "nunique"),
        amount=("sales_value", "sum"),
    )


def test_category_offers_need_enough_households_and_real_products(
    demo_workspace: Workspace,
) -> None:
    by_category = _raw_lines_by_category()
    popular = set(by_category.index[by_category["households"] >= 100])
    assert len(popular) == 246  # what the demo offered before non-products were left out
    expected = popular - set(NOT_PRODUCTS)
    assert len(expected) == 242

    offers = demo_workspace.read("offers")
    categories = offers[offers["kind"] == "category"]
    assert set(categories["category"]) == expected
    assert len(categories) == 242
    assert (categories["offer_id"] == "category:" + categories["category"]).all()
    assert categories["product_ids"].map(len).eq(0).all()
    for real in ("GREETING CARDS/WRAP/PARTY SPLY", "SOFT DRINKS", "MAGAZINE", "TICKETS"):
        assert f"category:{real}" in set(categories["offer_id"]), real


def test_non_product_categories_make_no_offer_and_are_reported(
    demo_workspace: Workspace,
) -> None:
    by_category = _raw_lines_by_category()
    offers = demo_workspace.read("offers")
    assert not offers["category"].isin(list(NOT_PRODUCTS)).any()
    assert "category:COUPON/MISC ITEMS" not in set(offers["offer_id"])
    assert not offers["title"].str.contains("Coupon/Misc", regex=False).any()

    report = summarize(demo_workspace)["data_quality"]["non_product_categories"]
    assert report["treatment"] == "order lines kept; no offer is made for them"
    assert set(report["categories"]) == set(NOT_PRODUCTS)
    for name, reason in NOT_PRODUCTS.items():
        entry = report["categories"][name]
        assert entry["reason"] == reason, name
        assert entry["lines"] == by_category.at[name, "lines"], name
        assert entry["customers"] == by_category.at[name, "households"], name
        assert entry["amount"] == pytest.approx(by_category.at[name, "amount"], abs=0.01), name
        assert entry["offer_withheld"] == (by_category.at[name, "households"] >= 100), name
    coupon_misc = report["categories"]["COUPON/MISC ITEMS"]
    assert (coupon_misc["lines"], coupon_misc["customers"]) == (16_073, 1_652)
    assert next(iter(coupon_misc["top_product_types"])) == "GASOLINE-REG UNLEADED"
    assert report["offers_withheld"] == [
        "COUPON/MISC ITEMS",
        "COUPONS/STORE & MFG",
        "FUEL",
        "PREPAID WIRELESS&ACCESSORIES",
    ]
    assert report["lines"] == int(by_category.loc[list(NOT_PRODUCTS), "lines"].sum()) == 18_357
    assert demo_workspace.manifest["source"]["keep_non_products"] is False


def test_non_product_order_lines_stay_in_the_orders(demo_workspace: Workspace) -> None:
    products = demo_workspace.read("products", columns=["product_id", "category"])
    orders = demo_workspace.read("orders", columns=["product_id"])
    category = orders["product_id"].map(products.set_index("product_id")["category"])
    assert int(category.isin(list(NOT_PRODUCTS)).sum()) == 18_357


def test_no_coupon_offer_is_only_non_products(demo_workspace: Workspace) -> None:
    """A coupon covers real products: none covers only non-product lines, none is named
    after one (a few list a coupon or store-supply item among thousands of products)."""
    products = demo_workspace.read("products", columns=["product_id", "category"])
    category = products.set_index("product_id")["category"]
    offers = demo_workspace.read("offers")
    coupons = offers[offers["kind"] == "coupon"]
    only_non_products = coupons["product_ids"].map(
        lambda ids: len(ids) > 0 and category.reindex(ids).isin(list(NOT_PRODUCTS)).all()
    )
    assert not only_non_products.any()
    assert not coupons["category"].isin(list(NOT_PRODUCTS)).any()


def test_keep_non_products_restores_their_offers() -> None:
    tables, quality = map_complete_journey(load_complete_journey(), keep_non_products=True)
    categories = tables["offers"].loc[tables["offers"]["kind"] == "category", "category"]
    assert len(categories) == 246
    assert {"COUPON/MISC ITEMS", "FUEL", "PREPAID WIRELESS&ACCESSORIES"} <= set(categories)
    report = quality["non_product_categories"]
    assert set(report["categories"]) == set(NOT_PRODUCTS)
    assert report["offers_withheld"] == []
    assert report["treatment"] == "kept as offers on request (keep_non_products)"


# -- the session's small demo model (conftest.demo_model) -----------------------------------


def test_training_carries_serving_contexts_and_the_cart_moves_scores(
    demo_model: DemoModel,
) -> None:
    """Training sees what serving sees (channels, placements, moments, page products and
    carts), so the context features vary in its rows and the model answers to them."""
    from features import FeatureBuilder, Requests
    from features.contract import CHANNELS, OFFER_KINDS
    from features.snapshot import MOMENTS, PLACEMENTS

    rows, snapshot = demo_model.result.test, demo_model.snapshot
    assert {CHANNELS[int(c)] for c in rows.column("channel")} == set(CHANNELS)
    assert len({PLACEMENTS[int(p)] for p in rows.column("placement")}) >= 7
    moments = rows.column("moment")
    assert "post_purchase" in {MOMENTS[int(m)] for m in moments[~np.isnan(moments)]}
    for name in ("cart_lift", "page_product_lift"):
        assert np.isfinite(rows.column(name)).any(), name
    booster = demo_model.result.booster
    used = dict(zip(booster.feature_name(), booster.feature_importance("split"), strict=True))
    assert used["cart_lift"] > 0
    # one customer, the same offers, with and without a cart: the scores move
    when = pd.Timestamp(demo_model.result.splits.test[0])
    builder = FeatureBuilder(min_pair_orders=demo_model.result.config.min_pair_orders).fit(
        snapshot, when
    )
    offers = np.flatnonzero(snapshot.offer_kind == OFFER_KINDS.index("category"))

    def scores(cart: list[str]) -> np.ndarray:
        requests = Requests.build(
            snapshot, ["1029"], [when], channel=["web"], placement=["cart"], cart=[cart]
        )
        matrix = builder.build(snapshot, requests, np.zeros(len(offers), dtype=np.int64), offers)
        return np.asarray(booster.predict(matrix.values))

    lines = demo_model.workspace.read("orders", columns=["product_id"])
    popular = lines["product_id"].value_counts().index[:20].tolist()
    assert not np.allclose(scores([]), scores(popular))


def test_web_slates_are_cross_sell_for_new_categories_and_differ(
    demo_model: DemoModel, tmp_path: Path
) -> None:
    """200 random customers on web/home, k = 3: no category offer for a category the
    customer already buys (recomputed here from the order lines), and the slates are the
    customers' own, not one slate for all."""
    from serving.assembly import build_recommender
    from serving.settings import ServingSettings

    recommender = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=f"sqlite:///{tmp_path / 'l.db'}"),
        workspace=demo_model.workspace,
        bundle=demo_model.bundle,
        snapshot=demo_model.snapshot,
        blocks=[],
    )
    customers = sorted(recommender.known_customers())
    chosen = list(np.random.default_rng(0).choice(customers, 200, replace=False))
    answers = recommender.recommend_many(chosen, channel="web", k=3, log_exposure=False)
    orders = demo_model.workspace.read("orders", columns=["customer_id", "product_id", "quantity"])
    products = demo_model.workspace.read("products", columns=["product_id", "category"])
    bought = orders[orders["quantity"] > 0].merge(products, on="product_id")
    owned = bought.groupby("customer_id")["category"].agg(set)
    served = [(a["customer_id"], o["offer_id"]) for a in answers for o in a["offers"]]
    assert len(served) == 600
    again = [
        (c, o) for c, o in served if o.startswith("category:") and o[9:] in owned.get(c, set())
    ]
    assert again == []
    distinct = {tuple(o["offer_id"] for o in a["offers"]) for a in answers}
    assert len(distinct) >= 100


@pytest.mark.slow
def test_every_phrase_is_true_on_the_demo(demo_model: DemoModel, tmp_path: Path) -> None:
    """The because oracle of tests/test_because.py, on the real demo: 400 customers across
    web/home, web/pdp, web/cart, email and mailer at k = 5, rules-only and cold starts."""
    from test_because import Raw, Tally, _contexts, _recommender, _report, serve_and_check

    workspace, snapshot, bundle = demo_model.workspace, demo_model.snapshot, demo_model.bundle
    raw = Raw(workspace)
    recommender = _recommender(workspace, snapshot, bundle, tmp_path / "model.db")
    customers = sorted(recommender.known_customers())
    rng = np.random.default_rng(7)
    chosen = [customers[i] for i in rng.choice(len(customers), 400, replace=False)]
    tally = Tally()
    for channel, placement, contexts in _contexts(rng, raw, chosen, recommender.now_s()):
        serve_and_check(recommender, raw, chosen, channel, placement, contexts, tally)
    rules_only = _recommender(workspace, snapshot, None, tmp_path / "rules.db")
    serve_and_check(rules_only, raw, chosen[:100], "web", "home", [{}] * 100, tally)
    serve_and_check(recommender, raw, ["stranger-1", "stranger-2"], "web", "home", [{}, {}], tally)
    assert not tally.false, _report(tally)
    assert tally.offers >= 5000 and tally.phrases >= 8000, (tally.offers, tally.phrases)
    assert len(tally.features) >= 8, tally.features


def test_no_label_reads_past_its_split_coupons_included(demo_workspace: Workspace) -> None:
    """The demo's coupons run in campaigns that straddle the splits: removing everything at
    or after the validation split's end changes none of its rows, coupon labels included."""
    from training.config import load_config
    from training.dataset import TASKS

    config = load_config(
        None,
        eval_customers_per_cut=150,
        min_eval_opportunities=600,
        cut_every_days=28,
        context_from_exposures=1.0,
        n_jobs=1,
    )
    before, after = rows_with_and_without_the_future(demo_workspace, config, "validation")
    coupon = before.task == TASKS.index("coupon")
    assert before.label[coupon].sum() > 0
    assert_same_rows(before, after)
