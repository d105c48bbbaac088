"""Batch scoring for campaigns: the service's own recommend, for many customers at once.

Customers sharing a moment go through :meth:`Recommender.recommend_many` in chunks, so
features, eligibility, ranking and explanations are computed for a chunk in one pass,
with the per-request semantics of the service (caps, holdouts, because text).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd

from serving.assembly import UNSET
from serving.engine import Recommender, in_holdout
from serving.settings import ServingSettings

__all__ = ["recommend_batch", "recommend_batch_dask", "without_rows"]

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
    # moments in time order, so that the few past builders the recommender keeps are each
    # fitted once (customers in random order would refit the same steps again and again)
    # each row remembers its line of the input, so the output keeps the input's order (a
    # customer listed twice, at two moments, keeps two separate slates)
    lines = pd.Series(range(len(ids)), index=ids.index)
    groups = sorted(ids.groupby(moments.map(str), sort=False), key=lambda g: _moment_key(g[0]))
    for moment, group in groups:
        as_of = None if moment == "None" else moment
        batch, at = group.tolist(), lines[group.index].tolist()
        for start in range(0, len(batch), chunk):
            responses = recommender.recommend_many(
                batch[start : start + chunk],
                channel=channel,
                placement=placement,
                k=k,
                as_of=as_of,
            )
            for line, response in zip(at[start : start + chunk], responses, strict=True):
                for offer in response["offers"]:
                    rows.append(
                        {
                            "line": line,
                            "customer_id": response["customer_id"],
                            "rank": offer["rank"],
                            "offer_id": offer["offer_id"],
                            "score": offer["score"],
                            "probability": offer["probability"],
                            "because": offer["because"],
                        }
                    )
    frame = pd.DataFrame(rows, columns=["line", *COLUMNS])
    frame = frame.sort_values(["line", "rank"], kind="stable", ignore_index=True)
    return frame.drop(columns="line")


def _moment_key(moment: str) -> tuple[int, float]:
    """Past moments first, oldest first; no moment (now) last; one that is not a plain
    time on the data's clock (unreadable, NaT, with a zone) first, where the recommender
    refuses it with its own message."""
    if moment == "None":
        return (1, 0.0)
    try:
        when = pd.Timestamp(moment)
    except (ValueError, TypeError):
        return (0, float("-inf"))
    if pd.isna(when) or when.tzinfo is not None:
        return (0, float("-inf"))
    return (0, float(when.value))


def _in_order(rows: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """Rows in the customers' order, each customer's by rank."""
    order = {c: i for i, c in enumerate(ids)}
    return rows.sort_values(
        ["customer_id", "rank"],
        key=lambda col: col.map(order) if col.name == "customer_id" else col,
        kind="stable",
        ignore_index=True,
    )


def without_rows(
    settings: ServingSettings, customer_ids: pd.Series, rows: pd.DataFrame
) -> tuple[int, int]:
    """Of the distinct customers scored, how many got no row: (those in the holdout,
    the others). The holdout is the engine's own sticky assignment under ``settings``."""
    ids = pd.Index(customer_ids.astype("str").unique())
    empty = ids[~ids.isin(rows["customer_id"].astype("str"))]
    held = sum(in_holdout(c, settings.holdout_salt, settings.holdout_share) for c in empty)
    return held, len(empty) - held


PLUGIN_NAME = "nextbest-recommender"


def _recommender_plugin(recommender: Recommender) -> Any:
    """A Dask WorkerPlugin that builds, once per worker, the same recommender as the
    client's: the same factory, settings, workspace, model version, ledger and blocks."""
    from distributed import WorkerPlugin

    bundle = recommender.model.bundle
    inputs: dict[str, Any] = {
        "settings": replace(recommender.settings, db_url=recommender.ledger.url),
        "workspace": recommender.workspace.path,
        "version": None if bundle is None else bundle.version,
        "alias": None if bundle is None else bundle.alias,
        "blocks": [block.model_dump() for block in recommender.blocks],
    }

    class RecommenderPlugin(WorkerPlugin):
        name = PLUGIN_NAME

        def setup(self, worker: Any) -> None:
            from policy.rules import SegmentBlock
            from runtime.registry import configure_tracking
            from serving.assembly import build_recommender

            configure_tracking()
            self.recommender = build_recommender(
                inputs["settings"],
                workspace=inputs["workspace"],
                version=inputs["version"],
                bundle=None if inputs["version"] is None else UNSET,
                blocks=[SegmentBlock(**block) for block in inputs["blocks"]],
            )
            if inputs["alias"] is not None and self.recommender.model.bundle is not None:
                self.recommender.model.bundle.alias = inputs["alias"]

    return RecommenderPlugin()


def _chunk_on_worker(
    ids: list[str], as_of: Any, channel: str, placement: str, k: int
) -> pd.DataFrame:
    from distributed import get_worker

    plugin: Any = get_worker().plugins[PLUGIN_NAME]
    chunk = pd.DataFrame({"customer_id": ids, "as_of": [as_of] * len(ids)})
    return recommend_batch(plugin.recommender, chunk, channel=channel, placement=placement, k=k)


def recommend_batch_dask(
    recommender: Recommender,
    customers: pd.DataFrame,
    *,
    channel: str,
    placement: str,
    k: int,
    scheduler: str | None = None,
    n_workers: int = 2,
    chunk: int = 256,
) -> pd.DataFrame:
    """:func:`recommend_batch` spread over a Dask cluster: every worker builds the same
    Recommender (same workspace, model version, settings and ledger) once, and scores
    chunks of customers. Rows come back in the customers' order."""
    from runtime.cluster import dask_client

    plugin = _recommender_plugin(recommender)
    with dask_client(scheduler, n_workers) as client:
        client.register_plugin(plugin)
        ids = customers["customer_id"].astype("str").tolist()
        moments = customers["as_of"].tolist() if "as_of" in customers.columns else [None] * len(ids)
        tasks = []
        for start in range(0, len(ids), chunk):
            part_ids, part_moments = ids[start : start + chunk], moments[start : start + chunk]
            for moment in dict.fromkeys(map(str, part_moments)):
                same = [c for c, m in zip(part_ids, part_moments, strict=True) if str(m) == moment]
                as_of = None if moment in ("None", "NaT", "nan") else moment
                tasks.append(
                    client.submit(_chunk_on_worker, same, as_of, channel, placement, k, pure=False)
                )
        parts = client.gather(tasks)
    frames = [p for p in parts if len(p)]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    return _in_order(rows, ids)
