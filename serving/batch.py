"""Batch scoring for campaigns: the service's recommend, customer by customer."""

from __future__ import annotations

import pandas as pd

from serving.engine import Recommender

__all__ = ["recommend_batch"]

COLUMNS = ["customer_id", "rank", "offer_id", "score", "probability", "because"]


def recommend_batch(
    recommender: Recommender, customers: pd.DataFrame, *, channel: str, placement: str, k: int
) -> pd.DataFrame:
    """One row per recommendation for every customer (``as_of`` per row if given).

    Holdout customers get what the holdout control says (nothing, or rules-only) and are
    logged like everyone else, exactly as the service does.
    """
    rows = []
    as_of = customers["as_of"] if "as_of" in customers.columns else None
    for i, customer in enumerate(customers["customer_id"].astype("str")):
        moment = None if as_of is None or pd.isna(as_of.iloc[i]) else as_of.iloc[i]
        response = recommender.recommend(
            customer, channel=channel, placement=placement, k=k, as_of=moment
        )
        for offer in response["offers"]:
            rows.append(
                {
                    "customer_id": customer,
                    "rank": offer["rank"],
                    "offer_id": offer["offer_id"],
                    "score": offer["score"],
                    "probability": offer["probability"],
                    "because": offer["because"],
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)
