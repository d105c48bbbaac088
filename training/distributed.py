"""Scale-out on Dask: the same row building per cut point as tasks on the cluster, and
``lightgbm.dask.DaskLGBMRanker`` for the fit.

* Features: the snapshot is broadcast to the workers once; each cut point's rows are
  built by :func:`training.dataset.build_rows` (the very function the local engine
  calls) in a task, and stay on the worker that built them.
* Fit: the training rows become dask arrays with one chunk per cut point (groups never
  cross a cut point), and DaskLGBMRanker trains on them where they are.
* Early stopping: Dask's LightGBM does not stop early across workers, so the run trains
  ``n_estimators`` trees and then keeps the prefix with the best validation NDCG@k,
  computed on the client from per-tree leaf outputs.

Point it at a real cluster with ``nextbest train --engine dask --scheduler tcp://HOST:8786``;
without ``--scheduler`` it starts a 2-worker LocalCluster.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from features import Snapshot
from features.builder import FeatureBuilder
from features.candidates import CandidateGenerator
from policy import RuleSet
from training.config import TrainConfig
from training.dataset import RowSet, build_rows, cut_points
from training.metrics import ndcg_at_k
from training.model import ranker_params
from training.pipeline import (
    Stages,
    TrainResult,
    _Fitted,
    _require_positives,
    bucket_rows_options,
    finish,
)

__all__ = ["best_prefix", "train_on_dask"]

VALIDATION_SAMPLE_ROWS = 300_000


def _cut_rows(
    snapshot: Snapshot,
    rules: RuleSet,
    builder: FeatureBuilder,
    generator: CandidateGenerator,
    cut: pd.Timestamp,
    config: TrainConfig,
    options: dict[str, Any],
) -> RowSet:
    return build_rows(snapshot, rules, lambda _: builder, generator, [cut], config, **options)


def _renumber(parts: list[RowSet]) -> RowSet:
    offset = 0
    for part in parts:
        part.group = part.group + offset
        offset = int(part.group.max()) + 1 if len(part) else offset
    names = next((p.names for p in parts if p.names), [])
    return RowSet.concat([p for p in parts if len(p)], names)


def best_prefix(booster: lgb.Booster, validation: RowSet, k: int, seed: int) -> int:
    """The number of trees whose validation NDCG@k is best (on a sample of groups)."""
    groups = np.unique(validation.group)
    rng = np.random.default_rng(seed)
    rows = validation
    if len(validation) > VALIDATION_SAMPLE_ROWS:
        share = VALIDATION_SAMPLE_ROWS / len(validation)
        keep = rng.choice(groups, size=max(1, int(len(groups) * share)), replace=False)
        rows = validation.subset(np.isin(validation.group, keep))
    leaves = np.asarray(booster.predict(rows.values, pred_leaf=True), dtype=np.int64)
    n_trees = leaves.shape[1]
    outputs = np.zeros_like(leaves, dtype=np.float64)
    for tree in range(n_trees):
        unique = np.unique(leaves[:, tree])
        values = np.array([booster.get_leaf_output(tree, int(leaf)) for leaf in unique])
        outputs[:, tree] = values[np.searchsorted(unique, leaves[:, tree])]
    cumulative = np.cumsum(outputs, axis=1)
    scores = [ndcg_at_k(rows.group, rows.label, cumulative[:, t], k).mean() for t in range(n_trees)]
    return int(np.argmax(scores)) + 1


def train_on_dask(
    snapshot: Snapshot,
    rules: RuleSet,
    config: TrainConfig,
    *,
    scheduler: str | None = None,
    stages: Stages | None = None,
    logged: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    n_workers: int = 2,
) -> TrainResult:
    """Train as :func:`training.pipeline.train` does, with the rows and the fit on Dask."""
    import dask.array as da
    from dask import delayed
    from lightgbm.dask import DaskLGBMRanker

    from runtime.cluster import dask_client

    stages = stages or Stages(show=False)
    with dask_client(scheduler, n_workers) as client:
        with stages.stage("cut points"):
            splits = cut_points(snapshot, config)
        fitted = _Fitted(snapshot, config, splits.train[0])
        with stages.stage("broadcast snapshot"):
            remote = client.scatter(snapshot, broadcast=True)
        futures: dict[str, list[Any]] = {}
        with stages.stage(
            "rows on dask", total=len(splits.train) + len(splits.validation) + len(splits.test)
        ) as advance:
            for name in ("train", "validation", "test"):
                cuts = getattr(splits, name)
                futures[name] = [
                    client.submit(
                        _cut_rows,
                        remote,
                        rules,
                        fitted.builder(cut),
                        fitted.generator(cut),
                        cut,
                        config,
                        bucket_rows_options(config, splits, name, index),
                        pure=False,
                    )
                    for index, cut in enumerate(cuts)
                ]
            sizes = client.gather(
                [
                    client.submit(lambda p: (len(p), len(np.unique(p.group))), f)
                    for f in futures["train"]
                ]
            )
            advance(len(futures["train"]))
            validation = _renumber(client.gather(futures["validation"]))
            test = _renumber(client.gather(futures["test"]))
            advance(len(futures["validation"]) + len(futures["test"]))
        parts = [(f, n, g) for f, (n, g) in zip(futures["train"], sizes, strict=True) if n]
        n_features = len(validation.names)
        X = da.concatenate(
            [
                da.from_delayed(
                    delayed(lambda p: p.values)(f), shape=(n, n_features), dtype=np.float32
                )
                for f, n, _ in parts
            ]
        )
        y = da.concatenate(
            [
                da.from_delayed(delayed(lambda p: p.label)(f), shape=(n,), dtype=np.int8)
                for f, n, _ in parts
            ]
        )
        group = da.concatenate(
            [
                da.from_delayed(delayed(lambda p: p.group_sizes())(f), shape=(g,), dtype=np.int64)
                for f, _, g in parts
            ]
        )
        with stages.stage("fit ranker (dask)"):
            ranker = DaskLGBMRanker(client=client, **ranker_params(config))
            with warnings.catch_warnings():
                # each worker sets its own threads; LightGBM says so on every fit
                warnings.filterwarnings("ignore", "Parameter n_jobs will be ignored")
                ranker.fit(X, y, group=group)
            full = ranker.to_local().booster_
            best = best_prefix(full, validation, config.eval_at, config.random_state)
            booster = lgb.Booster(model_str=full.model_to_string(num_iteration=best))
        train_rows = _renumber(client.gather(futures["train"]))
        _require_positives(train_rows, validation)
    result = finish(
        snapshot,
        rules,
        config,
        splits,
        fitted,
        booster,
        train_rows,
        validation,
        test,
        stages=stages,
        logged=logged,
    )
    result.extra["dask"] = {
        "trees_trained": full.num_trees(),
        "trees_kept": best,
        "scheduler": scheduler or f"LocalCluster({n_workers} workers)",
    }
    return result
