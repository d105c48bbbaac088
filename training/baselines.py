"""The simple things a retailer already does, scored on the same rows as the ranker.

Each baseline returns a score per row; higher ranks first. They read the same
point-in-time features the ranker sees, so they are compared on identical candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.dataset import RowSet

__all__ = ["BASELINES"]


def _nan0(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values.astype(np.float64), nan=0.0)


def popularity(rows: RowSet) -> np.ndarray:
    """What everyone bought most in the last 30 days."""
    return _nan0(rows.column("offer_popularity_30d"))


def personal_frequency(rows: RowSet) -> np.ndarray:
    """What this customer bought most often (its products, else its category)."""
    return _nan0(rows.column("offer_product_purchases_365d")) + _nan0(
        rows.column("category_orders_365d")
    )


def personal_then_global(rows: RowSet) -> np.ndarray:
    """Personal frequency first; global popularity breaks the ties."""
    popular = popularity(rows)
    return personal_frequency(rows) * (popular.max() + 1.0) + popular


def copurchase(rows: RowSet) -> np.ndarray:
    """Bought this, also bought: the best basket lift with something they bought."""
    return np.fmax(
        _nan0(rows.column("copurchase_lift")), _nan0(rows.column("item_copurchase_lift"))
    )


def rules_only(rows: RowSet) -> np.ndarray:
    """Eligibility, then the business's own order: the most valuable offer first."""
    return np.nan_to_num(rows.value, nan=0.0) * np.nan_to_num(rows.lever, nan=1.0)


BASELINES: dict[str, Callable[[RowSet], np.ndarray]] = {
    "popularity": popularity,
    "personal_frequency": personal_frequency,
    "personal_then_global": personal_then_global,
    "copurchase": copurchase,
    "rules_only": rules_only,
}
