"""The feature registry: every feature's name, family, meaning, unit and what it may say.

A feature speaks to a customer only through its *claims*. A claim is a template and the
condition under which its words are true, written as data (``"value >= 0.1"``) so that it
can be listed (``nextbest features --list``), audited and checked. A phrase is said only
when every condition holds and every name it needs is known; numbers are always put into
words here (days, counts, shares, lifts), so "0 days ago", "1 times" or "0 %" cannot be
printed. A feature with no claims is never said (it can still rank, and reviewers still
see it).

Conditions and templates may use the feature's own ``value``, any other feature of the same
row by name, and the quantities in :data:`QUANTITIES` (the catalogue at the row's moment,
and the builder's window settings); templates name things through :data:`NAMES`.
"""

from __future__ import annotations

import math
import operator
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAMILIES",
    "FEATURES",
    "NAMES",
    "POPULARITY_COUNTS",
    "QUANTITIES",
    "WORDS",
    "Claim",
    "Condition",
    "FeatureSpec",
    "claims_of",
    "display_name",
    "feature_names",
    "phrase",
    "says",
]

FAMILIES = ("compatibility", "recency", "usage", "category_mix", "offer", "context")


def display_name(name: object) -> str:
    """A category's or department's name as a sentence says it: title case, its runs of
    spaces made one (retailers' hierarchies carry "CHRISTMAS  SEASONAL")."""
    return " ".join(str(name).split()).title()


QUANTITIES: dict[str, str] = {
    "value": "the feature's own value in the row",
    "offer_products": "how many products the offer covers (0 for a category offer)",
    "popularity_top_fifth": "the lowest 30-day popularity that is still within the top fifth "
    "of offers of the row's kind valid at the row's moment",
    "acceptance_median": "the upper median acceptance rate of offers of the row's kind valid at "
    "the row's moment (a rate above it is above more than half of them)",
    "offer_accepted": "times the offer was accepted before the row's moment",
    "ladder_product_step": "the ladder step of the product named as ladder_product",
    "popularity_days": "the popularity window, days",
    "post_purchase_hours": "the post-purchase window, hours",
    "cart_abandon_hours": "the abandoned-cart window, hours",
    "loyalty_milestone_days": "the new-loyalty-tier window, days",
    "usage_milestone_level": "the usage level (share of capacity) that counts as a milestone",
}

NAMES: dict[str, str] = {
    "category": "the offer's category",
    "department": "the offer's department",
    "anchor_category": "the category with the highest basket lift to the offer's category "
    "among those the customer bought in the last year",
    "anchor_product": "the last product the customer bought in the anchor category",
    "item_anchor_product": "the product with the highest basket lift to the offer's product "
    "among those the customer bought in the last year",
    "compatible_product": "the last product the customer bought that the offer completes",
    "family": "the product family of the offer's first product",
    "ladder_product": "the last product the customer bought on the offer's upgrade ladder",
    "offer_product": "the last product the offer covers that the customer bought",
    "usage_product": "the product of the latest usage reading in the offer's family",
    "page_product": "the product on the page",
    "page_category": "the category of the product on the page",
    "cart_product": "the product in the cart with the highest basket lift to the offer's category",
    "cart_category": "the category of cart_product",
    "offer_item": "the offer's product, when it covers exactly one",
    "kind_offers": "the offer's kind in words (coupons, bundles, product or category offers)",
}


def _whole(number: float) -> int:
    # float32 features carry integer counts and day spans with a little noise either way
    return math.floor(number + 1e-6)


def _days_ago(days: float) -> str:
    whole = _whole(days)
    if whole < 1:
        return "less than a day ago"
    return "a day ago" if whole == 1 else f"{whole:,} days ago"


def _every(days: float) -> str:
    whole = _whole(days)
    if whole < 1:
        return "more than once a day"
    return "every day" if whole == 1 else f"every {whole:,} days"


def _times(count: float) -> str:
    whole = round(count)
    return {0: "never", 1: "once", 2: "twice"}.get(whole, f"{whole:,} times")


def _orders(count: float) -> str:
    whole = round(count)
    return "one order" if whole == 1 else f"{whole:,} orders"


def _percent(share: float) -> str:
    # floored, never rounded up: the words never claim more than the number
    whole = math.floor(share * 100 + 1e-4)
    return "less than 1%" if whole < 1 else f"{whole}%"


def _ratio(ratio: float) -> str:
    return f"{math.floor(ratio * 10 + 1e-4) / 10:.1f}"


WORDS: dict[str, Callable[[float], str]] = {
    "ago": _days_ago,
    "every": _every,
    "times": _times,
    "orders": _orders,
    "count": lambda number: f"{round(number):,}",
    "pct": _percent,
    "ratio": _ratio,
    "money": lambda amount: f"{amount:,.2f}",
}

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
    "<=": operator.le,
    "<": operator.lt,
}


def _number(quantities: Mapping[str, Any], name: str) -> float:
    value = quantities.get(name)
    if value is None:
        return math.nan
    return float(value)


@dataclass(frozen=True)
class Condition:
    """``quantity op level`` (level a number or another quantity), or ``quantity known``."""

    quantity: str
    op: str
    level: float | str | None = None

    @classmethod
    def parse(cls, text: str) -> Condition:
        parts = text.split()
        if len(parts) == 2 and parts[1] == "known":
            return cls(parts[0], "known")
        if len(parts) != 3 or parts[1] not in _OPS:
            raise ValueError(
                f"condition {text!r}: write 'quantity op level' with op one of "
                f"{' '.join(_OPS)}, or 'quantity known'"
            )
        try:
            level: float | str = float(parts[2])
        except ValueError:
            level = parts[2]
        return cls(parts[0], parts[1], level)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.quantity,) + ((self.level,) if isinstance(self.level, str) else ())

    def holds(self, quantities: Mapping[str, Any]) -> bool:
        number = _number(quantities, self.quantity)
        if math.isnan(number):
            return False
        if self.op == "known":
            return True
        level = (
            self.level if isinstance(self.level, float) else _number(quantities, str(self.level))
        )
        return not math.isnan(level) and _OPS[self.op](number, level)

    def __str__(self) -> str:
        if self.op == "known":
            return f"{self.quantity} known"
        level = f"{self.level:g}" if isinstance(self.level, float) else self.level
        return f"{self.quantity} {self.op} {level}"


@dataclass(frozen=True)
class Claim:
    """A template and the conditions under which its words are true."""

    template: str
    when: tuple[Condition, ...]

    @property
    def fields(self) -> list[tuple[str, str]]:
        """(name, word) of each placeholder; word is empty for a name (text)."""
        return [
            (name, spec or "")
            for _, name, spec, _ in string.Formatter().parse(self.template)
            if name is not None
        ]

    def render(self, quantities: Mapping[str, Any], names: Mapping[str, Any]) -> str | None:
        """The words, or None if a condition fails or a name or number is not known."""
        if not all(condition.holds(quantities) for condition in self.when):
            return None
        out = []
        for literal, name, spec, _ in string.Formatter().parse(self.template):
            out.append(literal)
            if name is None:
                continue
            if spec:
                number = _number(quantities, name)
                if math.isnan(number):
                    return None
                out.append(WORDS[spec](number))
            else:
                text = names.get(name)
                if not isinstance(text, str) or not text:
                    return None
                out.append(text)
        return "".join(out)

    def __str__(self) -> str:
        return f'"{self.template}" when {" and ".join(map(str, self.when))}'


def says(template: str, *conditions: str) -> Claim:
    return Claim(template, tuple(Condition.parse(c) for c in conditions))


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    family: str
    description: str
    unit: str
    claims: tuple[Claim, ...] = ()
    categorical: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"feature {self.name}: unknown family {self.family!r}")
        for claim in self.claims:
            if not any(condition.quantity == "value" for condition in claim.when):
                raise ValueError(
                    f"feature {self.name}: claim {claim.template!r} has no condition on the "
                    "feature's own value; add one (e.g. 'value known' or 'value == 1')"
                )

    @property
    def because(self) -> str | None:
        """The claims in one line (what a reviewer or the model card reads)."""
        return "; ".join(map(str, self.claims)) or None


_F = FeatureSpec
_LIFT = "times as often as the average basket"

FEATURES: tuple[FeatureSpec, ...] = (
    # compatibility: completion, ecosystem, evolution
    _F(
        "copurchase_lift",
        "compatibility",
        "Highest basket lift between a category the customer bought in the last year and the "
        "offer's category (learned from baskets before the reference time).",
        "ratio",
        (
            says(
                "baskets with {anchor_category}, which you bought in the past year, hold "
                "{category} {value:ratio} " + _LIFT,
                "value >= 1.5",
            ),
        ),
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
        (says("you bought {anchor_product} {value:ago}", "value known"),),
    ),
    _F(
        "item_copurchase_lift",
        "compatibility",
        "For a one-product offer: highest basket lift between a product the customer bought "
        "in the last year and the offer's product.",
        "ratio",
        (
            says(
                "baskets with {item_anchor_product}, which you bought in the past year, hold "
                "{offer_item} {value:ratio} " + _LIFT,
                "value >= 1.5",
                "offer_products == 1",
            ),
        ),
    ),
    _F(
        "days_since_item_anchor_purchase",
        "compatibility",
        "Days since the customer bought that anchor product.",
        "days",
        (says("you bought {item_anchor_product} {value:ago}", "value known"),),
    ),
    _F(
        "days_since_compatible_purchase",
        "compatibility",
        "Days since the customer bought a product that the offer explicitly completes "
        "(catalog compatibility table).",
        "days",
        (
            says(
                "it completes the {compatible_product} you bought {value:ago}",
                "value known",
                "offer_products == 1",
            ),
            says(
                "it holds a product that completes the {compatible_product} you bought {value:ago}",
                "value known",
                "offer_products >= 2",
            ),
        ),
    ),
    _F(
        "family_owned",
        "compatibility",
        "1 if the customer already bought a product of the offer's product family (ecosystem).",
        "flag",
        (says("it is from the {family} range, which you already bought from", "value == 1"),),
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
        (
            # the product named is the last one bought on the ladder, not always the highest
            says(
                "it is the next step up from your {ladder_product}",
                "value == 1",
                "ladder_product_step == ladder_step_owned",
            ),
            says("it is the next step up from what you own in its range", "value == 1"),
        ),
    ),
    # recency and moments
    _F("days_since_last_order", "recency", "Days since the customer's last order.", "days"),
    _F(
        "days_since_category_purchase",
        "recency",
        "Days since the customer last bought in the offer's category.",
        "days",
        (says("you bought {category} {value:ago}", "value known"),),
    ),
    _F(
        "days_since_offer_product_purchase",
        "recency",
        "Days since the customer last bought a product the offer covers.",
        "days",
        (says("you bought {offer_product} {value:ago}", "value known"),),
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
        (says("you placed an order in the last {post_purchase_hours:count} hours", "value == 1"),),
    ),
    _F(
        "in_cart_abandon_window",
        "recency",
        "1 within 4 hours after abandoning a cart.",
        "flag",
        (
            says(
                "you left items in a cart in the last {cart_abandon_hours:count} hours",
                "value == 1",
            ),
        ),
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
        "1 within 7 days after a loyalty tier change.",
        "flag",
        (
            # a tier change can go either way: "moved", never "reached a higher tier"
            says(
                "you moved to a new loyalty tier in the last {loyalty_milestone_days:count} days",
                "value == 1",
            ),
        ),
    ),
    # usage and frequency
    _F("orders_30d", "usage", "Orders in the last 30 days.", "orders"),
    _F("orders_90d", "usage", "Orders in the last 90 days.", "orders"),
    _F(
        "orders_365d",
        "usage",
        "Orders in the last 365 days.",
        "orders",
        (says("you placed {value:orders} with us in the past year", "value >= 1"),),
    ),
    _F("spend_30d", "usage", "Spend in the last 30 days.", "currency"),
    _F("spend_90d", "usage", "Spend in the last 90 days.", "currency"),
    _F("spend_365d", "usage", "Spend in the last 365 days.", "currency"),
    _F(
        "offer_product_purchases_365d",
        "usage",
        "Purchases (order lines) of products the offer covers, last 365 days.",
        "purchases",
        (
            says(
                "you bought {offer_product} {value:times} in the past year",
                "value >= 1",
                "offer_products == 1",
            ),
            # the count spans all the offer's products: no one product is named
            says(
                "you bought products this offer covers {value:times} in the past year",
                "value >= 1",
                "offer_products >= 2",
            ),
        ),
    ),
    _F(
        "offer_product_order_share",
        "usage",
        "Share of the customer's orders in the last 365 days that held a product the offer covers.",
        "share",
        (
            says(
                "{offer_item} was in {value:pct} of your orders in the past year",
                "value >= 0.1",
                "offer_products == 1",
            ),
        ),
    ),
    _F(
        "offer_product_cycle_days",
        "usage",
        "The customer's mean days between orders holding a product the offer covers.",
        "days",
    ),
    _F(
        "offer_product_due",
        "usage",
        "Days since the customer's last order with the offer's products over their own cycle "
        "for them (1 = due): replenishment.",
        "ratio",
        (
            says(
                "you buy {offer_item} about {offer_product_cycle_days:every} and your last "
                "was {days_since_offer_product_purchase:ago}",
                "value >= 0.5",
                "offer_products == 1",
                "offer_product_cycle_days >= 1",
            ),
        ),
    ),
    _F(
        "offer_product_decayed",
        "usage",
        "Orders with the offer's products, each weighted 0.9 to the power of the customer's "
        "orders since (TIFU-KNN's basket decay).",
        "weight",
    ),
    _F(
        "offer_repeat_rate",
        "offer",
        "Share of the offer's buyers who bought it again on a later order (its category's "
        "share when it has fewer than 20 buyers): consumable or durable, from the data.",
        "share",
    ),
    _F(
        "category_orders_365d",
        "usage",
        "Orders in the offer's category, last 365 days.",
        "orders",
        (says("you bought {category} {value:times} in the past year", "value >= 1"),),
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
        (
            says(
                "you buy {category} about {category_cycle_days:every} and last bought it "
                "{days_since_category_purchase:ago}",
                "value >= 1",
                "category_cycle_days >= 1",
            ),
        ),
    ),
    _F(
        "usage_level",
        "usage",
        "Latest usage reading (share of capacity) of their product in the offer's family.",
        "share",
        (
            says(
                "your {usage_product} was at {value:pct} of its capacity at its last reading",
                "value >= 0.5",
            ),
        ),
    ),
    _F(
        "usage_milestone",
        "usage",
        "1 if that usage reached 75 %.",
        "flag",
        (
            says(
                "your {usage_product} reached {usage_milestone_level:pct} of its capacity",
                "value == 1",
            ),
        ),
    ),
    _F(
        "category_views_30d",
        "usage",
        "Views of the offer's category in the last 30 days.",
        "views",
        (says("you looked at {category} {value:times} in the last 30 days", "value >= 1"),),
    ),
    _F(
        "browsing_intent",
        "usage",
        "1 if they viewed the offer's category 3 or more times in the last 30 days.",
        "flag",
        (
            says(
                "you looked at {category} {category_views_30d:times} in the last 30 days",
                "value == 1",
            ),
        ),
    ),
    _F("email_clicks_90d", "usage", "Email clicks in the last 90 days.", "clicks"),
    # category mix
    _F(
        "category_spend_share",
        "category_mix",
        "Share of the customer's last-year spend in the offer's category.",
        "share",
        (
            says(
                "{category} is {value:pct} of what you spent with us in the past year",
                "value >= 0.1",
            ),
        ),
    ),
    _F(
        "department_spend_share",
        "category_mix",
        "Share of the customer's last-year spend in the offer's department.",
        "share",
        (
            says(
                "{department} is {value:pct} of what you spent with us in the past year",
                "value >= 0.25",
            ),
        ),
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
        (says("you have not bought {category} from us before", "value == 1"),),
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
        (says("it saves you {value:money}", "value > 0"),),
    ),
    _F("offer_value", "offer", "Expected revenue if accepted.", "currency"),
    _F("offer_margin", "offer", "Expected margin if accepted.", "currency"),
    _F(
        "offer_popularity_30d",
        "offer",
        "Purchases (order lines) of the offer's products (or category) by all customers, "
        "last 30 days.",
        "purchases",
        (
            # among offers of the same kind: category offers count a whole category's lines
            # and would otherwise outrank every coupon
            says(
                "it is in the top fifth of our {kind_offers} by purchases in the last "
                "{popularity_days:count} days",
                "value >= 1",
                "value >= popularity_top_fifth",
            ),
        ),
    ),
    _F(
        "offer_acceptance_rate",
        "offer",
        "Smoothed share of showings of this offer that were accepted before the moment "
        "(out of fold in training).",
        "share",
        (
            says(
                "customers accept it more often than most of our {kind_offers}",
                "value > acceptance_median",
                "offer_accepted >= 1",
            ),
        ),
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
        (
            says(
                "baskets with {page_category}, like the {page_product} on this page, hold "
                "{category} {value:ratio} " + _LIFT,
                "value >= 1.5",
            ),
        ),
    ),
    _F(
        "cart_lift",
        "context",
        "Highest basket lift between a product in the cart and the offer's category.",
        "ratio",
        (
            says(
                "baskets with {cart_category}, like the {cart_product} in your cart, hold "
                "{category} {value:ratio} " + _LIFT,
                "value >= 1.5",
            ),
        ),
    ),
    _F("in_cart", "context", "1 if a product of the offer is already in the cart.", "flag"),
)

# What a cold-start slate says: it is ranked by exactly this count, so the count is the reason.
POPULARITY_COUNTS: tuple[Claim, ...] = (
    says(
        "customers bought {category} {value:times} in the last {popularity_days:count} days",
        "value >= 1",
        "offer_products == 0",
    ),
    says(
        "customers bought {offer_item} {value:times} in the last {popularity_days:count} days",
        "value >= 1",
        "offer_products == 1",
    ),
    says(
        "customers bought the products it covers {value:times} in the last "
        "{popularity_days:count} days",
        "value >= 1",
        "offer_products >= 2",
    ),
)

_BY_NAME = {spec.name: spec for spec in FEATURES}


def _check(claims: tuple[Claim, ...], where: str) -> None:
    numbers = set(_BY_NAME) | set(QUANTITIES)
    for claim in claims:
        for condition in claim.when:
            unknown = [n for n in condition.names if n not in numbers]
            if unknown:
                raise ValueError(f"{where}: condition '{condition}' uses unknown {unknown}")
        for name, word in claim.fields:
            if word and word not in WORDS:
                raise ValueError(f"{where}: {{{name}:{word}}}: words are one of {list(WORDS)}")
            if word and name not in numbers:
                raise ValueError(f"{where}: {{{name}:{word}}} is not a feature or quantity")
            if not word and name not in NAMES:
                raise ValueError(
                    f"{where}: {{{name}}} is not a name; numbers need a word, e.g. "
                    f"{{{name}:count}} (one of {list(WORDS)})"
                )


for _spec in FEATURES:
    _check(_spec.claims, f"feature {_spec.name}")
_check(POPULARITY_COUNTS, "POPULARITY_COUNTS")


def feature_names() -> list[str]:
    return [spec.name for spec in FEATURES]


def features_hash() -> str:
    """A short hash of the feature names in order: a version trained with other features
    cannot be served by this code (``train --if-missing`` trains anew)."""
    import hashlib

    return hashlib.sha256("\n".join(feature_names()).encode()).hexdigest()[:16]


def claims_of(name: str) -> tuple[Claim, ...]:
    return _BY_NAME[name].claims


def phrase(
    name: str,
    value: float,
    evidence: Mapping[str, Any],
    quantities: Mapping[str, Any] | None = None,
) -> str | None:
    """The first true claim of feature ``name`` at ``value``, or None if it has none, no
    claim's condition holds, or a name it needs is missing (a phrase is never built on a
    guess). ``quantities`` are the row's other features and catalogue quantities."""
    known = {**(quantities or {}), "value": value}
    for claim in _BY_NAME[name].claims:
        text = claim.render(known, evidence)
        if text is not None:
            return text
    return None
