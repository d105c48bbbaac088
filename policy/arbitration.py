"""Arbitration: calibrated acceptance probability × value × lever.

The ranker orders by relevance; the business orders by expected value. A
:class:`Calibrator` turns the ranker's raw score into P(accept) per task (isotonic,
fitted on validation). Levers are per-offer business weights, clipped to
``[1/lever_cap, lever_cap]`` so that they can reorder relevance only so far.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "REPEAT_FEATURE",
    "TASKS",
    "TASK_OF_KIND",
    "Calibrator",
    "arbitrate",
    "bounded_value",
    "offer_tasks",
    "rank_scores",
    "row_tasks",
]

TASKS = ("coupon", "cross_sell", "item", "replenishment")
"""What each calibrator (and each ranking group in training) is about: coupons, new
categories (cross-sell), items new to the customer, and items they bought before
(replenishment: what they may buy anyway, kept apart so that arbitration can tell)."""
TASK_OF_KIND = {"coupon": "coupon", "category": "cross_sell", "item": "item", "bundle": "item"}
REPEAT_FEATURE = "days_since_offer_product_purchase"
"""The feature that says a row's item was bought before: known = replenishment."""


@dataclass(frozen=True)
class Calibrator:
    """A monotone step function from raw score to probability (isotonic thresholds)."""

    x: np.ndarray
    y: np.ndarray

    def __call__(self, score: np.ndarray) -> np.ndarray:
        if len(self.x) == 0:
            return np.full(len(score), float(self.y[0]) if len(self.y) else 0.0)
        return np.interp(np.asarray(score, dtype=np.float64), self.x, self.y)

    def to_dict(self) -> dict[str, Any]:
        return {"x": self.x.tolist(), "y": self.y.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        return cls(np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"], dtype=np.float64))


def arbitrate(
    probability: np.ndarray,
    value: np.ndarray,
    lever: np.ndarray,
    lever_cap: float,
    default_value: float,
) -> np.ndarray:
    """Expected business value of each row: P(accept) × value × clipped lever."""
    worth = np.where(np.isnan(value) | (value <= 0), default_value, value)
    weight = np.clip(np.nan_to_num(lever, nan=1.0), 1.0 / lever_cap, lever_cap)
    return np.asarray(probability, dtype=np.float64) * worth * weight


def offer_tasks(kind_codes: np.ndarray) -> np.ndarray:
    """The task (coupon, cross_sell or item) of offers given their kind codes."""
    from features.contract import OFFER_KINDS

    kinds = np.asarray(OFFER_KINDS)[np.maximum(np.asarray(kind_codes), 0)]
    return np.array([TASK_OF_KIND[kind] for kind in kinds], dtype=object)


def row_tasks(kind_codes: np.ndarray, days_since_bought: np.ndarray) -> np.ndarray:
    """The task of each (customer, offer) row: an item offer whose product the customer
    bought before is replenishment; otherwise the task of the offer's kind."""
    from features.contract import OFFER_KINDS

    tasks = offer_tasks(kind_codes)
    repeat = (np.asarray(kind_codes) == OFFER_KINDS.index("item")) & ~np.isnan(
        np.asarray(days_since_bought, dtype=np.float64)
    )
    tasks[repeat] = "replenishment"
    return tasks


def rank_scores(
    raw: np.ndarray,
    tasks: np.ndarray,
    value: np.ndarray,
    lever: np.ndarray,
    calibrators: Mapping[str, Calibrator],
    default_values: Mapping[str, float],
    lever_cap: float,
    value_cap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(score, P(accept)) for ranked rows, as serving orders them: calibrated probability
    per task × value (the task's default where unknown) × clipped lever; ties in the
    product (isotonic steps) fall back to the raw score.

    With ``value_cap`` a row's value counts within ``[1/cap, cap]`` × its task's typical
    value (the training median): tasks keep their worth against each other, and inside a
    task the price reorders the probabilities only so far (a version trained before the
    cap existed ranks by the raw value, as it was evaluated)."""
    raw = np.asarray(raw, dtype=np.float64)
    probability = np.zeros(len(raw))
    default = np.ones(len(raw))
    for task in TASKS:
        mine = tasks == task
        if mine.any() and task in calibrators:
            probability[mine] = calibrators[task](raw[mine])
            default[mine] = default_values.get(task, 1.0)
    worth = bounded_value(value, default, value_cap)
    return arbitrate(probability, worth, lever, lever_cap, 1.0) + 1e-9 * raw, probability


def bounded_value(
    value: np.ndarray, typical: np.ndarray | float, value_cap: float | None
) -> np.ndarray:
    """The value arbitration multiplies by: the typical value where unknown, and within
    ``[1/value_cap, value_cap]`` × the typical value when a cap is set."""
    typical = np.broadcast_to(np.asarray(typical, dtype=np.float64), np.shape(value))
    value = np.asarray(value, dtype=np.float64)
    worth = np.where(np.isnan(value), typical, value)
    if value_cap is None:
        return worth
    return np.clip(worth, typical / value_cap, typical * value_cap)
