"""Batch scoring for campaigns: the service's own recommend, for many customers at once.

Customers sharing a moment go through :meth:`Recommender.recommend_many` in chunks, so
features, eligibility, ranking and explanations are computed for a chunk in one pass,
with the per-request semantics of the service (caps, holdouts, because text).
"""

from __future__ import annotations

import pandas as pd

from serving.engine import Recommender

__all__ = ["recommend_batch"]

COLUMNS = ["customer_id", "rank", "offer_id", "score", "probability", "because"]


def recommend_batch(
    recommender: Recommender,
    customers: pd.DataFrame,
    *,
    channel: str,
    placement: str,
    k: int,
    chunk: int = 256,
) -> pd.DataFrame:
    """One row per recommendation for every customer (``as_of`` per row if given).

    Holdout customers get what the holdout control says (nothing, or rules-only) and are
    logged like everyone else, exactly as the service does.
    """
    ids = customers["customer_id"].astype("str")
    moments = (
        customers["as_of"].astype("object").where(customers["as_of"].notna(), None)
        if "as_of" in customers.columns
        else pd.Series([None] * len(customers), index=customers.index, dtype="object")
    )
    rows = []
    for moment, group in ids.groupby(moments.map(str), sort=False):
        as_of = None if moment == "None" else moment
        batch = group.tolist()
        for start in range(0, len(batch), chunk):
            responses = recommender.recommend_many(
                batch[start : start + chunk],
                channel=channel,
                placement=placement,
                k=k,
                as_of=as_of,
            )
            for response in responses:
                for offer in response["offers"]:
                    rows.append(
                        {
                            "customer_id": response["customer_id"],
                            "rank": offer["rank"],
                            "offer_id": offer["offer_id"],
                            "score": offer["score"],
                            "probability": offer["probability"],
                            "because": offer["because"],
                        }
                    )
    return pd.DataFrame(rows, columns=COLUMNS)
