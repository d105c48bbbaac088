"""Models trained in the tests, served without the MLflow registry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features import Snapshot, Workspace
from policy import RuleSet, load_rules
from runtime.registry import ModelBundle, model_name
from training.config import TrainConfig
from training.dataset import RowSet, cut_points
from training.pipeline import Stages, TrainResult, _Fitted, _rows
from training.tracking import bundle_meta

# a small model of the real demo: fast enough for the suite, enough to rank and explain.
# On a sample this small, the default learning rate stops early after a handful of trees;
# the slower rate (and depth 6) keeps a model that uses its context features.
DEMO_CONFIG = {
    "train_customers_per_cut": 200,
    "eval_customers_per_cut": 150,
    "cut_every_days": 14,
    # the per-split floors at their defaults would take about 3x these per bucket on a
    # year of data (about twice the training time): the suite needs a model, not the best
    "min_train_opportunities": 6000,
    "min_eval_opportunities": 1500,
    "n_estimators": 80,
    "learning_rate": 0.05,
    "max_depth": 6,
    "bootstrap_samples": 20,
    "n_jobs": 1,
}


@dataclass
class DemoModel:
    workspace: Workspace
    snapshot: Snapshot
    result: TrainResult
    bundle: ModelBundle


def bundle_of(result: TrainResult, workspace: Workspace, rules: RuleSet) -> ModelBundle:
    """The version a training run would register, as serving loads it."""
    return ModelBundle(
        name=model_name(workspace.workspace_id),
        version="test",
        alias="champion",
        run_id="test-run",
        booster=result.booster,
        meta=bundle_meta(result, workspace, rules),
        rules_yaml=rules.to_yaml(),
    )


# every raw table with a time column, and the column: what "the future" is
TIME_COLUMNS = {
    "orders": "ordered_at",
    "exposures": "shown_at",
    "outcomes": "occurred_at",
    "events": "occurred_at",
    "consent": "updated_at",
    "audiences": "added_at",
}


def rows_with_and_without_the_future(
    workspace: Workspace, config: TrainConfig, name: str
) -> tuple[RowSet, RowSet]:
    """The rows of split ``name`` built from the whole workspace, and from its tables with
    everything at or after the split's end removed (builders and generators refitted)."""
    tables = workspace.read_all()
    full = Snapshot.from_tables(tables)
    splits = cut_points(full, config)
    end = splits.ends[name]
    cut = dict(tables)
    for table, column in TIME_COLUMNS.items():
        frame = tables[table]
        cut[table] = frame[frame[column].isna() | (frame[column] < end)].reset_index(drop=True)
    truncated = Snapshot.from_tables(cut)
    assert len(truncated.line_seconds) < len(full.line_seconds)
    out = []
    for snapshot in (full, truncated):
        fitted = _Fitted(snapshot, config, splits.train[0])
        out.append(_rows(snapshot, load_rules(), fitted, splits, config, Stages(show=False), name))
    before = out[0]
    assert before.as_of_s.max() < end.value // 10**9
    return before, out[1]


def assert_same_rows(before: RowSet, after: RowSet) -> None:
    assert len(before) > 0 and before.label.sum() > 0
    np.testing.assert_array_equal(before.label, after.label)
    np.testing.assert_array_equal(before.offer, after.offer)
    np.testing.assert_array_equal(before.as_of_s, after.as_of_s)
    np.testing.assert_array_equal(before.values, after.values)
