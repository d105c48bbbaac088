"""The real demo: dunnhumby's Complete Journey, mapped into the contract."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from features import Workspace, load_complete_journey, summarize
from nextbest.cli import app

pytestmark = [pytest.mark.demo, pytest.mark.xdist_group("demo")]


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


def test_category_offers_need_enough_households(demo_workspace: Workspace) -> None:
    offers = demo_workspace.read("offers")
    categories = offers[offers["kind"] == "category"]
    assert len(categories) > 100
    assert (categories["offer_id"] == "category:" + categories["category"]).all()
    assert categories["product_ids"].map(len).eq(0).all()
