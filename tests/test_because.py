"""Every "because" is true: an oracle written by hand, independent of the registry's claims.

Thousands of offers are served (a synthetic world, and the real demo), and every phrase of
every offer is read back with a pattern written here for its feature. Its numbers must be
the words of the served row's feature value (the row is rebuilt, and its SHAP contributions
recomputed with ``pred_contrib``), the condition the phrase asserts must hold, and what can
be recomputed from the raw tables with plain pandas is (days since, counts, shares of spend,
basket lift, popularity rank among offers of the kind, acceptances). A single false phrase
fails. Nothing here imports ``phrase`` or the registry's claims.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from features import (
    FeatureBuilder,
    FeatureMatrix,
    Requests,
    ScenarioConfig,
    Snapshot,
    Workspace,
    load_snapshot,
    make_world,
    row_context,
    write_world,
)
from policy import load_rules
from runtime.registry import ModelBundle
from serving.assembly import build_recommender
from serving.engine import Recommender
from serving.settings import ServingSettings
from training.config import load_config
from training.pipeline import train

DAY = 86_400
KIND_WORDS = {
    "item": "product offers",
    "category": "category offers",
    "coupon": "coupons",
    "bundle": "bundles",
}
ACCEPTED = ("accepted", "redeemed", "purchased")
# what a phrase may rest on besides its own feature, set by the builder's defaults
POST_PURCHASE_HOURS, CART_ABANDON_HOURS, LOYALTY_DAYS, POPULARITY_DAYS = 48, 4, 7, 30
SLACK_DAYS = 10 / DAY  # float32 day counts near a year are good to a few seconds

# -- reading numbers back out of words -------------------------------------------------------

AGO = r"(?P<ago>less than a day ago|a day ago|[\d,]+ days ago)"
TIMES = r"(?P<times>once|twice|[\d,]+ times)"
PCT = r"(?P<pct>\d+)%"
RATIO = r"(?P<ratio>\d+\.\d) times as often as the average basket"


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def ago_span(text: str) -> tuple[float, float]:
    """The whole days "N days ago" asserts: [N, N + 1)."""
    if text == "less than a day ago":
        return 0.0, 1.0
    if text == "a day ago":
        return 1.0, 2.0
    n = _int(text.split()[0])
    assert n >= 2, f"{text!r}: 0 or 1 days are said in words"
    return float(n), n + 1.0


def every_span(text: str) -> tuple[float, float]:
    if text == "every day":
        return 1.0, 2.0
    n = _int(text.split()[1])
    assert n >= 2, f"{text!r}: 'every day' is said in words"
    return float(n), n + 1.0


def count_of(text: str) -> int:
    if text in ("once", "twice"):
        return 1 if text == "once" else 2
    n = _int(text.split()[0])
    assert n >= 3, f"{text!r}: 1 and 2 are 'once' and 'twice'"
    return n


def pct_span(text: str) -> tuple[float, float]:
    n = int(text)
    assert n >= 1, f"{text}%: a share is never printed as 0 %"
    return n / 100, (n + 1) / 100


def ratio_span(text: str) -> tuple[float, float]:
    x = float(text)
    return x, x + 0.1


def within(value: float, span: tuple[float, float], slack: float = 1e-5) -> bool:
    return span[0] - slack <= value < span[1] + slack


# -- the world the phrases are about, from the raw tables -------------------------------------


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    # plain object columns: the oracle slices small frames thousands of times, and
    # Arrow-backed strings make each slice slow
    text = [c for c in frame.columns if frame[c].dtype.kind not in "biufcmM"]
    return frame.astype({c: object for c in text})


def _seconds(times: pd.Series) -> np.ndarray:
    return ((times - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


class Raw:
    """The workspace's tables in plain pandas, indexed by customer."""

    def __init__(self, workspace: Workspace) -> None:
        tables = workspace.read_all()
        products = tables["products"].set_index("product_id")
        self.products = products
        self.title = products["title"].where(products["title"].notna(), products.index.to_series())
        orders = tables["orders"]
        lines = orders[orders["quantity"] > 0].copy()
        info = products.reindex(lines["product_id"])
        lines["s"] = _seconds(lines["ordered_at"])
        lines["amount"] = lines["amount"].astype("float64").fillna(0.0)
        lines["title"] = self.title.reindex(lines["product_id"]).to_numpy()
        for column in ("category", "department", "family", "ladder"):
            lines[column] = info[column].to_numpy()
        lines["step"] = info["ladder_step"].astype("float64").to_numpy()
        lines["order"] = pd.factorize(
            lines["order_id"].astype(str) + "|" + lines["customer_id"].astype(str)
        )[0]
        self.lines = _plain(lines)
        self.lines_by_customer = dict(tuple(self.lines.groupby("customer_id")))
        events = tables["events"].copy()
        events["s"] = _seconds(events["occurred_at"])
        # a view names its category, else its product's
        events["category"] = events["category"].where(
            events["category"].notna(),
            products["category"].reindex(events["product_id"]).to_numpy(),
        )
        self.events_by_customer = dict(tuple(_plain(events).groupby("customer_id")))
        offers = tables["offers"].set_index("offer_id")
        self.offers = offers
        self.compatibility = tables["compatibility"]
        exposures = tables["exposures"]
        self.shown = exposures[~exposures["holdout"].astype(bool)]
        outcomes = tables["outcomes"]
        accepted = outcomes[outcomes["outcome"].isin(ACCEPTED)].copy()
        accepted["s"] = _seconds(accepted["occurred_at"])
        # one acceptance per customer, offer and day (redeemed and purchased are one)
        accepted = accepted.assign(day=accepted["s"] // DAY).drop_duplicates(
            ["customer_id", "offer_id", "day"]
        )
        self.accepted = {
            str(o): np.sort(g.to_numpy()) for o, g in accepted.groupby("offer_id")["s"]
        }
        self._popularity: dict[int, pd.Series] = {}
        self._valid: dict[int, pd.DataFrame] = {}
        self._orders_by_category: dict[int, tuple[int, dict[str, np.ndarray]]] = {}
        self._lines: dict[tuple[str, int], pd.DataFrame] = {}
        self._lifts: dict[tuple[str, str, int], float] = {}
        self._peers: dict[tuple[int, str], np.ndarray] = {}

    def customer_lines(self, customer: str, t: int) -> pd.DataFrame:
        """The customer's order lines strictly before ``t``."""
        key = (customer, t)
        if key not in self._lines:
            lines = self.lines_by_customer.get(customer, self.lines.iloc[:0])
            self._lines[key] = lines[lines["s"].to_numpy() < t]
        return self._lines[key]

    def customer_events(self, customer: str, t: int, kind: str) -> pd.DataFrame:
        events = self.events_by_customer.get(customer)
        if events is None:
            return pd.DataFrame({"s": [], "product_id": [], "category": [], "value": []})
        return events[(events["s"].to_numpy() < t) & (events["event_type"].to_numpy() == kind)]

    def offer_category(self, offer: str) -> str:
        row = self.offers.loc[offer]
        if isinstance(row["category"], str):
            return row["category"]
        return str(self.products.loc[row["product_ids"][0], "category"])

    def offer_department(self, offer: str) -> str:
        row = self.offers.loc[offer]
        if isinstance(row["department"], str):
            return row["department"]
        return str(self.products.loc[row["product_ids"][0], "department"])

    def valid_offers(self, t: int) -> pd.DataFrame:
        """The offers valid at ``t`` (valid_from ≤ t ≤ valid_to, to the second)."""
        if t not in self._valid:
            offers = self.offers
            start = offers["valid_from"].map(lambda v: -math.inf if pd.isna(v) else v.timestamp())
            end = offers["valid_to"].map(lambda v: math.inf if pd.isna(v) else v.timestamp())
            valid = (np.floor(start) <= t) & (t <= np.floor(end)) & offers["kind"].notna()
            self._valid[t] = offers[valid]
        return self._valid[t]

    def popularity(self, t: int) -> pd.Series:
        """Order lines of each offer's products (a category offer: of its category) by all
        customers in the popularity window before ``t``."""
        if t not in self._popularity:
            lines = self.lines[
                (self.lines["s"] >= t - POPULARITY_DAYS * DAY) & (self.lines["s"] < t)
            ]
            by_product = lines["product_id"].value_counts()
            by_category = lines["category"].value_counts()
            counts = {}
            for offer, row in self.offers.iterrows():
                products = list(row["product_ids"])
                counts[offer] = (
                    int(by_product.reindex(products).fillna(0).sum())
                    if products
                    else int(by_category.get(self.offer_category(str(offer)), 0))
                )
            self._popularity[t] = pd.Series(counts)
        return self._popularity[t]

    def peer_popularity(self, t: int, kind: str) -> np.ndarray:
        """The popularity of every offer of ``kind`` valid at ``t``."""
        key = (t, kind)
        if key not in self._peers:
            valid = self.valid_offers(t)
            self._peers[key] = self.popularity(t)[valid.index[valid["kind"] == kind]].to_numpy()
        return self._peers[key]

    def times_accepted(self, offer: str, t: int) -> int:
        return int(np.searchsorted(self.accepted.get(offer, np.zeros(0)), t))

    def lift(self, anchor: str, target: str, reference: int) -> float:
        """Basket lift(anchor → target) between categories over orders before
        ``reference``: P(target | anchor) / P(target), a category counted once per order."""
        key = (anchor, target, reference)
        if key not in self._lifts:
            self._lifts[key] = self._category_lift(anchor, target, reference)
        return self._lifts[key]

    def _category_lift(self, anchor: str, target: str, reference: int) -> float:
        if reference not in self._orders_by_category:
            before = self.lines[self.lines["s"] < reference]
            orders = {c: np.unique(g.to_numpy()) for c, g in before.groupby("category")["order"]}
            self._orders_by_category[reference] = (before["order"].nunique(), orders)
        n, orders = self._orders_by_category[reference]
        a, b = orders[anchor], orders[target]
        return len(np.intersect1d(a, b, assume_unique=True)) * n / (len(a) * len(b))

    def product_lift(self, anchor: str, target: str, reference: int) -> float:
        before = self.lines[self.lines["s"] < reference]
        a = set(before.loc[before["product_id"] == anchor, "order"])
        b = set(before.loc[before["product_id"] == target, "order"])
        return len(a & b) * before["order"].nunique() / (len(a) * len(b))


@dataclass
class Served:
    """One phrase of one served offer, with everything the oracle checks it against."""

    raw: Raw
    customer: str
    offer: str
    t: int
    reference: int
    context: dict[str, Any]
    values: dict[str, float]  # the served row's features, rebuilt
    shap: dict[str, float]
    reason: dict[str, Any]
    catalogue: pd.DataFrame  # every offer at t: kind, valid, popularity, acceptance

    @property
    def feature(self) -> str:
        return str(self.reason["feature"])

    @property
    def value(self) -> float:
        return self.values[self.feature]

    @cached_property
    def lines(self) -> pd.DataFrame:
        return self.raw.customer_lines(self.customer, self.t)

    @cached_property
    def category(self) -> str:
        return self.raw.offer_category(self.offer)

    @property
    def products(self) -> list[str]:
        return list(self.raw.offers.loc[self.offer, "product_ids"])

    @property
    def kind(self) -> str:
        return str(self.raw.offers.loc[self.offer, "kind"])

    def days_since(self, seconds: float) -> float:
        return (self.t - seconds) / DAY

    def in_year(self, lines: pd.DataFrame) -> pd.DataFrame:
        return lines[lines["s"] >= self.t - 365 * DAY]


Check = Callable[[Served, "re.Match[str]"], None]
CLAIMS: dict[str, list[tuple[re.Pattern[str], Check]]] = {}


def claim(feature: str, pattern: str) -> Callable[[Check], Check]:
    """A phrase feature ``feature`` may say (``pattern``) and what makes it true (the check)."""

    def register(check: Check) -> Check:
        CLAIMS.setdefault(feature, []).append((re.compile(pattern), check))
        return check

    return register


def _said(name: object) -> str:
    """A category or department as a sentence names it: title case, one space apart."""
    return " ".join(str(name).split()).title()


def _same(name: str, expected: str) -> None:
    assert name == _said(expected) or name == str(expected), (name, expected)


def _last_bought(o: Served, m: re.Match[str], lines: pd.DataFrame) -> None:
    """ "you bought X N days ago": X is among the products of the latest of ``lines``, and
    the latest was N whole days ago (and so is the row's feature)."""
    span = ago_span(m["ago"])
    assert within(o.value, span, SLACK_DAYS), (o.value, m["ago"])
    assert len(lines), "nothing of the kind was bought"
    last = lines["s"].max()
    assert within(o.days_since(last), span, SLACK_DAYS), (o.days_since(last), m["ago"])
    assert m["product"] in set(lines.loc[lines["s"] == last, "title"]), m["product"]


# compatibility ------------------------------------------------------------------------------


@claim(
    "copurchase_lift",
    rf"baskets with (?P<anchor>.+), which you bought in the past year, hold (?P<category>.+) "
    rf"{RATIO}",
)
def _copurchase_lift(o: Served, m: re.Match[str]) -> None:
    assert o.value >= 1.5
    assert within(o.value, ratio_span(m["ratio"]), 1e-4)
    _same(m["category"], o.category)
    anchors = o.in_year(o.lines)
    bought = {_said(c): c for c in anchors["category"].dropna()}
    assert m["anchor"] in bought, f"{m['anchor']} not bought in the past year"
    lift = o.raw.lift(bought[m["anchor"]], o.category, o.reference)
    assert lift == pytest.approx(o.value, rel=1e-5)


def _latest(lines: pd.DataFrame) -> pd.DataFrame:
    return lines[lines["s"] == lines["s"].max()]


@claim("days_since_anchor_purchase", rf"you bought (?P<product>.+?) {AGO}")
def _days_since_anchor(o: Served, m: re.Match[str]) -> None:
    span = ago_span(m["ago"])
    assert within(o.value, span, SLACK_DAYS) and o.value <= 365 + SLACK_DAYS
    # the product is among the last purchase in its category, N days ago
    categories = set(o.lines.loc[o.lines["title"] == m["product"], "category"].dropna())
    last = [_latest(o.lines[o.lines["category"] == c]) for c in categories]
    assert any(
        within(o.days_since(lines["s"].iloc[0]), span, SLACK_DAYS)
        and m["product"] in set(lines["title"])
        for lines in last
    ), f"no category whose last purchase was {m['product']} {m['ago']}"


@claim(
    "item_copurchase_lift",
    rf"baskets with (?P<anchor>.+), which you bought in the past year, hold (?P<item>.+) {RATIO}",
)
def _item_copurchase_lift(o: Served, m: re.Match[str]) -> None:
    assert o.value >= 1.5 and len(o.products) == 1
    assert within(o.value, ratio_span(m["ratio"]), 1e-4)
    assert m["item"] == o.raw.title[o.products[0]]
    anchors = o.in_year(o.lines)
    ids = set(anchors.loc[anchors["title"] == m["anchor"], "product_id"])
    assert ids, f"{m['anchor']} not bought in the past year"
    lifts = [o.raw.product_lift(a, o.products[0], o.reference) for a in ids]
    assert any(lift == pytest.approx(o.value, rel=1e-5) for lift in lifts)


@claim("days_since_item_anchor_purchase", rf"you bought (?P<product>.+?) {AGO}")
def _days_since_item_anchor(o: Served, m: re.Match[str]) -> None:
    ids = set(o.lines.loc[o.lines["title"] == m["product"], "product_id"])
    assert any(
        within(o.days_since(o.lines.loc[o.lines["product_id"] == p, "s"].max()), ago_span(m["ago"]))
        for p in ids
    )
    assert within(o.value, ago_span(m["ago"]), SLACK_DAYS)


def _completes(o: Served, m: re.Match[str]) -> None:
    pairs = o.raw.compatibility[o.raw.compatibility["relation"] == "completes"]
    completed = set(pairs.loc[pairs["related_product_id"].isin(o.products), "product_id"])
    _last_bought(o, m, o.lines[o.lines["product_id"].isin(completed)])


@claim("days_since_compatible_purchase", rf"it completes the (?P<product>.+) you bought {AGO}")
def _completes_one(o: Served, m: re.Match[str]) -> None:
    assert len(o.products) == 1
    _completes(o, m)


@claim(
    "days_since_compatible_purchase",
    rf"it holds a product that completes the (?P<product>.+) you bought {AGO}",
)
def _completes_many(o: Served, m: re.Match[str]) -> None:
    assert len(o.products) >= 2
    _completes(o, m)


@claim("family_owned", r"it is from the (?P<family>.+) range, which you already bought from")
def _family_owned(o: Served, m: re.Match[str]) -> None:
    assert o.value == 1
    assert o.raw.products.loc[o.products[0], "family"] == m["family"]
    assert (o.lines["family"] == m["family"]).any()


def _ladder(o: Served) -> tuple[str, float]:
    first = o.raw.products.loc[o.products[0]]
    owned = o.lines.loc[o.lines["ladder"] == first["ladder"], "step"].max()
    assert float(first["ladder_step"]) == owned + 1 and owned >= 1, (first["ladder_step"], owned)
    return str(first["ladder"]), float(owned)


@claim("is_next_ladder_step", r"it is the next step up from your (?P<product>.+)")
def _next_step_named(o: Served, m: re.Match[str]) -> None:
    assert o.value == 1
    ladder, owned = _ladder(o)
    mine = o.lines[(o.lines["ladder"] == ladder) & (o.lines["title"] == m["product"])]
    assert (mine["step"] == owned).any(), f"{m['product']} is not the highest step owned"


@claim("is_next_ladder_step", r"it is the next step up from what you own in its range")
def _next_step(o: Served, m: re.Match[str]) -> None:
    assert o.value == 1
    _ladder(o)


# recency --------------------------------------------------------------------------------------


@claim("days_since_category_purchase", rf"you bought (?P<category>.+?) {AGO}")
def _days_since_category(o: Served, m: re.Match[str]) -> None:
    _same(m["category"], o.category)
    mine = o.lines[o.lines["category"] == o.category]
    span = ago_span(m["ago"])
    assert within(o.value, span, SLACK_DAYS)
    assert within(o.days_since(mine["s"].max()), span, SLACK_DAYS)


@claim("days_since_offer_product_purchase", rf"you bought (?P<product>.+?) {AGO}")
def _days_since_offer_product(o: Served, m: re.Match[str]) -> None:
    _last_bought(o, m, o.lines[o.lines["product_id"].isin(o.products)])


def _window(o: Served, seconds: pd.Series, limit: float) -> None:
    assert o.value == 1
    assert len(seconds) and o.t - seconds.max() <= limit, "nothing in the window"


@claim("in_post_purchase_window", r"you placed an order in the last (?P<hours>\d+) hours")
def _post_purchase(o: Served, m: re.Match[str]) -> None:
    assert int(m["hours"]) == POST_PURCHASE_HOURS
    _window(o, o.lines["s"], POST_PURCHASE_HOURS * 3600)


@claim("in_cart_abandon_window", r"you left items in a cart in the last (?P<hours>\d+) hours")
def _cart_abandon(o: Served, m: re.Match[str]) -> None:
    assert int(m["hours"]) == CART_ABANDON_HOURS
    events = o.raw.customer_events(o.customer, o.t, "cart_abandon")
    _window(o, events["s"], CART_ABANDON_HOURS * 3600)


@claim(
    "loyalty_milestone_recent", r"you moved to a new loyalty tier in the last (?P<days>\d+) days"
)
def _loyalty(o: Served, m: re.Match[str]) -> None:
    assert int(m["days"]) == LOYALTY_DAYS
    events = o.raw.customer_events(o.customer, o.t, "loyalty_tier_change")
    _window(o, events["s"], LOYALTY_DAYS * DAY)


# usage ------------------------------------------------------------------------------------------


@claim("orders_365d", r"you placed (?P<orders>one order|[\d,]+ orders) with us in the past year")
def _orders_365d(o: Served, m: re.Match[str]) -> None:
    n = 1 if m["orders"] == "one order" else _int(m["orders"].split()[0])
    assert n >= 1 and (m["orders"] == "one order") == (n == 1)
    assert o.value == n
    assert o.in_year(o.lines)["order"].nunique() == n


def _covered_purchases(o: Served, m: re.Match[str]) -> None:
    n = count_of(m["times"])
    assert o.value == n
    assert o.in_year(o.lines)["product_id"].isin(o.products).sum() == n


@claim("offer_product_purchases_365d", rf"you bought (?P<product>.+) {TIMES} in the past year")
def _offer_product_purchases(o: Served, m: re.Match[str]) -> None:
    # one named product: only for an offer of exactly that product
    assert len(o.products) == 1 and m["product"] == o.raw.title[o.products[0]]
    _covered_purchases(o, m)


@claim(
    "offer_product_purchases_365d",
    rf"you bought products this offer covers {TIMES} in the past year",
)
def _offer_products_purchases(o: Served, m: re.Match[str]) -> None:
    assert len(o.products) >= 2
    _covered_purchases(o, m)


@claim("category_orders_365d", rf"you bought (?P<category>.+) {TIMES} in the past year")
def _category_orders(o: Served, m: re.Match[str]) -> None:
    _same(m["category"], o.category)
    n = count_of(m["times"])
    assert o.value == n
    mine = o.in_year(o.lines)
    assert mine.loc[mine["category"] == o.category, "order"].nunique() == n


@claim(
    "category_replenishment_due",
    rf"you buy (?P<category>.+) about (?P<every>every day|every [\d,]+ days) and last bought "
    rf"it {AGO}",
)
def _replenishment(o: Served, m: re.Match[str]) -> None:
    _same(m["category"], o.category)
    mine = o.lines[o.lines["category"] == o.category]
    orders = mine["order"].nunique()
    assert orders >= 2
    # the mean gap between the orders that held the category
    cycle = (mine["s"].max() - mine["s"].min()) / (orders - 1) / DAY
    since = o.days_since(mine["s"].max())
    assert since >= cycle - SLACK_DAYS, "not due: the last purchase is within the usual gap"
    assert within(cycle, every_span(m["every"]), SLACK_DAYS)
    assert within(since, ago_span(m["ago"]), SLACK_DAYS)
    assert within(o.values["category_cycle_days"], every_span(m["every"]), SLACK_DAYS)
    assert o.value >= 1


@claim(
    "offer_product_order_share", rf"(?P<product>.+) was in {PCT} of your orders in the past year"
)
def _offer_product_share(o: Served, m: re.Match[str]) -> None:
    assert len(o.products) == 1 and m["product"] == o.raw.title[o.products[0]]
    year = o.in_year(o.lines)
    holding = year.loc[year["product_id"].isin(o.products), "order"].nunique()
    share = holding / year["order"].nunique()
    assert within(share, pct_span(m["pct"])), (share, m["pct"])
    assert within(o.value, pct_span(m["pct"]))


@claim(
    "offer_product_due",
    rf"you buy (?P<product>.+) about (?P<every>every day|every [\d,]+ days) and your last was "
    rf"{AGO}",
)
def _item_replenishment(o: Served, m: re.Match[str]) -> None:
    assert len(o.products) == 1 and m["product"] == o.raw.title[o.products[0]]
    mine = o.lines[o.lines["product_id"].isin(o.products)]
    orders = mine["order"].nunique()
    assert orders >= 2
    # the mean gap between the orders that held the product, and the last of them
    cycle = (mine["s"].max() - mine["s"].min()) / (orders - 1) / DAY
    since = o.days_since(mine["s"].max())
    assert within(cycle, every_span(m["every"]), SLACK_DAYS), (cycle, m["every"])
    assert within(since, ago_span(m["ago"]), SLACK_DAYS), (since, m["ago"])
    # said only once at least half the cycle has passed (a cycle under a day counts as one)
    assert since >= 0.5 * max(cycle, 1.0) - SLACK_DAYS


def _usage(o: Served, product: str) -> float:
    family = o.raw.products.loc[o.products[0], "family"]
    readings = o.raw.customer_events(o.customer, o.t, "usage")
    readings = readings[
        o.raw.products.reindex(readings["product_id"])["family"].to_numpy() == family
    ]
    last = readings[readings["s"] == readings["s"].max()]
    assert product in set(o.raw.title.reindex(last["product_id"])), product
    return float(last["value"].iloc[-1])


@claim(
    "usage_level",
    rf"your (?P<product>.+) was at {PCT} of its capacity at its last reading",
)
def _usage_level(o: Served, m: re.Match[str]) -> None:
    share = pct_span(m["pct"])
    assert share[0] >= 0.5 and within(o.value, share)
    assert within(_usage(o, m["product"]), share)


@claim("usage_milestone", rf"your (?P<product>.+) reached {PCT} of its capacity")
def _usage_milestone(o: Served, m: re.Match[str]) -> None:
    assert o.value == 1 and m["pct"] == "75"
    assert _usage(o, m["product"]) >= 0.75


def _views(o: Served, m: re.Match[str]) -> int:
    _same(m["category"], o.category)
    views = o.raw.customer_events(o.customer, o.t, "view")
    recent = views["s"].to_numpy() >= o.t - 30 * DAY
    n = count_of(m["times"])
    assert int((views["category"].to_numpy()[recent] == o.category).sum()) == n
    assert o.values["category_views_30d"] == n
    return n


@claim("category_views_30d", rf"you looked at (?P<category>.+) {TIMES} in the last 30 days")
def _category_views(o: Served, m: re.Match[str]) -> None:
    _views(o, m)


@claim("browsing_intent", rf"you looked at (?P<category>.+) {TIMES} in the last 30 days")
def _browsing(o: Served, m: re.Match[str]) -> None:
    assert o.value == 1 and _views(o, m) >= 3


# category mix ----------------------------------------------------------------------------------


def _share(o: Served, m: re.Match[str], column: str, name: str, level: float) -> None:
    _same(m[column], name)
    share = pct_span(m["pct"])
    assert share[0] >= level, f"{m['pct']}% is below the stated level {level:.0%}"
    assert within(o.value, share)
    year = o.lines["s"].to_numpy() >= o.t - 365 * DAY
    amount = o.lines["amount"].to_numpy()[year]
    raw = amount[o.lines[column].to_numpy()[year] == name].sum() / amount.sum()
    assert within(raw, share)


@claim(
    "category_spend_share",
    rf"(?P<category>.+) is {PCT} of what you spent with us in the past year",
)
def _category_share(o: Served, m: re.Match[str]) -> None:
    _share(o, m, "category", o.category, 0.10)


@claim(
    "department_spend_share",
    rf"(?P<department>.+) is {PCT} of what you spent with us in the past year",
)
def _department_share(o: Served, m: re.Match[str]) -> None:
    _share(o, m, "department", o.raw.offer_department(o.offer), 0.25)


@claim("category_is_new", r"you have not bought (?P<category>.+) from us before")
def _category_new(o: Served, m: re.Match[str]) -> None:
    _same(m["category"], o.category)
    assert o.value == 1
    assert not (o.lines["category"] == o.category).any()


# offer -----------------------------------------------------------------------------------------


@claim("offer_discount", r"it saves you (?P<money>[\d,]+\.\d\d)")
def _discount(o: Served, m: re.Match[str]) -> None:
    assert o.value > 0
    assert float(m["money"].replace(",", "")) == round(o.value, 2)
    assert o.raw.offers.loc[o.offer, "discount"] == pytest.approx(o.value, rel=1e-6)


@claim(
    "offer_popularity_30d",
    r"it is in the top fifth of our (?P<kind>coupons|bundles|product offers|category offers) "
    r"by purchases in the last 30 days",
)
def _popular(o: Served, m: re.Match[str]) -> None:
    assert m["kind"] == KIND_WORDS[o.kind]
    assert o.raw.popularity(o.t)[o.offer] == o.value >= 1
    peers = o.raw.peer_popularity(o.t, o.kind)
    # the top fifth: fewer than a fifth of the kind's offers valid now sell more
    assert (peers > o.value).sum() < len(peers) / 5, (int((peers > o.value).sum()), len(peers))


@claim(
    "offer_acceptance_rate",
    r"customers accept it more often than most of our "
    r"(?P<kind>coupons|bundles|product offers|category offers)",
)
def _accepted(o: Served, m: re.Match[str]) -> None:
    assert m["kind"] == KIND_WORDS[o.kind]
    peers = o.catalogue[o.catalogue["valid"] & (o.catalogue["kind"] == o.kind)]
    # "most": more than half of the kind's offers valid now have a lower rate
    assert (peers["acceptance"] < np.float32(o.value)).sum() > len(peers) / 2
    assert o.raw.times_accepted(o.offer, o.t) >= 1


# context ---------------------------------------------------------------------------------------


def _context_lift(o: Served, m: re.Match[str], products: list[str]) -> None:
    assert o.value >= 1.5
    assert within(o.value, ratio_span(m["ratio"]), 1e-4)
    _same(m["category"], o.category)
    assert m["product"] in {o.raw.title[p] for p in products}, m["product"]
    named = [p for p in products if o.raw.title[p] == m["product"]]
    categories = {str(o.raw.products.loc[p, "category"]) for p in named}
    assert any(m["other"] in (c, _said(c)) for c in categories), m["other"]
    lift = o.raw.lift(
        next(c for c in categories if m["other"] in (c, _said(c))), o.category, o.reference
    )
    assert lift == pytest.approx(o.value, rel=1e-5)


@claim(
    "page_product_lift",
    rf"baskets with (?P<other>.+), like the (?P<product>.+) on this page, hold (?P<category>.+) "
    rf"{RATIO}",
)
def _page_lift(o: Served, m: re.Match[str]) -> None:
    _context_lift(o, m, [o.context["product_id"]])


@claim(
    "cart_lift",
    rf"baskets with (?P<other>.+), like the (?P<product>.+) in your cart, hold (?P<category>.+) "
    rf"{RATIO}",
)
def _cart_lift(o: Served, m: re.Match[str]) -> None:
    _context_lift(o, m, list(o.context["cart"]))


# a cold start is ranked by popularity alone, and says how popular
COLD_START = re.compile(
    r"Because we have no orders from you yet, we show what sells most: customers bought "
    rf"(?P<what>.+) {TIMES} in the last 30 days\."
)
LEADS = {
    "model": "There is no single reason we can state for this offer",
    "rules_only": "One of our current offers",
}


def check_cold_start(o: Served, because: str) -> None:
    m = COLD_START.fullmatch(because)
    assert m, because
    n = count_of(m["times"])
    assert o.value == n == o.raw.popularity(o.t)[o.offer]
    products = o.products
    if not products:
        _same(m["what"], o.category)
    elif len(products) == 1:
        assert m["what"] == o.raw.title[products[0]]
    else:
        assert m["what"] == "the products it covers"


def check_phrase(o: Served) -> None:
    text = o.reason["text"]
    claims = CLAIMS.get(o.feature)
    assert claims, f"no hand-written claim for feature {o.feature}: {text!r}"
    readings = [(m, check) for p, check in claims if (m := p.fullmatch(text))]
    assert readings, f"{o.feature}: {text!r} is not a phrase this test knows"
    # true if one reading is (a product name may look like another phrase's words)
    errors = []
    for m, check in readings:
        try:
            check(o, m)
            return
        except AssertionError as error:
            errors.append(error)
    raise errors[0]


# -- serving and checking ---------------------------------------------------------------------


@dataclass
class Tally:
    phrases: int = 0
    offers: int = 0
    facts: int = 0
    features: Counter[str] = field(default_factory=Counter)
    claims: Counter[str] = field(default_factory=Counter)  # of every claim, said or not
    false: list[str] = field(default_factory=list)


def serve_and_check(
    recommender: Recommender,
    raw: Raw,
    customers: list[str],
    channel: str,
    placement: str,
    contexts: list[dict[str, Any]],
    tally: Tally,
    *,
    as_of: Any = None,
    k: int = 5,
    every_claim: int = 0,
) -> None:
    """Serve, rebuild every served row, and check every phrase of every offer; with
    ``every_claim`` = n, also every claim the registry would make on every n-th row,
    whatever its contribution (claims the model happens not to pick are checked too)."""
    answers = recommender.recommend_many(
        customers,
        channel=channel,
        placement=placement,
        contexts=contexts,
        k=k,
        as_of=as_of,
        log_exposure=False,
    )
    s = recommender.snapshot
    t = int(pd.Timestamp(answers[0]["as_of"]).value // 10**9)
    builder = recommender.builder_for(t)
    served = [(i, o) for i, a in enumerate(answers) for o in a["offers"]]
    if not served:
        return
    requests = Requests.build(
        s,
        customers,
        [pd.Timestamp(t, unit="s")] * len(customers),
        channel=[channel] * len(customers),
        placement=[placement] * len(customers),
        moment=[c.get("moment") for c in contexts],
        page_product=[c.get("product_id") for c in contexts],
        cart=[list(c.get("cart") or []) for c in contexts],
    )
    rows = np.array([i for i, _ in served], dtype=np.int64)
    offers = s.offers.encode([o["offer_id"] for _, o in served])
    matrix = builder.build(s, requests, rows, offers)
    bundle = recommender.model.bundle
    shap = (
        np.asarray(bundle.booster.predict(matrix.values, pred_contrib=True))[:, :-1]
        if bundle is not None
        else None
    )
    catalogue = _catalogue(s, builder, raw, t)
    for n, (i, offer) in enumerate(served):
        mode = answers[i]["model"]["mode"]
        values = dict(zip(matrix.names, matrix.values[n].astype(np.float64).tolist(), strict=True))
        contributions = (
            {} if shap is None else dict(zip(matrix.names, shap[n].tolist(), strict=True))
        )
        tally.offers += 1
        reasons = offer["reasons"]
        for reason in reasons:
            o = Served(
                raw,
                customers[i],
                offer["offer_id"],
                t,
                builder.reference_seconds_,
                contexts[i],
                values,
                contributions,
                reason,
                catalogue,
            )
            try:
                assert set(reason) == {"feature", "value", "shap", "text", "role"}
                assert reason["value"] == values[reason["feature"]], "value is not the matrix's"
                if mode == "model" and reason["role"] == "reason":
                    assert reason["shap"] == pytest.approx(contributions[o.feature], abs=1e-9)
                    assert contributions[o.feature] > 0, "a reason with no positive SHAP"
                elif mode == "model":  # a fact: its SHAP is reported, never positive-only
                    assert reason["shap"] == pytest.approx(contributions[o.feature], abs=1e-9)
                else:
                    assert reason["shap"] is None
                if mode == "cold_start" and reason["role"] == "reason":
                    check_cold_start(o, offer["because"])
                else:
                    check_phrase(o)
            except AssertionError as error:
                tally.false.append(
                    f"{customers[i]} {offer['offer_id']} [{mode}] {reason['feature']}="
                    f"{values[reason['feature']]:.6g}: {reason['text']!r}: {error}"
                )
            tally.phrases += 1
            tally.features[reason["feature"]] += 1
        _check_sentence(offer, mode, tally, f"{customers[i]} {offer['offer_id']}")
        if every_claim and n % every_claim == 0:
            context = row_context(s, builder, matrix, n)
            for statement in context.true_statements(matrix.names):
                o = Served(
                    raw,
                    customers[i],
                    offer["offer_id"],
                    t,
                    builder.reference_seconds_,
                    contexts[i],
                    values,
                    contributions,
                    {"feature": statement.feature, "text": statement.text},
                    catalogue,
                )
                try:
                    check_phrase(o)
                except AssertionError as error:
                    tally.false.append(
                        f"{customers[i]} {offer['offer_id']} (any claim) {statement.feature}="
                        f"{statement.value:.6g}: {statement.text!r}: {error}"
                    )
                tally.claims[statement.feature] += 1


def _check_sentence(offer: dict[str, Any], mode: str, tally: Tally, who: str) -> None:
    """The sentence is its phrases and nothing else; a fact is never called the reason."""
    reasons = offer["reasons"]
    roles = [r["role"] for r in reasons]
    texts = [r["text"] for r in reasons]
    if mode == "cold_start" and roles == ["reason"]:
        return
    if roles and set(roles) == {"reason"}:
        expected = f"Because {' and '.join(texts)}."
    elif roles == ["fact"]:
        tally.facts += 1
        expected = (
            f"{LEADS['model' if mode == 'model' else 'rules_only']}; for context, {texts[0]}."
        )
    else:
        expected = {"model": LEADS["model"] + ".", "rules_only": LEADS["rules_only"] + "."}.get(
            mode, "We have no orders from you yet; this is one of our current offers."
        )
        assert roles == [], roles
    if offer["because"] != expected:
        tally.false.append(f"{who} [{mode}]: {offer['because']!r} is not {expected!r}")
    if mode != "model" and "reason" in roles and mode != "cold_start":
        tally.false.append(f"{who} [{mode}]: a reason without a model")


def _catalogue(s: Snapshot, builder: FeatureBuilder, raw: Raw, t: int) -> pd.DataFrame:
    """Every offer's acceptance rate at ``t`` (it does not depend on the customer), from a
    feature matrix of one customer × every offer."""
    offers = np.flatnonzero(s.offer_known)
    requests = Requests.build(s, ["nobody-at-all"], [pd.Timestamp(t, unit="s")])
    matrix: FeatureMatrix = builder.build(s, requests, np.zeros(len(offers), np.int64), offers)
    ids = s.offers.decode(offers)
    valid = raw.valid_offers(t)
    return pd.DataFrame(
        {
            "kind": raw.offers.loc[ids, "kind"].to_numpy(),
            "valid": np.isin(ids, valid.index),
            "acceptance": matrix.values[:, matrix.names.index("offer_acceptance_rate")],
        },
        index=ids,
    )


def _bundle(workspace: Workspace, snapshot: Snapshot, **config: Any) -> ModelBundle:
    from model_helpers import bundle_of

    result = train(snapshot, load_rules(), load_config(None, **config))
    return bundle_of(result, workspace, load_rules())


def _recommender(
    workspace: Workspace, snapshot: Snapshot, bundle: ModelBundle | None, db: Path, **settings: Any
) -> Recommender:
    return build_recommender(
        ServingSettings(**({"holdout_share": 0.0, "db_url": f"sqlite:///{db}"} | settings)),
        workspace=workspace,
        bundle=bundle,
        snapshot=snapshot,
        blocks=[],
    )


def _contexts(
    rng: np.random.Generator, raw: Raw, customers: list[str], t: int
) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """Channels and placements, with a page product or a cart drawn from what sells."""
    recent = raw.lines[raw.lines["s"] < t]
    popular = recent["product_id"].value_counts().index[:300].to_numpy()
    n = len(customers)
    yield "web", "home", [{} for _ in range(n)]
    yield "web", "pdp", [{"product_id": str(p)} for p in rng.choice(popular, n)]
    yield "web", "cart", [{"cart": [str(p) for p in rng.choice(popular, 2)]} for _ in range(n)]
    yield "email", "inbox", [{} for _ in range(n)]
    yield "mailer", "mailer", [{} for _ in range(n)]


def _report(tally: Tally) -> str:
    shown = "\n".join(tally.false[:25])
    return f"{len(tally.false)} of {tally.phrases} phrases false or misworded:\n{shown}"


# -- a synthetic world ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Snapshot, Raw, ModelBundle, Path, Workspace]:
    folder = tmp_path_factory.mktemp("because")
    workspace = write_world(
        make_world(ScenarioConfig(n_customers=160, n_days=150, seed=4)), folder / "ws"
    )
    snapshot = load_snapshot(workspace)
    bundle = _bundle(
        workspace, snapshot, min_pair_orders=3, n_estimators=60, bootstrap_samples=20, n_jobs=1
    )
    return snapshot, Raw(workspace), bundle, folder, workspace


@pytest.mark.slow
def test_every_phrase_is_true_on_a_synthetic_world(
    world: tuple[Snapshot, Raw, ModelBundle, Path, Workspace],
) -> None:
    snapshot, raw, bundle, folder, workspace = world
    recommender = _recommender(workspace, snapshot, bundle, folder / "model.db")
    customers = sorted(recommender.known_customers())
    end = recommender.now_s()
    events = pd.concat(raw.events_by_customer.values())
    abandons = events[(events["event_type"] == "cart_abandon") & (events["s"] < end - 5 * DAY)]
    changes = events[(events["event_type"] == "loyalty_tier_change") & (events["s"] < end - DAY)]
    # moments right after events, so that the event windows are open for some customers
    moments = [
        end,
        int(abandons["s"].max()) + 3600,
        int(changes["s"].iloc[len(changes) // 2]) + DAY,
    ]
    rng = np.random.default_rng(4)
    tally = Tally()
    for t in moments:
        some = [customers[i] for i in rng.choice(len(customers), 100, replace=False)]
        for channel, placement, contexts in _contexts(rng, raw, some, t):
            serve_and_check(
                recommender,
                raw,
                some,
                channel,
                placement,
                contexts,
                tally,
                as_of=pd.Timestamp(t, unit="s"),
                every_claim=4,
            )
    # the other two rankings: rules only (facts, no reasons) and cold starts (popularity)
    rules_only = _recommender(workspace, snapshot, None, folder / "rules.db")
    serve_and_check(rules_only, raw, customers, "web", "home", [{}] * len(customers), tally)
    strangers = [f"stranger-{i}" for i in range(5)]
    serve_and_check(recommender, raw, strangers, "web", "home", [{}] * 5, tally)
    assert not tally.false, _report(tally)
    assert tally.offers >= 4000 and tally.phrases >= 6000, (tally.offers, tally.phrases)
    # enough different reasons were said, and every hand-written claim was checked on
    # some row, for the test to mean something
    assert len(tally.features) >= 10, tally.features
    assert set(CLAIMS) <= set(tally.claims), set(CLAIMS) - set(tally.claims)
    assert tally.facts, "no offer without a reason: the fact path was never checked"


# -- honesty when nothing qualifies, and the catalogue ----------------------------------------


class _GivenContributions:
    """A booster stand-in whose SHAP contributions are given per feature (others -0.5)."""

    def __init__(self, names: list[str], given: dict[str, float]) -> None:
        self.row = np.array([given.get(name, -0.5) for name in names] + [0.0])

    def predict(self, values: np.ndarray, **_: Any) -> np.ndarray:
        return np.tile(self.row, (len(values), 1))


def _one_matrix(snapshot: Snapshot, builder: FeatureBuilder, customer: str, t: int) -> Any:
    offers = np.flatnonzero(snapshot.offer_known)
    requests = Requests.build(snapshot, [customer], [pd.Timestamp(t, unit="s")])
    return builder.build(snapshot, requests, np.zeros(len(offers), np.int64), offers)


def test_a_positive_contribution_whose_claim_is_false_is_never_the_reason(
    world: tuple[Snapshot, Raw, ModelBundle, Path, Workspace],
) -> None:
    from serving.explain import explain_rows

    snapshot, _, _, folder, workspace = world
    recommender = _recommender(workspace, snapshot, None, folder / "honest.db")
    t = recommender.now_s()
    builder = recommender.builder_for(t)
    customer = sorted(recommender.known_customers())[0]
    matrix = _one_matrix(snapshot, builder, customer, t)
    column = {name: j for j, name in enumerate(matrix.names)}
    flags = ("category_is_new", "in_cart_abandon_window", "browsing_intent")
    row = next(
        i
        for i in range(len(matrix.values))
        if all(matrix.values[i, column[f]] == 0 for f in flags)
        and matrix.values[i, column["orders_365d"]] >= 2
    )
    # the model "likes" three flags that are 0: none of them may be said
    booster = _GivenContributions(matrix.names, {f: 1.0 for f in flags} | {"orders_365d": -0.001})
    [explained] = explain_rows(booster, matrix, np.array([row]), builder, snapshot)
    orders = int(matrix.values[row, column["orders_365d"]])
    assert explained.because == (
        "There is no single reason we can state for this offer; for context, you placed "
        f"{orders} orders with us in the past year."
    )
    assert explained.reasons == [
        {
            "feature": "orders_365d",
            "value": float(orders),
            "shap": -0.001,
            "text": f"you placed {orders} orders with us in the past year",
            "role": "fact",
        }
    ]


def test_a_cold_start_in_a_rules_only_holdout_claims_no_popularity_ranking(
    world: tuple[Snapshot, Raw, ModelBundle, Path, Workspace],
) -> None:
    snapshot, _, bundle, folder, workspace = world
    control = _recommender(
        workspace,
        snapshot,
        bundle,
        folder / "holdout.db",
        holdout_share=1.0,
        holdout_control="rules_only",
    )
    answer = control.recommend("stranger-in-holdout", channel="web", k=3, log_exposure=False)
    assert answer["holdout"] and answer["model"]["mode"] == "cold_start" and answer["offers"]
    for offer in answer["offers"]:
        # ranked by the rules, not by popularity: facts only, never "we show what sells most"
        assert not offer["because"].startswith("Because"), offer["because"]
        assert all(r["role"] == "fact" for r in offer["reasons"])


def test_the_catalogue_is_the_features_of_every_offer_and_is_kept_per_moment(
    world: tuple[Snapshot, Raw, ModelBundle, Path, Workspace],
) -> None:
    from features.claims import catalogue_at

    snapshot, raw, _, folder, workspace = world
    recommender = _recommender(workspace, snapshot, None, folder / "catalogue.db")
    t = recommender.now_s() - 20 * DAY
    builder = recommender.builder_for(t)
    matrix = _one_matrix(snapshot, builder, "nobody-at-all", t)
    catalogue = catalogue_at(snapshot, builder, t)
    offers = np.flatnonzero(snapshot.offer_known)
    column = matrix.names.index
    np.testing.assert_array_equal(
        catalogue.popularity[offers], matrix.values[:, column("offer_popularity_30d")]
    )
    np.testing.assert_array_equal(
        catalogue.acceptance[offers], matrix.values[:, column("offer_acceptance_rate")]
    )
    # the popularity is the raw count of order lines, offer by offer
    ids = snapshot.offers.decode(offers)
    np.testing.assert_array_equal(catalogue.popularity[offers], raw.popularity(t)[ids].to_numpy())
    assert catalogue_at(snapshot, builder, t) is catalogue
    for later in range(1, 6):
        catalogue_at(snapshot, builder, t + later)
    assert catalogue_at(snapshot, builder, t) is not catalogue  # only a few moments are kept
