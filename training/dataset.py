"""The training set: opportunities along time, their candidates, features and labels.

* An **opportunity** is a customer at a cut point (weekly by default).
* Its **context** is sampled as serving sees them: channel, placement, moment, page
  product and cart (``training.contexts``).
* Its **candidates** are what generation and eligibility (``policy.evaluate``, the very
  decision serving makes) let through at that moment.
* **Labels** look forward from the cut point: a coupon is redeemed (or accepted) inside
  its campaign window; an item or bundle offer's product is bought within the horizon;
  a category offer counts only while the category is new to the customer (cross-sell),
  and its label is that first purchase within the horizon.
* Rows are grouped per (opportunity, task), the unit the ranker orders. The tasks are
  ``coupon``, ``cross_sell`` and ``item`` (item and bundle offers).
* Cut points are split by time into train, validation and test, with an embargo of one
  horizon between them so that no label window of one split reaches into the next.

Training may sample customers per cut point and negatives per group; evaluation always
keeps every candidate of every sampled opportunity.
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
from policy.arbitration import TASKS, offer_tasks
from training.config import TrainConfig
from training.contexts import sample_contexts

__all__ = ["TASKS", "RowSet", "Splits", "build_rows", "cut_points", "task_of_offer"]

DAY = 86_400


def task_of_offer(snapshot: Snapshot, offers: np.ndarray) -> np.ndarray:
    """Task codes (positions in TASKS) of offers."""
    tasks = offer_tasks(snapshot.offer_kind[offers])
    return np.array([TASKS.index(task) for task in tasks], dtype=np.int8)


@dataclass
class Splits:
    train: list[pd.Timestamp]
    validation: list[pd.Timestamp]
    test: list[pd.Timestamp]

    def as_dict(self) -> dict[str, list[str]]:
        return {
            name: [t.isoformat() for t in getattr(self, name)]
            for name in ("train", "validation", "test")
        }


def cut_points(snapshot: Snapshot, config: TrainConfig) -> Splits:
    """Cut points every ``cut_every_days`` between ``start`` and ``until - horizon``,
    split by time with a one-horizon embargo between the parts."""
    seconds = snapshot.line_seconds
    if not len(seconds):
        raise ValueError("the workspace has no orders to train on")
    first = pd.Timestamp(int(seconds.min()), unit="s").normalize()
    last = pd.Timestamp(int(seconds.max()), unit="s")
    start = pd.Timestamp(config.start) if config.start else first + pd.Timedelta(weeks=8)
    until = pd.Timestamp(config.until) if config.until else last
    horizon = pd.Timedelta(days=config.horizon_days)
    cuts = list(pd.date_range(start, until - horizon, freq=f"{config.cut_every_days}D"))
    if len(cuts) < 6:
        raise ValueError(
            f"only {len(cuts)} cut points between {start.date()} and {until.date()} minus the "
            f"{config.horizon_days}-day horizon; train on a longer history or cut more often"
        )
    n_test = max(1, round(len(cuts) * config.test_share))
    n_validation = max(1, round(len(cuts) * config.validation_share))
    test = cuts[-n_test:]
    validation = [t for t in cuts if t + horizon <= test[0]][-n_validation:]
    train = [t for t in cuts if validation and t + horizon <= validation[0]]
    if not train or not validation:
        raise ValueError(
            f"{len(cuts)} cut points are too few to split into train, validation and test "
            f"with a {config.horizon_days}-day gap between them; train on a longer history, "
            "cut more often or shorten the horizon"
        )
    return Splits(train=train, validation=validation, test=test)


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
    task: np.ndarray,
    horizon_days: int,
) -> np.ndarray:
    s = snapshot
    end = t + horizon_days * DAY
    label = np.zeros(len(offers), dtype=np.int8)
    coupon = task == 0
    if coupon.any():
        valid_to = s.offer_valid_to_s[offers[coupon]]
        window_end = np.where(valid_to < np.iinfo(np.int64).max // 2, valid_to + 1, end[coupon])
        pair = s.accepted_by_cust_offer_pairs.encode(customers[coupon], offers[coupon])
        label[coupon] = s.accepted_by_cust_offer.count(pair, t[coupon], window_end) > 0
    cross = task == 1
    if cross.any():
        pair = s.cust_category.encode(customers[cross], s.offer_category[offers[cross]])
        label[cross] = s.orders_by_cust_category.count(pair, t[cross], end[cross]) > 0
    item = task == 2
    if item.any():
        pair = s.cust_offer_bought.encode(customers[item], offers[item])
        label[item] = s.bought_by_cust_offer.count(pair, t[item], end[item]) > 0
    return label


def build_rows(
    snapshot: Snapshot,
    rules: RuleSet,
    builders: Callable[[pd.Timestamp], FeatureBuilder],
    generator: CandidateGenerator,
    cuts: list[pd.Timestamp],
    config: TrainConfig,
    *,
    customers_per_cut: int,
    negatives_per_group: int | None,
    out_of_fold: bool,
    seed_offset: int = 0,
    progress: Callable[[int], None] | None = None,
) -> RowSet:
    """Rows for every cut point: candidates → eligibility → features → labels.

    ``builders(t)`` returns the feature builder fitted for cut point ``t``.
    ``negatives_per_group`` samples negatives (training); None keeps every candidate.
    """
    s = snapshot
    parts: list[RowSet] = []
    group_base = 0
    all_customers = np.flatnonzero(np.asarray(snapshot.customers.values) != "UNKNOWN")
    needs_features = rules.needs_features
    for index, cut in enumerate(cuts):
        rng = np.random.default_rng([config.random_state, seed_offset, index])
        t_cut = second_ceil(cut)
        first_order = s.orders_by_customer.first_of_group(
            all_customers, np.full(len(all_customers), t_cut)
        )
        active = all_customers[first_order >= 0]
        chosen = (
            rng.choice(active, size=customers_per_cut, replace=False)
            if len(active) > customers_per_cut
            else active
        )
        chosen = np.sort(chosen)
        ids = list(snapshot.customers.decode(chosen))
        context = sample_contexts(
            snapshot,
            chosen,
            t_cut,
            rng,
            from_exposures=config.context_from_exposures,
            horizon_days=config.horizon_days,
        )
        requests = Requests.build(
            snapshot,
            ids,
            [cut] * len(ids),
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
        # the one eligibility decision serving makes too (policy.evaluate), on the history
        eligible = evaluate(snapshot, rules, requests, r, o, features=features).eligible
        r, o = r[eligible], o[eligible]
        matrix = builder.build(snapshot, requests, r, o, out_of_fold=out_of_fold)
        task = task_of_offer(snapshot, o)
        values = matrix.values
        c, t = requests.customer[r], requests.as_of_s[r]
        label = _labels(snapshot, c, o, t, task, config.horizon_days)
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
            names=matrix.names,
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
