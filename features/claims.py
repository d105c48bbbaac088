"""What may be said about a row: the catalogue at its moment, and its true claims.

The registry (:mod:`features.registry`) declares each feature's claims as data; this module
gathers what those claims are checked against for one row of a :class:`FeatureMatrix`: the
row's features, the names behind its evidence, and the catalogue-relative quantities
("the top fifth of coupons", "most of our category offers") at the row's moment, among
offers of the same kind that are valid then.

The catalogue is computed only when something is explained and kept for a few moments,
so a request pays for it once per moment at most.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from features.contract import OFFER_KINDS
from features.registry import POPULARITY_COUNTS, Claim, claims_of, display_name
from features.snapshot import Snapshot

if TYPE_CHECKING:
    from features.builder import FeatureBuilder, FeatureMatrix

__all__ = ["Catalogue", "RowContext", "Statement", "catalogue_at", "row_context"]

DAY = 86_400
KIND_OFFERS = {
    "item": "product offers",
    "category": "category offers",
    "coupon": "coupons",
    "bundle": "bundles",
}
_MOMENTS_KEPT = 4


@dataclass(frozen=True)
class Catalogue:
    """Offer statistics at one moment, and per offer kind the levels claims compare to.

    ``popularity`` and ``acceptance`` are computed exactly as the builder computes the
    features ``offer_popularity_30d`` and ``offer_acceptance_rate`` (acceptance as float32,
    like the matrix, so that a row is compared with itself bit for bit).
    """

    seconds: int
    popularity: np.ndarray
    acceptance: np.ndarray
    accepted: np.ndarray
    compared: np.ndarray  # per kind: offers of that kind valid at the moment
    top_fifth: np.ndarray  # per kind: lowest popularity within the top fifth
    acceptance_median: np.ndarray  # per kind: the upper median acceptance rate


def compute_catalogue(snapshot: Snapshot, builder: FeatureBuilder, seconds: int) -> Catalogue:
    """Every offer's popularity and acceptance at ``seconds``, and per kind the levels."""
    s, t = snapshot, int(seconds)
    offers = np.arange(len(s.offers))
    now = np.full(len(offers), t, dtype=np.int64)
    window = builder.popularity_days * DAY
    by_products = s.bought_by_offer.count(offers, now - window, now)
    by_category = s.purchases_by_category.count(s.offer_category, now - window, now)
    popularity = np.where(s.offer_products.lengths() > 0, by_products, by_category).astype(
        np.float64
    )
    start = np.zeros_like(now)
    shown = s.exposure_customer_for_offer.count(offers, start, now).astype(np.float64)
    accepted = s.accepted_for_offer.count(offers, start, now).astype(np.float64)
    prior = builder.acceptance_prior
    acceptance = ((accepted + prior * builder.global_acceptance_) / (shown + prior)).astype(
        np.float32
    )
    valid = s.offer_known & (s.offer_valid_from_s <= t) & (t <= s.offer_valid_to_s)
    kinds = len(OFFER_KINDS)
    compared = np.zeros(kinds, dtype=np.int64)
    top_fifth = np.full(kinds, np.nan)
    median = np.full(kinds, np.nan, dtype=np.float32)
    for kind in range(kinds):
        mine = valid & (s.offer_kind == kind)
        n = int(mine.sum())
        compared[kind] = n
        if n == 0:
            continue
        # the top fifth: fewer than n/5 offers of the kind sell more
        top_fifth[kind] = np.sort(popularity[mine])[::-1][math.ceil(n / 5) - 1]
        # above the upper median, a rate beats more than half of the kind's offers
        median[kind] = np.sort(acceptance[mine])[n // 2]
    return Catalogue(t, popularity, acceptance, accepted, compared, top_fifth, median)


_lock = threading.Lock()
_kept: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[Snapshot], OrderedDict[int, Catalogue]]]
_kept = weakref.WeakKeyDictionary()


def catalogue_at(snapshot: Snapshot, builder: FeatureBuilder, seconds: int) -> Catalogue:
    """The catalogue at ``seconds`` (the last few moments are kept per builder)."""
    t = int(seconds)
    with _lock:
        entry = _kept.get(builder)
        if entry is not None and entry[0]() is snapshot and t in entry[1]:
            entry[1].move_to_end(t)
            return entry[1][t]
    catalogue = compute_catalogue(snapshot, builder, t)
    with _lock:
        entry = _kept.get(builder)
        if entry is None or entry[0]() is not snapshot:
            entry = (weakref.ref(snapshot), OrderedDict())
            _kept[builder] = entry
        entry[1][t] = catalogue
        while len(entry[1]) > _MOMENTS_KEPT:
            entry[1].popitem(last=False)
    return catalogue


@dataclass(frozen=True)
class Statement:
    feature: str
    value: float
    text: str


@dataclass
class RowContext:
    """Everything a claim about one row may use: numbers and names."""

    quantities: dict[str, float]
    names: dict[str, str | None]

    def say(self, feature: str) -> Statement | None:
        """The first true claim of ``feature`` for this row, or None."""
        return self._first(feature, claims_of(feature))

    def popularity_count(self) -> Statement | None:
        """How often customers bought the offer lately (what a cold start is ranked by)."""
        return self._first("offer_popularity_30d", POPULARITY_COUNTS)

    def true_statements(self, features: list[str]) -> Iterator[Statement]:
        for feature in features:
            statement = self.say(feature)
            if statement is not None:
                yield statement

    def _first(self, feature: str, claims: tuple[Claim, ...]) -> Statement | None:
        if not claims:
            return None
        value = self.quantities[feature]
        known = self.quantities | {"value": value}
        for claim in claims:
            text = claim.render(known, self.names)
            if text is not None:
                return Statement(feature, value, text)
        return None


def row_context(
    snapshot: Snapshot, builder: FeatureBuilder, matrix: FeatureMatrix, row: int
) -> RowContext:
    """The numbers and names the claims about row ``row`` of ``matrix`` are checked on."""
    s = snapshot
    if len(matrix.as_of_s) != len(matrix.values) or len(matrix.offer) != len(matrix.values):
        raise ValueError(
            "the feature matrix does not carry its rows' offers and moments: build it with "
            "FeatureBuilder.build, which sets them"
        )
    t, offer = int(matrix.as_of_s[row]), int(matrix.offer[row])
    kind = int(s.offer_kind[offer])
    catalogue = catalogue_at(s, builder, t)
    names: dict[str, str | None] = dict(builder.describe_evidence(s, matrix, row))
    products = s.offer_products.values[
        s.offer_products.offsets[offer] : s.offer_products.offsets[offer + 1]
    ]
    names["offer_item"] = _title(s, int(products[0])) if len(products) == 1 else None
    names["kind_offers"] = KIND_OFFERS.get(OFFER_KINDS[kind]) if kind >= 0 else None
    page = int(matrix.evidence["page_product"][row])
    names["page_category"] = _category(s, int(s.product_category[page])) if page >= 0 else None
    cart = int(matrix.evidence["cart_product"][row])
    names["cart_category"] = _category(s, int(s.product_category[cart])) if cart >= 0 else None
    ladder_product = int(matrix.evidence["ladder_product"][row])
    quantities: dict[str, float] = dict(
        zip(matrix.names, matrix.values[row].astype(np.float64).tolist(), strict=True)
    )
    quantities |= {
        "offer_products": float(len(products)),
        "popularity_top_fifth": float(catalogue.top_fifth[kind]) if kind >= 0 else math.nan,
        "acceptance_median": float(catalogue.acceptance_median[kind]) if kind >= 0 else math.nan,
        "offer_accepted": float(catalogue.accepted[offer]),
        "ladder_product_step": float(s.product_ladder_step[ladder_product])
        if ladder_product >= 0
        else math.nan,
        "popularity_days": float(builder.popularity_days),
        "post_purchase_hours": float(builder.post_purchase_hours),
        "cart_abandon_hours": float(builder.cart_abandon_hours),
        "loyalty_milestone_days": float(builder.loyalty_milestone_days),
        "usage_milestone_level": float(builder.usage_milestone),
    }
    return RowContext(quantities, names)


def _title(s: Snapshot, product: int) -> str | None:
    return None if product == s.products.unknown else str(s.product_title[product])


def _category(s: Snapshot, code: int) -> str | None:
    return (
        None
        if code < 0 or code == s.categories.unknown
        else display_name(s.categories.values[code])
    )
