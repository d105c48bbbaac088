"""The MLflow model registry, as training, serving and review use it: the one module that
talks to ``MlflowClient``.

* The tracking URI is ``MLFLOW_TRACKING_URI`` when set (any MLflow server), else an
  embedded SQLite store under ``models/`` with artifacts beside it.
* Each workspace has its own registered model, ``nextbest-ranker-<workspace id>``
  (:func:`model_name`), so training on an imported workspace never changes what the demo
  serves. Training registers each run as a new version with the alias ``challenger``;
  only the review gate moves ``champion``.
* A version's **bundle** is everything serving needs besides the booster: feature names,
  per-task calibrators, default values, the rules file, the config, and the identity of
  the workspace and offer catalogue it was trained on. It is logged as run artifacts
  (``bundle/bundle.json``, ``bundle/rules.yaml``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.settings import Settings

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EXPERIMENT",
    "MODEL_PREFIX",
    "ModelBundle",
    "ModelMismatchError",
    "UnknownVersion",
    "configure_tracking",
    "delete_alias",
    "delete_version_tags",
    "find_version",
    "load_bundle",
    "model_name",
    "register_version",
    "registered_versions",
    "resolve_version",
    "set_alias",
    "set_version_tags",
    "version_tags",
]

MODEL_PREFIX = "nextbest-ranker"
EXPERIMENT = "nextbest"
CHAMPION = "champion"
CHALLENGER = "challenger"
BEATS_BASELINE_TAG = "quality.beats_best_baseline"
"""'true' or 'false': the version's served slate beat its best baseline on test (the
95 % interval of the NDCG@10 margin above 0). A 'false' version needs an audited
override to be released."""
QUALITY_SUMMARY_TAG = "quality.served_margin"


class UnknownVersion(LookupError):
    """No such registered version, or the alias points nowhere (yet)."""


class ModelMismatchError(ValueError):
    """A model version that does not fit the workspace it would serve."""


def model_name(workspace_id: str) -> str:
    """The registered model of a workspace (see ``features.Workspace.workspace_id``)."""
    return f"{MODEL_PREFIX}-{workspace_id}"


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

    name: str
    version: str
    alias: str | None
    run_id: str
    booster: Any
    meta: dict[str, Any]
    rules_yaml: str

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def resolve_version(
    name: str, version: str | int | None = None, alias: str | None = None
) -> tuple[str, str | None]:
    """(version, alias): a given version, else the alias's version (default champion).

    Raises LookupError when there is no such version or alias.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        if version is not None:
            client.get_model_version(name, str(version))
            return str(version), None
        used = alias or CHAMPION
        return str(client.get_model_version_by_alias(name, used).version), used
    except MlflowException as error:
        what = f"version {version}" if version is not None else f"alias '{alias or CHAMPION}'"
        raise UnknownVersion(f"model {name} has no {what}") from error


def load_bundle(
    name: str, version: str | int | None = None, alias: str | None = None
) -> ModelBundle:
    """Load a version's booster and bundle (by version, or by alias; default champion)."""
    import mlflow

    resolved, used_alias = resolve_version(name, version, alias)
    model_version = _client().get_model_version(name, resolved)
    booster = mlflow.lightgbm.load_model(f"models:/{name}/{resolved}")
    with tempfile.TemporaryDirectory() as folder:
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=model_version.run_id, artifact_path="bundle", dst_path=folder
            )
        )
        meta = json.loads((local / "bundle.json").read_text())
        rules_yaml = (local / "rules.yaml").read_text()
    return ModelBundle(
        name=name,
        version=resolved,
        alias=used_alias,
        run_id=str(model_version.run_id),
        booster=booster,
        meta=meta,
        rules_yaml=rules_yaml,
    )


def register_version(model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register a logged model as a new version of ``name``, tag it, and point the
    ``challenger`` alias at it (never ``champion``). Returns the version."""
    import mlflow

    version = str(mlflow.register_model(model_uri, name).version)
    set_version_tags(name, version, tags)
    set_alias(name, CHALLENGER, version)
    return version


def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, str(version))


def delete_alias(name: str, alias: str) -> None:
    _client().delete_registered_model_alias(name, alias)


def version_tags(name: str, version: str) -> dict[str, str]:
    return dict(_client().get_model_version(name, str(version)).tags)


def set_version_tags(name: str, version: str, tags: Mapping[str, str]) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def delete_version_tags(name: str, version: str, keys: Iterable[str]) -> None:
    client = _client()
    for key in keys:
        client.delete_model_version_tag(name, str(version), key)


def find_version(name: str, fingerprint: str, rules_hash: str) -> str | None:
    """The newest registered version trained on this dataset with these rules, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matching = [
        int(v.version)
        for v in versions
        if v.tags.get("dataset.fingerprint") == fingerprint
        and v.tags.get("rules.hash") == rules_hash
    ]
    return str(max(matching)) if matching else None


def registered_versions(name: str) -> list[dict[str, Any]]:
    """Every registered version, newest first: aliases, review status and when it was made."""
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(f"name = '{name}'")
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
