"""Point-in-time features for (customer, offer, as_of) rows: one code path, batch or online.

The work is split into *requests* (a customer at a moment, with an optional channel,
placement, page product, cart and declared moment) and *rows* (a request paired with an
offer). Customer-level quantities are computed once per request, category-level ones
once per (request, category), and everything is numpy over the :class:`Snapshot`'s
sorted indexes. Training asks for many requests at once; the service asks for one
request × its candidate offers. It is the same function either way.

Nothing at or after ``as_of`` is read: every lookup is "strictly before". Statistics
learned across customers (basket lift between categories and products, the acceptance
prior) are fitted on data strictly before ``reference_time``, and ``transform`` refuses
rows whose ``as_of`` is earlier than that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from features.contract import CHANNELS
from features.history import TimeIndex, second_ceil, to_seconds_ceil
from features.registry import FEATURES, display_name, feature_names
from features.snapshot import MOMENTS, PLACEMENTS, Csr, Snapshot

__all__ = ["BasketLift", "FeatureBuilder", "FeatureMatrix", "Requests", "cooccurrence_anchors"]

DAY = 86_400
EVIDENCE = (
    "category",
    "department",
    "anchor_category",
    "anchor_product",
    "item_anchor_product",
    "compatible_product",
    "family",
    "ladder_product",
    "offer_product",
    "usage_product",
    "page_product",
    "cart_product",
)


@dataclass
class Requests:
    """Customers at moments, in snapshot codes. Context is optional (-1 = none).

    ``ids`` keeps each customer's own id: one the snapshot does not know has the UNKNOWN
    code, but a live ledger still counts its caps and cooldowns under its id."""

    customer: np.ndarray
    as_of_s: np.ndarray
    channel: np.ndarray
    placement: np.ndarray
    moment: np.ndarray
    page_product: np.ndarray
    cart: Csr
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.customer):
            raise ValueError("Requests: one id per customer code is needed")

    def __len__(self) -> int:
        return len(self.customer)

    @classmethod
    def build(
        cls,
        snapshot: Snapshot,
        customer_ids: Sequence[str],
        as_of: Sequence[Any] | pd.Series,
        *,
        channel: Sequence[str | None] | None = None,
        placement: Sequence[str | None] | None = None,
        moment: Sequence[str | None] | None = None,
        page_product: Sequence[str | None] | None = None,
        cart: Sequence[Sequence[str]] | None = None,
    ) -> Requests:
        n = len(customer_ids)

        def vocab(values: Sequence[str | None] | None, names: tuple[str, ...]) -> np.ndarray:
            if values is None:
                return np.full(n, -1, dtype=np.int64)
            return np.array([names.index(v) if v in names else -1 for v in values], dtype=np.int64)

        return cls(
            ids=np.asarray([str(c) for c in customer_ids], dtype=object),
            customer=snapshot.customers.encode(list(customer_ids)),
            as_of_s=to_seconds_ceil(_as_datetimes(as_of)),
            channel=vocab(channel, CHANNELS),
            placement=vocab(placement, PLACEMENTS),
            moment=vocab(moment, MOMENTS),
            page_product=(
                np.full(n, -1, dtype=np.int64)
                if page_product is None
                else snapshot.products.encode(list(page_product), missing=-1)
            ),
            cart=Csr.of(
                [[] for _ in range(n)]
                if cart is None
                else [snapshot.products.encode(list(items), missing=-1) for items in cart]
            ),
        )


def _as_datetimes(values: Sequence[Any] | pd.Series) -> np.ndarray:
    """Moments as datetime64[us]; a short list of timestamps skips pandas' parser."""
    if (
        isinstance(values, list)
        and len(values) <= 16
        and all(isinstance(v, pd.Timestamp) for v in values)
    ):
        return np.array([v.to_datetime64() for v in values], dtype="datetime64[us]")
    return np.asarray(pd.to_datetime(pd.Series(list(values))).to_numpy(), dtype="datetime64[us]")


@dataclass
class FeatureMatrix:
    """Features of rows: ``values[i, j]`` is feature ``names[j]`` of row i (float32, NaN =
    unknown). ``evidence`` holds, per row, codes of what a "because" may name; ``offer``
    and ``as_of_s`` are each row's offer code and moment (seconds), for a "because" that
    compares the offer with the catalogue at that moment."""

    values: np.ndarray
    names: list[str]
    evidence: dict[str, np.ndarray] = field(default_factory=dict)
    offer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    as_of_s: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values, columns=self.names)

    def columns(self) -> dict[str, np.ndarray]:
        """Feature name → its values per row (what eligibility rules read)."""
        return {name: self.values[:, j] for j, name in enumerate(self.names)}

    def take(self, rows: np.ndarray) -> FeatureMatrix:
        """The matrix of these rows only (positions)."""
        return FeatureMatrix(
            values=self.values[rows],
            names=self.names,
            evidence={name: codes[rows] for name, codes in self.evidence.items()},
            offer=self.offer[rows] if len(self.offer) else self.offer,
            as_of_s=self.as_of_s[rows] if len(self.as_of_s) else self.as_of_s,
        )


def cooccurrence_anchors(
    order_codes: np.ndarray,
    item_codes: np.ndarray,
    n_items: int,
    *,
    top_k: int,
    min_pair_orders: int,
    exclude: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each item b, the ``top_k`` items a with the highest basket lift(a → b).

    lift(a → b) = P(b | a) / P(b) over orders; only pairs seen in at least
    ``min_pair_orders`` orders count. Returns (anchors, lift, confidence), each of shape
    (n_items, top_k), anchors padded with -1.
    """
    anchors = np.full((n_items, top_k), -1, dtype=np.int64)
    lift = np.zeros((n_items, top_k))
    confidence = np.zeros((n_items, top_k))
    if len(order_codes) == 0:
        return anchors, lift, confidence
    _, order_index = np.unique(order_codes, return_inverse=True)
    n_orders = int(order_index.max()) + 1
    basket = sp.csr_matrix(
        (np.ones(len(item_codes)), (order_index, item_codes)), shape=(n_orders, n_items)
    )
    basket.sum_duplicates()
    basket.data[:] = 1.0  # an item counts once per order
    item_orders = np.asarray(basket.sum(axis=0)).ravel()
    # A pair can reach the support threshold only if both items do: keep just those
    # columns, so that a large catalog does not square its memory. Counts are exact in
    # float32 below 2**24 orders, and its product is twice as fast; float64 beyond.
    frequent = np.flatnonzero(item_orders >= min_pair_orders)
    if exclude is not None:
        frequent = frequent[frequent != exclude]
    exact = np.float32 if n_orders < 2**24 else np.float64
    compact = basket[:, frequent].astype(exact)
    # both operands in CSR, so the product is CSR (a CSC operand makes it CSC, and turning
    # its millions of pairs back into CSR cost half the time)
    together = compact.T.tocsr() @ compact
    # most co-occurring pairs fall short of the threshold: drop them before listing the
    # rest (listing all of them cost as much as the product)
    together.data[together.data < min_pair_orders] = 0
    together.eliminate_zeros()
    pairs = together.tocoo()
    a, b = frequent[pairs.row], frequent[pairs.col]
    count = pairs.data.astype(np.float64)
    keep = a != b
    a, b, count = a[keep], b[keep], count[keep]
    pair_lift = count * n_orders / (item_orders[a] * item_orders[b])
    pair_confidence = count / item_orders[a]
    order = np.lexsort((a, -pair_lift, b))  # ties by the anchor's code: a fixed order
    a, b, pair_lift, pair_confidence = a[order], b[order], pair_lift[order], pair_confidence[order]
    starts = np.searchsorted(b, np.arange(n_items))
    rank = np.arange(len(b)) - starts[b]
    top = rank < top_k
    anchors[b[top], rank[top]] = a[top]
    lift[b[top], rank[top]] = pair_lift[top]
    confidence[b[top], rank[top]] = pair_confidence[top]
    return anchors, lift, confidence


Anchors = tuple[np.ndarray, np.ndarray, np.ndarray]  # (anchors, lift, confidence)


@dataclass(frozen=True)
class BasketLift:
    """The basket lift of one snapshot at one reference, for categories and products:
    each item's ``top_k`` strongest anchors (:func:`cooccurrence_anchors`), from order
    lines strictly before the reference. The feature builder and the candidate generator
    fitted at the same moment read the same lift: fit it once and give it to both."""

    reference_s: int
    min_pair_orders: int
    top_k: int
    category: Anchors
    product: Anchors

    @classmethod
    def fit(
        cls, snapshot: Snapshot, reference_time: Any, *, min_pair_orders: int, top_k: int
    ) -> BasketLift:
        reference = second_ceil(reference_time)
        before = snapshot.line_seconds < reference
        orders, products = snapshot.line_order[before], snapshot.line_product[before]
        options = {"top_k": top_k, "min_pair_orders": min_pair_orders}
        return cls(
            reference_s=reference,
            min_pair_orders=min_pair_orders,
            top_k=top_k,
            category=cooccurrence_anchors(
                orders,
                snapshot.product_category[products],
                len(snapshot.categories),
                exclude=snapshot.categories.unknown,
                **options,
            ),
            product=cooccurrence_anchors(
                orders,
                products,
                len(snapshot.products),
                exclude=snapshot.products.unknown,
                **options,
            ),
        )

    @classmethod
    def at(
        cls,
        given: BasketLift | None,
        snapshot: Snapshot,
        reference_time: Any,
        *,
        min_pair_orders: int,
        top_k: int,
    ) -> BasketLift:
        """``given`` if it is this moment's lift with these settings (and at least ``top_k``
        anchors an item), else a fit of its own; a lift fitted at another moment, or with
        another support threshold, is refused rather than read."""
        if given is None:
            return cls.fit(snapshot, reference_time, min_pair_orders=min_pair_orders, top_k=top_k)
        wanted = (second_ceil(reference_time), min_pair_orders)
        if (given.reference_s, given.min_pair_orders) != wanted or given.top_k < top_k:
            raise ValueError(
                f"this basket lift was fitted at {given.reference_s} s with min_pair_orders "
                f"{given.min_pair_orders} and {given.top_k} anchors an item; the fit needs "
                f"{wanted[0]} s, {min_pair_orders} and {top_k}"
            )
        return given

    def top(self, level: str, k: int) -> Anchors:
        """The ``k`` strongest anchors of each category (``level="category"``) or product."""
        anchors, lift, confidence = self.category if level == "category" else self.product
        return anchors[:, :k], lift[:, :k], confidence[:, :k]


def _customer_fold(customer_ids: np.ndarray, n_folds: int) -> np.ndarray:
    return np.array(
        [
            int(hashlib.blake2b(str(c).encode(), digest_size=4).hexdigest(), 16) % n_folds
            for c in customer_ids
        ],
        dtype=np.int64,
    )


class FeatureBuilder:
    """Builds the registry's features for (customer, offer, as_of) rows.

    Parameters are stored as given; :meth:`fit` learns the cross-customer statistics
    from a snapshot, strictly before ``reference_time``.
    """

    def __init__(
        self,
        *,
        anchors_per_item: int = 10,
        min_pair_orders: int = 20,
        acceptance_prior: float = 20.0,
        n_folds: int = 5,
        post_purchase_hours: float = 48,
        cart_abandon_hours: float = 4,
        support_resolved_hours: float = 24,
        loyalty_milestone_days: float = 7,
        browsing_views: int = 3,
        usage_milestone: float = 0.75,
        popularity_days: int = 30,
        repeat_decay: float = 0.9,
        min_repeat_buyers: int = 20,
    ) -> None:
        self.anchors_per_item = anchors_per_item
        self.min_pair_orders = min_pair_orders
        self.acceptance_prior = acceptance_prior
        self.n_folds = n_folds
        self.post_purchase_hours = post_purchase_hours
        self.cart_abandon_hours = cart_abandon_hours
        self.support_resolved_hours = support_resolved_hours
        self.loyalty_milestone_days = loyalty_milestone_days
        self.browsing_views = browsing_views
        self.usage_milestone = usage_milestone
        self.popularity_days = popularity_days
        self.repeat_decay = repeat_decay
        self.min_repeat_buyers = min_repeat_buyers

    # -- learning ----------------------------------------------------------------------
    def fit(
        self, snapshot: Snapshot, reference_time: Any, lift: BasketLift | None = None
    ) -> FeatureBuilder:
        """Learn basket lift (categories and products) and the global acceptance rate
        from events strictly before ``reference_time``; ``lift``: that moment's basket
        lift, already fitted (for the candidate generator, say), instead of a fit here."""
        reference = second_ceil(reference_time)
        k = self.anchors_per_item
        lift = BasketLift.at(
            lift, snapshot, reference_time, min_pair_orders=self.min_pair_orders, top_k=k
        )
        cat_anchor, cat_lift, cat_conf = lift.top("category", k)
        prod_anchor, prod_lift, prod_conf = lift.top("product", k)
        names = np.asarray(snapshot.categories.values, dtype=object)
        product_names = np.asarray(snapshot.products.values, dtype=object)
        self.category_anchors_ = self._anchor_frame(names, cat_anchor, cat_lift, cat_conf)
        self.product_anchors_ = self._anchor_frame(product_names, prod_anchor, prod_lift, prod_conf)
        shown = int(np.sum(snapshot.exposure_customer_for_offer.seconds < reference))
        accepted = int(np.sum(snapshot.accepted_for_offer.seconds < reference))
        self.global_acceptance_ = (accepted + 1.0) / (shown + 2.0)
        self.reference_seconds_ = reference
        self.reference_time_ = pd.Timestamp(reference_time)
        self.feature_names_out_ = feature_names()
        self._encoded: tuple[Snapshot, dict[str, Any]] | None = None
        return self

    @staticmethod
    def _anchor_frame(
        names: np.ndarray, anchors: np.ndarray, lift: np.ndarray, confidence: np.ndarray
    ) -> pd.DataFrame:
        target, slot = np.nonzero(anchors >= 0)
        return pd.DataFrame(
            {
                "target": names[target],
                "anchor": names[anchors[target, slot]],
                "lift": lift[target, slot],
                "confidence": confidence[target, slot],
            }
        )

    def get_feature_names_out(self) -> list[str]:
        return list(self.feature_names_out_)

    def __getstate__(self) -> dict[str, Any]:
        # shipped to other processes (Dask) without the snapshot-specific cache
        return {key: value for key, value in self.__dict__.items() if key != "_encoded"} | {
            "_encoded": None
        }

    def _anchors_for(self, snapshot: Snapshot) -> dict[str, Any]:
        """The learned anchors in this snapshot's codes (kept for the last snapshot used;
        the snapshot itself is the key, so a recycled object id can never match)."""
        if self._encoded is None or self._encoded[0] is not snapshot:
            self._encoded = (snapshot, self._encode_anchors(snapshot))
        return dict(self._encoded[1])

    def _encode_anchors(self, snapshot: Snapshot) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for level, frame, codes in (
            ("category", self.category_anchors_, snapshot.categories),
            ("product", self.product_anchors_, snapshot.products),
        ):
            n, k = len(codes), self.anchors_per_item
            anchors = np.full((n, k), -1, dtype=np.int64)
            lift = np.zeros((n, k))
            confidence = np.zeros((n, k))
            target = codes.encode(frame["target"], missing=-1)
            anchor = codes.encode(frame["anchor"], missing=-1)
            ok = (target >= 0) & (anchor >= 0)
            slot = frame.groupby("target").cumcount().to_numpy()
            anchors[target[ok], slot[ok]] = anchor[ok]
            lift[target[ok], slot[ok]] = frame["lift"].to_numpy()[ok]
            confidence[target[ok], slot[ok]] = frame["confidence"].to_numpy()[ok]
            out[f"{level}_anchor"], out[f"{level}_lift"] = anchors, lift
            out[f"{level}_confidence"] = confidence
        folds = _customer_fold(np.asarray(snapshot.customers.values), self.n_folds)
        out["customer_fold"] = folds
        index = snapshot.exposure_customer_for_offer
        out["shown_fold_keys"] = TimeIndex.build(
            index.groups * self.n_folds + folds[index.payload["customer"]], index.seconds
        )  # type: ignore[assignment]
        accepted = snapshot.accepted_for_offer
        out["accepted_fold_keys"] = TimeIndex.build(
            accepted.groups * self.n_folds + folds[accepted.payload["customer"]], accepted.seconds
        )  # type: ignore[assignment]
        return out

    # -- building ----------------------------------------------------------------------
    def transform(self, snapshot: Snapshot, queries: pd.DataFrame) -> pd.DataFrame:
        """Features for each query row (DataFrame in, DataFrame out).

        ``queries`` has ``customer_id``, ``offer_id`` and ``as_of``, and optionally
        ``channel``, ``placement``, ``moment``, ``product_id`` (the page) and ``cart`` (a
        list of product ids). Returns one float column per registry feature, same index.
        """
        return self._frame(snapshot, queries, out_of_fold=False)

    def fit_transform(
        self, snapshot: Snapshot, queries: pd.DataFrame, reference_time: Any
    ) -> pd.DataFrame:
        """Fit, then build features with the acceptance rate out of fold (training)."""
        return self.fit(snapshot, reference_time)._frame(snapshot, queries, out_of_fold=True)

    def _frame(
        self, snapshot: Snapshot, queries: pd.DataFrame, *, out_of_fold: bool
    ) -> pd.DataFrame:
        requests, request_of_row = self.requests_from_queries(snapshot, queries)
        offers = snapshot.offers.encode(queries["offer_id"], missing=-1)
        if (offers < 0).any():
            unknown = queries["offer_id"][offers < 0].iloc[0]
            raise KeyError(f"offer {unknown!r} is not in the snapshot's offers table")
        matrix = self.build(snapshot, requests, request_of_row, offers, out_of_fold=out_of_fold)
        return pd.DataFrame(matrix.values, columns=matrix.names, index=queries.index)

    @staticmethod
    def requests_from_queries(
        snapshot: Snapshot, queries: pd.DataFrame
    ) -> tuple[Requests, np.ndarray]:
        """Group query rows into requests (same customer, moment and context)."""
        context = [c for c in ("channel", "placement", "moment", "product_id") if c in queries]
        keys = queries[["customer_id", "as_of", *context]].astype("str")
        if "cart" in queries:
            keys = keys.assign(cart=queries["cart"].map(lambda v: "|".join(v or [])))
        codes, _ = pd.factorize(pd.MultiIndex.from_frame(keys))
        first = pd.Series(np.arange(len(queries))).groupby(codes).first().to_numpy()
        rows = queries.iloc[first]

        def column(name: str) -> list[Any] | None:
            return rows[name].tolist() if name in rows else None

        requests = Requests.build(
            snapshot,
            rows["customer_id"].tolist(),
            rows["as_of"],
            channel=column("channel"),
            placement=column("placement"),
            moment=column("moment"),
            page_product=column("product_id"),
            cart=column("cart"),
        )
        return requests, codes.astype(np.int64)

    def build(
        self,
        snapshot: Snapshot,
        requests: Requests,
        request_of_row: np.ndarray,
        offer_of_row: np.ndarray,
        *,
        out_of_fold: bool = False,
    ) -> FeatureMatrix:
        """The feature matrix for rows (request index, offer code)."""
        if not hasattr(self, "reference_seconds_"):
            raise RuntimeError("FeatureBuilder is not fitted: call fit(snapshot, reference_time)")
        if len(requests) and int(requests.as_of_s.min()) < self.reference_seconds_:
            raise ValueError(
                f"as_of {pd.Timestamp(int(requests.as_of_s.min()), unit='s')} is before the "
                f"reference time {self.reference_time_}: the learned statistics would leak "
                "the future into it. Fit with an earlier reference_time."
            )
        s = snapshot
        enc = self._anchors_for(s)
        r = np.asarray(request_of_row, dtype=np.int64)
        o = np.asarray(offer_of_row, dtype=np.int64)
        n = len(r)
        c = requests.customer[r]
        t = requests.as_of_s[r]
        out: dict[str, np.ndarray] = {}
        evidence: dict[str, np.ndarray] = {}

        customer_level = self._customer_level(s, requests)
        for name, values in customer_level.items():
            out[name] = values[r]

        # -- category level: once per (request, category) ---------------------------------
        category = s.offer_category[o]
        department = s.offer_department[o]
        evidence["category"] = category
        evidence["department"] = department
        unique_rc, rc_of_row = np.unique(r * len(s.categories) + category, return_inverse=True)
        ur, ucat = unique_rc // len(s.categories), unique_rc % len(s.categories)
        cat_level = self._category_level(s, enc, requests, ur, ucat, customer_level)
        for name, values in cat_level.items():
            if name.startswith("@"):
                evidence[name[1:]] = values[rc_of_row]
            else:
                out[name] = values[rc_of_row]
        unique_rd, rd_of_row = np.unique(r * len(s.departments) + department, return_inverse=True)
        ud_r, ud = unique_rd // len(s.departments), unique_rd % len(s.departments)
        pair = s.cust_department.encode(requests.customer[ud_r], ud)
        t_d = requests.as_of_s[ud_r]
        spend = s.orders_by_cust_department.total("amount", pair, t_d - 365 * DAY, t_d)
        total = customer_level["spend_365d"][ud_r]
        out["department_spend_share"] = _ratio(spend, total)[rd_of_row]

        # -- (customer, offer) level -----------------------------------------------------
        self._offer_history(s, c, o, t, out, evidence)
        self._item_anchors(s, enc, c, o, t, out, evidence)
        self._ecosystem(s, c, o, t, out, evidence)

        # -- offer level -----------------------------------------------------------------
        out["offer_price"] = s.offer_price[o]
        out["offer_discount"] = s.offer_discount[o]
        out["offer_value"] = s.offer_value[o]
        out["offer_margin"] = s.offer_margin[o]
        window = self.popularity_days * DAY
        by_products = s.bought_by_offer.count(o, t - window, t)
        by_category = s.purchases_by_category.count(category, t - window, t)
        has_products = s.offer_products.lengths()[o] > 0
        out["offer_popularity_30d"] = np.where(has_products, by_products, by_category)
        out["offer_acceptance_rate"] = self._acceptance(s, enc, c, o, t, out_of_fold)
        out["offer_kind"] = s.offer_kind[o].astype(np.float64)

        # -- context -----------------------------------------------------------------------
        out["channel"] = _code(requests.channel[r])
        out["placement"] = _code(requests.placement[r])
        out["moment"] = _code(requests.moment[r])
        page = requests.page_product[r]
        evidence["page_product"] = page
        page_category = np.where(page >= 0, s.product_category[np.maximum(page, 0)], -1)
        out["page_product_lift"] = _lift_between(enc, category, page_category)
        cart_lift = np.full(n, np.nan)
        cart_product = np.full(n, -1, dtype=np.int64)
        in_cart = np.zeros(n)
        cart_sizes = requests.cart.lengths()
        for j in range(int(cart_sizes.max()) if len(cart_sizes) else 0):
            has = cart_sizes[r] > j
            product = np.full(n, -1, dtype=np.int64)
            product[has] = requests.cart.values[requests.cart.offsets[r[has]] + j]
            cart_category = np.where(product >= 0, s.product_category[np.maximum(product, 0)], -1)
            lift = _lift_between(enc, category, cart_category)
            cart_product = np.where(
                lift > np.nan_to_num(cart_lift, nan=-np.inf), product, cart_product
            )
            cart_lift = np.fmax(cart_lift, lift)
            in_cart = np.maximum(in_cart, (product >= 0) & s.offer_covers(o, product))
        out["cart_lift"] = cart_lift
        out["in_cart"] = in_cart
        evidence["cart_product"] = cart_product

        values = np.empty((n, len(FEATURES)), dtype=np.float32)
        for j, spec in enumerate(FEATURES):
            values[:, j] = out[spec.name]
        return FeatureMatrix(
            values=values,
            names=feature_names(),
            evidence=evidence,
            offer=o.copy(),
            as_of_s=t.astype(np.int64, copy=False),
        )

    def _customer_level(self, s: Snapshot, requests: Requests) -> dict[str, np.ndarray]:
        c, t = requests.customer, requests.as_of_s
        out: dict[str, np.ndarray] = {}
        orders = s.orders_by_customer
        last = orders.last_before(c, t)
        last_s = orders.seconds_at(last)
        out["days_since_last_order"] = (t - last_s) / DAY
        for days in (30, 90, 365):
            out[f"orders_{days}d"] = orders.total("orders", c, t - days * DAY, t)
            out[f"spend_{days}d"] = orders.total("amount", c, t - days * DAY, t)
        out["in_post_purchase_window"] = _within(t, last_s, self.post_purchase_hours * 3600)
        events = s.events_by_customer_type
        types = len(s.event_types)

        def last_event(name: str) -> np.ndarray:
            return events.seconds_at(events.last_before(c * types + s.event_type_code(name), t))

        out["in_cart_abandon_window"] = _within(
            t, last_event("cart_abandon"), self.cart_abandon_hours * 3600
        )
        out["in_support_resolved_window"] = _within(
            t, last_event("support_resolved"), self.support_resolved_hours * 3600
        )
        clicks = c * types + s.event_type_code("email_click")
        out["email_clicks_90d"] = events.count(clicks, t - 90 * DAY, t).astype(np.float64)
        loyalty = s.loyalty_by_customer.last_before(c, t)
        out["loyalty_milestone_recent"] = _within(
            t, s.loyalty_by_customer.seconds_at(loyalty), self.loyalty_milestone_days * DAY
        )
        event_tier = s.loyalty_by_customer.payload_at("rank", loyalty)
        out["loyalty_tier_rank"] = np.where(
            np.isnan(event_tier), s.customer_static_tier[c], event_tier
        )
        signup = s.customer_signup_s[c]
        first = orders.seconds_at(orders.first_of_group(c, t))
        start = np.where((signup >= 0) & (signup < t), signup, first)
        out["tenure_days"] = (t - start) / DAY
        # entropy of spend over departments, last year
        n_departments = len(s.departments)
        rows = np.repeat(np.arange(len(c)), n_departments)
        departments = np.tile(np.arange(n_departments), len(c))
        pair = s.cust_department.encode(c[rows], departments)
        spend = s.orders_by_cust_department.total("amount", pair, t[rows] - 365 * DAY, t[rows])
        spend = np.maximum(spend, 0).reshape(len(c), n_departments)
        share = spend / np.maximum(spend.sum(axis=1, keepdims=True), 1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["department_mix_entropy"] = -np.nansum(
                np.where(share > 0, share * np.log2(share), 0.0), axis=1
            )
        return out

    def _category_level(
        self,
        s: Snapshot,
        enc: dict[str, np.ndarray],
        requests: Requests,
        r: np.ndarray,
        category: np.ndarray,
        customer_level: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        c, t = requests.customer[r], requests.as_of_s[r]
        out: dict[str, np.ndarray] = {}
        index = s.orders_by_cust_category
        pair = s.cust_category.encode(c, category)
        last = index.last_before(pair, t)
        last_s = index.seconds_at(last)
        days_since = (t - last_s) / DAY
        out["days_since_category_purchase"] = days_since
        out["category_is_new"] = (last < 0).astype(np.float64)
        out["category_orders_365d"] = index.total("orders", pair, t - 365 * DAY, t)
        spend = index.total("amount", pair, t - 365 * DAY, t)
        out["category_spend_share"] = _ratio(spend, customer_level["spend_365d"][r])
        first = index.first_of_group(pair, t)
        n_before = np.where(last >= 0, last - first + 1, 0)
        first_s = index.seconds_at(first)
        with np.errstate(divide="ignore", invalid="ignore"):
            cycle = np.where(
                n_before >= 2, (last_s - first_s) / np.maximum(n_before - 1, 1) / DAY, np.nan
            )
            out["category_cycle_days"] = cycle
            out["category_replenishment_due"] = np.where(cycle > 0, days_since / cycle, np.nan)
        views = s.views_by_cust_category.count(
            s.cust_view_category.encode(c, category), t - 30 * DAY, t
        ).astype(np.float64)
        out["category_views_30d"] = views
        out["browsing_intent"] = (views >= self.browsing_views).astype(np.float64)
        # completion through baskets: the best anchor category bought in the last year
        anchors = enc["category_anchor"][category]
        best_lift, best_conf, best_days, best_anchor, best_product = _best_anchor(
            s.orders_by_cust_category,
            s.cust_category,
            c,
            t,
            anchors,
            enc["category_lift"][category],
            enc["category_confidence"][category],
        )
        out["copurchase_lift"] = best_lift
        out["copurchase_confidence"] = best_conf
        out["days_since_anchor_purchase"] = best_days
        out["@anchor_category"] = best_anchor
        out["@anchor_product"] = best_product
        return out

    def _offer_history(
        self,
        s: Snapshot,
        c: np.ndarray,
        o: np.ndarray,
        t: np.ndarray,
        out: dict[str, np.ndarray],
        evidence: dict[str, np.ndarray],
    ) -> None:
        bought = s.bought_by_cust_offer
        pair = s.cust_offer_bought.encode(c, o)
        last = bought.last_before(pair, t)
        out["days_since_offer_product_purchase"] = (t - bought.seconds_at(last)) / DAY
        out["offer_product_purchases_365d"] = bought.count(pair, t - 365 * DAY, t).astype(float)
        evidence["offer_product"] = bought.payload_at("product", last, missing=-1).astype(np.int64)
        self._replenishment(s, c, o, t, pair, out)
        shown = s.caps.shown_by_cust_offer
        shown_pair = s.caps.cust_offer_shown.encode(c, o)
        out["days_since_offer_shown"] = (
            t - shown.seconds_at(shown.last_before(shown_pair, t))
        ) / DAY
        out["offer_times_shown_30d"] = shown.count(shown_pair, t - 30 * DAY, t).astype(float)
        declined = s.declined_by_cust_offer
        declined_pair = s.cust_offer_declined.encode(c, o)
        out["days_since_offer_declined"] = (
            t - declined.seconds_at(declined.last_before(declined_pair, t))
        ) / DAY
        compatible = s.compatible_by_cust_offer
        last_compatible = compatible.last_before(s.cust_offer_compatible.encode(c, o), t)
        out["days_since_compatible_purchase"] = (t - compatible.seconds_at(last_compatible)) / DAY
        evidence["compatible_product"] = compatible.payload_at(
            "product", last_compatible, missing=-1
        ).astype(np.int64)

    def _replenishment(
        self,
        s: Snapshot,
        c: np.ndarray,
        o: np.ndarray,
        t: np.ndarray,
        pair: np.ndarray,
        out: dict[str, np.ndarray],
    ) -> None:
        """How the customer repeats the offer's products: purchase occasions (one per
        order), their share of the customer's orders, the customer's own cycle, how due
        it is, a recency-weighted count, and the repeat rate of everyone who bought it."""
        occasions = s.occasions_by_cust_offer
        cycles = s.purchase_cycles(pair, t)
        orders_365d = s.orders_by_customer.total("orders", c, t - 365 * DAY, t)
        in_year = occasions.count(pair, t - 365 * DAY, t)
        out["offer_product_order_share"] = _ratio(in_year.astype(np.float64), orders_365d)
        out["offer_product_cycle_days"] = cycles.cycle_days
        out["offer_product_due"] = np.where(cycles.cycle_days > 0, cycles.due, np.nan)
        # Σ decay^(orders since): each occasion weighs by how many of the customer's
        # orders came after it (0 for one in their last order), as TIFU-KNN weighs baskets
        decayed = np.zeros(len(o))
        owned = np.flatnonzero(cycles.occasions > 0)
        if len(owned):
            counts = cycles.occasions[owned]
            row = np.repeat(owned, counts)
            offsets = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
            event = cycles.first[row] + offsets
            since = s.orders_by_customer.count(c[row], occasions.seconds[event], t[row]) - 1
            np.add.at(decayed, row, self.repeat_decay ** np.maximum(since, 0))
        out["offer_product_decayed"] = decayed
        out["offer_repeat_rate"] = s.repeat_rate(o, t, self.min_repeat_buyers)

    def _item_anchors(
        self,
        s: Snapshot,
        enc: dict[str, np.ndarray],
        c: np.ndarray,
        o: np.ndarray,
        t: np.ndarray,
        out: dict[str, np.ndarray],
        evidence: dict[str, np.ndarray],
    ) -> None:
        single = s.offer_products.lengths()[o] == 1
        product = np.where(
            single,
            s.offer_products.values[
                np.minimum(s.offer_products.offsets[o], max(len(s.offer_products.values) - 1, 0))
            ],
            -1,
        )
        product = np.where(single, product, 0)
        anchors = np.where(single[:, None], enc["product_anchor"][product], -1)
        lift, _, days, _, anchor_product = _best_anchor(
            s.orders_by_cust_product,
            s.cust_product,
            c,
            t,
            anchors,
            enc["product_lift"][product],
            enc["product_confidence"][product],
        )
        out["item_copurchase_lift"] = lift
        out["days_since_item_anchor_purchase"] = days
        evidence["item_anchor_product"] = anchor_product

    def _ecosystem(
        self,
        s: Snapshot,
        c: np.ndarray,
        o: np.ndarray,
        t: np.ndarray,
        out: dict[str, np.ndarray],
        evidence: dict[str, np.ndarray],
    ) -> None:
        family = s.offer_family[o]
        evidence["family"] = family
        family_pair = np.where(family >= 0, s.cust_family.encode(c, np.maximum(family, 0)), -1)
        out["family_owned"] = (s.orders_by_cust_family.last_before(family_pair, t) >= 0).astype(
            np.float64
        )
        ladder = s.offer_ladder[o]
        ladder_pair = np.where(ladder >= 0, s.cust_ladder.encode(c, np.maximum(ladder, 0)), -1)
        last = s.orders_by_cust_ladder.last_before(ladder_pair, t)
        owned_step = s.orders_by_cust_ladder.payload_at("max_step", last, missing=0.0)
        out["ladder_step_owned"] = owned_step
        out["is_next_ladder_step"] = (
            (ladder >= 0) & (owned_step >= 1) & (s.offer_ladder_step[o] == owned_step + 1)
        ).astype(np.float64)
        evidence["ladder_product"] = s.orders_by_cust_ladder.payload_at(
            "product", last, missing=-1
        ).astype(np.int64)
        usage = s.usage_by_cust_family
        last_usage = usage.last_before(family_pair, t)
        level = usage.payload_at("value", last_usage)
        out["usage_level"] = level
        out["usage_milestone"] = np.where(np.isnan(level), 0.0, level >= self.usage_milestone)
        evidence["usage_product"] = usage.payload_at("product", last_usage, missing=-1).astype(
            np.int64
        )

    def _acceptance(
        self,
        s: Snapshot,
        enc: dict[str, Any],
        c: np.ndarray,
        o: np.ndarray,
        t: np.ndarray,
        out_of_fold: bool,
    ) -> np.ndarray:
        start = np.zeros_like(t)
        shown = s.exposure_customer_for_offer.count(o, start, t).astype(np.float64)
        accepted = s.accepted_for_offer.count(o, start, t).astype(np.float64)
        if out_of_fold:
            fold = enc["customer_fold"][c]
            group = o * self.n_folds + fold
            shown -= enc["shown_fold_keys"].count(group, start, t)
            accepted -= enc["accepted_fold_keys"].count(group, start, t)
        prior = self.acceptance_prior
        return (accepted + prior * self.global_acceptance_) / (shown + prior)

    def describe_evidence(
        self, snapshot: Snapshot, matrix: FeatureMatrix, row: int
    ) -> dict[str, Any]:
        """The names behind row ``row``'s evidence codes, for the "because" phrases."""
        s = snapshot
        ev = {name: int(codes[row]) for name, codes in matrix.evidence.items()}

        def category(code: int) -> str | None:
            return (
                None
                if code < 0 or code == s.categories.unknown
                else display_name(s.categories.values[code])
            )

        def product(code: int) -> str | None:
            return None if code < 0 or code == s.products.unknown else str(s.product_title[code])

        return {
            "category": category(ev["category"]),
            "department": None
            if ev["department"] in (-1, s.departments.unknown)
            else display_name(s.departments.values[ev["department"]]),
            "anchor_category": category(ev["anchor_category"]),
            "anchor_product": product(ev["anchor_product"]),
            "item_anchor_product": product(ev["item_anchor_product"]),
            "compatible_product": product(ev["compatible_product"]),
            "family": None if ev["family"] < 0 else str(s.families.values[ev["family"]]),
            "ladder_product": product(ev["ladder_product"]),
            "offer_product": product(ev["offer_product"]),
            "usage_product": product(ev["usage_product"]),
            "page_product": product(ev["page_product"]),
            "cart_product": product(ev.get("cart_product", -1)),
        }


def _best_anchor(
    index: TimeIndex,
    pairs: Any,
    c: np.ndarray,
    t: np.ndarray,
    anchors: np.ndarray,
    lift: np.ndarray,
    confidence: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Among each row's anchors, the one with the highest lift that the customer bought in
    the last 365 days: (lift, confidence, days since, anchor code, last product there)."""
    n, k = anchors.shape
    flat_anchor = anchors.ravel()
    customers = np.repeat(c, k)
    times = np.repeat(t, k)
    pair = np.where(flat_anchor >= 0, pairs.encode(customers, np.maximum(flat_anchor, 0)), -1)
    last = index.last_before(pair, times)
    last_s = index.seconds_at(last)
    bought = (last >= 0) & (times - last_s <= 365 * DAY)
    scored = np.where(bought, lift.ravel(), -np.inf).reshape(n, k)
    best = np.argmax(scored, axis=1) if k else np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    found = np.isfinite(scored[rows, best]) if k else np.zeros(n, dtype=bool)
    flat = rows * k + best
    days = (times[flat] - last_s[flat]) / DAY
    product = index.payload_at("product", last[flat], missing=-1).astype(np.int64)
    return (
        np.where(found, lift[rows, best], np.nan),
        np.where(found, confidence[rows, best], np.nan),
        np.where(found, days, np.nan),
        np.where(found, anchors[rows, best], -1),
        np.where(found, product, -1),
    )


def _lift_between(enc: dict[str, np.ndarray], target: np.ndarray, other: np.ndarray) -> np.ndarray:
    anchors = enc["category_anchor"][target]
    match = (anchors == other[:, None]) & (other[:, None] >= 0)
    lift = np.where(match, enc["category_lift"][target], np.nan)
    with np.errstate(all="ignore"):
        return np.where(
            match.any(axis=1), np.nanmax(np.where(match, lift, -np.inf), axis=1), np.nan
        )


def _within(t: np.ndarray, event_s: np.ndarray, seconds: float) -> np.ndarray:
    return np.where(np.isnan(event_s), 0.0, (t - event_s) <= seconds).astype(np.float64)


def _ratio(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    return np.where(whole > 0, part / np.where(whole > 0, whole, 1.0), 0.0)


def _code(values: np.ndarray) -> np.ndarray:
    return np.where(values >= 0, values, np.nan).astype(np.float64)
