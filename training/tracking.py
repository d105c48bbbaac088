"""MLflow: one run per training, everything logged, then a registered version.

This is the I/O shell around ``training.pipeline.train``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features import FEATURES, Workspace
from features.registry import features_hash
from policy import RuleSet
from policy.fairness import FAIRNESS_TAG, FairnessReport, fairness_report
from runtime.registry import (
    BEATS_BASELINE_TAG,
    CHALLENGER,
    CHECKSUM_TAG,
    EXPERIMENT,
    FEATURES_TAG,
    QUALITY_SUMMARY_TAG,
    check_logged_model,
    model_name,
    register_version,
)
from training.dataset import TASKS
from training.pipeline import TrainResult, probabilities
from training.report import model_card, write_plots

__all__ = ["bundle_meta", "close_abandoned_runs", "log_run", "served_fairness"]

PIP_REQUIREMENTS = ["lightgbm==4.7.0", "numpy==2.4.6", "pandas==3.1.1", "scikit-learn==1.9.1"]


PID_TAG = "nextbest.pid"
HOST_TAG = "nextbest.host"
PAUSE_HOOK = "NEXTBEST_TEST_PAUSE_BEFORE_REGISTERING"
"""Test hook: seconds to sleep once everything is logged, just before the version is
registered (after saying so on stderr), so that a test can kill training at that point."""


def _pause_before_registering() -> None:
    seconds = float(os.environ.get(PAUSE_HOOK) or 0)
    if seconds > 0:
        print(f"{PAUSE_HOOK}: pausing {seconds:g} s before registering", file=sys.stderr)
        sys.stderr.flush()
        time.sleep(seconds)


def close_abandoned_runs() -> list[str]:
    """Mark KILLED the runs of this experiment left RUNNING by a training process on this
    machine that no longer exists (killed midway: they never registered a version).
    Returns their ids."""
    import mlflow
    from mlflow import MlflowClient

    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    client = MlflowClient()
    closed = []
    host = socket.gethostname()
    for run in client.search_runs(
        [experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=1000
    ):
        pid = run.data.tags.get(PID_TAG)
        if run.data.tags.get(HOST_TAG) != host or pid is None or _alive(int(pid)):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        out[prefix] = float(value)


def bundle_meta(result: TrainResult, workspace: Workspace, rules: RuleSet) -> dict[str, Any]:
    """What serving needs besides the booster (``runtime.registry.ModelBundle.meta``),
    including the workspace and catalogue it was trained on, which serving checks."""
    return {
        "feature_names": result.test.names,
        "calibrators": {task: c.to_dict() for task, c in result.calibrators.items()},
        "default_values": result.default_values,
        "lever_cap": result.config.lever_cap,
        "value_cap": result.config.value_cap,
        "config": result.config.model_dump(),
        "rules_hash": rules.content_hash,
        "fingerprint": workspace.fingerprint,
        "workspace_id": workspace.workspace_id,
        "catalogue": result.catalogue,
        "splits": result.splits.as_dict(),
        "trained_until": result.splits.ends["test"].isoformat(),
    }


def log_run(
    result: TrainResult, workspace: Workspace, rules: RuleSet, *, engine: str = "local"
) -> dict[str, Any]:
    """Log ``result`` as one MLflow run, register it, alias it ``challenger``.

    Returns ``run_id``, ``model_version`` and the headline metrics.
    """
    import mlflow
    from mlflow.models import infer_signature

    manifest = workspace.manifest
    name = model_name(workspace.workspace_id)
    config = result.config.model_dump()
    close_abandoned_runs()
    with mlflow.start_run(run_name=f"train-{manifest['fingerprint']}") as run:
        mlflow.set_tags({PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
        mlflow.log_params(
            {
                **{f"config.{k}": v for k, v in config.items()},
                "rules.hash": rules.content_hash,
                "rules.name": rules.name,
                "engine": engine,
                "train.first_cut": result.splits.train[0].isoformat(),
                "test.last_cut": result.splits.test[-1].isoformat(),
                "test.end": result.splits.ends["test"].isoformat(),
            }
        )
        mlflow.set_tags(
            {
                "dataset.fingerprint": manifest["fingerprint"],
                "dataset.source": json.dumps(manifest["source"], default=str)[:5000],
                "dataset.synthetic": str(manifest["synthetic"]),
                "dataset.as_of_range": f"{result.splits.train[0].date()}.."
                f"{result.splits.ends['test'].date()}",
            }
        )
        flat: dict[str, float] = {}
        _flatten("", result.metrics, flat)
        _flatten("rows", result.rows, flat)
        _flatten("seconds", result.timings, flat)
        mlflow.log_metrics({key.replace("@", "_at_"): value for key, value in flat.items()})
        fairness = served_fairness(result.served, workspace, rules)
        if fairness is not None:
            mlflow.log_metrics(fairness.metrics())
            # per-group counts and ratios: group labels, never a customer's row
            mlflow.log_dict(fairness.to_dict(), "fairness.json")
        probability = probabilities(result.test_scores, result.test, result.calibrators)
        # Everything is logged (the model first, for its checksum) before the version is
        # registered, with its tags, in one registry call: a run killed midway leaves a
        # run, never a half-registered version.
        example = _of_no_one(result.test.values)  # item 7: no customer's row
        signature = infer_signature(example, result.booster.predict(example))
        info = mlflow.lightgbm.log_model(
            result.booster,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
        )
        checksum = check_logged_model(info.model_uri, len(result.test.names))
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            bundle = root / "bundle"
            bundle.mkdir()
            meta = bundle_meta(result, workspace, rules) | {"model_sha256": checksum}
            (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))
            (bundle / "rules.yaml").write_text(rules.to_yaml())
            (bundle / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
            mlflow.log_artifacts(str(bundle), artifact_path="bundle")
            features = [
                {
                    "name": s.name,
                    "family": s.family,
                    "description": s.description,
                    "unit": s.unit,
                    "because": s.because,
                }
                for s in FEATURES
            ]
            mlflow.log_dict({"features": features}, "features.json")
            mlflow.log_text(rules.to_yaml(), "rules.yaml")
            plots = write_plots(
                result.booster,
                result.validation,
                result.test,
                result.test_scores,
                probability,
                root / "plots",
                result.config.random_state,
            )
            for plot in plots:
                mlflow.log_artifact(str(plot), artifact_path="plots")
        card = model_card(
            name=name,
            version=None,  # not known before registering, which comes last
            run_id=run.info.run_id,
            fingerprint=manifest["fingerprint"],
            workspace=manifest["source"],
            config=config,
            metrics=result.metrics,
            splits=result.splits.as_dict(),
            rules_hash=rules.content_hash,
            rows=result.rows,
            trees=result.booster.num_trees(),
            timings=result.timings,
            fairness=fairness,
        )
        mlflow.log_text(card, "model_card.md")
        _pause_before_registering()
        version = register_version(
            info.model_uri,
            name,
            {
                "dataset.fingerprint": manifest["fingerprint"],
                "rules.hash": rules.content_hash,
                FEATURES_TAG: features_hash(),
                "workspace.id": workspace.workspace_id,
                CHECKSUM_TAG: checksum,
                **quality_tags(result.metrics),
                **({FAIRNESS_TAG: fairness.tag()} if fairness is not None else {}),
            },
        )
    return {
        "run_id": run.info.run_id,
        "model_name": name,
        "model_version": version,
        "alias": CHALLENGER,
        "metrics": headline(result.metrics),
    }


def served_fairness(
    served: pd.DataFrame | None, workspace: Workspace, rules: RuleSet
) -> FairnessReport | None:
    """Exposure and acceptance parity of the test slates a model would serve
    (``TrainResult.served``, ``Evaluation.served``), per group of the rules' fairness
    attributes (the workspace's customers table); None without served slates."""
    if served is None:
        return None
    return fairness_report(workspace.read("customers"), served, rules.fairness)


def quality_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """The registry tags that say whether the served slate beat its best baseline."""
    served = metrics.get("served")
    if not served:
        return {BEATS_BASELINE_TAG: "false", QUALITY_SUMMARY_TAG: "no served-slate evaluation"}
    return {
        BEATS_BASELINE_TAG: str(served["beats_best_baseline"]).lower(),
        QUALITY_SUMMARY_TAG: served_margin_text(served),
    }


def served_margin_text(served: dict[str, Any]) -> str:
    """One line: the served slate's NDCG@10 margin over its best baseline."""
    margin = served["ndcg_at_10_margin"]
    best = served["best_baseline"]
    return (
        f"served-slate NDCG@10 {served['model']['ndcg_at_10']:.4f} vs "
        f"{best} {served['baselines'][best]['ndcg_at_10']:.4f}: "
        f"margin {margin['mean']:+.4f} [{margin['ci95_low']:+.4f}, {margin['ci95_high']:+.4f}]"
    )


def _headline_of(report: dict[str, Any]) -> dict[str, Any]:
    best = report["best_baseline"]
    return {
        "ndcg_at_10": round(report["model"]["ndcg_at_10"], 4),
        "recall_at_10": round(report["model"]["recall_at_10"], 4),
        "best_baseline": best,
        "best_baseline_ndcg_at_10": round(report["baselines"][best]["ndcg_at_10"], 4),
        "ndcg_at_10_margin": {k: round(v, 4) for k, v in report["ndcg_at_10_margin"].items()},
    }


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a person looks at first, per task and for the served slate."""
    tasks = {task: _headline_of(report) for task, report in metrics.items() if task in TASKS}
    served = metrics.get("served")
    if served:
        tasks["served"] = _headline_of(served) | {
            "hit_rate_at_3": round(served["model"]["hit_rate_at_3"], 4),
            "beats_best_baseline": served["beats_best_baseline"],
        }
    if metrics.get("off_policy", {}).get("available"):
        tasks["off_policy"] = {
            key: round(metrics["off_policy"][key]["estimate"], 4)
            for key in ("logging_policy", "ips", "snips")
        }
    return tasks


def _of_no_one(values: Any) -> Any:
    """The model's input example (MLflow keeps it beside the model): one row, each
    feature's mean over the rows (NaN where none has it), so that no customer's own
    features (tenure, loyalty tier, spend) are written into the artifacts."""
    return pd.DataFrame(values).mean().to_numpy(dtype=np.asarray(values).dtype)[None, :]
