"""Next-basket recommendation on the demo's order lines, as the Reality Check measures it.

The protocol of "A Next Basket Recommendation Reality Check" (Li et al., ACM TOIS 2023)
on dunnhumby's Complete Journey (the demo's order lines, read offline), with its
references computed in the same run, and nextbest run exactly as a user runs it.

**The split** (:func:`make_split`), in this order:

1. A basket is one customer's order (``basket_id``); its time is the earliest timestamp
   of its lines (all lines of a demo basket share one); its items are the distinct items
   of its lines. A customer's baskets are ordered by (time, basket id).
2. Customers with fewer than 3 baskets are dropped; a longer history keeps its last 50.
3. Each customer's last basket is the target, the others are the history.
4. Items in fewer than 3 history baskets (all customers' history baskets, one count per
   basket holding the item; targets never count) are dropped from every history basket
   and every target.
5. Baskets that lost every item are dropped. A customer whose target lost every item is
   dropped (the target is fixed in step 3, before the counts, so it is never replaced by
   a history basket), and so is a customer left with fewer than 2 history baskets (the
   ≥ 3 baskets rule again). The item counts are not recomputed after this: an item kept
   in step 4 can end up in fewer than 3 history baskets of the kept customers.
6. 20 % of the kept customers (rounded), drawn with ``numpy.random.default_rng(SEED)``
   from the customer ids in sorted order, are the test customers.

**The references**, for the test customers, from the histories only (no target of any
customer): G-TopFreq (items by the number of history baskets holding them, ties by item
id), P-TopFreq (the customer's own items by the number of their baskets holding them,
ties: the most recently bought first, then item id; no padding), GP-TopFreq (P-TopFreq
filled with G-TopFreq items the customer lacks), G-TopFreq-new (G-TopFreq without the
items the customer has bought), and TIFU-KNN (Hu et al., SIGIR 2020) with the Reality
Check's dunnhumby hyper-parameters (:data:`TIFU`): within-basket decay
``within_decay_rate^(n−1−i)`` for history basket i of n over the whole history, the
baskets cut into ``group_count`` consecutive groups as evenly as possible (the earlier
groups the smaller; with fewer baskets than groups each basket is a group), each group
averaged, group g weighted ``group_decay_rate^(group_count−1−g)``, the sum divided by the
number of groups; neighbours are the non-test customers, found by brute-force euclidean
KNN; the prediction is ``alpha × own + (1 − alpha) × mean of the neighbours' vectors``,
ranked by score (ties by item id), items scored 0 never ranked.

**nextbest** goes through a user's commands, as subprocesses: the order lines of every
history basket and of the non-test customers' targets (never a test customer's target)
written as a CSV with a retailer's column names, ``nextbest import transactions``,
``nextbest train`` (its defaults), ``nextbest recommend-batch --no-holdout`` for the test
customers, each ``as_of`` its target basket's time (features then see only what
happened before it). Offers are the import's item offers (``offer_id`` = item id; items
of categories that are not products, such as fuel or coupons, get no offer there, while
the references may rank them). A customer it returns nothing for scores 0.

**nextbest (new to you)**: its top 10 is mostly items the customer bought before
(replenishment), so its new-item recall is low by construction, while G-TopFreq-new ranks
only items the customer has not bought. The like-for-like slate is a retailer's "new to
you" campaign: after the standard ``recommend-batch``, a second one with the same
arguments and ``NEXTBEST_RULES`` set to a rules file the benchmark writes
(:func:`write_new_to_you_rules`, ``rules_new_to_you.yaml``): the packaged default rules
with only the ``already_owns`` rule's ``consumable_repeat_rate`` set to null (nothing the
customer bought comes back), on a ledger of its own. It is scored as the method
``nextbest (new to you)`` in both tables, with the share of its top 10 the customer
bought before (there should be none).

**nextbest (--keep-non-products)**: the standard slate's commands with the import's
documented ``--keep-non-products`` flag (offers for the non-product categories too, which
the references rank), in a sub-folder ``keep_non_products`` of its own (its
``workspace``, MLflow ``home``, ``ledger.db`` and logs); the standard slate only (no
new-to-you batch), its recommendations ``recommendations_keep_non_products.csv`` beside
the others. It is scored as the method ``nextbest (--keep-non-products)`` in both
tables, and judged in the standard table only (where its item universe is the
references'): the bootstrap interval of it − TIFU-KNN for Recall@10 and NDCG@10, and its
own target, Recall@10 and NDCG@10 ≥ TIFU-KNN (``keep_non_products_targets``; the
targets above stay on the default import's slates). Its step timings are
``keep_non_products_import``, ``_train`` and ``_recommend_batch``.

**The metrics**, per test customer then averaged, at k = 10 and 20: Recall@k (hits in
the top k / |target|), NDCG@k (binary gains; the ideal DCG is over min(|target|, k)
items: the Reality Check's own code divides by the ideal DCG over all |target| items,
which is lower whenever |target| > k), PHR@k (hit at least once). Each is also taken on
the target's repeat items (those in the customer's history; averaged over the customers
with any) and new items (the rest; over the customers with any): the full top-k list
against that part of the target, the ideal over min(|part|, k). The Reality Check
splits recall and PHR this way; NDCG is split here too. A customer-level bootstrap
(resampled test customers, :data:`BOOTSTRAP` draws, fixed seed) gives the 95 % interval
of nextbest − TIFU-KNN for Recall@10 and NDCG@10 (the standard slate), and of
nextbest (new to you) − G-TopFreq-new for the new-item Recall@10 (and, for information,
of the standard slate − G-TopFreq-new). The target: the standard slate ≥ TIFU-KNN on
Recall@10 and NDCG@10, and the new-to-you slate's new-item Recall@10 > G-TopFreq-new's
(not judged without a new-to-you slate).

**Products only (the same item universe for every method)**, a second table on the same
split after the standard one: nextbest makes no offer for lines that are not products
(fuel, coupon and misc lines, bags, fees, deposits…), while the references above rank
them. The universe (:func:`product_universe`) is the items ``nextbest import
transactions`` makes an item offer for with its defaults (``--offer-level item``, no
``--keep-non-products``), decided by the import's own code:
:func:`features.importing.order_lines_to_tables` on the order lines nextbest imports
(those written to ``order_lines.csv``, mapped as :func:`run_nextbest` maps them), each
item's category resolved by the import's ``CATEGORY_POLICY``; an item is left out when
its category is among ``features.catalog.non_product_categories(categories, items=True)``
(a placeholder name such as ``NO COMMODITY DESCRIPTION`` leaves its items in; an item
with no category stays in). Nothing is read from a nextbest workspace. In this table each
test customer's target keeps its universe items only, and a customer left with none
drops out (the table says how many remain); repeat/new is as before, against the
customer's history. Every reference ranks universe items only: G-TopFreq and
G-TopFreq-new over universe items, P-TopFreq and GP-TopFreq skip the other items (the
counts and ties of the standard lists otherwise), and TIFU-KNN has the other items'
columns zeroed in every user vector before the neighbour search (same hyper-parameters;
a history basket that held only such items keeps its place in the decays and groups).
nextbest's lists (every slate) are scored as they are; the items in them outside the
universe are counted (there should be none but for the --keep-non-products slate, which
is not judged there). The same metrics, bootstrap intervals and
target verdict follow. The figures are under ``products_only``, with the same structure
as the standard ones plus ``universe`` and ``nextbest_items_outside_universe`` (per
slate).

Environment: ``NEXTBEST_BENCH_NB_SKIP_NEXTBEST=1`` runs the references only;
``NEXTBEST_BENCH_NB_VARIANTS=0`` skips the --keep-non-products slate (default: run it);
``NEXTBEST_BENCH_NB_WEEKS=N`` runs the whole protocol on the demo's last N weeks of order
lines only (:func:`last_weeks`; a retailer with a short history; default: the whole year);
``NEXTBEST_BENCH_NB_KEEP=FOLDER`` keeps the split (``order_lines.csv``,
``test_customers.csv``, ``truth.csv``: the test customers' target items), and with
nextbest its ``workspace``, MLflow ``home``, ``ledger.db`` (``ledger-new-to-you.db`` for
the second batch), the commands' logs, ``rules_new_to_you.yaml``,
``recommendations.csv``, ``recommendations_new_to_you.csv``,
``recommendations_keep_non_products.csv`` and the ``keep_non_products`` sub-folder,
there. The nextbest
commands run with none of the caller's ``NEXTBEST_*`` variables (the product's defaults;
the second batch adds ``NEXTBEST_RULES``), in that home, on fresh ledgers. To re-run
nextbest on the same split and score it::

    export NEXTBEST_HOME=FOLDER/home NEXTBEST_DB_URL=sqlite:///FOLDER/ledger-2.db
    nextbest train -w FOLDER/workspace
    nextbest recommend-batch -w FOLDER/workspace --alias challenger --no-holdout \\
        --customers FOLDER/test_customers.csv --k 20 --channel web --placement home \\
        --out RECS.csv
    python -m bench.nextbasket rules RULES.yaml    # the new-to-you rules
    NEXTBEST_RULES=RULES.yaml NEXTBEST_DB_URL=sqlite:///FOLDER/ledger-3.db \\
        nextbest recommend-batch ... (the same arguments) --out NEW.csv
    nextbest import transactions ... --keep-non-products -w KEEP/workspace  # own home,
    nextbest train -w KEEP/workspace ...; nextbest recommend-batch ... --out KEEP.csv  # ledger
    python -m bench.nextbasket score RECS.csv FOLDER NEW.csv --keep-non-products KEEP.csv

``score`` reads any file with ``customer_id``, ``rank`` and ``offer_id`` columns (the
third, the new-to-you slate, and ``--keep-non-products`` are optional:
``recommendations_new_to_you.csv`` and ``recommendations_keep_non_products.csv`` in the
folder when there are) and prints both tables beside the references, recomputed from
the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from training.metrics import bootstrap_difference as paired_bootstrap

KS = (10, 20)
MIN_BASKETS = 3
MAX_BASKETS = 50
MIN_ITEM_BASKETS = 3
TEST_SHARE = 0.2
SEED = 0
BOOTSTRAP = 1000
TIFU: dict[str, Any] = {
    "num_nearest_neighbors": 900,
    "within_decay_rate": 0.9,
    "group_decay_rate": 0.6,
    "alpha": 0.2,
    "group_count": 3,
}
REFERENCES = ("G-TopFreq", "P-TopFreq", "GP-TopFreq", "G-TopFreq-new", "TIFU-KNN")
NEXTBEST = "nextbest"
NEW_TO_YOU = "nextbest (new to you)"
KEEP_NON_PRODUCTS = "nextbest (--keep-non-products)"
SLATES = (NEXTBEST, NEW_TO_YOU, KEEP_NON_PRODUCTS)
PARTS = ("all", "repeat", "new")
MEASURES = ("recall", "ndcg", "phr")
# the retailer's own column names in the CSV nextbest imports
CSV_COLUMNS = {
    "basket_id": "receipt",
    "customer_id": "shopper",
    "time": "when",
    "item_id": "sku",
    "category": "category",
    "quantity": "units",
    "amount": "paid",
}
LINES_FILE, TEST_FILE, TRUTH_FILE = "order_lines.csv", "test_customers.csv", "truth.csv"
LEDGER_FILE = "ledger.db"
RECS_FILE, NEW_TO_YOU_FILE = "recommendations.csv", "recommendations_new_to_you.csv"
NEW_TO_YOU_RULES, NEW_TO_YOU_LEDGER = "rules_new_to_you.yaml", "ledger-new-to-you.db"
KEEP_NON_PRODUCTS_FILE = "recommendations_keep_non_products.csv"
KEEP_NON_PRODUCTS_FOLDER = "keep_non_products"
SKIP_ENV, KEEP_ENV = "NEXTBEST_BENCH_NB_SKIP_NEXTBEST", "NEXTBEST_BENCH_NB_KEEP"
VARIANTS_ENV = "NEXTBEST_BENCH_NB_VARIANTS"
WEEKS_ENV = "NEXTBEST_BENCH_NB_WEEKS"


# -- the split ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """The protocol's outcome.

    * ``pairs``: one row per (basket, item) kept: ``customer_id``, ``basket_id``, ``time``
      (the basket's), ``item_id``, ``position`` (the basket's index in the customer's
      history, 0 the oldest; the target's is the number of history baskets) and
      ``target``.
    * ``lines``: the order lines of the kept baskets and items (columns as given).
    * ``test``: the test customers, sorted.
    """

    pairs: pd.DataFrame
    lines: pd.DataFrame
    test: np.ndarray

    @property
    def history(self) -> pd.DataFrame:
        return self.pairs[~self.pairs["target"].to_numpy()]

    @property
    def customers(self) -> np.ndarray:
        return np.sort(self.pairs["customer_id"].unique())

    def targets(self) -> dict[str, set[str]]:
        """Every test customer's target items."""
        rows = self.pairs[self.pairs["target"].to_numpy() & self._is_test()]
        return {c: set(g) for c, g in rows.groupby("customer_id")["item_id"]}

    def baskets(self, customers: Collection[str]) -> dict[str, list[list[str]]]:
        """The history baskets of these customers, oldest first."""
        rows = self.history[self.history["customer_id"].isin(list(customers))]
        rows = rows.sort_values(["customer_id", "position", "item_id"])
        out: dict[str, list[list[str]]] = {}
        for (customer, _), items in rows.groupby(["customer_id", "position"], sort=True)["item_id"]:
            out.setdefault(str(customer), []).append(items.tolist())
        return out

    def target_times(self) -> pd.Series:
        """Each test customer's target basket time (the ``as_of`` of its request)."""
        rows = self.pairs[self.pairs["target"].to_numpy() & self._is_test()]
        return rows.groupby("customer_id")["time"].first().sort_index()

    def _is_test(self) -> np.ndarray:
        return self.pairs["customer_id"].isin(self.test).to_numpy()

    def hidden_baskets(self) -> np.ndarray:
        """The test customers' target baskets: never in nextbest's workspace."""
        pairs = self.pairs
        hidden = pairs["target"].to_numpy() & self._is_test()
        return np.asarray(pairs.loc[hidden, "basket_id"].unique())

    def sizes(self) -> dict[str, float]:
        targets = self.targets()
        histories = self.baskets(self.test)
        repeat = sum(
            len(t & {i for b in histories.get(c, []) for i in b}) for c, t in targets.items()
        )
        items = sum(len(t) for t in targets.values())
        return {
            "customers": int(self.pairs["customer_id"].nunique()),
            "test_customers": len(self.test),
            "items": int(self.pairs["item_id"].nunique()),
            "baskets": int(self.pairs["basket_id"].nunique()),
            "lines": len(self.lines),
            "lines_in_workspace": int((~self.lines["basket_id"].isin(self.hidden_baskets())).sum()),
            "test_target_items": items,
            "repeat_share_of_test_target_items": round(repeat / items, 4) if items else 0.0,
        }


def make_split(lines: pd.DataFrame, *, seed: int = SEED, test_share: float = TEST_SHARE) -> Split:
    """The protocol (see the module's docstring) on order lines with at least
    ``customer_id``, ``basket_id``, ``time`` and ``item_id``."""
    lines = lines.reset_index(drop=True)
    baskets = (
        lines.groupby("basket_id", sort=False)
        .agg(customer_id=("customer_id", "first"), time=("time", "min"))
        .reset_index()
        .sort_values(["customer_id", "time", "basket_id"], ignore_index=True)
    )
    from_end = baskets.groupby("customer_id").cumcount(ascending=False)
    count = baskets.groupby("customer_id")["basket_id"].transform("size")
    baskets = baskets[(count >= MIN_BASKETS).to_numpy() & (from_end < MAX_BASKETS).to_numpy()]
    baskets = baskets.assign(target=(from_end[baskets.index] == 0).to_numpy())
    pairs = lines[["basket_id", "item_id"]].drop_duplicates()
    pairs = pairs.merge(baskets, on="basket_id", how="inner")
    seen = pairs.loc[~pairs["target"].to_numpy(), "item_id"].value_counts()
    kept_items = seen.index[seen >= MIN_ITEM_BASKETS]
    pairs = pairs[pairs["item_id"].isin(kept_items)]
    # baskets left empty vanish with their pairs; then the customers that lost their
    # target or are left with fewer than MIN_BASKETS - 1 history baskets
    per_customer = pairs.groupby("customer_id").agg(
        has_target=("target", "any"),
        baskets=("basket_id", "nunique"),
    )
    keep = per_customer.index[
        per_customer["has_target"].to_numpy() & (per_customer["baskets"] >= MIN_BASKETS).to_numpy()
    ]
    pairs = pairs[pairs["customer_id"].isin(keep)]
    pairs = pairs.sort_values(["customer_id", "time", "basket_id", "item_id"], ignore_index=True)
    first = ~pairs.duplicated("basket_id")
    pairs["position"] = (
        first.astype("int64").groupby(pairs["customer_id"]).cumsum().to_numpy() - 1
    ).astype("int64")
    pairs = pairs[["customer_id", "basket_id", "time", "item_id", "position", "target"]]
    customers = np.sort(pairs["customer_id"].unique())
    rng = np.random.default_rng(seed)
    test = np.sort(rng.choice(customers, size=round(test_share * len(customers)), replace=False))
    kept_lines = lines[
        lines["basket_id"].isin(pairs["basket_id"].unique()) & lines["item_id"].isin(kept_items)
    ].reset_index(drop=True)
    return Split(pairs=pairs, lines=kept_lines, test=test)


def last_weeks(lines: pd.DataFrame, weeks: float | None) -> pd.DataFrame:
    """The lines of the last ``weeks`` weeks (None: all): those at or after the last
    line's time minus ``weeks`` weeks, as a retailer with a short history has them."""
    if weeks is None:
        return lines
    start = lines["time"].max() - pd.Timedelta(weeks=weeks)
    return lines[lines["time"] >= start].reset_index(drop=True)


def demo_lines() -> pd.DataFrame:
    """The Complete Journey's order lines (from the installed package, offline) with the
    product category, ids as text."""
    from features import load_complete_journey

    raw = load_complete_journey(("transactions", "products"))
    lines = raw["transactions"]
    category = lines["product_id"].map(raw["products"].set_index("product_id")["product_category"])
    return pd.DataFrame(
        {
            "basket_id": lines["basket_id"].astype("str"),
            "customer_id": lines["household_id"].astype("str"),
            "time": lines["transaction_timestamp"],
            "item_id": lines["product_id"].astype("str"),
            "category": category,
            "quantity": lines["quantity"],
            "amount": lines["sales_value"],
        }
    )


# -- the split on disk -----------------------------------------------------------------------
def write_folder(split: Split, folder: Path) -> dict[str, Path]:
    """What nextbest and a re-run need: the order lines nextbest may see (every history
    basket, and the targets of the non-test customers), the test customers with their
    ``as_of``, and the test customers' target items (the truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    seen = workspace_lines(split)
    paths = {name: folder / name for name in (LINES_FILE, TEST_FILE, TRUTH_FILE)}
    columns = [c for c in CSV_COLUMNS if c in seen.columns]
    seen[columns].rename(columns=CSV_COLUMNS).to_csv(paths[LINES_FILE], index=False)
    as_of = split.target_times()
    pd.DataFrame({"customer_id": as_of.index, "as_of": _iso(as_of)}).to_csv(
        paths[TEST_FILE], index=False
    )
    truth = [(c, item) for c, items in sorted(split.targets().items()) for item in sorted(items)]
    pd.DataFrame(truth, columns=["customer_id", "item_id"]).to_csv(paths[TRUTH_FILE], index=False)
    return paths


def workspace_lines(split: Split) -> pd.DataFrame:
    """The order lines nextbest imports: every kept line but those of the test customers'
    targets, each at its basket's time."""
    seen = split.lines[~split.lines["basket_id"].isin(split.hidden_baskets())]
    times = split.pairs.groupby("basket_id")["time"].first()
    return seen.assign(time=seen["basket_id"].map(times))  # one time per basket


def read_folder(folder: Path) -> Split:
    """The split back from :func:`write_folder`'s files: a non-test customer's last basket
    in the order lines (by time, then basket id) is its target, as :func:`make_split` made
    it; a test customer's target is the truth file's items, at its ``as_of``."""
    order_lines = _read_text(folder / LINES_FILE)
    lines = order_lines.rename(columns={v: k for k, v in CSV_COLUMNS.items()})
    lines["time"] = pd.to_datetime(lines["time"])
    test_file, truth = _read_text(folder / TEST_FILE), _read_text(folder / TRUTH_FILE)
    test = np.sort(test_file["customer_id"].to_numpy(dtype=object))
    pairs = lines[["customer_id", "basket_id", "time", "item_id"]].drop_duplicates(
        ["basket_id", "item_id"]
    )
    pairs = pairs.sort_values(["customer_id", "time", "basket_id", "item_id"], ignore_index=True)
    first = ~pairs.duplicated("basket_id")
    pairs["position"] = first.astype("int64").groupby(pairs["customer_id"]).cumsum() - 1
    last = pairs.groupby("customer_id")["position"].transform("max")
    pairs["target"] = ((pairs["position"] == last) & ~pairs["customer_id"].isin(test)).to_numpy()
    as_of = pd.to_datetime(test_file.set_index("customer_id")["as_of"])
    after = last.groupby(pairs["customer_id"]).first() + 1
    hidden = truth.assign(
        basket_id="target:" + truth["customer_id"],
        time=truth["customer_id"].map(as_of),
        position=truth["customer_id"].map(after).astype("int64"),
        target=True,
    )
    pairs = pd.concat([pairs, hidden[pairs.columns]], ignore_index=True)
    return Split(pairs=pairs, lines=lines, test=test)


def _read_text(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def _iso(times: pd.Series) -> list[str]:
    return [pd.Timestamp(t).isoformat() for t in times]


# -- the products-only universe ----------------------------------------------------------------
@dataclass(frozen=True)
class Universe:
    """The items every method may rank in the products-only table.

    * ``items``: the split's items the import makes an item offer for by default.
    * ``left_out``: the categories whose items it makes no item offer for, with the reason
      (:func:`features.catalog.non_product_categories` with ``items=True``).
    * ``split_items``: how many items the split has in all.
    """

    items: frozenset[str]
    left_out: dict[str, str]
    split_items: int


UNIVERSE_RULE = (
    "the items 'nextbest import transactions' makes an item offer for by default "
    "(features.importing.order_lines_to_tables, offer_level='item', keep_non_products=False, "
    "on the order lines nextbest imports): every item but those whose category (by "
    "CATEGORY_POLICY) is in features.catalog.non_product_categories(categories, items=True)"
)


def product_universe(split: Split) -> Universe:
    """The universe of the products-only table, by the import's own code (see the module's
    docstring): :func:`features.importing.order_lines_to_tables` with its defaults on
    :func:`workspace_lines`, mapped as :func:`run_nextbest` maps the CSV."""
    from features.catalog import non_product_categories
    from features.importing import OrderLineMapping, order_lines_to_tables

    lines = workspace_lines(split)
    present = {name: name if name in lines.columns else None for name in CSV_COLUMNS}
    mapping = OrderLineMapping(
        customer="customer_id",
        time="time",
        item="item_id",
        category=present["category"],
        amount=present["amount"],
        quantity=present["quantity"],
        order="basket_id",
    )
    tables = order_lines_to_tables(lines, mapping)
    offered = frozenset(tables["offers"]["offer_id"].astype("str"))
    items = set(split.pairs["item_id"].astype("str"))
    categories = tables["products"]["category"].dropna().unique()
    return Universe(
        items=frozenset(items & offered),
        left_out=non_product_categories(categories, items=True),
        split_items=len(items),
    )


def _only(items: list[str], universe: Collection[str] | None) -> list[str]:
    """``items`` without those outside ``universe`` (all of them without a universe)."""
    return items if universe is None else [item for item in items if item in universe]


# -- references --------------------------------------------------------------------------------
def global_top(split: Split) -> list[str]:
    """Every history item, by the number of history baskets holding it (ties: item id)."""
    counts = split.history["item_id"].value_counts()
    frame = pd.DataFrame({"item": counts.index, "n": counts.to_numpy()})
    return frame.sort_values(["n", "item"], ascending=[False, True])["item"].tolist()


def personal_top(baskets: Sequence[Collection[str]]) -> list[str]:
    """One customer's items by the number of their baskets holding them; ties: the most
    recently bought first, then item id."""
    count: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, basket in enumerate(baskets):
        for item in set(basket):
            count[item] = count.get(item, 0) + 1
            last[item] = index
    return sorted(count, key=lambda item: (-count[item], -last[item], item))


def topfreq_references(
    split: Split, k: int = max(KS), *, universe: Collection[str] | None = None
) -> dict[str, dict[str, list[str]]]:
    """G-, P-, GP-TopFreq and G-TopFreq-new for every test customer, top k; with a
    ``universe``, the items outside it are skipped (the products-only table)."""
    popular = _only(global_top(split), universe)
    baskets = split.baskets(split.test)
    out: dict[str, dict[str, list[str]]] = {
        name: {} for name in ("G-TopFreq", "P-TopFreq", "GP-TopFreq", "G-TopFreq-new")
    }
    for customer in split.test:
        own = _only(personal_top(baskets.get(customer, [])), universe)
        have = set(own)
        out["G-TopFreq"][customer] = popular[:k]
        out["P-TopFreq"][customer] = own[:k]
        out["GP-TopFreq"][customer] = _fill(own[:k], popular, have, k)
        out["G-TopFreq-new"][customer] = _fill([], popular, have, k)
    return out


def _fill(head: list[str], popular: list[str], have: Collection[str], k: int) -> list[str]:
    out = list(head)
    for item in popular:
        if len(out) >= k:
            break
        if item not in have:
            out.append(item)
    return out


def tifu_vectors(
    user: np.ndarray,
    position: np.ndarray,
    item: np.ndarray,
    shape: tuple[int, int],
    *,
    within_decay_rate: float,
    group_decay_rate: float,
    group_count: int,
) -> sparse.csr_matrix:
    """TIFU-KNN's user vectors (rows: users, columns: items) from one entry per (history
    basket, item): the user's row, the basket's position in that user's history (0 the
    oldest) and the item's column. See the module's docstring for the decays and groups."""
    user, position, item = (np.asarray(a, dtype="int64") for a in (user, position, item))
    n = np.zeros(shape[0], dtype="int64")
    np.maximum.at(n, user, position + 1)
    n_user = n[user]
    within = within_decay_rate ** (n_user - 1 - position).astype(float)
    small = n_user < group_count  # every basket its own group
    base = np.maximum(n_user // group_count, 1)
    extra = n_user % group_count
    plain = group_count - extra  # groups of `base` baskets, then `extra` of base + 1
    boundary = plain * base
    group = np.where(
        position < boundary, position // base, plain + (position - boundary) // (base + 1)
    )
    size = np.where(position < boundary, base, base + 1)
    group = np.where(small, position, group)
    size = np.where(small, 1, size)
    groups = np.where(small, n_user, group_count)
    weight = within * group_decay_rate ** (group_count - 1 - group) / size / groups
    matrix = sparse.coo_matrix((weight, (user, item)), shape=shape).tocsr()
    matrix.sum_duplicates()
    return matrix


def tifu_knn(
    split: Split, k: int = max(KS), *, universe: Collection[str] | None = None, **params: Any
) -> dict[str, list[str]]:
    """TIFU-KNN's top k for every test customer (neighbours: the non-test customers); with
    a ``universe``, the columns of the items outside it are zeroed in every user vector
    before the neighbour search (the products-only table)."""
    from sklearn.neighbors import NearestNeighbors

    settings = TIFU | params
    history = split.history
    customers = split.customers
    items = np.sort(split.pairs["item_id"].unique())
    rows = pd.Index(customers).get_indexer(history["customer_id"])
    columns = pd.Index(items).get_indexer(history["item_id"])
    vectors = tifu_vectors(
        rows,
        history["position"].to_numpy(),
        columns,
        (len(customers), len(items)),
        within_decay_rate=settings["within_decay_rate"],
        group_decay_rate=settings["group_decay_rate"],
        group_count=settings["group_count"],
    )
    if universe is not None:
        keep = pd.Index(items).isin(list(universe)).astype(float)
        vectors = (vectors @ sparse.diags(keep)).tocsr()
        vectors.eliminate_zeros()
    is_test = np.isin(customers, split.test)
    train, test = vectors[~is_test], vectors[is_test]
    neighbours = min(int(settings["num_nearest_neighbors"]), train.shape[0])
    knn = NearestNeighbors(n_neighbors=neighbours, algorithm="brute", metric="euclidean")
    index = knn.fit(train).kneighbors(test, return_distance=False)
    mean = sparse.csr_matrix(
        (
            np.full(index.size, 1.0 / neighbours),
            (np.repeat(np.arange(len(index)), neighbours), index.ravel()),
        ),
        shape=(test.shape[0], train.shape[0]),
    )
    alpha = float(settings["alpha"])
    scores = (alpha * test + (1 - alpha) * (mean @ train)).tocsr()
    out = {}
    for row, customer in enumerate(customers[is_test]):
        start, end = scores.indptr[row], scores.indptr[row + 1]
        values, cols = scores.data[start:end], scores.indices[start:end]
        order = np.lexsort((cols, -values))
        order = order[values[order] > 0][:k]
        out[str(customer)] = items[cols[order]].tolist()
    return out


def references(
    split: Split, universe: Collection[str] | None = None
) -> tuple[dict[str, dict[str, list[str]]], dict[str, float]]:
    """Every reference's lists for the test customers (ranking only ``universe`` items
    when given), and the seconds each took."""
    seconds = {}
    started = time.perf_counter()
    lists = topfreq_references(split, universe=universe)
    seconds["topfreq"] = time.perf_counter() - started
    started = time.perf_counter()
    lists["TIFU-KNN"] = tifu_knn(split, universe=universe)
    seconds["tifu_knn"] = time.perf_counter() - started
    return lists, seconds


# -- metrics ------------------------------------------------------------------------------------
def customer_metrics(
    ranked: Sequence[str],
    target: Collection[str],
    history: Collection[str],
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Recall, NDCG and PHR at each k on the whole target, its repeat items (those in
    ``history``) and its new items; NaN for a part the target lacks."""
    ranked = list(dict.fromkeys(ranked))
    whole = set(target)
    repeat = whole & set(history)
    parts = {"all": whole, "repeat": repeat, "new": whole - repeat}
    out = {}
    for k in ks:
        top = ranked[:k]
        for part, truth in parts.items():
            suffix = "" if part == "all" else f"_{part}"
            if not truth:
                for measure in MEASURES:
                    out[f"{measure}{suffix}@{k}"] = math.nan
                continue
            hits = [i for i, item in enumerate(top) if item in truth]
            ideal = sum(1 / math.log2(i + 2) for i in range(min(len(truth), k)))
            out[f"recall{suffix}@{k}"] = len(hits) / len(truth)
            out[f"ndcg{suffix}@{k}"] = sum(1 / math.log2(i + 2) for i in hits) / ideal
            out[f"phr{suffix}@{k}"] = float(bool(hits))
    return out


def per_customer(
    lists: Mapping[str, Sequence[str]],
    targets: Mapping[str, Collection[str]],
    histories: Mapping[str, Collection[str]],
) -> pd.DataFrame:
    """One row of :func:`customer_metrics` per target customer (no list: an empty one)."""
    rows = {
        c: customer_metrics(lists.get(c, []), targets[c], histories.get(c, ()))
        for c in sorted(targets)
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def summarise(frame: pd.DataFrame) -> dict[str, float]:
    """Means over the customers (each repeat/new column over those who have that part)."""
    return {column: round(float(frame[column].mean()), 4) for column in frame.columns}


def bootstrap_difference(
    ours: np.ndarray, theirs: np.ndarray, *, draws: int = BOOTSTRAP, seed: int = SEED
) -> dict[str, float | None]:
    """Mean of ours − theirs over customers, with a 95 % percentile interval from
    resampling the customers (training's own bootstrap; None for no customers)."""
    if not len(ours):
        return {"mean": None, "low": None, "high": None, "customers": 0}
    mean, low, high = paired_bootstrap(ours, theirs, draws, seed)
    return {
        "mean": round(mean, 4),
        "low": round(low, 4),
        "high": round(high, 4),
        "customers": len(ours),
    }


def table(summaries: Mapping[str, Mapping[str, float]], counts: Mapping[str, int]) -> str:
    """Rows: methods; a block per part of the target (all, repeat, new); columns: Recall,
    NDCG, PHR at each k."""
    names = {"recall": "Recall", "ndcg": "NDCG", "phr": "PHR"}
    header = "".join(f"{names[m] + '@' + str(k):>12}" for k in KS for m in MEASURES)
    width = max(len(name) for name in summaries) + 2
    lines = []
    for part in PARTS:
        suffix = "" if part == "all" else f"_{part}"
        label = {"all": "all target items", "repeat": "repeat items", "new": "new items"}[part]
        lines.append(f"{label} ({counts[part]:,} customers)")
        lines.append(" " * width + header)
        for name, summary in summaries.items():
            cells = "".join(f"{summary[f'{m}{suffix}@{k}']:>12.4f}" for k in KS for m in MEASURES)
            lines.append(f"{name:<{width}}{cells}")
        lines.append("")
    return "\n".join(lines).rstrip()


def universe_targets(
    targets: Mapping[str, Collection[str]], universe: Collection[str]
) -> dict[str, set[str]]:
    """The targets' universe items; a customer left with none is left out."""
    kept = {customer: {i for i in items if i in universe} for customer, items in targets.items()}
    return {customer: items for customer, items in kept.items() if items}


def evaluate(
    split: Split,
    lists: Mapping[str, Mapping[str, Sequence[str]]],
    universe: Collection[str] | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Per-customer metrics of every method, and how many test customers have any target
    items at all, any repeat ones and any new ones; with a ``universe``, on the targets'
    universe items only (:func:`universe_targets`)."""
    targets = split.targets()
    if universe is not None:
        targets = universe_targets(targets, universe)
    histories = {
        c: {i for b in baskets for i in b} for c, baskets in split.baskets(split.test).items()
    }
    frames = {name: per_customer(ranked, targets, histories) for name, ranked in lists.items()}
    any_frame = next(iter(frames.values()))
    counts = {
        "all": len(targets),
        "repeat": int(any_frame[f"recall_repeat@{KS[0]}"].notna().sum()),
        "new": int(any_frame[f"recall_new@{KS[0]}"].notna().sum()),
    }
    return frames, counts


def compare(frames: Mapping[str, pd.DataFrame], *, standard: bool = True) -> dict[str, Any]:
    """nextbest against TIFU-KNN (the standard slate) and G-TopFreq-new (the new-to-you
    slate when there is one; the standard slate for information): bootstrap intervals of
    the differences, and whether each target holds (None: not judged). In the ``standard``
    table (where its item universe is the references'), the --keep-non-products slate
    against TIFU-KNN too, its own targets under ``keep_non_products_targets``."""

    def interval(ours: str, reference: str, column: str) -> dict[str, float | None]:
        mine = frames[ours][column]
        theirs = frames[reference].loc[mine.index, column]
        has = mine.notna().to_numpy()  # a repeat/new part: its customers only
        return bootstrap_difference(mine.to_numpy()[has], theirs.to_numpy()[has])

    means = {name: summarise(frame) for name, frame in frames.items()}
    mine, tifu, new = means[NEXTBEST], means["TIFU-KNN"], means["G-TopFreq-new"]
    figures: dict[str, Any] = {
        "nextbest_minus_tifu_knn_95ci": {
            column: interval(NEXTBEST, "TIFU-KNN", column) for column in ("recall@10", "ndcg@10")
        },
        "nextbest_minus_g_topfreq_new_95ci": {
            "recall_new@10": interval(NEXTBEST, "G-TopFreq-new", "recall_new@10")
        },
    }
    new_item_target = None
    if NEW_TO_YOU in frames:
        figures["nextbest_new_to_you_minus_g_topfreq_new_95ci"] = {
            "recall_new@10": interval(NEW_TO_YOU, "G-TopFreq-new", "recall_new@10")
        }
        new_item_target = means[NEW_TO_YOU]["recall_new@10"] > new["recall_new@10"]
    figures["targets"] = {
        "recall@10_ge_tifu_knn": mine["recall@10"] >= tifu["recall@10"],
        "ndcg@10_ge_tifu_knn": mine["ndcg@10"] >= tifu["ndcg@10"],
        "new_to_you_new_recall@10_gt_g_topfreq_new": new_item_target,
    }
    figures["target_slates"] = {
        "recall@10_ge_tifu_knn": NEXTBEST,
        "ndcg@10_ge_tifu_knn": NEXTBEST,
        "new_to_you_new_recall@10_gt_g_topfreq_new": NEW_TO_YOU,
    }
    if KEEP_NON_PRODUCTS in frames and standard:
        keep = means[KEEP_NON_PRODUCTS]
        figures["nextbest_keep_non_products_minus_tifu_knn_95ci"] = {
            column: interval(KEEP_NON_PRODUCTS, "TIFU-KNN", column)
            for column in ("recall@10", "ndcg@10")
        }
        figures["keep_non_products_targets"] = {
            f"{column}_ge_tifu_knn": keep[column] >= tifu[column]
            for column in ("recall@10", "ndcg@10")
        }
    return figures


def _verdict(figures: Mapping[str, Any], customers: int) -> str:
    """The comparison in words, under the table."""

    def ci(values: Mapping[str, float | None]) -> str:
        if values["mean"] is None:
            return "n/a (no customers)"
        return f"{values['mean']:+.4f} [{values['low']:+.4f}, {values['high']:+.4f}]"

    def held(value: bool | None) -> str:
        return "not judged" if value is None else "yes" if value else "no"

    tifu = figures["nextbest_minus_tifu_knn_95ci"]
    new = figures["nextbest_minus_g_topfreq_new_95ci"]["recall_new@10"]
    new_to_you = figures.get("nextbest_new_to_you_minus_g_topfreq_new_95ci")
    targets = figures["targets"]
    empty = figures["customers_without_recommendations"]
    bought = figures["top10_share_bought_before"]
    lines = [
        "nextbest (standard slate) − TIFU-KNN (95 % customer bootstrap): Recall@10 "
        f"{ci(tifu['recall@10'])}, NDCG@10 {ci(tifu['ndcg@10'])}",
        f"{NEW_TO_YOU} − G-TopFreq-new, new-item Recall@10: "
        + (ci(new_to_you["recall_new@10"]) if new_to_you else "n/a (no new-to-you slate)"),
        f"nextbest (standard slate) − G-TopFreq-new, new-item Recall@10: {ci(new)} "
        "(for information: the standard slate is mostly replenishment)",
        "returned nothing (scored 0) for "
        + ", ".join(f"{name} {n} of {customers}" for name, n in empty.items())
        + " test customers",
        "share of the top 10 the customer bought before: "
        + ", ".join(f"{name} {share:.1%}" for name, share in bought.items()),
        "target: "
        + (
            "not met"
            if False in targets.values()
            else "not judged in full"
            if None in targets.values()
            else "met"
        )
        + f" (Recall@10 ≥ TIFU-KNN, standard slate: {held(targets['recall@10_ge_tifu_knn'])}; "
        f"NDCG@10 ≥ TIFU-KNN, standard slate: {held(targets['ndcg@10_ge_tifu_knn'])}; "
        "new-item Recall@10 > G-TopFreq-new, new-to-you slate: "
        f"{held(targets['new_to_you_new_recall@10_gt_g_topfreq_new'])})",
    ]
    keep = figures.get("nextbest_keep_non_products_minus_tifu_knn_95ci")
    if keep is not None:
        own = figures["keep_non_products_targets"]
        lines += [
            f"{KEEP_NON_PRODUCTS} − TIFU-KNN (95 % customer bootstrap): Recall@10 "
            f"{ci(keep['recall@10'])}, NDCG@10 {ci(keep['ndcg@10'])}",
            f"{KEEP_NON_PRODUCTS} target (standard table): "
            + ("met" if all(own.values()) else "not met")
            + f" (Recall@10 ≥ TIFU-KNN: {held(own['recall@10_ge_tifu_knn'])}; "
            f"NDCG@10 ≥ TIFU-KNN: {held(own['ndcg@10_ge_tifu_knn'])})",
        ]
    elif KEEP_NON_PRODUCTS in empty:
        lines.append(
            f"{KEEP_NON_PRODUCTS}: scored as given, judged in the standard table only "
            "(it recommends items outside this universe)"
        )
    return "\n".join(lines)


def read_recommendations(path: Path) -> dict[str, list[str]]:
    """A recommend-batch output's ranked offer ids per customer."""
    rows = pd.read_csv(path, dtype={"customer_id": str, "offer_id": str})
    rows = rows.sort_values(["customer_id", "rank"], kind="stable")
    return {str(c): g.tolist() for c, g in rows.groupby("customer_id")["offer_id"]}


def _report_table(
    split: Split,
    lists: Mapping[str, Mapping[str, Sequence[str]]],
    universe: Collection[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """One table, its verdict and its figures (see :func:`report`)."""
    frames, counts = evaluate(split, lists, universe)
    summaries = {name: summarise(frame) for name, frame in frames.items()}
    figures: dict[str, Any] = {"metrics": summaries, "customers_with": counts}
    text = table(summaries, counts)
    if NEXTBEST in lists:
        customers = frames[NEXTBEST].index
        histories = {
            c: {i for b in baskets for i in b} for c, baskets in split.baskets(customers).items()
        }
        slates = [name for name in SLATES if name in lists]
        figures["customers_without_recommendations"] = {
            name: sum(1 for c in customers if not lists[name].get(c)) for name in slates
        }
        figures["top10_share_bought_before"] = {
            name: _share_bought_before(lists[name], customers, histories) for name in slates
        }
        figures |= compare(frames, standard=universe is None)
        text += "\n\n" + _verdict(figures, len(customers))
    return text, figures


def _share_bought_before(
    ranked: Mapping[str, Sequence[str]],
    customers: Collection[str],
    histories: Mapping[str, Collection[str]],
) -> float:
    """The share of these customers' top-10 items that are in their own history."""
    tops = [(c, list(dict.fromkeys(ranked.get(c, [])))[: KS[0]]) for c in customers]
    total = sum(len(top) for _, top in tops)
    bought = sum(1 for c, top in tops for item in top if item in histories.get(c, ()))
    return round(bought / total, 4) if total else 0.0


PRODUCTS_ONLY = "products only (the same item universe for every method)"


def report(
    split: Split,
    lists: Mapping[str, Mapping[str, Sequence[str]]],
    products: tuple[Universe, Mapping[str, Mapping[str, Sequence[str]]]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The printed tables and the figures of every method (with the comparison when
    nextbest is among them): the standard table, then, given ``products`` (the universe
    and every method's lists for it), the products-only one, its figures under
    ``products_only``."""
    text, figures = _report_table(split, lists)
    if products is None:
        return text, figures
    universe, product_lists = products
    targets = split.targets()
    kept = universe_targets(targets, universe.items)
    about: dict[str, Any] = {
        "rule": UNIVERSE_RULE,
        "items": len(universe.items),
        "split_items": universe.split_items,
        "categories_left_out": universe.left_out,
        "test_customers": len(kept),
        "test_customers_left_out": len(targets) - len(kept),
        "test_target_items": sum(len(items) for items in kept.values()),
        "test_target_items_left_out": sum(len(items) for items in targets.values())
        - sum(len(items) for items in kept.values()),
    }
    product_text, product_figures = _report_table(split, product_lists, universe.items)
    heading = (
        f"{PRODUCTS_ONLY}: {about['items']:,} of {about['split_items']:,} items "
        f"({len(universe.left_out)} categories left out), {about['test_customers']:,} of "
        f"{len(targets):,} test customers ({about['test_customers_left_out']:,} with no "
        f"product in the target), {about['test_target_items']:,} of "
        f"{about['test_target_items'] + about['test_target_items_left_out']:,} target items"
    )
    slates = [name for name in SLATES if name in product_lists]
    if slates:
        product_figures["nextbest_items_outside_universe"] = {
            name: _outside(product_lists[name], universe.items, targets) for name in slates
        }
        product_text += "\nrecommended outside the universe (scored as given): " + ", ".join(
            f"{name} {product_figures['nextbest_items_outside_universe'][name]['recommendations']}"
            " items"
            for name in slates
        )
    figures["products_only"] = {"universe": about, **product_figures}
    return f"{text}\n\n{heading}\n\n{product_text}", figures


def _outside(
    ranked: Mapping[str, Sequence[str]], universe: Collection[str], customers: Collection[str]
) -> dict[str, int]:
    """How many of these customers' recommendations are outside the universe, and for how
    many customers."""
    outside = {
        customer: [item for item in items if item not in universe]
        for customer, items in ranked.items()
        if customer in customers
    }
    return {
        "recommendations": sum(len(items) for items in outside.values()),
        "customers": sum(1 for items in outside.values() if items),
    }


def _without_metrics(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The figures to print under the tables: all but the tables' own metrics."""
    return {
        key: _without_metrics(value) if key == "products_only" else value
        for key, value in figures.items()
        if key != "metrics"
    }


Lists = dict[str, dict[str, list[str]]]
"""Every method's ranked items per test customer."""


def all_references(split: Split) -> tuple[Universe, Lists, Lists, dict[str, float]]:
    """The universe, the references' lists for the standard and the products-only
    tables, and the seconds each step took."""
    started = time.perf_counter()
    universe = product_universe(split)
    seconds = {"universe": time.perf_counter() - started}
    lists, standard_s = references(split)
    product_lists, product_s = references(split, universe.items)
    seconds |= {f"reference_{name}": s for name, s in standard_s.items()}
    seconds |= {f"reference_products_only_{name}": s for name, s in product_s.items()}
    return universe, lists, product_lists, seconds


def score(
    recs_csv: Path | str,
    folder: Path | str,
    new_to_you_csv: Path | str | None = None,
    keep_non_products_csv: Path | str | None = None,
) -> dict[str, Any]:
    """Score a recommendations file against a kept split (``NEXTBEST_BENCH_NB_KEEP``),
    with the new-to-you slate's and the --keep-non-products one's (default:
    ``recommendations_new_to_you.csv`` and ``recommendations_keep_non_products.csv`` in
    the folder, when there are), beside the references, and print both tables."""
    split = read_folder(Path(folder))
    universe, lists, product_lists, _ = all_references(split)
    lists[NEXTBEST] = product_lists[NEXTBEST] = read_recommendations(Path(recs_csv))
    for name, csv, default in (
        (NEW_TO_YOU, new_to_you_csv, NEW_TO_YOU_FILE),
        (KEEP_NON_PRODUCTS, keep_non_products_csv, KEEP_NON_PRODUCTS_FILE),
    ):
        if csv is None and (Path(folder) / default).exists():
            csv = Path(folder) / default
        if csv is not None:
            lists[name] = product_lists[name] = read_recommendations(Path(csv))
    text, figures = report(split, lists, (universe, product_lists))
    print(text)
    print(json.dumps(_without_metrics(figures), indent=2))
    return figures


# -- nextbest, as a user runs it -------------------------------------------------------------------
def _nextbest(
    folder: Path, *args: str, log: str, ledger: str = LEDGER_FILE, rules: Path | None = None
) -> tuple[float, str, str]:
    """`python -m nextbest.cli ARGS` with the product's defaults (no ``NEXTBEST_*``
    variable of the caller; ``NEXTBEST_RULES`` given ``rules``) in its own home and
    ``ledger`` under ``folder``; seconds, stdout and the last stderr line."""
    root = Path(__file__).resolve().parents[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NEXTBEST_") and k != "MLFLOW_TRACKING_URI"
    }
    env |= {
        "NEXTBEST_HOME": str(folder / "home"),
        "NEXTBEST_DB_URL": f"sqlite:///{folder / ledger}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "BENTOML_DO_NOT_TRACK": "true",
    }
    if rules is not None:
        env["NEXTBEST_RULES"] = str(rules)
    (folder / "home").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (folder / log).open("w") as errors:
        done = subprocess.run(
            [sys.executable, "-m", "nextbest.cli", *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    seconds = time.perf_counter() - started
    stderr = (folder / log).read_text().strip().splitlines()
    if done.returncode != 0:
        tail = "\n".join(stderr[-20:])
        raise RuntimeError(f"nextbest {' '.join(args[:2])} failed ({done.returncode}):\n{tail}")
    return seconds, done.stdout, stderr[-1] if stderr else ""


def write_new_to_you_rules(path: Path) -> Path:
    """The rules of the new-to-you slate at ``path``: the packaged default rules
    (``policy/default_rules.yaml``) with only the ``already_owns`` rule's
    ``consumable_repeat_rate`` set to null (nothing the customer bought comes back)."""
    import yaml

    from policy.rules import DEFAULT_RULES

    data = yaml.safe_load(DEFAULT_RULES.read_text())
    owns = [rule for rule in data["rules"] if rule.get("type") == "already_owns"]
    if len(owns) != 1:
        raise ValueError(f"{DEFAULT_RULES}: {len(owns)} already_owns rules, expected one")
    owns[0]["consumable_repeat_rate"] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _standard_slate(
    folder: Path, split_folder: Path, out: Path, *import_flags: str
) -> tuple[dict[str, float], dict[str, Any], tuple[str, ...]]:
    """Import (with ``import_flags``), train and recommend-batch in ``folder`` (its own
    workspace, home and ledger) on the kept split in ``split_folder``, to ``out``; the
    seconds of each step, what the commands said and the batch's arguments."""
    workspace = folder / "workspace"
    columns = ("--customer", "--time", "--item", "--category", "--quantity", "--amount", "--order")
    names = ("customer_id", "time", "item_id", "category", "quantity", "amount", "basket_id")
    mapping = [
        part
        for flag, name in zip(columns, names, strict=True)
        for part in (flag, CSV_COLUMNS[name])
    ]
    seconds = {}
    seconds["import"], _, _ = _nextbest(
        folder,
        *("import", "transactions", str(split_folder / LINES_FILE), *mapping, *import_flags),
        *("-w", str(workspace)),
        log="import.log",
    )
    seconds["train"], trained, _ = _nextbest(
        folder, "train", "--quiet", "-w", str(workspace), log="train.log"
    )
    batch = (
        *("recommend-batch", "-w", str(workspace), "--alias", "challenger"),
        *("--customers", str(split_folder / TEST_FILE), "--k", str(max(KS))),
        *("--channel", "web", "--placement", "home", "--no-holdout"),
    )
    # a fresh ledger per slate: no cap counted by an earlier run or another slate
    (folder / LEDGER_FILE).unlink(missing_ok=True)
    seconds["recommend_batch"], _, said = _nextbest(
        folder, *batch, "--out", str(out), log="recommend_batch.log"
    )
    from features import Workspace

    offers = Workspace(workspace).read("offers")["offer_id"].astype("str")
    truth = _read_text(split_folder / TRUTH_FILE)["item_id"]
    return (
        seconds,
        {
            "model_version": json.loads(trained).get("model_version"),
            "recommend_batch_said": said,
            "nextbest_offers": len(offers),
            "test_target_items_with_an_offer": round(float(truth.isin(offers).mean()), 4),
        },
        batch,
    )


def run_nextbest(
    folder: Path, *, variants: bool = True
) -> tuple[dict[str, Path], dict[str, float], dict[str, Any]]:
    """Import, train and recommend-batch on the kept split in ``folder``, then
    recommend-batch again with the new-to-you rules; with ``variants``, the
    --keep-non-products slate too (import with ``--keep-non-products``, train and
    recommend-batch in ``folder/keep_non_products``, its own workspace, home and ledger;
    its recommendations in ``folder``); the recommendations file of each slate, the
    seconds of each step and what the commands said."""
    outs = {NEXTBEST: folder / RECS_FILE, NEW_TO_YOU: folder / NEW_TO_YOU_FILE}
    seconds, said, batch = _standard_slate(folder, folder, outs[NEXTBEST])
    rules = write_new_to_you_rules(folder / NEW_TO_YOU_RULES)
    (folder / NEW_TO_YOU_LEDGER).unlink(missing_ok=True)
    seconds["recommend_batch_new_to_you"], _, said["recommend_batch_new_to_you_said"] = _nextbest(
        folder,
        *batch,
        *("--out", str(outs[NEW_TO_YOU])),
        log="recommend_batch_new_to_you.log",
        ledger=NEW_TO_YOU_LEDGER,
        rules=rules,
    )
    if variants:
        outs[KEEP_NON_PRODUCTS] = folder / KEEP_NON_PRODUCTS_FILE
        own = folder / KEEP_NON_PRODUCTS_FOLDER
        own.mkdir(parents=True, exist_ok=True)
        keep_s, said["keep_non_products"], _ = _standard_slate(
            own, folder, outs[KEEP_NON_PRODUCTS], "--keep-non-products"
        )
        seconds |= {f"keep_non_products_{step}": s for step, s in keep_s.items()}
    return outs, seconds, said


@contextlib.contextmanager
def _folder() -> Iterator[Path]:
    keep = os.environ.get(KEEP_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep).resolve()
    else:
        with tempfile.TemporaryDirectory(prefix="nextbasket-") as folder:
            yield Path(folder)


def run() -> dict[str, Any]:
    skip = os.environ.get(SKIP_ENV, "").lower() in ("1", "true", "yes")
    variants = os.environ.get(VARIANTS_ENV, "1").lower() not in ("0", "false", "no")
    weeks = float(os.environ[WEEKS_ENV]) if os.environ.get(WEEKS_ENV) else None
    started = time.perf_counter()
    split = make_split(last_weeks(demo_lines(), weeks))
    seconds: dict[str, float] = {"split": time.perf_counter() - started}
    with _folder() as folder:
        write_folder(split, folder)
        universe, lists, product_lists, reference_s = all_references(split)
        seconds |= reference_s
        said: dict[str, Any] = {}
        if not skip:
            outs, nextbest_s, said = run_nextbest(folder, variants=variants)
            seconds |= nextbest_s
            for name, out in outs.items():
                lists[name] = product_lists[name] = read_recommendations(out)
        text, figures = report(split, lists, (universe, product_lists))
    print(text, flush=True)
    return {
        "protocol": "Li et al., A Next Basket Recommendation Reality Check (TOIS 2023)",
        "data": split.sizes(),
        "history_weeks": weeks,
        "tifu_knn": TIFU,
        "k": list(KS),
        "nextbest_run": not skip,
        "nextbest_variants_run": not skip and variants,
        **said,
        **figures,
        "seconds": {name: round(s, 2) for name, s in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="the whole benchmark (as `python -m bench next_basket`)")
    scorer = commands.add_parser("score", help="score a recommendations file on a kept split")
    scorer.add_argument("recs", type=Path, help="recommend-batch output (.csv)")
    scorer.add_argument("folder", type=Path, help=f"a split kept with {KEEP_ENV}")
    scorer.add_argument(
        "new_to_you",
        type=Path,
        nargs="?",
        help=f"the new-to-you slate's output (default: FOLDER/{NEW_TO_YOU_FILE} if it exists)",
    )
    scorer.add_argument(
        "--keep-non-products",
        type=Path,
        help="the --keep-non-products slate's output "
        f"(default: FOLDER/{KEEP_NON_PRODUCTS_FILE} if it exists)",
    )
    rules = commands.add_parser("rules", help="write the new-to-you slate's rules file")
    rules.add_argument("path", type=Path, help="the rules file to write (.yaml)")
    args = parser.parse_args()
    if args.command == "score":
        score(args.recs, args.folder, args.new_to_you, args.keep_non_products)
    elif args.command == "rules":
        print(write_new_to_you_rules(args.path))
    else:
        print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
