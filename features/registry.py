"""The feature registry: every feature's name, family, meaning, unit and "because" phrase.

A phrase is a template filled with the feature's value and the evidence the builder
found (the category, the product bought, the anchor category). ``None`` means the
feature is never said to a customer (it can still rank, and reviewers still see it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["FAMILIES", "FEATURES", "FeatureSpec", "feature_names", "phrase"]

FAMILIES = ("compatibility", "recency", "usage", "category_mix", "offer", "context")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    family: str
    description: str
    unit: str
    because: str | None = None
    categorical: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"feature {self.name}: unknown family {self.family!r}")


_F = FeatureSpec

FEATURES: tuple[FeatureSpec, ...] = (
    # compatibility: completion, ecosystem, evolution
    _F(
        "copurchase_lift",
        "compatibility",
        "Highest basket lift between a category the customer bought in the last year and the "
        "offer's category (learned from baskets before the reference time).",
        "ratio",
        "shoppers who buy {anchor_category} often add {category}",
    ),
    _F(
        "copurchase_confidence",
        "compatibility",
        "Share of baskets with that anchor category that also hold the offer's category.",
        "share",
    ),
    _F(
        "days_since_anchor_purchase",
        "compatibility",
        "Days since the customer last bought in that anchor category.",
        "days",
        "you bought {anchor_product} {value:.0f} days ago",
    ),
    _F(
        "item_copurchase_lift",
        "compatibility",
        "For a one-product offer: highest basket lift between a product the customer bought "
        "in the last year and the offer's product.",
        "ratio",
    ),
    _F(
        "days_since_item_anchor_purchase",
        "compatibility",
        "Days since the customer bought that anchor product.",
        "days",
        "you bought {item_anchor_product} {value:.0f} days ago",
    ),
    _F(
        "days_since_compatible_purchase",
        "compatibility",
        "Days since the customer bought a product that the offer explicitly completes "
        "(catalog compatibility table).",
        "days",
        "it goes with the {compatible_product} you bought {value:.0f} days ago",
    ),
    _F(
        "family_owned",
        "compatibility",
        "1 if the customer already bought a product of the offer's product family (ecosystem).",
        "flag",
        "it belongs to the {family} range you already use",
    ),
    _F(
        "ladder_step_owned",
        "compatibility",
        "Highest step the customer owns on the offer's upgrade ladder (0 = none).",
        "step",
    ),
    _F(
        "is_next_ladder_step",
        "compatibility",
        "1 if the offer is the next step up from what the customer owns (evolution).",
        "flag",
        "it is the next step up from your {ladder_product}",
    ),
    # recency and moments
    _F("days_since_last_order", "recency", "Days since the customer's last order.", "days"),
    _F(
        "days_since_category_purchase",
        "recency",
        "Days since the customer last bought in the offer's category.",
        "days",
        "you bought {category} {value:.0f} days ago",
    ),
    _F(
        "days_since_offer_product_purchase",
        "recency",
        "Days since the customer last bought a product the offer covers.",
        "days",
        "you bought {offer_product} {value:.0f} days ago",
    ),
    _F(
        "days_since_offer_shown", "recency", "Days since this offer was last shown to them.", "days"
    ),
    _F("days_since_offer_declined", "recency", "Days since they last declined this offer.", "days"),
    _F(
        "in_post_purchase_window",
        "recency",
        "1 within 48 hours after an order.",
        "flag",
        "you just placed an order",
    ),
    _F(
        "in_cart_abandon_window",
        "recency",
        "1 within 4 hours after abandoning a cart.",
        "flag",
        "you left something in your cart",
    ),
    _F(
        "in_support_resolved_window",
        "recency",
        "1 within 24 hours after a support ticket was resolved.",
        "flag",
    ),
    _F(
        "loyalty_milestone_recent",
        "recency",
        "1 within 7 days after reaching a new loyalty tier.",
        "flag",
        "you just reached a new loyalty tier",
    ),
    # usage and frequency
    _F("orders_30d", "usage", "Orders in the last 30 days.", "orders"),
    _F("orders_90d", "usage", "Orders in the last 90 days.", "orders"),
    _F(
        "orders_365d",
        "usage",
        "Orders in the last 365 days.",
        "orders",
        "you shop with us often ({value:.0f} orders this year)",
    ),
    _F("spend_30d", "usage", "Spend in the last 30 days.", "currency"),
    _F("spend_90d", "usage", "Spend in the last 90 days.", "currency"),
    _F("spend_365d", "usage", "Spend in the last 365 days.", "currency"),
    _F(
        "offer_product_purchases_365d",
        "usage",
        "Orders with a product the offer covers, in the last 365 days.",
        "orders",
        "you bought {offer_product} {value:.0f} times this year",
    ),
    _F(
        "category_orders_365d",
        "usage",
        "Orders in the offer's category, last 365 days.",
        "orders",
        "you bought {category} {value:.0f} times this year",
    ),
    _F(
        "category_cycle_days",
        "usage",
        "The customer's mean days between purchases in the offer's category.",
        "days",
    ),
    _F(
        "category_replenishment_due",
        "usage",
        "Days since the last purchase in the category over the customer's cycle (1 = due).",
        "ratio",
        "you usually restock {category} about now",
    ),
    _F(
        "usage_level",
        "usage",
        "Latest usage reading (share of capacity) of their product in the offer's family.",
        "share",
        "you are using {value:.0%} of your {usage_product}",
    ),
    _F(
        "usage_milestone",
        "usage",
        "1 if that usage reached 75 %.",
        "flag",
        "you are getting close to the limit of your {usage_product}",
    ),
    _F(
        "category_views_30d",
        "usage",
        "Views of the offer's category in the last 30 days.",
        "views",
        "you looked at {category} {value:.0f} times recently",
    ),
    _F(
        "browsing_intent",
        "usage",
        "1 if they viewed the offer's category 3 or more times.",
        "flag",
        "you have been looking at {category}",
    ),
    _F("email_clicks_90d", "usage", "Email clicks in the last 90 days.", "clicks"),
    # category mix
    _F(
        "category_spend_share",
        "category_mix",
        "Share of the customer's last-year spend in the offer's category.",
        "share",
        "{category} is {value:.0%} of your basket",
    ),
    _F(
        "department_spend_share",
        "category_mix",
        "Share of the customer's last-year spend in the offer's department.",
        "share",
        "{department} is {value:.0%} of your basket",
    ),
    _F(
        "department_mix_entropy",
        "category_mix",
        "Entropy (bits) of the customer's last-year spend over departments.",
        "bits",
    ),
    _F(
        "category_is_new",
        "category_mix",
        "1 if the customer never bought in the offer's category (cross-sell).",
        "flag",
        "it is something new for you to try",
    ),
    _F("tenure_days", "category_mix", "Days since signup, else since the first order.", "days"),
    _F("loyalty_tier_rank", "category_mix", "Loyalty tier (1 = entry) as of the moment.", "rank"),
    # offer
    _F("offer_price", "offer", "Sum of the catalog prices of the offer's products.", "currency"),
    _F(
        "offer_discount",
        "offer",
        "Discount the offer gives.",
        "currency",
        "it saves you {value:.2f}",
    ),
    _F("offer_value", "offer", "Expected revenue if accepted.", "currency"),
    _F("offer_margin", "offer", "Expected margin if accepted.", "currency"),
    _F(
        "offer_popularity_30d",
        "offer",
        "Purchases of the offer's products (or category) by all customers, last 30 days.",
        "purchases",
        "it is popular right now",
    ),
    _F(
        "offer_acceptance_rate",
        "offer",
        "Smoothed share of showings of this offer that were accepted before the moment "
        "(out of fold in training).",
        "share",
        "many customers take this offer",
    ),
    _F(
        "offer_times_shown_30d",
        "offer",
        "Times this offer was shown to them, last 30 days.",
        "times",
    ),
    _F("offer_kind", "offer", "item, category, coupon or bundle.", "code", categorical=True),
    # context
    _F("channel", "context", "The channel asking.", "code", categorical=True),
    _F("placement", "context", "The placement asking.", "code", categorical=True),
    _F("moment", "context", "The moment the storefront declared.", "code", categorical=True),
    _F(
        "page_product_lift",
        "context",
        "Basket lift between the product on the page and the offer's category.",
        "ratio",
        "it goes well with {page_product}",
    ),
    _F(
        "cart_lift",
        "context",
        "Highest basket lift between a product in the cart and the offer's category.",
        "ratio",
        "it goes well with what is in your cart",
    ),
    _F("in_cart", "context", "1 if a product of the offer is already in the cart.", "flag"),
)

_BY_NAME = {spec.name: spec for spec in FEATURES}


def feature_names() -> list[str]:
    return [spec.name for spec in FEATURES]


def phrase(name: str, value: float, evidence: dict[str, Any]) -> str | None:
    """The "because" phrase of feature ``name`` at ``value``, or None if it has none or the
    evidence it needs is missing (a phrase is never built on a guess)."""
    spec = _BY_NAME[name]
    if spec.because is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    fields = {k: v for k, v in evidence.items() if v is not None and v == v}
    try:
        return spec.because.format(value=value, **fields)
    except (KeyError, ValueError):
        return None
