"""Models trained in the tests, served without the MLflow registry."""

from __future__ import annotations

from dataclasses import dataclass

from features import Snapshot, Workspace
from policy import RuleSet
from runtime.registry import ModelBundle, model_name
from training.pipeline import TrainResult
from training.tracking import bundle_meta

# a small model of the real demo: fast enough for the suite, enough to rank and explain.
# On a sample this small, the default learning rate stops early after a handful of trees;
# the slower rate (and depth 6) keeps a model that uses its context features.
DEMO_CONFIG = {
    "train_customers_per_cut": 200,
    "eval_customers_per_cut": 150,
    "cut_every_days": 14,
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
