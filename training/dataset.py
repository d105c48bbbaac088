"""The training set: opportunities along time, their candidates, features and labels.

* An **opportunity** is a customer about to place an order: the request is made at the
  order's first line, and features read only what came strictly before. Training cuts at
  the customers' own baskets, as the next-basket literature does, so that a few months of
  order lines still give many opportunities: time is split into buckets of
  ``cut_every_days``, and each bucket samples customers who ordered in it (one order each).
* Its **context** is sampled as serving sees them: channel, placement, moment, page
  product and cart (``training.contexts``).
* Its **candidates** are what generation and eligibility (``policy.evaluate``, the very
  decision serving makes) let through at that moment.
* **Labels**: an item, bundle or category offer is positive when that order holds its
  products (its category, for a category offer, which is cross-sell: eligibility keeps
  only categories new to the customer); a coupon when it is redeemed (or accepted) inside
  its campaign window, else within ``horizon_days``. Every label window ends at its
  split's end (and at ``until``): nothing after a split is read for it.
* Rows are grouped per (opportunity, task), the unit the ranker orders. The tasks are
  ``coupon``, ``cross_sell``, ``item`` (item and bundle offers new to the customer) and
  ``replenishment`` (items they bought before): see ``policy.arbitration.row_tasks``.
* Time is split into train, validation and test: a warm-up first (8 weeks, or a quarter
  of a shorter history), then the shares of the rest in time order.

Training may sample negatives per group; evaluation keeps every candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features import FeatureBuilder, Requests, Snapshot
from features.candidates import CandidateGenerator
from features.history import second_ceil
from policy import RuleSet, evaluate
from policy.arbitration import REPEAT_FEATURE, TASKS, row_tasks
from policy.eligibility import personalisation_allowed
from training.config import TrainConfig
from training.contexts import sample_contexts

__all__ = ["TASKS", "RowSet", "Splits", "build_rows", "cut_points"]

DAY = 86_400


@dataclass
class Splits:
    """Bucket starts of each split, and where each split ends (exclusive): no label of a
    split reads anything at or after its end."""

    train: list[pd.Timestamp]
    validation: list[pd.Timestamp]
    test: list[pd.Timestamp]
    ends: dict[str, pd.Timestamp]

    def as_dict(self) -> dict[str, list[str]]:
        out = {
            name: [t.isoformat() for t in getattr(self, name)]
            for name in ("train", "validation", "test")
        }
        out["ends"] = [self.ends[name].isoformat() for name in ("train", "validation", "test")]
        return out

    def describe(self, step_days: int) -> str:
        """What was chosen, in one line (``nextbest train`` prints it)."""
        return (
            f"opportunities: customers at their own orders, in {step_days}-day buckets; "
            f"train {self.train[0].date()}..{self.ends['train'].date()} "
            f"({len(self.train)} buckets), validation ..{self.ends['validation'].date()} "
            f"({len(self.validation)}), test ..{self.ends['test'].date()} ({len(self.test)})"
        )


WARM_UP = pd.Timedelta(weeks=8)


def cut_points(snapshot: Snapshot, config: TrainConfig) -> Splits:
    """Buckets of ``cut_every_days`` from the warm-up's end to ``until``, split in time
    order into train, validation and test by their shares."""
    seconds = snapshot.line_seconds
    if not len(seconds):
        raise ValueError("the workspace has no orders to train on")
    first = pd.Timestamp(int(seconds.min()), unit="s").normalize()
    until = (
        pd.Timestamp(config.until)
        if config.until
        else pd.Timestamp(int(seconds.max()) + 1, unit="s")
    )
    start = (
        pd.Timestamp(config.start)
        if config.start
        else (first + min(WARM_UP, (until - first) / 4)).normalize()
    )
    length = until - start
    step = pd.Timedelta(days=config.cut_every_days)
    test_start = until - length * config.test_share
    validation_start = test_start - length * config.validation_share

    def buckets(a: pd.Timestamp, b: pd.Timestamp) -> list[pd.Timestamp]:
        return list(pd.date_range(a, b, freq=step, inclusive="left")) if b > a else []

    train = buckets(start, validation_start)
    validation = buckets(validation_start, test_start)
    test = buckets(test_start, until)
    if len(train) < 2 or not validation or not test:
        raise ValueError(
            f"{start.date()}..{until.date()} is too short to split into train, validation "
            f"and test buckets of {config.cut_every_days} days; train on a longer history "
            "or set a smaller cut_every_days"
        )
    return Splits(
        train=train,
        validation=validation,
        test=test,
        ends={"train": validation_start, "validation": test_start, "test": until},
    )


@dataclass
class RowSet:
    """Candidate rows with features and labels, sorted by group."""

    values: np.ndarray
    names: list[str]
    label: np.ndarray
    group: np.ndarray
    task: np.ndarray
    offer: np.ndarray
    customer: np.ndarray
    as_of_s: np.ndarray
    value: np.ndarray
    lever: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def group_sizes(self) -> np.ndarray:
        return np.bincount(np.unique(self.group, return_inverse=True)[1])

    def subset(self, mask: np.ndarray) -> RowSet:
        return RowSet(
            **{name: getattr(self, name)[mask] for name in _ARRAYS},
            names=self.names,
        )

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]

    @classmethod
    def concat(cls, parts: list[RowSet], names: list[str]) -> RowSet:
        if not parts:
            empty = {n: np.zeros(0) for n in _ARRAYS}
            empty["values"] = np.zeros((0, len(names)), dtype=np.float32)
            return cls(**empty, names=names)
        return cls(
            **{n: np.concatenate([getattr(p, n) for p in parts]) for n in _ARRAYS}, names=names
        )


_ARRAYS = ("values", "label", "group", "task", "offer", "customer", "as_of_s", "value", "lever")


def _labels(
    snapshot: Snapshot,
    customers: np.ndarray,
    offers: np.ndarray,
    t: np.ndarray,
    basket_end: np.ndarray,
    task: np.ndarray,
    horizon_days: int,
    split_end: int,
) -> np.ndarray:
    """Labels of rows at moments ``t``: the order placed at ``t`` (which ends at
    ``basket_end``) for products and categories, the campaign window for coupons; every
    window ends by ``split_end`` (seconds, exclusive)."""
    s = snapshot
    label = np.zeros(len(offers), dtype=np.int8)
    basket = np.minimum(basket_end, split_end)
    coupon = task == TASKS.index("coupon")
    if coupon.any():
        valid_to = s.offer_valid_to_s[offers[coupon]]
        campaign = np.where(
            valid_to < np.iinfo(np.int64).max // 2,
            valid_to + 1,
            t[coupon] + horizon_days * DAY,
        )
        window_end = np.minimum(campaign, split_end)
        pair = s.accepted_by_cust_offer_pairs.encode(customers[coupon], offers[coupon])
        label[coupon] = s.accepted_by_cust_offer.count(pair, t[coupon], window_end) > 0
    cross = task == TASKS.index("cross_sell")
    if cross.any():
        pair = s.cust_category.encode(customers[cross], s.offer_category[offers[cross]])
        label[cross] = s.orders_by_cust_category.count(pair, t[cross], basket[cross]) > 0
    item = (task == TASKS.index("item")) | (task == TASKS.index("replenishment"))
    if item.any():
        pair = s.cust_offer_bought.encode(customers[item], offers[item])
        label[item] = s.bought_by_cust_offer.count(pair, t[item], basket[item]) > 0
    return label


def _opportunities(
    snapshot: Snapshot,
    start: int,
    end: int,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(customer, as_of, basket end) in seconds: up to ``size`` customers who placed an
    order in ``[start, end)`` and had ordered before, one random order of each."""
    spans = snapshot.order_spans
    lo, hi = np.searchsorted(spans["start"].to_numpy(), [start, end])
    window = spans.iloc[lo:hi]
    window = window[window["customer"] != snapshot.customers.unknown]
    customer = window["customer"].to_numpy(np.int64)
    at = window["start"].to_numpy(np.int64)
    earlier = snapshot.orders_by_customer.first_of_group(customer, at) >= 0
    window = window[earlier]
    if not len(window):
        return (np.zeros(0, dtype=np.int64),) * 3
    one_each = window.sample(frac=1.0, random_state=rng).drop_duplicates("customer")
    if len(one_each) > size:
        one_each = one_each.iloc[rng.choice(len(one_each), size=size, replace=False)]
    one_each = one_each.sort_values(["customer", "start"])
    return (
        one_each["customer"].to_numpy(np.int64),
        one_each["start"].to_numpy(np.int64),
        one_each["end"].to_numpy(np.int64) + 1,
    )


def build_rows(
    snapshot: Snapshot,
    rules: RuleSet,
    builders: Callable[[pd.Timestamp], FeatureBuilder],
    generator: CandidateGenerator,
    cuts: list[pd.Timestamp],
    config: TrainConfig,
    *,
    split_end: pd.Timestamp,
    customers_per_cut: int,
    negatives_per_group: int | None,
    out_of_fold: bool,
    seed_offset: int = 0,
    progress: Callable[[int], None] | None = None,
) -> RowSet:
    """Rows for every bucket starting at ``cuts``: opportunities → candidates →
    eligibility → features → labels. No bucket reaches past ``split_end``, and no row is
    an opportunity of a customer who did not consent to personalisation (at its moment,
    on its channel).

    ``builders(t)`` returns the feature builder fitted for bucket start ``t``.
    ``negatives_per_group`` samples negatives (training); None keeps every candidate.
    """
    s = snapshot
    parts: list[RowSet] = []
    group_base = 0
    needs_features = rules.needs_features
    end_s = second_ceil(split_end)
    step = config.cut_every_days * DAY
    for index, cut in enumerate(cuts):
        rng = np.random.default_rng([config.random_state, seed_offset, index])
        start_s = second_ceil(cut)
        chosen, at, basket_end = _opportunities(
            s, start_s, min(start_s + step, end_s), customers_per_cut, rng
        )
        if not len(chosen):
            if progress:
                progress(1)
            continue
        ids = list(snapshot.customers.decode(chosen))
        context = sample_contexts(
            snapshot,
            chosen,
            at,
            rng,
            from_exposures=config.context_from_exposures,
            horizon_days=config.horizon_days,
        )
        requests = Requests.build(
            snapshot,
            ids,
            pd.to_datetime(at, unit="s"),
            channel=context.channel,
            placement=context.placement,
            moment=context.moment,
            page_product=context.page_product,
            cart=context.cart,
        )
        candidates = generator.generate(snapshot, requests)
        r, o = candidates.request, candidates.offer
        builder = builders(cut)
        features = None
        if needs_features:
            matrix = builder.build(snapshot, requests, r, o, out_of_fold=out_of_fold)
            features = matrix.columns()
        # the one eligibility decision serving makes too (policy.evaluate), on the history;
        # and a customer without consent to personalisation at that moment, on that
        # channel, is no example to learn from (serving ranks them as an unknown customer)
        eligible = evaluate(snapshot, rules, requests, r, o, features=features).eligible
        eligible &= personalisation_allowed(snapshot, rules, requests)[r]
        r, o = r[eligible], o[eligible]
        matrix = builder.build(snapshot, requests, r, o, out_of_fold=out_of_fold)
        names = matrix.names
        values = matrix.values
        tasks = row_tasks(s.offer_kind[o], values[:, names.index(REPEAT_FEATURE)])
        task = np.array([TASKS.index(name) for name in tasks], dtype=np.int8)
        c, t = requests.customer[r], requests.as_of_s[r]
        label = _labels(snapshot, c, o, t, basket_end[r], task, config.horizon_days, end_s)
        group = r.astype(np.int64) * len(TASKS) + task
        if negatives_per_group is not None:
            sample = _sample_negatives(group, label, negatives_per_group, rng)
            r, o, task, values, c, t, label, group = (
                a[sample] for a in (r, o, task, values, c, t, label, group)
            )
        _, group = np.unique(group, return_inverse=True)
        order = np.lexsort((o, group))
        part = RowSet(
            values=values[order],
            names=names,
            label=label[order],
            group=group[order] + group_base,
            task=task[order],
            offer=o[order],
            customer=c[order],
            as_of_s=t[order],
            value=s.offer_value[o[order]],
            lever=s.offer_lever[o[order]],
        )
        group_base += int(group.max()) + 1 if len(group) else 0
        parts.append(part)
        if progress:
            progress(1)
    names = parts[0].names if parts else []
    return RowSet.concat(parts, names)


def _sample_negatives(
    group: np.ndarray, label: np.ndarray, per_group: int, rng: np.random.Generator
) -> np.ndarray:
    """Keep every positive, and up to ``per_group`` random negatives per group."""
    noise = rng.random(len(group))
    order = np.lexsort((noise, group))
    negative = label[order] == 0
    rank = np.zeros(len(group), dtype=np.int64)
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]
    counts = np.cumsum(negative)
    base = np.repeat(counts[starts] - negative[starts], np.diff(np.r_[starts, len(group)]))
    rank[order] = counts - base
    keep = (label == 1) | (rank <= per_group)
    return np.flatnonzero(keep)
