"""Every ranking metric three ways: perfect ranking = 1, no hits = 0, a worked example."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    METRICS,
    bootstrap_difference,
    brier_score,
    catalog_coverage,
    hit_rate_at_k,
    map_at_k,
    ndcg_at_k,
    ranks_within_groups,
    recall_at_k,
)

GROUP = np.array([0, 0, 0, 0, 1, 1, 1])
LABEL = np.array([1, 0, 1, 0, 0, 1, 0])


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_perfect_ranking_scores_one(name: str, k: int) -> None:
    score = LABEL + np.linspace(0, 0.1, len(LABEL))  # positives first
    values = METRICS[name](GROUP, LABEL, score, k)
    if name == "recall" and k == 1:  # group 0 has two positives: one fits in the top 1
        np.testing.assert_allclose(values, [0.5, 1.0])
    else:
        np.testing.assert_allclose(values, 1.0)


@pytest.mark.parametrize("name", list(METRICS))
def test_no_hits_scores_zero(name: str) -> None:
    score = -LABEL.astype(float)  # positives last
    assert METRICS[name](GROUP, LABEL, score, 2).sum() == 0


def test_groups_without_positives_are_left_out() -> None:
    group = np.array([0, 0, 1, 1])
    label = np.array([0, 0, 1, 0])
    assert len(ndcg_at_k(group, label, np.array([1.0, 0.0, 1.0, 0.0]), 5)) == 1


def test_worked_example() -> None:
    """One group, positives at ranks 2 and 4 of 5 (the usual textbook case)."""
    group = np.zeros(5, dtype=int)
    label = np.array([0, 1, 0, 1, 0])
    score = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    idcg = 1 / np.log2(2) + 1 / np.log2(3)
    assert ndcg_at_k(group, label, score, 5)[0] == pytest.approx(dcg / idcg)  # 0.6509
    assert ndcg_at_k(group, label, score, 5)[0] == pytest.approx(0.650921, abs=1e-6)
    assert recall_at_k(group, label, score, 3)[0] == 0.5
    assert hit_rate_at_k(group, label, score, 1)[0] == 0.0
    assert hit_rate_at_k(group, label, score, 2)[0] == 1.0
    # AP@5 = (1/2 + 2/4) / 2 = 0.5
    assert map_at_k(group, label, score, 5)[0] == pytest.approx(0.5)


def test_ties_are_broken_by_row_order() -> None:
    ranks = ranks_within_groups(np.array([0, 0, 0]), np.array([1.0, 1.0, 2.0]))
    assert ranks.tolist() == [2, 3, 1]


def test_brier_coverage_and_bootstrap() -> None:
    assert brier_score(np.array([1, 0]), np.array([1.0, 0.0])) == 0
    assert brier_score(np.array([1, 0]), np.array([0.0, 1.0])) == 1
    assert (
        catalog_coverage(
            np.array([0, 0, 1, 1]), np.array([7, 8, 7, 9]), np.array([2.0, 1.0, 2.0, 1.0]), 1, 10
        )
        == 0.1
    )
    mean, low, high = bootstrap_difference(np.ones(50), np.zeros(50), 200, 0)
    assert (mean, low, high) == (1.0, 1.0, 1.0)
    mean, low, high = bootstrap_difference(
        np.r_[np.ones(50), np.zeros(50)], np.full(100, 0.5), 500, 0
    )
    assert mean == 0 and low < 0 < high


def test_the_customer_bootstrap_resamples_whole_customers() -> None:
    from training.metrics import bootstrap_difference

    # customer A's three groups gain 1.0 each, customer B's one group gains nothing
    a = np.array([1.0, 1.0, 1.0, 0.0])
    b = np.zeros(4)
    mean, low, high = bootstrap_difference(a, b, 400, 0, clusters=np.array(["A", "A", "A", "B"]))
    assert mean == 0.75
    # a draw of two customers is AA (1.0), AB (0.75) or BB (0.0): nothing in between
    assert low in (0.0, 0.75) and high == 1.0
    one = bootstrap_difference(a, b, 400, 0, clusters=np.array(["A"] * 4))
    assert one == (0.75, 0.75, 0.75)  # one customer: every draw is the same


def test_the_served_slate_ranks_every_task_together_as_serving_does() -> None:
    from features.registry import feature_names
    from policy.arbitration import Calibrator
    from training.config import TrainConfig, load_config
    from training.dataset import RowSet
    from training.pipeline import served_slate_metrics

    # one opportunity, three rows: a replenishment row (raw 2, P 0.6, value 1), an item
    # row (P 0.3, value 4) and a coupon (P 0.1, value 20); the customer took the item.
    # Serving ranks by P × value bounded to [2/3, 1.5] × the task median 2: item
    # 0.3 × 3 = 0.9, replenishment 0.6 × 4/3 = 0.8, coupon 0.1 × 3 = 0.3.
    identity = Calibrator(np.array([0.0, 10.0]), np.array([0.0, 1.0]))
    names = feature_names()  # the baselines read them: all 0 here, so they tie
    rows = RowSet(
        values=np.zeros((3, len(names)), dtype=np.float32),
        names=names,
        label=np.array([0, 1, 0]),
        group=np.array([3, 2, 0]),
        task=np.array([3, 2, 0]),  # replenishment, item, coupon
        offer=np.array([0, 1, 2]),
        customer=np.array([7, 7, 7]),
        as_of_s=np.array([100, 100, 100]),
        value=np.array([1.0, 4.0, 20.0]),
        lever=np.ones(3),
    )
    raw = np.array([6.0, 3.0, 1.0])  # P = raw / 10: 0.6, 0.3, 0.1
    config = load_config(None, bootstrap_samples=10)
    medians = {"coupon": 2.0, "item": 2.0, "replenishment": 2.0}
    served = served_slate_metrics(
        rows, raw, dict.fromkeys(medians, identity), medians, config, validation=rows
    )
    # the item is first: NDCG@3 = 1 and hit rate@3 = 1
    assert served["model"]["ndcg_at_3"] == 1.0 and served["model"]["hit_rate_at_3"] == 1.0
    assert served["opportunities"] == 1 and served["customers"] == 1
    # unbounded, the coupon's price leads (0.1 × 20 = 2 > 0.3 × 4 = 1.2 > 0.6 × 1): the
    # item is second, NDCG@3 = 1 / log2(3)
    unbounded = served_slate_metrics(
        rows,
        raw,
        dict.fromkeys(medians, identity),
        medians,
        TrainConfig.model_validate({"bootstrap_samples": 10, "value_cap": None}),
        validation=rows,
    )
    assert unbounded["model"]["ndcg_at_3"] == pytest.approx(1 / np.log2(3))
