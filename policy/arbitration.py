"""Arbitration: calibrated acceptance probability × value × lever.

The ranker orders by relevance; the business orders by expected value. A
:class:`Calibrator` turns the ranker's raw score into P(accept) per task (isotonic,
fitted on validation). Levers are per-offer business weights, clipped to
``[1/lever_cap, lever_cap]`` so that they can reorder relevance only so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Calibrator", "arbitrate"]


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
