"""The state snapshot: every table of a workspace, encoded and indexed for point-in-time reads.

A :class:`Snapshot` is built once from contract tables (``Snapshot.from_tables``) and
then answers, for any customer and any time, "what had happened strictly before then".
Training builds one for the whole history and asks at many cut points; the service
holds one in memory and asks at "now". Both read through the same indexes, so features
computed in batch and online are the same numbers.

Codes: every id is replaced by a dense integer code (its position in a sorted index).
Unknown ids (an order line for a product missing from the catalog) get the code of an
``UNKNOWN`` entry, so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from features.contract import CHANNELS, LEDGER_EXPOSURE_PREFIX, OFFER_KINDS, TABLES
from features.history import TimeIndex, to_seconds

__all__ = [
    "CHANNEL_PLACEMENTS",
    "MOMENTS",
    "PLACEMENTS",
    "UNKNOWN",
    "Codes",
    "Cycles",
    "PairCodes",
    "Snapshot",
    "load_snapshot",
]

UNKNOWN = "UNKNOWN"
DAY = 86_400
PLACEMENTS = ("home", "pdp", "cart", "checkout", "post_purchase", "search", "inbox", "mailer")
_PAGES = ("home", "pdp", "cart", "checkout", "post_purchase", "search")
CHANNEL_PLACEMENTS: dict[str, tuple[str, ...]] = {
    "web": _PAGES,
    "app": _PAGES,
    "email": ("inbox",),
    "sms": ("inbox",),
    "mailer": ("mailer",),
}
"""Where each channel shows offers: the requests a storefront or a campaign makes."""
MOMENTS = (
    "post_purchase",
    "cart_abandonment",
    "browsing",
    "support_resolved",
    "usage_milestone",
    "loyalty_milestone",
    "seasonal",
    "life_stage",
    "gift",
    "product_launch",
)
ACCEPTED_OUTCOMES = ("accepted", "redeemed", "purchased")
_SMALL = 16


@dataclass(frozen=True)
class Codes:
    """A sorted vocabulary: id ↔ dense integer code. ``UNKNOWN`` is always present."""

    values: pd.Index

    @classmethod
    def of(cls, *columns: pd.Series | np.ndarray | list[str]) -> Codes:
        ids = pd.Index(
            pd.unique(
                np.concatenate(
                    [np.asarray(pd.Series(c).dropna(), dtype=object) for c in columns]
                    + [np.array([UNKNOWN], dtype=object)]
                )
            )
        )
        return cls(pd.Index(ids.astype("str")).sort_values())

    def __len__(self) -> int:
        return len(self.values)

    @property
    def unknown(self) -> int:
        return int(self.values.get_loc(UNKNOWN))

    def encode(
        self, ids: pd.Series | np.ndarray | list[str], missing: int | None = None
    ) -> np.ndarray:
        """Codes of ``ids``; an id not in the vocabulary (or empty) gets ``missing``
        (default: the UNKNOWN code)."""
        fallback = self.unknown if missing is None else missing
        if isinstance(ids, list) and len(ids) <= _SMALL:
            # a request's handful of ids: a hash lookup, without pandas' fixed costs
            return np.array(
                [
                    self.values.get_loc(i) if isinstance(i, str) and i in self.values else fallback
                    for i in ids
                ],
                dtype=np.int64,
            )
        series = pd.Series(ids, dtype="object")
        codes = self.values.get_indexer(series.where(series.notna(), UNKNOWN).astype("str"))
        return np.where(codes < 0, fallback, codes).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self._array[np.asarray(codes, dtype=np.int64)]

    @cached_property
    def _array(self) -> np.ndarray:
        # the ids as one numpy array, made once: a request decodes a few codes at a time
        return np.asarray(self.values, dtype=object)


@dataclass(frozen=True)
class PairCodes:
    """Dense codes for the (a, b) pairs that occur, e.g. (customer, category)."""

    keys: np.ndarray
    width: int

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, width: int) -> PairCodes:
        combined = np.asarray(a, dtype=np.int64) * width + np.asarray(b, dtype=np.int64)
        return cls(np.unique(combined), width)

    def encode(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Dense code of each pair, or -1 if the pair never occurs."""
        combined = np.asarray(a, dtype=np.int64) * self.width + np.asarray(b, dtype=np.int64)
        position = np.searchsorted(self.keys, combined)
        position = np.minimum(position, max(len(self.keys) - 1, 0))
        found = (
            (len(self.keys) > 0) & (self.keys[position] == combined)
            if len(self.keys)
            else (np.zeros(len(combined), dtype=bool))
        )
        return np.where(found, position, -1).astype(np.int64)


@dataclass(frozen=True)
class CapIndexes:
    """What frequency caps count in a workspace's history (``Snapshot._cap_indexes``)."""

    sends_by_customer_channel: TimeIndex
    served_by_customer_channel: TimeIndex
    viewed_by_customer_channel: TimeIndex
    cust_offer_shown: PairCodes
    shown_by_cust_offer: TimeIndex
    cust_offer_viewed: PairCodes
    viewed_by_cust_offer: TimeIndex


@dataclass(frozen=True)
class Cycles:
    """How customers repeat offers, per (customer, offer) row before its moment: the index
    of the first purchase occasion (one per order; -1 for none), how many occasions, days
    since the last (NaN for none), the mean days between them and the days since the last
    over that cycle, a cycle under a day counting as one (both NaN below two occasions)."""

    first: np.ndarray
    occasions: np.ndarray
    days_since: np.ndarray
    cycle_days: np.ndarray
    due: np.ndarray


@dataclass(frozen=True)
class Csr:
    """A ragged list per row: ``values[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, lists: Sequence[Any]) -> Csr:
        lengths = np.array([len(items) for items in lists], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        values = (
            np.concatenate([np.asarray(items, dtype=np.int64) for items in lists])
            if len(lists) and offsets[-1] > 0
            else np.zeros(0, dtype=np.int64)
        )
        return cls(offsets, values)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def expand(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``rows``, value) for every value of every listed row."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths()[rows]
        owner = np.repeat(np.arange(len(rows)), lengths)
        starts = np.repeat(self.offsets[rows], lengths)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return owner, self.values[starts + within]


def _encode_lists(codes: Codes, lists: pd.Series) -> Csr:
    """Encode a column of id lists in one pass (unknown ids are left out)."""
    lists = lists.map(lambda v: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [])
    lengths = lists.map(len).to_numpy()
    flat = codes.encode(
        pd.Series([item for items in lists for item in items], dtype="object"), missing=-1
    )
    owner = np.repeat(np.arange(len(lists)), lengths)
    keep = flat >= 0
    counts = np.bincount(owner[keep], minlength=len(lists))
    return Csr(np.concatenate(([0], np.cumsum(counts))).astype(np.int64), flat[keep])


def _vocabulary_codes(values: pd.Series, names: tuple[str, ...]) -> np.ndarray:
    return pd.Categorical(values.astype("str"), categories=list(names)).codes.astype(np.int64)


def _invert(csr: Csr, n_targets: int) -> Csr:
    """From row → targets, build target → rows."""
    owner = np.repeat(np.arange(len(csr.offsets) - 1), csr.lengths())
    order = np.argsort(csr.values, kind="stable")
    counts = np.bincount(csr.values, minlength=n_targets)
    return Csr(np.concatenate(([0], np.cumsum(counts))).astype(np.int64), owner[order])


class Snapshot:
    """Encoded, indexed contract tables. Build with :meth:`from_tables`; never mutated."""

    def __init__(self, tables: Mapping[str, pd.DataFrame]) -> None:
        self._build(tables)

    @classmethod
    def from_tables(cls, tables: Mapping[str, pd.DataFrame]) -> Snapshot:
        missing = [name for name in TABLES if name not in tables]
        if missing:
            raise ValueError(f"a snapshot needs every contract table; missing {missing}")
        return cls(tables)

    # -- construction -------------------------------------------------------------------
    def _build(self, tables: Mapping[str, pd.DataFrame]) -> None:
        customers = tables["customers"]
        products = tables["products"]
        orders = tables["orders"]
        offers = tables["offers"]
        events = tables["events"]

        self.customers = Codes.of(customers["customer_id"], orders["customer_id"])
        self.products = Codes.of(products["product_id"])
        self.categories = Codes.of(products["category"], offers["category"])
        self.departments = Codes.of(products["department"], offers["department"])
        self.families = Codes.of(products["family"])
        self.ladders = Codes.of(products["ladder"])
        self.segments = Codes.of(customers["segment"])
        self.offers = Codes.of(offers["offer_id"])
        self.audiences = Codes.of(
            tables["audiences"]["audience_id"],
            pd.Series([a for t in offers["target_audiences"] for a in t]),
        )
        self.bundle_ladders = Codes.of(offers["bundle_ladder"])

        self._build_products(products)
        self._build_customers(customers)
        self._build_offers(offers)
        self._build_orders(orders)
        self._build_events(events)
        self._build_exposures(tables["exposures"], tables["outcomes"])
        self._build_consent(tables["consent"], tables["audiences"])
        self.compatibility = self._compatibility(tables["compatibility"])
        self._build_offer_purchases()

    def _build_products(self, products: pd.DataFrame) -> None:
        n = len(self.products)
        info = products.set_index("product_id").reindex(self.products.values)
        self.product_category = self.categories.encode(info["category"])
        self.product_department = self.departments.encode(info["department"])
        self.product_family = self.families.encode(info["family"], missing=-1)
        self.product_family[self.product_family == self.families.unknown] = -1
        self.product_ladder = self.ladders.encode(info["ladder"], missing=-1)
        self.product_ladder[self.product_ladder == self.ladders.unknown] = -1
        self.product_ladder_step = info["ladder_step"].astype("float64").fillna(0).to_numpy()
        self.product_price = info["price"].astype("float64").to_numpy()
        title = info["title"].astype("object").where(info["title"].notna(), None)
        self.product_title = np.where(
            pd.isna(title.to_numpy()), np.asarray(self.products.values, dtype=object), title
        ).astype(object)
        assert len(self.product_category) == n

    def _build_customers(self, customers: pd.DataFrame) -> None:
        info = customers.set_index("customer_id").reindex(self.customers.values)
        self.customer_segment = self.segments.encode(info["segment"])
        self.customer_signup_s = np.where(
            info["signup_at"].notna(), to_seconds(info["signup_at"].fillna(pd.Timestamp(0))), -1
        )
        tiers = info["loyalty_tier"].astype("object")
        self.tier_names = sorted({str(t) for t in tiers.dropna()})
        self.customer_static_tier = np.array(
            [np.nan if pd.isna(t) else float(self._tier_rank(str(t))) for t in tiers]
        )

    @staticmethod
    def _tier_rank(name: str) -> int:
        order = {"bronze": 1, "silver": 2, "gold": 3, "platinum": 4}
        return order.get(name.lower(), 0)

    def _build_offers(self, offers: pd.DataFrame) -> None:
        info = offers.set_index("offer_id").reindex(self.offers.values)
        known = info["kind"].notna().to_numpy()
        self.offer_known = known
        self.offer_kind = np.array(
            [OFFER_KINDS.index(k) if isinstance(k, str) else -1 for k in info["kind"]]
        )
        self.offer_products = _encode_lists(self.products, info["product_ids"])
        # An offer's category: its own, else its first product's.
        has_product = self.offer_products.lengths() > 0
        first_product = np.where(
            has_product,
            self.offer_products.values[
                np.minimum(
                    self.offer_products.offsets[:-1], max(len(self.offer_products.values) - 1, 0)
                )
            ]
            if len(self.offer_products.values)
            else -1,
            -1,
        )
        category = self.categories.encode(info["category"])
        from_product = np.where(first_product >= 0, self.product_category[first_product], -1)
        self.offer_category = np.where(
            (category == self.categories.unknown) & (from_product >= 0), from_product, category
        )
        department = self.departments.encode(info["department"])
        dept_from_product = np.where(first_product >= 0, self.product_department[first_product], -1)
        self.offer_department = np.where(
            (department == self.departments.unknown) & (dept_from_product >= 0),
            dept_from_product,
            department,
        )
        self.offer_family = np.where(first_product >= 0, self.product_family[first_product], -1)
        self.offer_ladder = np.where(first_product >= 0, self.product_ladder[first_product], -1)
        self.offer_ladder_step = np.where(
            first_product >= 0, self.product_ladder_step[first_product], 0.0
        )
        owner, product = self.offer_products.expand(np.arange(len(self.offers)))
        price_sum = np.bincount(
            owner, weights=np.nan_to_num(self.product_price[product]), minlength=len(self.offers)
        )
        self.offer_price = np.where(self.offer_products.lengths() > 0, price_sum, np.nan)
        self.offer_discount = info["discount"].astype("float64").to_numpy()
        self.offer_value = info["value"].astype("float64").to_numpy()
        self.offer_margin = info["margin"].astype("float64").to_numpy()
        self.offer_lever = info["lever"].astype("float64").fillna(1.0).to_numpy()
        self.offer_title = info["title"].astype("object").where(info["title"].notna(), None)
        self.offer_channels = np.array(
            [
                sum(1 << CHANNELS.index(c) for c in ch)
                if isinstance(ch, list) and ch
                else (1 << len(CHANNELS)) - 1
                for ch in info["channels"]
            ],
            dtype=np.int64,
        )
        never = np.iinfo(np.int64).max
        self.offer_valid_from_s = np.where(
            info["valid_from"].notna(),
            to_seconds(info["valid_from"].fillna(pd.Timestamp(0))),
            -never,
        )
        self.offer_valid_to_s = np.where(
            info["valid_to"].notna(), to_seconds(info["valid_to"].fillna(pd.Timestamp(0))), never
        )
        self.offer_audiences = _encode_lists(self.audiences, info["target_audiences"])
        self.offer_segments = _encode_lists(self.segments, info["target_segments"])
        self.offer_bundle_ladder = self.bundle_ladders.encode(info["bundle_ladder"], missing=-1)
        self.offer_bundle_ladder[self.offer_bundle_ladder == self.bundle_ladders.unknown] = -1
        self.offer_bundle_tier = info["bundle_tier"].astype("object").to_numpy()

    def _build_orders(self, orders: pd.DataFrame) -> None:
        bought = orders[orders["quantity"] > 0]
        customer = self.customers.encode(bought["customer_id"])
        product = self.products.encode(bought["product_id"])
        seconds = to_seconds(bought["ordered_at"])
        amount = bought["amount"].astype("float64").fillna(0.0).to_numpy()
        order_code = pd.factorize(
            bought["order_id"].astype("str") + "\x1f" + bought["customer_id"]
        )[0]
        self.line_customer, self.line_product, self.line_seconds = customer, product, seconds
        self.line_order, self.line_amount = order_code, amount
        # a customer's own lines in time order: what was in their last basket, and what
        # they bought lately (the contexts training samples)
        self.lines_by_customer = TimeIndex.build(
            customer, seconds, payload={"product": product, "order": order_code}
        )
        category = self.product_category[product]
        department = self.product_department[product]

        # order level: one event per order (lines of one order at different times stay
        # apart, so a line is never read before its own time)
        per_order = (
            pd.DataFrame(
                {"order": order_code, "customer": customer, "seconds": seconds, "amount": amount}
            )
            .groupby(["order", "seconds"], sort=False)
            .agg(customer=("customer", "first"), amount=("amount", "sum"))
            .reset_index()
        )
        self.orders_by_customer = TimeIndex.build(
            per_order["customer"].to_numpy(),
            per_order["seconds"].to_numpy(),
            values={"amount": per_order["amount"].to_numpy(), "orders": np.ones(len(per_order))},
        )
        self.cust_category = PairCodes.of(customer, category, len(self.categories))
        self.cust_department = PairCodes.of(customer, department, len(self.departments))
        self.cust_product = PairCodes.of(customer, product, len(self.products))
        self.orders_by_cust_category = self._order_level_index(
            self.cust_category.encode(customer, category), order_code, seconds, amount, product
        )
        self.orders_by_cust_department = self._order_level_index(
            self.cust_department.encode(customer, department), order_code, seconds, amount, product
        )
        self.orders_by_cust_product = self._order_level_index(
            self.cust_product.encode(customer, product), order_code, seconds, amount, product
        )
        self.purchases_by_category = TimeIndex.build(
            category, seconds, values={"lines": np.ones(len(seconds))}
        )
        family = self.product_family[product]
        has_family = family >= 0
        self.cust_family = PairCodes.of(
            customer[has_family], family[has_family], len(self.families)
        )
        self.orders_by_cust_family = TimeIndex.build(
            self.cust_family.encode(customer[has_family], family[has_family]),
            seconds[has_family],
        )
        ladder = self.product_ladder[product]
        on_ladder = ladder >= 0
        self.cust_ladder = PairCodes.of(customer[on_ladder], ladder[on_ladder], len(self.ladders))
        ladder_groups = self.cust_ladder.encode(customer[on_ladder], ladder[on_ladder])
        steps = self.product_ladder_step[product[on_ladder]]
        index = TimeIndex.build(
            ladder_groups,
            seconds[on_ladder],
            payload={"step": steps, "product": product[on_ladder]},
        )
        # running maximum of the step within each (customer, ladder), in time order
        running = pd.Series(index.payload["step"]).groupby(index.groups).cummax().to_numpy()
        index.payload["max_step"] = running
        self.orders_by_cust_ladder = index

    @staticmethod
    def _order_level_index(
        groups: np.ndarray,
        orders: np.ndarray,
        seconds: np.ndarray,
        amount: np.ndarray,
        product: np.ndarray,
    ) -> TimeIndex:
        frame = pd.DataFrame(
            {
                "group": groups,
                "order": orders,
                "seconds": seconds,
                "amount": amount,
                "product": product,
            }
        )
        per = (
            frame.groupby(["group", "order", "seconds"], sort=False)
            .agg(amount=("amount", "sum"), product=("product", "last"))
            .reset_index()
        )
        return TimeIndex.build(
            per["group"].to_numpy(),
            per["seconds"].to_numpy(),
            values={"amount": per["amount"].to_numpy(), "orders": np.ones(len(per))},
            payload={"product": per["product"].to_numpy()},
        )

    def _build_events(self, events: pd.DataFrame) -> None:
        customer = self.customers.encode(events["customer_id"])
        seconds = to_seconds(events["occurred_at"])
        kind = events["event_type"].astype("str").to_numpy()
        self.event_types = tuple(TABLES["events"].column("event_type").allowed or ())
        kind_code = _vocabulary_codes(events["event_type"], self.event_types)
        self.events_by_customer_type = TimeIndex.build(
            customer * len(self.event_types) + kind_code,
            seconds,
            payload={"value": events["value"].astype("float64").to_numpy()},
        )
        views = kind == "view"
        view_product = self.products.encode(events.loc[views, "product_id"], missing=-1)
        view_category = self.categories.encode(events.loc[views, "category"], missing=-1)
        view_category = np.where(
            (view_category < 0) | (view_category == self.categories.unknown),
            np.where(view_product >= 0, self.product_category[np.maximum(view_product, 0)], -1),
            view_category,
        )
        self.cust_view_category = PairCodes.of(customer[views], view_category, len(self.categories))
        self.views_by_cust_category = TimeIndex.build(
            self.cust_view_category.encode(customer[views], view_category), seconds[views]
        )
        usage = kind == "usage"
        usage_product = self.products.encode(events.loc[usage, "product_id"], missing=-1)
        usage_family = np.where(
            usage_product >= 0, self.product_family[np.maximum(usage_product, 0)], -1
        )
        self.usage_by_cust_family = TimeIndex.build(
            self.cust_family.encode(customer[usage], usage_family),
            seconds[usage],
            payload={
                "value": events.loc[usage, "value"].astype("float64").to_numpy(),
                "product": usage_product,
            },
        )
        loyalty = kind == "loyalty_tier_change"
        tiers = events.loc[loyalty, "detail"].astype("object")
        rank = (
            np.array([self._tier_rank(str(t)) if isinstance(t, str) else np.nan for t in tiers])
            if loyalty.any()
            else np.zeros(0)
        )
        value = events.loc[loyalty, "value"].astype("float64").to_numpy()
        rank = np.where(np.isnan(value), rank, value) if len(rank) else rank
        self.loyalty_by_customer = TimeIndex.build(
            customer[loyalty], seconds[loyalty], payload={"rank": rank}
        )

    def event_type_code(self, name: str) -> int:
        return self.event_types.index(name)

    def _cap_indexes(
        self, exposures: pd.DataFrame, outcomes: pd.DataFrame
    ) -> tuple[CapIndexes, pd.DataFrame]:
        """What caps count (policy.rules.Cap), from these exposures and outcomes: sends (one
        slate or one mailing per channel), offers served, and the storefront's 'viewed'
        feedback, per (customer, channel) and per (customer, offer); never the ghost
        exposures of the holdout. Also the sends themselves (one row per request)."""
        shown = exposures[~exposures["holdout"].astype(bool)]
        customer = self.customers.encode(shown["customer_id"])
        offer = self.offers.encode(shown["offer_id"])
        cust_offer_shown = PairCodes.of(customer, offer, len(self.offers))
        served = pd.DataFrame(
            {
                "c": self.customers.encode(exposures["customer_id"]),
                "ch": _vocabulary_codes(exposures["channel"], CHANNELS),
                "s": to_seconds(exposures["shown_at"]),
                "request": exposures["request_id"].astype("object").fillna("").to_numpy(),
            }
        )
        all_channel = served["ch"].to_numpy()
        served = served[~exposures["holdout"].astype(bool).to_numpy()]
        send = served["request"].where(served["request"] != "", served["s"].astype("str"))
        sends = served.assign(send=send).drop_duplicates(["c", "ch", "send"])
        o_customer = self.customers.encode(outcomes["customer_id"])
        o_offer = self.offers.encode(outcomes["offer_id"])
        o_seconds = to_seconds(outcomes["occurred_at"])
        kind = outcomes["outcome"].astype("str").to_numpy()
        # a view counts through the exposure it follows; never one of a holdout's ghost
        ghost = set(exposures.loc[exposures["holdout"].astype(bool), "exposure_id"])
        viewed = (kind == "viewed") & ~outcomes["exposure_id"].isin(ghost).to_numpy()
        channel_of_exposure = pd.Series(all_channel, index=exposures["exposure_id"].to_numpy())
        channel_of_exposure = channel_of_exposure[~channel_of_exposure.index.duplicated()]
        viewed_channel = (
            channel_of_exposure.reindex(outcomes["exposure_id"][viewed].to_numpy())
            .fillna(-1)
            .to_numpy()
            .astype(np.int64)
        )
        on_channel = viewed_channel >= 0
        cust_offer_viewed = PairCodes.of(o_customer[viewed], o_offer[viewed], len(self.offers))
        caps = CapIndexes(
            sends_by_customer_channel=TimeIndex.build(
                sends["c"].to_numpy() * len(CHANNELS) + sends["ch"].to_numpy(),
                sends["s"].to_numpy(),
            ),
            served_by_customer_channel=TimeIndex.build(
                served["c"].to_numpy() * len(CHANNELS) + served["ch"].to_numpy(),
                served["s"].to_numpy(),
            ),
            viewed_by_customer_channel=TimeIndex.build(
                o_customer[viewed][on_channel] * len(CHANNELS) + viewed_channel[on_channel],
                o_seconds[viewed][on_channel],
            ),
            cust_offer_shown=cust_offer_shown,
            shown_by_cust_offer=TimeIndex.build(
                cust_offer_shown.encode(customer, offer), to_seconds(shown["shown_at"])
            ),
            cust_offer_viewed=cust_offer_viewed,
            viewed_by_cust_offer=TimeIndex.build(
                cust_offer_viewed.encode(o_customer[viewed], o_offer[viewed]),
                o_seconds[viewed],
            ),
        )
        return caps, sends

    def _build_exposures(self, exposures: pd.DataFrame, outcomes: pd.DataFrame) -> None:
        shown = exposures[~exposures["holdout"].astype(bool)]
        customer = self.customers.encode(shown["customer_id"])
        offer = self.offers.encode(shown["offer_id"])
        seconds = to_seconds(shown["shown_at"])
        caps, sends = self._cap_indexes(exposures, outcomes)
        self.caps = caps
        # the live ledger counts the rows exported from it (serving.export) itself: a reader
        # of both (serving.ledger.CombinedLedger) takes the history without them
        exported = exposures["exposure_id"].astype("str").str.startswith(LEDGER_EXPOSURE_PREFIX)
        self.caps_without_ledger_rows = (
            self._cap_indexes(
                exposures[~exported.to_numpy()],
                outcomes[
                    ~outcomes["exposure_id"]
                    .astype("str")
                    .str.startswith(LEDGER_EXPOSURE_PREFIX)
                    .to_numpy()
                ],
            )[0]
            if exported.any()
            else caps
        )
        # the contexts offers were shown in (one per request): training samples them
        contexts = sends.sort_values("s")
        self.exposure_context_seconds = contexts["s"].to_numpy()
        self.exposure_context_channel = contexts["ch"].to_numpy()
        placement = exposures["placement"].astype("object").iloc[contexts.index.to_numpy()]
        self.exposure_context_placement = _vocabulary_codes(
            placement.where(placement.isin(PLACEMENTS)), PLACEMENTS
        )
        self.exposure_customer_for_offer = TimeIndex.build(
            offer, seconds, payload={"customer": customer}
        )

        o_customer = self.customers.encode(outcomes["customer_id"])
        o_offer = self.offers.encode(outcomes["offer_id"])
        o_seconds = to_seconds(outcomes["occurred_at"])
        kind = outcomes["outcome"].astype("str").to_numpy()
        declined = kind == "declined"
        self.cust_offer_declined = PairCodes.of(
            o_customer[declined], o_offer[declined], len(self.offers)
        )
        self.declined_by_cust_offer = TimeIndex.build(
            self.cust_offer_declined.encode(o_customer[declined], o_offer[declined]),
            o_seconds[declined],
        )
        accepted = np.isin(kind, ACCEPTED_OUTCOMES)
        # one acceptance per (customer, offer, day) at most: redeemed + purchased is one success
        frame = pd.DataFrame(
            {"c": o_customer[accepted], "o": o_offer[accepted], "s": o_seconds[accepted]}
        )
        frame = frame.assign(day=frame["s"] // 86400).drop_duplicates(["c", "o", "day"])
        self.accepted_for_offer = TimeIndex.build(
            frame["o"].to_numpy(),
            frame["s"].to_numpy(),
            payload={"customer": frame["c"].to_numpy()},
        )
        self.accepted_by_cust_offer_pairs = PairCodes.of(
            frame["c"].to_numpy(), frame["o"].to_numpy(), len(self.offers)
        )
        self.accepted_by_cust_offer = TimeIndex.build(
            self.accepted_by_cust_offer_pairs.encode(frame["c"].to_numpy(), frame["o"].to_numpy()),
            frame["s"].to_numpy(),
        )

    def _build_consent(self, consent: pd.DataFrame, audiences: pd.DataFrame) -> None:
        customer = self.customers.encode(consent["customer_id"])
        channel = _vocabulary_codes(consent["channel"], CHANNELS)
        purpose = consent["purpose"].astype("str").to_numpy()
        self.consent_purposes = tuple(TABLES["consent"].column("purpose").allowed or ())
        purpose_code = np.array([self.consent_purposes.index(p) for p in purpose], dtype=np.int64)
        updated = consent["updated_at"]
        seconds = np.where(updated.notna(), to_seconds(updated.fillna(pd.Timestamp(0))), 0)
        self.consent_index = TimeIndex.build(
            (customer * len(CHANNELS) + channel) * len(self.consent_purposes) + purpose_code,
            seconds,
            payload={"granted": consent["granted"].astype(bool).to_numpy().astype(np.float64)},
        )
        a_customer = self.customers.encode(audiences["customer_id"])
        a_code = self.audiences.encode(audiences["audience_id"])
        added = audiences["added_at"]
        a_seconds = np.where(added.notna(), to_seconds(added.fillna(pd.Timestamp(0))), 0)
        self.audience_pairs = PairCodes.of(a_customer, a_code, len(self.audiences))
        self.audience_index = TimeIndex.build(
            self.audience_pairs.encode(a_customer, a_code), a_seconds
        )

    def _compatibility(self, compatibility: pd.DataFrame) -> Csr:
        """Product → products it is completed by (explicit 'completes' relations)."""
        completes = compatibility[compatibility["relation"] == "completes"]
        source = self.products.encode(completes["product_id"])
        target = self.products.encode(completes["related_product_id"])
        lists: list[list[int]] = [[] for _ in range(len(self.products))]
        for s, t in zip(source, target, strict=True):
            lists[s].append(int(t))
        return Csr.of(lists)

    def catalogue_fingerprint(self) -> str:
        """A short hash of which offers exist (id and kind): a model is trained for one
        catalogue, and serving refuses a version trained on another."""
        import hashlib

        known = np.flatnonzero(self.offer_known)
        kinds = np.asarray(OFFER_KINDS)[self.offer_kind[known]]
        listing = "\n".join(
            f"{o}\t{k}" for o, k in zip(self.offers.decode(known), kinds, strict=True)
        )
        return hashlib.sha256(listing.encode()).hexdigest()[:16]

    def offer_covers(self, offers: np.ndarray, products: np.ndarray) -> np.ndarray:
        """Whether each offer's product list holds the paired product."""
        return self.offer_product_pairs.encode(offers, products) >= 0

    @cached_property
    def order_spans(self) -> pd.DataFrame:
        """One row per order: ``customer`` (code), ``start`` and ``end`` (seconds of its
        first and last line), sorted by start: the baskets that training cuts at."""
        frame = pd.DataFrame(
            {"order": self.line_order, "customer": self.line_customer, "s": self.line_seconds}
        )
        spans = frame.groupby("order", sort=False).agg(
            customer=("customer", "first"), start=("s", "min"), end=("s", "max")
        )
        return spans.sort_values(["start", "customer"], kind="stable").reset_index(drop=True)

    def purchase_cycles(self, pair: np.ndarray, seconds: np.ndarray) -> Cycles:
        """The customers' own cycles for (customer, offer) pair codes
        (``cust_offer_bought``) strictly before ``seconds``: what replenishment's features
        and the ``already_owns`` rule both read."""
        index = self.occasions_by_cust_offer
        t = np.asarray(seconds)
        last = index.last_before(pair, t)
        first = index.first_of_group(pair, t)
        n = np.where(last >= 0, last - first + 1, 0)
        last_s = index.seconds_at(last)
        with np.errstate(divide="ignore", invalid="ignore"):
            cycle = np.where(
                n >= 2, (last_s - index.seconds_at(first)) / np.maximum(n - 1, 1) / DAY, np.nan
            )
            days_since = (t - last_s) / DAY
            due = days_since / np.maximum(cycle, 1.0)
        return Cycles(first=first, occasions=n, days_since=days_since, cycle_days=cycle, due=due)

    def repeat_rate(
        self, offers: np.ndarray, seconds: np.ndarray, min_buyers: int = 20
    ) -> np.ndarray:
        """For each offer, the share of its buyers before ``seconds`` who bought it again
        on a later order: the data's own word on consumable (high) or durable (low).

        An item offer with fewer than ``min_buyers`` buyers takes its category's rate; a
        category offer has its category's rate; NaN where neither has enough buyers."""
        o = np.asarray(offers, dtype=np.int64)
        t = np.asarray(seconds, dtype=np.int64)
        zero = np.zeros(len(o), dtype=np.int64)
        category = self.offer_category[o]

        def rate(buyers: TimeIndex, repeaters: TimeIndex, groups: np.ndarray) -> np.ndarray:
            first = buyers.count(groups, zero, t)
            again = repeaters.count(groups, zero, t)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(first >= min_buyers, again / first, np.nan)

        by_category = rate(self.category_buyers, self.category_repeaters, category)
        by_item = rate(self.offer_buyers, self.offer_repeaters, o)
        has_products = self.offer_products.lengths()[o] > 0
        return np.where(has_products & ~np.isnan(by_item), by_item, by_category)

    def _build_offer_purchases(self) -> None:
        """(customer, offer) purchase events: lines of a product the offer covers, and
        lines of a product that an offer's product explicitly completes."""
        offer_owner, offer_product = self.offer_products.expand(np.arange(len(self.offers)))
        self.offer_product_pairs = PairCodes.of(offer_owner, offer_product, len(self.products))
        product_offers = _invert(self.offer_products, len(self.products))
        owner, offer = product_offers.expand(self.line_product)
        self.cust_offer_bought = PairCodes.of(self.line_customer[owner], offer, len(self.offers))
        self.bought_by_cust_offer = TimeIndex.build(
            self.cust_offer_bought.encode(self.line_customer[owner], offer),
            self.line_seconds[owner],
            values={"amount": self.line_amount[owner]},
            payload={"product": self.line_product[owner]},
        )
        self.bought_by_offer = TimeIndex.build(offer, self.line_seconds[owner])
        # purchase occasions: one event per (customer, offer, order), the unit of a cycle
        self.occasions_by_cust_offer = self._order_level_index(
            self.cust_offer_bought.encode(self.line_customer[owner], offer),
            self.line_order[owner],
            self.line_seconds[owner],
            self.line_amount[owner],
            self.line_product[owner],
        )
        # who bought an offer's products, and who came back for them: the repeat rate
        self.offer_buyers, self.offer_repeaters = _first_and_second(
            self.occasions_by_cust_offer, self.cust_offer_bought.keys % len(self.offers)
        )
        self.category_buyers, self.category_repeaters = _first_and_second(
            self.orders_by_cust_category, self.cust_category.keys % len(self.categories)
        )
        # completion through the catalog: bought p, and p is completed by a product of o
        line, related = self.compatibility.expand(self.line_product)
        if len(related):
            owner2, offer2 = product_offers.expand(related)
            lines = line[owner2]
            customer = self.line_customer[lines]
            self.cust_offer_compatible = PairCodes.of(customer, offer2, len(self.offers))
            self.compatible_by_cust_offer = TimeIndex.build(
                self.cust_offer_compatible.encode(customer, offer2),
                self.line_seconds[lines],
                payload={"product": self.line_product[lines]},
            )
        else:
            self.cust_offer_compatible = PairCodes.of(np.zeros(0), np.zeros(0), len(self.offers))
            self.compatible_by_cust_offer = TimeIndex.build(
                np.zeros(0), np.zeros(0), payload={"product": np.zeros(0, dtype=np.int64)}
            )


def _first_and_second(
    occasions: TimeIndex, target_of_pair: np.ndarray
) -> tuple[TimeIndex, TimeIndex]:
    """From purchase occasions grouped by (customer, target) pair: one event per pair at
    its first occasion, and one per pair that came back, at its second, grouped by target."""
    groups = occasions.groups
    if not len(groups):
        empty = TimeIndex.build(np.zeros(0), np.zeros(0))
        return empty, empty
    starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
    target = target_of_pair[groups[starts]]
    second = starts + 1
    again = second < len(groups)
    again[again] &= groups[second[again]] == groups[starts[again]]
    return (
        TimeIndex.build(target, occasions.seconds[starts]),
        TimeIndex.build(target[again], occasions.seconds[second[again]]),
    )


def load_snapshot(workspace: Any) -> Snapshot:
    """Read every table of a workspace and index it."""
    return Snapshot.from_tables(workspace.read_all())
