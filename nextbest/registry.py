"""The MLflow model registry, as training, serving and review use it.

* The tracking URI is ``MLFLOW_TRACKING_URI`` when set (any MLflow server), else an
  embedded SQLite store under ``models/`` with artifacts beside it.
* The registered model is ``nextbest-ranker``. Training registers each run as a new
  version with the alias ``challenger``; only the review gate moves ``champion``.
* A version's **bundle** is everything serving needs besides the booster: feature names,
  per-task calibrators, default values, the rules file and the config. It is logged as
  run artifacts (``bundle/bundle.json``, ``bundle/rules.yaml``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nextbest.settings import Settings

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EXPERIMENT",
    "MODEL_NAME",
    "ModelBundle",
    "configure_tracking",
    "find_version",
    "load_bundle",
    "registered_versions",
    "resolve_version",
]

MODEL_NAME = "nextbest-ranker"
EXPERIMENT = "nextbest"
CHAMPION = "champion"
CHALLENGER = "challenger"


def configure_tracking(settings: Settings | None = None) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded store; return the URI.

    Also makes sure the experiment exists (with its artifacts under ``models/`` for the
    embedded store) and keeps MLflow offline and quiet.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    settings = settings or Settings.load()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    artifacts = None
    if not uri:
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{settings.models_dir / 'mlflow.db'}"
        artifacts = (settings.models_dir / "artifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow.set_experiment(EXPERIMENT)
    return uri


@dataclass
class ModelBundle:
    """A registered version: its booster and what serving needs to use it."""

    version: str
    alias: str | None
    run_id: str
    booster: Any
    meta: dict[str, Any]
    rules_yaml: str

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])


def resolve_version(
    version: str | int | None = None, alias: str | None = None
) -> tuple[str, str | None]:
    """(version, alias): a given version, else the alias's version (default champion).

    Raises LookupError when there is no such version or alias.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if version is not None:
            client.get_model_version(MODEL_NAME, str(version))
            return str(version), None
        name = alias or CHAMPION
        return str(client.get_model_version_by_alias(MODEL_NAME, name).version), name
    except MlflowException as error:
        what = f"version {version}" if version is not None else f"alias '{alias or CHAMPION}'"
        raise LookupError(f"model {MODEL_NAME} has no {what}") from error


def load_bundle(version: str | int | None = None, alias: str | None = None) -> ModelBundle:
    """Load a version's booster and bundle (by version, or by alias; default champion)."""
    import mlflow
    from mlflow import MlflowClient

    resolved, used_alias = resolve_version(version, alias)
    client = MlflowClient()
    model_version = client.get_model_version(MODEL_NAME, resolved)
    booster = mlflow.lightgbm.load_model(f"models:/{MODEL_NAME}/{resolved}")
    with tempfile.TemporaryDirectory() as folder:
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=model_version.run_id, artifact_path="bundle", dst_path=folder
            )
        )
        meta = json.loads((local / "bundle.json").read_text())
        rules_yaml = (local / "rules.yaml").read_text()
    return ModelBundle(
        version=resolved,
        alias=used_alias,
        run_id=str(model_version.run_id),
        booster=booster,
        meta=meta,
        rules_yaml=rules_yaml,
    )


def find_version(fingerprint: str, rules_hash: str) -> str | None:
    """The newest registered version trained on this dataset with these rules, if any."""
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    matching = [
        int(v.version)
        for v in versions
        if v.tags.get("dataset.fingerprint") == fingerprint
        and v.tags.get("rules.hash") == rules_hash
    ]
    return str(max(matching)) if matching else None


def registered_versions() -> list[dict[str, Any]]:
    """Every registered version, newest first: aliases, review status and when it was made."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name = '{MODEL_NAME}'")
    except MlflowException:
        return []
    rows = [
        {
            "version": str(v.version),
            "aliases": sorted(v.aliases or []),
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC),
            "review": v.tags.get("review.status"),
            "run_id": v.run_id,
        }
        for v in versions
    ]
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)
