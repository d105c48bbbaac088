"""Ranking and calibration metrics over grouped rows.

Every ranking metric takes (group, label, score) arrays: rows of one group are ranked by
score (ties broken by row order, so results are deterministic) and the metric is the
mean over groups that hold at least one positive.

* ``ndcg_at_k``: DCG with gain 1 per positive and discount 1/log2(rank+1), over the
  ideal DCG.
* ``recall_at_k``: positives in the top k over all positives of the group.
* ``hit_rate_at_k``: 1 if any positive is in the top k.
* ``map_at_k``: mean over positives in the top k of precision at their rank, divided by
  min(k, positives).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "METRICS",
    "bootstrap_difference",
    "brier_score",
    "catalog_coverage",
    "group_owners",
    "hit_rate_at_k",
    "map_at_k",
    "ndcg_at_k",
    "ranks_within_groups",
    "recall_at_k",
]


def ranks_within_groups(group: np.ndarray, score: np.ndarray) -> np.ndarray:
    """1-based rank of each row inside its group, best score first (stable on ties)."""
    order = np.lexsort((np.arange(len(score)), -np.asarray(score, dtype=np.float64), group))
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]
    lengths = np.diff(np.r_[starts, len(group)])
    ranks = np.empty(len(group), dtype=np.int64)
    ranks[order] = np.arange(len(group)) - np.repeat(starts, lengths) + 1
    return ranks


def _per_group(
    group: np.ndarray, label: np.ndarray, score: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    _, codes = np.unique(group, return_inverse=True)
    ranks = ranks_within_groups(codes, score)
    positives = np.bincount(codes, weights=label > 0)
    top = (ranks <= k) & (label > 0)
    return codes, ranks, positives, top


def ndcg_at_k(group: np.ndarray, label: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Per-group NDCG@k for groups with a positive (an array; take its mean)."""
    codes, ranks, positives, top = _per_group(group, label, score, k)
    dcg = np.bincount(
        codes, weights=np.where(top, 1.0 / np.log2(ranks + 1), 0.0), minlength=len(positives)
    )
    ideal_hits = np.minimum(positives, k).astype(np.int64)
    discounts = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))]
    ideal = discounts[ideal_hits]
    has = positives > 0
    return dcg[has] / ideal[has]


def recall_at_k(group: np.ndarray, label: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    codes, _, positives, top = _per_group(group, label, score, k)
    hits = np.bincount(codes, weights=top, minlength=len(positives))
    has = positives > 0
    return hits[has] / positives[has]


def hit_rate_at_k(group: np.ndarray, label: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    codes, _, positives, top = _per_group(group, label, score, k)
    hits = np.bincount(codes, weights=top, minlength=len(positives))
    has = positives > 0
    return (hits[has] > 0).astype(np.float64)


def map_at_k(group: np.ndarray, label: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    codes, ranks, positives, top = _per_group(group, label, score, k)
    order = np.lexsort((ranks, codes))
    hit_sorted = top[order].astype(np.float64)
    group_sorted = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(group_sorted)) + 1]
    lengths = np.diff(np.r_[starts, len(codes)])
    cumulative = np.cumsum(hit_sorted)
    hits_before = cumulative - np.repeat(cumulative[starts] - hit_sorted[starts], lengths)
    precision = np.where(hit_sorted > 0, hits_before / ranks[order], 0.0)
    total = np.bincount(group_sorted, weights=precision, minlength=len(positives))
    has = positives > 0
    return total[has] / np.minimum(positives[has], k)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]] = {
    "ndcg": ndcg_at_k,
    "recall": recall_at_k,
    "hit_rate": hit_rate_at_k,
    "map": map_at_k,
}


def brier_score(label: np.ndarray, probability: np.ndarray) -> float:
    return float(np.mean((np.asarray(probability, dtype=np.float64) - label) ** 2))


def catalog_coverage(
    group: np.ndarray, offer: np.ndarray, score: np.ndarray, k: int, catalog_size: int
) -> float:
    """Share of the catalog that appears in anyone's top k."""
    ranks = ranks_within_groups(np.unique(group, return_inverse=True)[1], score)
    return float(len(np.unique(offer[ranks <= k])) / max(catalog_size, 1))


def bootstrap_difference(
    a: np.ndarray,
    b: np.ndarray,
    samples: int,
    seed: int,
    clusters: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Mean of paired per-group differences a − b with a 95 % bootstrap interval.

    With ``clusters`` (e.g. the customer of each group) whole clusters are resampled:
    the same customers recur in every bucket, and their groups are not independent."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not len(diff):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if clusters is None:
        means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    else:
        _, code = np.unique(np.asarray(clusters), return_inverse=True)
        n = int(code.max()) + 1
        total = np.bincount(code, weights=diff, minlength=n)
        count = np.bincount(code, minlength=n).astype(np.float64)
        draws = rng.integers(0, n, size=(samples, n))
        means = total[draws].sum(axis=1) / count[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def group_owners(group: np.ndarray, label: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The owner (e.g. customer) of each group with a positive, in the order the ranking
    metrics return their per-group values."""
    _, first = np.unique(group, return_index=True)
    positives = np.bincount(np.unique(group, return_inverse=True)[1], weights=label > 0)
    return np.asarray(owner)[first][positives > 0]
