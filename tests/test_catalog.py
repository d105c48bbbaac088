"""What is not a product: one definition for the demo and the import."""

from __future__ import annotations

import pytest

from features import NON_PRODUCT_RULES, load_complete_journey, non_product_categories
from features.catalog import non_product_reason

NOT_PRODUCTS = [
    ("COUPON/MISC ITEMS", "coupon lines; miscellaneous till lines (open-ring keys)"),
    ("COUPONS/STORE & MFG", "coupon lines"),
    ("MISC SALES TRANS", "miscellaneous till lines (open-ring keys)"),
    ("Gift Cards", "gift cards and vouchers (stored value)"),
    ("E-Gift Card", "gift cards and vouchers (stored value)"),
    ("GIFTCARDS", "gift cards and vouchers (stored value)"),
    ("Gift vouchers", "gift cards and vouchers (stored value)"),
    ("PREPAID WIRELESS&ACCESSORIES", "prepaid phone cards and top-ups (stored value)"),
    ("LONG DISTANCE CALLING CARDS", "prepaid phone cards and top-ups (stored value)"),
    ("Mobile top-up", "prepaid phone cards and top-ups (stored value)"),
    ("Bag fee", "fees, charges and deposits; carrier bags"),
    ("Carrier bags", "carrier bags"),
    ("BOTTLE DEPOSITS", "fees, charges and deposits"),
    ("Delivery charge", "fees, charges and deposits"),
    ("Postage", "postage"),
    ("Stamps", "postage"),
    ("Lottery", "lottery"),
    ("Scratch cards", "lottery"),
    ("FUEL", "fuel (forecourt sales)"),
    ("KIOSK-GAS", "fuel (forecourt sales)"),
    ("Charity donations", "donations"),
    ("NO COMMODITY DESCRIPTION", "no category given (a placeholder name)"),
    ("unknown", "no category given (a placeholder name)"),
]

PRODUCTS = [
    "GREETING CARDS/WRAP/PARTY SPLY",
    "GIFT & GREETING CARDS",
    "GIFT & FRUIT BASKETS",
    "BAG SNACKS",
    "FD WRAPS/BAGS/TRSH BG",
    "Trash bags",
    "MISCELLANEOUS",
    "MISC. DAIRY",
    "MISC WINE",
    "PROPANE",
    "CHARCOAL AND LIGHTER FLUID",
    "TICKETS",
    "MAGAZINE",
    "Prepaid cell phones",
    "STATIONERY & SCHOOL SUPPLIES",
    "Rubber stamps",
    "COFFEE",
    "Coffee Accessories",
    "Bakery",
]


@pytest.mark.parametrize(("name", "reason"), NOT_PRODUCTS)
def test_non_product_names_are_recognised_with_their_reason(name: str, reason: str) -> None:
    assert non_product_reason(name) == reason


@pytest.mark.parametrize("name", PRODUCTS)
def test_real_product_categories_are_left_alone(name: str) -> None:
    assert non_product_reason(name) is None


def test_placeholder_names_drop_the_category_but_not_its_items() -> None:
    assert non_product_reason("NO COMMODITY DESCRIPTION", items=True) is None
    assert non_product_reason("Gift Cards", items=True) is not None
    assert non_product_reason(None) is None
    assert non_product_categories(["Bakery", "Bag fee", "Unknown"], items=True) == {
        "Bag fee": "fees, charges and deposits; carrier bags"
    }


def test_every_rule_has_a_reason_and_valid_patterns() -> None:
    assert len({rule.reason for rule in NON_PRODUCT_RULES}) == len(NON_PRODUCT_RULES)
    for rule in NON_PRODUCT_RULES:
        assert rule.reason and rule.patterns
        assert not rule.matches("")


@pytest.mark.demo
def test_on_the_demo_exactly_seven_categories_are_not_products() -> None:
    """Every one of the 303 category names in the demo's products table, as given."""
    names = load_complete_journey(("products",))["products"]["product_category"].dropna()
    assert names.nunique() == 303
    assert non_product_categories(names.unique()) == {
        "BOTTLE DEPOSITS": "fees, charges and deposits",
        "COUPON": "coupon lines",
        "COUPON/MISC ITEMS": ("coupon lines; miscellaneous till lines (open-ring keys)"),
        "COUPONS/STORE & MFG": "coupon lines",
        "FUEL": "fuel (forecourt sales)",
        "LONG DISTANCE CALLING CARDS": "prepaid phone cards and top-ups (stored value)",
        "PREPAID WIRELESS&ACCESSORIES": "prepaid phone cards and top-ups (stored value)",
    }
