"""The ranker: LightGBM lambdarank over candidate groups, calibrated per task."""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np
from sklearn.isotonic import IsotonicRegression

from policy.arbitration import Calibrator
from training.config import TrainConfig
from training.dataset import TASKS, RowSet

__all__ = ["calibrate", "fit_ranker", "ranker_params", "raw_scores"]


def _with_positive_groups(rows: RowSet) -> RowSet:
    positives = np.bincount(np.unique(rows.group, return_inverse=True)[1], weights=rows.label)
    keep = positives[np.unique(rows.group, return_inverse=True)[1]] > 0
    return rows.subset(keep)


def ranker_params(config: TrainConfig) -> dict[str, Any]:
    """The ranker's parameters, shared by the local and the Dask engine."""
    return {
        "objective": "lambdarank",
        "n_estimators": config.n_estimators,
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "max_depth": config.max_depth,
        "min_child_samples": config.min_child_samples,
        "random_state": config.random_state,
        "deterministic": True,
        "force_row_wise": True,
        "verbose": -1,
    }


def fit_ranker(train: RowSet, validation: RowSet, config: TrainConfig) -> lgb.Booster:
    """LGBMRanker (lambdarank), one group per (opportunity, task), early stopping on the
    validation NDCG@``eval_at``. Seeded and deterministic.

    Code-valued features (channel, placement, moment, offer kind) are split as numbers,
    as the Dask engine must (distributed categorical bins crash LightGBM's workers).
    """
    ranker = lgb.LGBMRanker(**ranker_params(config), n_jobs=config.n_jobs)
    valid = _with_positive_groups(validation)
    ranker.fit(
        train.values,
        train.label,
        group=train.group_sizes(),
        eval_X=(valid.values,),
        eval_y=(valid.label,),
        eval_group=[valid.group_sizes()],
        eval_at=[config.eval_at],
        feature_name=list(train.names),
        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
    )
    return ranker.booster_


def raw_scores(booster: lgb.Booster, rows: RowSet, n_jobs: int) -> np.ndarray:
    return np.asarray(booster.predict(rows.values, num_threads=n_jobs), dtype=np.float64)


def calibrate(scores: np.ndarray, rows: RowSet) -> dict[str, Calibrator]:
    """Isotonic regression of the label on the raw score, per task, on validation rows."""
    calibrators: dict[str, Calibrator] = {}
    for code, task in enumerate(TASKS):
        mine = rows.task == code
        if not mine.any():
            continue
        if rows.label[mine].min() == rows.label[mine].max():
            rate = float(rows.label[mine].mean())
            calibrators[task] = Calibrator(np.zeros(0), np.array([rate]))
            continue
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(scores[mine], rows.label[mine])
        calibrators[task] = Calibrator(np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_))
    return calibrators
