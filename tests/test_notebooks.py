"""Notebooks hold no logic, but they must run: execute each one on a small world."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from features import ScenarioConfig, make_world, write_world

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_retrain_and_compare_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace = write_world(
        make_world(ScenarioConfig(n_customers=120, n_days=120, seed=6)), tmp_path / "ws"
    )
    (tmp_path / "config.yaml").write_text(
        json.dumps({"min_pair_orders": 3, "n_estimators": 40, "bootstrap_samples": 50, "n_jobs": 1})
    )
    monkeypatch.setenv("NEXTBEST_NOTEBOOK_WORKSPACE", str(workspace.path))
    monkeypatch.setenv("NEXTBEST_NOTEBOOK_CONFIG", str(tmp_path / "config.yaml"))
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.read(NOTEBOOKS / "1.0-retrain-and-compare.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    ]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    last = notebook.cells[-1]["outputs"][-1]["data"]["text/plain"]
    assert last == "('1', 'challenger')"
    assert (tmp_path / "models" / "mlflow.db").exists()
