"""What is not a product: till lines that must not become offers.

A retailer's order lines hold more than products: coupon lines, gift-card activations,
prepaid phone top-ups, fees and deposits, carrier bags, postage, lottery, fuel from the
forecourt, open-ring "miscellaneous" keys. They are real history and stay in the orders
table, but a cross-sell offer for them ("Discover Coupon/Misc Items") is nonsense. This
module is the one definition of which category names mean such lines; the demo mapping
(:mod:`features.demo`) and the generic import (:mod:`features.importing`) both use it, and
both record in the workspace's data quality what they left out and why
(:func:`non_product_report`).

A rule matches a category name (case-insensitive, anywhere in the name, on word
boundaries). Names are matched as given, so the rules are written to leave real products
alone: ``GREETING CARDS/WRAP/PARTY SPLY``, ``GIFT & GREETING CARDS``, ``GIFT & FRUIT
BASKETS`` (not gift cards), ``BAG SNACKS``, ``FD WRAPS/BAGS/TRSH BG`` (not carrier bags),
``MISCELLANEOUS``, ``MISC. DAIRY``, ``MISC WINE`` (real if vague categories), ``PROPANE``,
``CHARCOAL AND LIGHTER FLUID`` (not fuel), ``PREPAID CELL PHONES`` (a device, not
airtime), ``TICKETS``, ``MAGAZINE``.

Most rules say the *lines* are not products: neither an item nor a category offer is made
for them. A placeholder name (``NO COMMODITY DESCRIPTION``, ``UNKNOWN``) only says the
category is not a real one: no category offer, but its items are still products and stay
item offers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

__all__ = [
    "NON_PRODUCT_RULES",
    "NonProductRule",
    "non_product_categories",
    "non_product_reason",
    "non_product_report",
]


@dataclass(frozen=True)
class NonProductRule:
    """Category names that mean something other than a product, and why."""

    reason: str
    patterns: tuple[str, ...]
    items_are_products: bool = False
    """True for placeholder names: the category is not real, but its items are products."""

    def matches(self, name: str) -> bool:
        return any(re.search(pattern, name, flags=re.IGNORECASE) for pattern in self.patterns)


NON_PRODUCT_RULES: tuple[NonProductRule, ...] = (
    NonProductRule("coupon lines", (r"\bcoupons?\b",)),
    NonProductRule(
        "miscellaneous till lines (open-ring keys)",
        (r"\bmisc(\.|ellaneous)?\s+(items?|sales?|trans\w*)\b", r"\bopen[ -]ring\b"),
    ),
    NonProductRule(
        "gift cards and vouchers (stored value)",
        (
            r"\b(e-?)?gift[ -]?cards?\b",
            r"\bgift (certificates?|vouchers?)\b",
            r"\bvouchers?\b",
            r"\bstored[ -]value\b",
        ),
    ),
    NonProductRule(
        "prepaid phone cards and top-ups (stored value)",
        (
            r"\bprepaid\s+(wireless|cards?|minutes|airtime|top[ -]?ups?)\b",
            r"\b(calling|phone)\s+cards?\b",
            r"\btop[ -]?ups?\b",
            r"\bairtime\b",
        ),
    ),
    NonProductRule(
        "fees, charges and deposits",
        (
            r"\bfees?\b",
            r"\bsurcharges?\b",
            r"\b(service|delivery|shipping|handling)\s+charges?\b",
            r"\bdeposits?\b",
            r"\blevy\b",
        ),
    ),
    NonProductRule(
        "carrier bags",
        (r"\b(carrier|shopping|checkout|check-out)\s+bags?\b", r"\bbags?\s+(fee|charge|levy)"),
    ),
    NonProductRule("postage", (r"\bpostage\b", r"\bpostal\b", r"^\s*stamps?\s*$")),
    NonProductRule("lottery", (r"\blottery\b", r"\blotto\b", r"\bscratch[ -]?(cards?|offs?)\b")),
    NonProductRule(
        "fuel (forecourt sales)",
        (r"\bfuel\b", r"\bgasoline\b", r"\bpetrol\b", r"\bdiesel\b", r"\bkiosk[ -]gas\b"),
    ),
    NonProductRule("donations", (r"\bdonations?\b", r"\bcharit(y|able)\b")),
    NonProductRule(
        "no category given (a placeholder name)",
        (
            r"^\s*no commodity description\s*$",
            r"^\s*(unknown|uncategori[sz]ed|no category|none|null|n/?a|-+)\s*$",
        ),
        items_are_products=True,
    ),
)
"""The definition, in order. A name that several rules match gets all their reasons."""


def non_product_reason(name: object, *, items: bool = False) -> str | None:
    """Why ``name`` is not a product category, or ``None`` when it is one.

    With ``items=True`` the question is whether the category's *items* are not products:
    placeholder names then do not count (their items are real products).
    """
    if not isinstance(name, str):
        return None
    reasons = [
        rule.reason
        for rule in NON_PRODUCT_RULES
        if not (items and rule.items_are_products) and rule.matches(name)
    ]
    return "; ".join(reasons) or None


def non_product_categories(names: Iterable[object], *, items: bool = False) -> dict[str, str]:
    """The names among ``names`` that are not product categories, each with its reason."""
    found = {}
    for name in names:
        reason = non_product_reason(name, items=items)
        if reason is not None:
            found[str(name)] = reason
    return dict(sorted(found.items()))


def non_product_report(
    lines: pd.DataFrame, reasons: dict[str, str], *, offers_made: bool
) -> dict[str, Any]:
    """The data-quality entry for non-product categories.

    ``lines`` has one row per order line with ``category``, ``customer_id``, ``product_id``
    and ``amount``; ``reasons`` is :func:`non_product_categories` of its categories.
    ``offers_made`` says whether the caller made offers for them anyway (a retailer's
    explicit choice) or left them out.
    """
    matched = lines[lines["category"].isin(list(reasons))]
    stats = matched.groupby("category").agg(
        lines=("customer_id", "size"),
        customers=("customer_id", "nunique"),
        products=("product_id", "nunique"),
        amount=("amount", "sum"),
    )
    categories = {
        name: {
            "reason": reason,
            "lines": int(stats.at[name, "lines"]) if name in stats.index else 0,
            "customers": int(stats.at[name, "customers"]) if name in stats.index else 0,
            "products": int(stats.at[name, "products"]) if name in stats.index else 0,
            "amount": round(float(stats.at[name, "amount"]), 2) if name in stats.index else 0.0,
        }
        for name, reason in reasons.items()
    }
    return {
        "categories": categories,
        "lines": len(matched),
        "share": round(len(matched) / max(len(lines), 1), 5),
        "treatment": (
            "kept as offers on request (keep_non_products)"
            if offers_made
            else "order lines kept; no offer is made for them"
        ),
        "rule": "features.catalog.NON_PRODUCT_RULES",
    }
