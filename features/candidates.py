"""Candidate generation: a few hundred plausible offers per request out of a large catalog.

A union of generators, each cheap and explainable:

* ``repeat``: offers covering products (or categories) the customer already buys,
  for repeat and replenishment;
* ``completion``: offers whose product or category is bought together (basket lift) with
  what the customer bought recently;
* ``progression``: categories that customers who bought the customer's categories went
  on to buy next;
* ``targeted``: offers aimed at an audience or segment the customer belongs to;
* ``popular``: what the customer's segment bought most recently.

Each generator scores its offers; the union keeps the best ``max_candidates`` by the
best rank any generator gave. A catalog smaller than ``pass_through_below`` skips
generation: every offer goes through. Eligibility and ranking come after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from features.builder import BasketLift, FeatureBuilder, Requests
from features.history import second_ceil
from features.snapshot import Snapshot

__all__ = [
    "GENERATORS",
    "CandidateGenerator",
    "Candidates",
    "fit_with_one_lift",
    "next_purchase_offers",
    "recall",
]

DAY = 86_400
GENERATORS = ("repeat", "completion", "progression", "targeted", "popular")


@dataclass
class Candidates:
    """Rows (request index, offer code) and, per row, a bitmask of the generators that
    proposed it (bit i = ``GENERATORS[i]``; 0 = passed through)."""

    request: np.ndarray
    offer: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.offer)


def _by_target(anchors: np.ndarray, lift: np.ndarray) -> pd.DataFrame:
    target, slot = np.nonzero(anchors >= 0)
    return pd.DataFrame(
        {"anchor": anchors[target, slot], "target": target, "score": lift[target, slot]}
    )


class CandidateGenerator:
    """Union of candidate generators. Parameters are stored as given; :meth:`fit` learns
    from events strictly before ``reference_time``."""

    def __init__(
        self,
        *,
        max_candidates: int = 200,
        pass_through_below: int = 2000,
        per_generator: int = 100,
        recent_days: int = 90,
        popular_days: int = 30,
        min_pair_orders: int = 20,
        items_per_category: int = 10,
        repeat_weight: float = 5.0,
        links_per_item: int = 20,
    ) -> None:
        self.max_candidates = max_candidates
        self.pass_through_below = pass_through_below
        self.per_generator = per_generator
        self.recent_days = recent_days
        self.popular_days = popular_days
        self.min_pair_orders = min_pair_orders
        self.items_per_category = items_per_category
        # what a customer buys again is most of a next basket: the repeat generator's
        # ranks count as if 5 × better, so a heavy shopper's usual items are not crowded
        # out by the other generators' picks
        self.repeat_weight = repeat_weight
        self.links_per_item = links_per_item  # basket-lift anchors kept for each item

    def fit(
        self, snapshot: Snapshot, reference_time: Any, lift: BasketLift | None = None
    ) -> CandidateGenerator:
        """Learn what each generator draws from, strictly before ``reference_time``;
        ``lift``: that moment's basket lift, already fitted (for the feature builder, say),
        instead of a fit here."""
        s = snapshot
        reference = second_ceil(reference_time)
        k = self.per_generator
        n = self.links_per_item
        lift = BasketLift.at(lift, s, reference_time, min_pair_orders=self.min_pair_orders, top_k=n)
        cat_anchor, cat_lift, _ = lift.top("category", n)
        prod_anchor, prod_lift, _ = lift.top("product", n)
        self.category_links_ = _by_target(cat_anchor, cat_lift)
        self.product_links_ = _by_target(prod_anchor, prod_lift)
        self.progression_ = self._progression(s, reference)
        # popular in segment: distinct buyers per offer in the window before the reference
        owner_rows = s.bought_by_cust_offer
        recent = (owner_rows.seconds < reference) & (
            owner_rows.seconds >= reference - self.popular_days * DAY
        )
        pair_keys = s.cust_offer_bought.keys[owner_rows.groups[recent]]
        customer = pair_keys // len(s.offers)
        offer = pair_keys % len(s.offers)
        frame = pd.DataFrame(
            {"segment": s.customer_segment[customer], "offer": offer, "customer": customer}
        ).drop_duplicates()
        by_category = self._category_buyers(s, reference)
        popular = pd.concat([frame, by_category], ignore_index=True).drop_duplicates()
        counts = popular.groupby(["segment", "offer"]).size().rename("score").reset_index()
        overall = popular.groupby("offer").size().rename("score").reset_index().assign(segment=-1)
        self.popular_ = (
            pd.concat([counts, overall], ignore_index=True)
            .sort_values(["segment", "score", "offer"], ascending=[True, False, True])
            .groupby("segment")
            .head(k)
        )
        self.category_offers_ = self._category_offers(s, reference)
        self.n_offers_ = len(s.offers)
        return self

    def _category_offers(self, s: Snapshot, reference: int) -> pd.DataFrame:
        """What a category stands for when a generator proposes it: its category offers,
        and its most bought other offers (so that an item catalog does not expand a
        category into every item in it)."""
        known = np.flatnonzero(s.offer_known)
        table = pd.DataFrame(
            {
                "offer": known,
                "category": s.offer_category[known],
                "whole": s.offer_products.lengths()[known] == 0,
            }
        )
        bought = s.bought_by_offer
        counts = np.bincount(bought.groups[bought.seconds < reference], minlength=len(s.offers))
        table["popularity"] = counts[table["offer"].to_numpy()]
        items = table[~table["whole"]].sort_values(
            ["category", "popularity", "offer"], ascending=[True, False, True]
        )
        top = items.groupby("category").head(self.items_per_category)
        return pd.concat([table[table["whole"]], top], ignore_index=True)[["offer", "category"]]

    def _category_buyers(self, s: Snapshot, reference: int) -> pd.DataFrame:
        """Buyers of each category offer's category, in the popularity window."""
        category_offers = np.flatnonzero((s.offer_products.lengths() == 0) & s.offer_known)
        if not len(category_offers):
            return pd.DataFrame(columns=["segment", "offer", "customer"])
        window = (s.line_seconds < reference) & (
            s.line_seconds >= reference - self.popular_days * DAY
        )
        lines = pd.DataFrame(
            {
                "customer": s.line_customer[window],
                "category": s.product_category[s.line_product[window]],
            }
        )
        offers = pd.DataFrame(
            {"offer": category_offers, "category": s.offer_category[category_offers]}
        )
        joined = lines.drop_duplicates().merge(offers, on="category")
        return pd.DataFrame(
            {
                "segment": s.customer_segment[joined["customer"].to_numpy()],
                "offer": joined["offer"].to_numpy(),
                "customer": joined["customer"].to_numpy(),
            }
        )

    @staticmethod
    def _progression(s: Snapshot, reference: int) -> pd.DataFrame:
        """Category A → B when B was a customer's next first-time category after A."""
        before = s.line_seconds < reference
        first = (
            pd.DataFrame(
                {
                    "customer": s.line_customer[before],
                    "category": s.product_category[s.line_product[before]],
                    "seconds": s.line_seconds[before],
                }
            )
            .groupby(["customer", "category"], as_index=False)["seconds"]
            .min()
        )
        first = first[first["category"] != s.categories.unknown].sort_values(
            ["customer", "seconds", "category"]
        )
        following = first.groupby("customer")["category"].shift(-1)
        pairs = pd.DataFrame({"anchor": first["category"], "target": following}).dropna()
        pairs["target"] = pairs["target"].astype(np.int64)
        counts = pairs.groupby(["anchor", "target"]).size().rename("score").reset_index()
        return (
            counts.sort_values(["anchor", "score"], ascending=[True, False])
            .groupby("anchor")
            .head(20)
        )

    @property
    def weights(self) -> tuple[float, ...]:
        """Each generator's rank weight, in the order of GENERATORS."""
        return tuple(self.repeat_weight if name == "repeat" else 1.0 for name in GENERATORS)

    # -- generation ----------------------------------------------------------------------
    def generate(self, snapshot: Snapshot, requests: Requests) -> Candidates:
        """Candidate rows for every request."""
        s = snapshot
        known = np.flatnonzero(s.offer_known)
        n = len(requests)
        if len(known) < self.pass_through_below:
            return Candidates(
                np.repeat(np.arange(n), len(known)),
                np.tile(known, n),
                np.zeros(n * len(known), dtype=np.int64),
            )
        proposals = [
            self._repeat(s, requests),
            self._completion(s, requests),
            self._via_categories(s, requests, self.progression_, "progression"),
            self._targeted(s, requests),
            self._popular(s, requests),
        ]
        frame = pd.concat([p for p in proposals if len(p)], ignore_index=True)
        frame = frame[s.offer_known[frame["offer"].to_numpy()]]
        # rank within each (request, generator), best first, over the generator's weight;
        # keep each offer's best rank
        frame["rank"] = (
            frame.groupby(["request", "generator"])["score"].rank(method="first", ascending=False)
            / np.asarray(self.weights)[frame["generator"].to_numpy(np.int64)]
        )
        frame["bit"] = np.left_shift(1, frame["generator"].to_numpy(np.int64))
        merged = (
            frame.sort_values("rank")
            .drop_duplicates(["request", "offer", "generator"])  # distinct bits: sum = or
            .groupby(["request", "offer"])
            .agg(rank=("rank", "min"), sources=("bit", "sum"))
            .reset_index()
        )
        merged = merged.sort_values(["request", "rank", "offer"])
        merged = merged.groupby("request").head(self.max_candidates)
        return Candidates(
            merged["request"].to_numpy(np.int64),
            merged["offer"].to_numpy(np.int64),
            merged["sources"].to_numpy(np.int64),
        )

    def _history(
        self,
        s: Snapshot,
        requests: Requests,
        keys: np.ndarray,
        width: int,
        index: Any,
        days: float | None,
    ) -> pd.DataFrame:
        """(request, item, last seconds) for the items each customer bought before the
        request (within ``days`` if given), from a (customer, item) pair vocabulary."""
        request, pair = _pairs_of_customers(keys, width, requests.customer)
        t = requests.as_of_s[request]
        last = index.last_before(pair, t)
        last_s = index.seconds_at(last)
        keep = last >= 0
        if days is not None:
            keep &= t - last_s <= days * DAY
        item = keys[pair] % width
        return pd.DataFrame(
            {
                "request": request[keep],
                "item": item[keep],
                "seconds": last_s[keep],
                "count": index.count(pair[keep], t[keep] - 365 * DAY, t[keep]),
            }
        )

    def _repeat(self, s: Snapshot, requests: Requests) -> pd.DataFrame:
        offers = self._history(
            s, requests, s.cust_offer_bought.keys, len(s.offers), s.bought_by_cust_offer, None
        )
        categories = self._category_history(s, requests, None)
        whole = self.category_offers_
        whole = whole[s.offer_products.lengths()[whole["offer"].to_numpy()] == 0]
        via_category = categories.merge(whole, left_on="item", right_on="category")
        frame = pd.concat(
            [
                pd.DataFrame(
                    {
                        "request": offers["request"],
                        "offer": offers["item"],
                        "score": offers["count"],
                    }
                ),
                pd.DataFrame(
                    {
                        "request": via_category["request"],
                        "offer": via_category["offer"],
                        "score": via_category["count"],
                    }
                ),
            ],
            ignore_index=True,
        )
        return frame.assign(generator=GENERATORS.index("repeat"))

    def _category_history(
        self, s: Snapshot, requests: Requests, days: float | None
    ) -> pd.DataFrame:
        return self._history(
            s, requests, s.cust_category.keys, len(s.categories), s.orders_by_cust_category, days
        )

    def _via_categories(
        self, s: Snapshot, requests: Requests, links: pd.DataFrame, generator: str
    ) -> pd.DataFrame:
        bought = self._category_history(s, requests, 365)
        targets = bought.merge(links, left_on="item", right_on="anchor")
        # a progression proposes only categories the customer has not bought yet
        if generator == "progression":
            width = np.int64(len(s.categories))
            owned = bought["request"].to_numpy(np.int64) * width + bought["item"].to_numpy(np.int64)
            proposed = targets["request"].to_numpy(np.int64) * width + targets["target"].to_numpy(
                np.int64
            )
            targets = targets[~np.isin(proposed, owned)]
        best = targets.groupby(["request", "target"])["score"].max().reset_index()
        offers = best.merge(self.category_offers_, left_on="target", right_on="category")
        return pd.DataFrame(
            {
                "request": offers["request"],
                "offer": offers["offer"],
                "score": offers["score"],
                "generator": GENERATORS.index(generator),
            }
        )

    def _completion(self, s: Snapshot, requests: Requests) -> pd.DataFrame:
        by_category = self._via_categories(s, requests, self.category_links_, "completion")
        recent = self._history(
            s,
            requests,
            s.cust_product.keys,
            len(s.products),
            s.orders_by_cust_product,
            self.recent_days,
        )
        targets = recent.merge(self.product_links_, left_on="item", right_on="anchor")
        best = targets.groupby(["request", "target"])["score"].max().reset_index()
        covering = self._product_offer_table(s)
        by_product = best.merge(covering, left_on="target", right_on="product")
        return pd.concat(
            [
                by_category,
                pd.DataFrame(
                    {
                        "request": by_product["request"],
                        "offer": by_product["offer"],
                        "score": by_product["score"],
                        "generator": GENERATORS.index("completion"),
                    }
                ),
            ],
            ignore_index=True,
        )

    @staticmethod
    def _product_offer_table(s: Snapshot) -> pd.DataFrame:
        owner, product = s.offer_products.expand(np.arange(len(s.offers)))
        return pd.DataFrame({"offer": owner, "product": product})

    def _targeted(self, s: Snapshot, requests: Requests) -> pd.DataFrame:
        targeted = np.flatnonzero(s.offer_audiences.lengths() > 0)
        if not len(targeted):
            return pd.DataFrame({"request": [], "offer": [], "score": [], "generator": []})
        owner, audience = s.offer_audiences.expand(targeted)
        links = pd.DataFrame({"offer": targeted[owner], "audience": audience})
        rows = self._history_members(s, requests, s.audience_pairs.keys, s.audience_pairs.width)
        joined = rows.merge(links, on="audience")
        start = s.offer_valid_from_s[joined["offer"].to_numpy()]
        # the sooner an offer starts before the moment, the more current it is
        score = -np.abs(requests.as_of_s[joined["request"].to_numpy()] - start).astype(float)
        return pd.DataFrame(
            {
                "request": joined["request"],
                "offer": joined["offer"],
                "score": score,
                "generator": GENERATORS.index("targeted"),
            }
        )

    @staticmethod
    def _history_members(
        s: Snapshot, requests: Requests, keys: np.ndarray, width: int
    ) -> pd.DataFrame:
        request, position = _pairs_of_customers(keys, width, requests.customer)
        joined_at = s.audience_index.last_before(position, requests.as_of_s[request] + 1)
        keep = joined_at >= 0
        return pd.DataFrame({"request": request[keep], "audience": keys[position[keep]] % width})

    def _popular(self, s: Snapshot, requests: Requests) -> pd.DataFrame:
        segment = s.customer_segment[requests.customer]
        frame = pd.DataFrame({"request": np.arange(len(requests)), "segment": segment})
        own = frame.merge(self.popular_, on="segment")
        overall = frame.assign(segment=-1).merge(self.popular_, on="segment")
        both = pd.concat([own, overall], ignore_index=True)
        return pd.DataFrame(
            {
                "request": both["request"],
                "offer": both["offer"],
                "score": both["score"].astype(float),
                "generator": GENERATORS.index("popular"),
            }
        )


def _pairs_of_customers(
    keys: np.ndarray, width: int, customers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each request's customer, every (customer, item) pair code it has, from the
    sorted pair keys (customer × width + item): (request index, pair code) arrays."""
    start = np.searchsorted(keys, customers * width)
    end = np.searchsorted(keys, (customers + 1) * width)
    lengths = end - start
    request = np.repeat(np.arange(len(customers)), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return request, (np.repeat(start, lengths) + within).astype(np.int64)


def next_purchase_offers(
    snapshot: Snapshot, requests: Requests, horizon_days: float
) -> pd.DataFrame:
    """(request, offer) for every offer covering a product the customer bought in
    ``[as_of, as_of + horizon)``, or a category offer of its category: what a perfect
    candidate set would hold."""
    s = snapshot
    lines = pd.DataFrame(
        {"customer": s.line_customer, "product": s.line_product, "seconds": s.line_seconds}
    )
    asks = pd.DataFrame(
        {
            "request": np.arange(len(requests)),
            "customer": requests.customer,
            "as_of": requests.as_of_s,
        }
    )
    joined = asks.merge(lines, on="customer")
    window = (joined["seconds"] >= joined["as_of"]) & (
        joined["seconds"] < joined["as_of"] + horizon_days * DAY
    )
    bought = joined.loc[window, ["request", "product"]].drop_duplicates()
    covering = CandidateGenerator._product_offer_table(s)
    by_product = bought.merge(covering, on="product")[["request", "offer"]]
    bought_category = pd.DataFrame(
        {"request": bought["request"], "category": s.product_category[bought["product"].to_numpy()]}
    )
    category_offers = np.flatnonzero((s.offer_products.lengths() == 0) & s.offer_known)
    by_category = bought_category.drop_duplicates().merge(
        pd.DataFrame({"offer": category_offers, "category": s.offer_category[category_offers]}),
        on="category",
    )[["request", "offer"]]
    truth = pd.concat([by_product, by_category], ignore_index=True).drop_duplicates()
    return truth[s.offer_known[truth["offer"].to_numpy()]].reset_index(drop=True)


def recall(candidates: Candidates, truth: pd.DataFrame) -> dict[str, float]:
    """Share of true next-purchase offers that the candidates hold: overall (micro) and
    per generator."""
    frame = pd.DataFrame(
        {"request": candidates.request, "offer": candidates.offer, "sources": candidates.sources}
    )
    joined = truth.merge(frame, on=["request", "offer"], how="left")
    found = joined["sources"].notna()
    out = {"union": float(found.mean()) if len(joined) else float("nan")}
    sources = joined["sources"].fillna(0).to_numpy(np.int64)
    for bit, name in enumerate(GENERATORS):
        out[name] = float(((sources >> bit) & 1).mean()) if len(joined) else float("nan")
    out["true_offers"] = float(len(joined))
    out["candidates_per_request"] = (
        float(frame.groupby("request").size().mean()) if len(frame) else 0.0
    )
    return out


def fit_with_one_lift(
    snapshot: Snapshot,
    reference_time: Any,
    builder: FeatureBuilder,
    generator: CandidateGenerator,
) -> tuple[FeatureBuilder, CandidateGenerator]:
    """Fit a feature builder and a candidate generator at one moment on one basket lift,
    computed once with as many anchors an item as the larger of the two needs. Both must
    count a pair of items from the same number of orders (``min_pair_orders``)."""
    if builder.min_pair_orders != generator.min_pair_orders:
        raise ValueError(
            f"the builder counts pairs from {builder.min_pair_orders} orders and the "
            f"generator from {generator.min_pair_orders}: one basket lift cannot serve both"
        )
    lift = BasketLift.fit(
        snapshot,
        reference_time,
        min_pair_orders=builder.min_pair_orders,
        top_k=max(builder.anchors_per_item, generator.links_per_item),
    )
    builder.fit(snapshot, reference_time, lift)
    generator.fit(snapshot, reference_time, lift)
    return builder, generator
