"""MLFLOW_TRACKING_URI points training at a real MLflow server (started here on loopback)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import free_port, running
from typer.testing import CliRunner

from features import ScenarioConfig, make_world, write_world
from nextbest.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = os.environ | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--default-artifact-root",
        (tmp_path / "server-artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    with running(command, env, f"{url}/health", tmp_path / "server.log", timeout=90):
        yield url


def test_training_logs_and_registers_on_a_real_server(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path))
    world = make_world(ScenarioConfig(n_customers=120, n_days=120, seed=2))
    workspace = write_world(world, tmp_path / "ws")
    (tmp_path / "config.yaml").write_text(
        json.dumps({"min_pair_orders": 3, "n_estimators": 40, "bootstrap_samples": 50, "n_jobs": 1})
    )
    result = CliRunner().invoke(
        app,
        ["train", "-w", str(workspace.path), "--config", str(tmp_path / "config.yaml"), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version_by_alias(summary["model_name"], "challenger")
    assert str(version.version) == summary["model_version"] == "1"
    assert version.run_id == summary["run_id"]
    run = client.get_run(summary["run_id"])
    assert "item.model.ndcg_at_10" in run.data.metrics
    assert not (tmp_path / "models" / "mlflow.db").exists()  # the embedded store was not used
