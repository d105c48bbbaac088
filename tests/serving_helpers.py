"""A trained, registered model on a synthetic world, for the serving tests."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from features import ScenarioConfig, Workspace, load_snapshot, make_world, write_world
from policy import load_rules
from training.config import load_config
from training.pipeline import train

CONFIG = {"min_pair_orders": 3, "n_estimators": 60, "bootstrap_samples": 50}


@dataclass
class Served:
    home: Path
    workspace: Workspace
    version: str


def train_and_register(home: Path, *, champion: bool = True, seed: int = 4) -> Served:
    """Train on a small synthetic world and register it (as champion, by default)."""
    from mlflow import MlflowClient

    from nextbest.registry import CHAMPION, MODEL_NAME, configure_tracking
    from training.tracking import log_run

    os.environ["NEXTBEST_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    workspace_dir = home / "ws"
    workspace = (
        Workspace(workspace_dir)
        if Workspace(workspace_dir).exists()
        else write_world(
            make_world(ScenarioConfig(n_customers=150, n_days=150, seed=seed)), workspace_dir
        )
    )
    result = train(load_snapshot(workspace), load_rules(), load_config(None, **CONFIG))
    configure_tracking()
    summary = log_run(result, workspace, load_rules())
    if champion:
        MlflowClient().set_registered_model_alias(MODEL_NAME, CHAMPION, summary["model_version"])
    return Served(home=home, workspace=workspace, version=summary["model_version"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
