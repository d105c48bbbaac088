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
