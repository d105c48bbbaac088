"""A trained, registered model on a synthetic world, for the serving tests."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from features import ScenarioConfig, Workspace, load_snapshot, make_world, write_world
from policy import load_rules
from runtime.processes import stop, wait_ready
from runtime.settings import Settings
from serving.engine import Recommender
from training.config import load_config
from training.pipeline import TrainResult, train

# one LightGBM thread: the suite runs two workers on two cores, and OpenMP threads that
# wait for a busy core spin (a 2-thread fit took 25x as long as a 1-thread one then)
CONFIG = {"min_pair_orders": 3, "n_estimators": 60, "bootstrap_samples": 50, "n_jobs": 1}


# made once per test process and copied: a seeded world (it is the same world every time)
# and an empty embedded MLflow store, its schema migrated (a new store costs about 2 s of
# migrations; a copied one is relocated to its new folder by configure_tracking)
_TEMPLATES: Path | None = None
# a model trained once per test process for each (world, settings): training is
# deterministic (tests/test_training.py::test_same_data_and_config_give_the_same_model), so
# each caller registers the same result in its own store (about 3 s saved a call)
_TRAINED: dict[tuple[str, str], TrainResult] = {}


def _templates() -> Path:
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = Path(tempfile.mkdtemp(prefix="nextbest-test-templates-"))
        atexit.register(shutil.rmtree, _TEMPLATES, ignore_errors=True)
    return _TEMPLATES


def _world_copy(seed: int, target: Path) -> Workspace:
    template = _templates() / f"world-{seed}"
    if not Workspace(template).exists():
        write_world(make_world(ScenarioConfig(n_customers=150, n_days=150, seed=seed)), template)
    shutil.copytree(template, target)
    return Workspace(target)


def _empty_store(models: Path) -> None:
    """``models/mlflow.db`` copied from a template store that has the experiment only."""
    from runtime.registry import configure_tracking

    template = _templates() / "home"
    if not (template / "models" / "mlflow.db").is_file():
        (template / "models").mkdir(parents=True)
        home = os.environ.get("NEXTBEST_HOME")
        os.environ["NEXTBEST_HOME"] = str(template)
        try:
            configure_tracking()
        finally:
            if home is not None:
                os.environ["NEXTBEST_HOME"] = home
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template / "models" / "mlflow.db", models / "mlflow.db")


@dataclass
class Served:
    home: Path
    workspace: Workspace
    version: str
    model_name: str


def train_and_register(
    home: Path,
    *,
    champion: bool = True,
    seed: int = 4,
    workspace_dir: Path | None = None,
    **config: object,
) -> Served:
    """Train on a small synthetic world (``home/ws`` unless ``workspace_dir``) and register
    it (as champion, by default); ``config`` overrides training settings (another model on
    the same world)."""
    from runtime.registry import CHAMPION, configure_tracking, set_alias
    from training.tracking import log_run

    os.environ["NEXTBEST_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    workspace_dir = workspace_dir or home / "ws"
    workspace = (
        Workspace(workspace_dir)
        if Workspace(workspace_dir).exists()
        else _world_copy(seed, workspace_dir)
    )
    settings = load_config(None, **(CONFIG | config))
    key = (f"{workspace.workspace_id}/{workspace.fingerprint}", settings.model_dump_json())
    if key not in _TRAINED:
        _TRAINED[key] = train(load_snapshot(workspace), load_rules(), settings)
    result = _TRAINED[key]
    models = Settings.load().models_dir
    if not (models / "mlflow.db").exists():
        _empty_store(models)
    configure_tracking()
    summary = log_run(result, workspace, load_rules())
    if champion:
        set_alias(summary["model_name"], CHAMPION, summary["model_version"])
    return Served(
        home=home,
        workspace=workspace,
        version=summary["model_version"],
        model_name=summary["model_name"],
    )


def recommender_for(served: Served, ledger_path: Path, **settings: object) -> Recommender:
    """The served workspace's recommender (the factory, as everywhere), on its own ledger,
    with no holdout unless asked for."""
    from serving.assembly import build_recommender
    from serving.settings import ServingSettings

    os.environ["NEXTBEST_HOME"] = str(served.home)
    return build_recommender(
        ServingSettings(
            **{"holdout_share": 0.0, "db_url": f"sqlite:///{ledger_path}", **settings}  # type: ignore[arg-type]
        ),
        workspace=served.workspace,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def forget_bentoml_metrics() -> None:
    """BentoML registers its request metrics in prometheus's process-wide registry when an
    ASGI app first answers; a second app in the same process (another test module on the
    same worker) would register them again and fail. Unregister them first."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if any(name.startswith("bentoml_") for name in names):
            REGISTRY.unregister(collector)


@contextmanager
def asgi_client(served: Served, folder: Path, **env: str) -> Iterator[object]:
    """The service's ASGI app in this process on ``served`` (a fresh SQLite ledger in
    ``folder``, no customer holdout, its BentoML metrics forgotten first); ``env`` adds or
    overrides settings."""
    import pytest
    from starlette.testclient import TestClient

    from serving.service import NextBest

    settings = {
        "NEXTBEST_HOME": str(served.home),
        "NEXTBEST_WORKSPACE": str(served.workspace.path),
        "NEXTBEST_DB_URL": f"sqlite:///{folder / 'ledger.db'}",
        "NEXTBEST_HOLDOUT_SHARE": "0",
        "BENTOML_HOME": str(folder / "bentoml"),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (settings | env).items():
            patch.setenv(name, value)
        forget_bentoml_metrics()
        with TestClient(NextBest.to_asgi()) as test_client:
            yield test_client


@contextmanager
def running(
    command: list[str], env: dict[str, str], ready_url: str, log: Path, timeout: float = 180
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server, wait until ``ready_url`` answers 200 (failing with its log when it
    dies or is late), and stop it with SIGTERM at the end.

    Started again, once, when BentoML's process manager lost its control port: BentoML
    picks a free port for it, lets it go and binds it later, and a server another test
    worker starts meanwhile can take it (``ZMQError: Address already in use``, seen in
    CI). Any other failure fails at once."""
    for attempt in (1, 2):
        with log.open("w") as sink:
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            if wait_ready(ready_url, process, timeout) is None:
                break
            text = log.read_text()
            if attempt == 2 or "ZMQError: Address already in use" not in text:
                raise AssertionError(f"{command[0]} did not start:\n{text}")
        except BaseException:
            stop(process, signal.SIGTERM)
            raise
        stop(process, signal.SIGTERM)
    try:
        yield process
    finally:
        stop(process, signal.SIGTERM)


def nextbest_serve(workspace: Workspace, port: int, *options: str) -> list[str]:
    """The `nextbest serve` command line for a workspace on a port."""
    import sys

    executable = str(Path(sys.executable).with_name("nextbest"))
    return [executable, "serve", "--port", str(port), "--workspace", str(workspace.path), *options]
