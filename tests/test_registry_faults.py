"""The model registry when things go wrong: a moved or copied store, a corrupt, changed or
pickled model, an unreachable registry (the last known good copy), a missing folder, and
training killed just before it registers."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from serving_helpers import CONFIG, Served, free_port, train_and_register
from typer.testing import CliRunner

from nextbest.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """One trained store, version 1 champion: tests change only their own copies."""
    return train_and_register(tmp_path_factory.mktemp("trained") / "home")


def use_home(monkeypatch: pytest.MonkeyPatch, home: Path, models: Path | None = None) -> None:
    from runtime.registry import configure_tracking

    monkeypatch.setenv("NEXTBEST_HOME", str(home))
    for name in ("MLFLOW_TRACKING_URI", "NEXTBEST_MODELS_DIR", "NEXTBEST_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    if models is not None:
        monkeypatch.setenv("NEXTBEST_MODELS_DIR", str(models))
    configure_tracking()


def copy_home(trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the trained home (store and workspace), in use; its database still names
    the original's absolute artifact paths, as a copied ``models/`` does."""
    home = tmp_path / "copy"
    shutil.copytree(trained.home, home)
    use_home(monkeypatch, home)
    return home


def booster_file(home: Path) -> Path:
    (found,) = (home / "models" / "artifacts" / "models").glob("*/artifacts/model.lgb")
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_moved_store_serves_its_own_files(
    trained: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.registry import load_bundle

    moved = trained.home / "models-moved"
    os.rename(trained.home / "models", moved)  # nothing is left where the database points
    try:
        use_home(monkeypatch, trained.home, models=moved)
        bundle = load_bundle(trained.model_name, alias="champion")
        (file,) = (moved / "artifacts" / "models").glob("*/artifacts/model.lgb")
        assert bundle.version == trained.version
        assert bundle.sha256 == sha256(file)
        assert bundle.booster.num_feature() == len(bundle.feature_names)
    finally:
        os.rename(moved, trained.home / "models")


def test_a_copied_store_reads_its_own_files_and_refuses_a_changed_model(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy's model is replaced by another valid LightGBM model (fewer trees): the copy
    must read its own file, and refuse it, since it is not what was registered."""
    import lightgbm as lgb

    from runtime.registry import ModelArtifactError, load_bundle

    home = copy_home(trained, tmp_path, monkeypatch)
    file = booster_file(home)
    other = lgb.Booster(model_str=file.read_text()).model_to_string(num_iteration=5)
    file.write_text(other)
    with pytest.raises(ModelArtifactError, match=r"version 1 of .*sha256 .* not loaded"):
        load_bundle(trained.model_name, alias="champion")


def test_training_in_a_copied_store_writes_into_the_copy(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from runtime.registry import EXPERIMENT, configure_tracking

    home = copy_home(trained, tmp_path, monkeypatch)
    configure_tracking()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert experiment.artifact_location == (home / "models" / "artifacts").as_uri()
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "note.txt")
    assert (home / "models" / "artifacts" / run.info.run_id / "artifacts" / "note.txt").exists()
    assert not (trained.home / "models" / "artifacts" / run.info.run_id).exists()


def test_a_truncated_model_is_refused_and_the_process_survives(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LightGBM aborts the process on this file; the load (in a process of its own here,
    as a service worker would) must raise a clear error instead."""
    home = copy_home(trained, tmp_path, monkeypatch)
    file = booster_file(home)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    program = (
        "from runtime.registry import configure_tracking, load_bundle\n"
        "configure_tracking()\n"
        "try:\n"
        f"    load_bundle({trained.model_name!r}, alias='champion')\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ModelArtifactError version 1 of ")
    assert "not loaded" in done.stdout


class _Marker:
    """Unpickling this creates a file: proof that bytes were unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_a_model_that_would_be_unpickled_is_refused(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from runtime.registry import ModelArtifactError, load_bundle

    home = copy_home(trained, tmp_path, monkeypatch)
    folder = booster_file(home).parent
    marker = tmp_path / "unpickled"
    (folder / "model.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["lightgbm"].update(
        model_class="lightgbm.sklearn.LGBMRanker", serialization_format="pickle", data="model.pkl"
    )
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(ModelArtifactError, match="not a LightGBM Booster's text model"):
        load_bundle(trained.model_name, alias="champion")
    assert not marker.exists()


def test_mlflow_flavors_that_unpickle_are_shut_in_a_nextbest_process(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scikit-learn model in the store (anyone who can write to a shared store can log
    one) cannot be unpickled through MLflow once nextbest has configured it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from sklearn.dummy import DummyClassifier

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    copy_home(trained, tmp_path, monkeypatch)  # configure_tracking, as every command does
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            DummyClassifier().fit([[0], [1]], [0, 1]), name="crafted", pip_requirements=[]
        )
    with pytest.raises(MlflowException, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        mlflow.sklearn.load_model(info.model_uri)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # the oracle: it loads
    assert mlflow.sklearn.load_model(info.model_uri).predict([[1]]).tolist() in ([0], [1])


def _register_a_copy_of_version_1(served: Served) -> str:
    """Version 2: version 1's booster and bundle logged again (its own files) and
    registered as training registers (checksum tag, alias challenger)."""
    import lightgbm as lgb
    import mlflow

    from runtime.registry import (
        CHECKSUM_TAG,
        check_logged_model,
        configure_tracking,
        load_bundle,
        register_version,
    )

    one = load_bundle(served.model_name, version="1")
    configure_tracking()
    with mlflow.start_run(), tempfile_folder() as folder:
        (folder / "bundle.json").write_text(json.dumps(one.meta))
        (folder / "rules.yaml").write_text(one.rules_yaml)
        mlflow.log_artifacts(str(folder), artifact_path="bundle")
        assert one.model_text is not None
        info = mlflow.lightgbm.log_model(
            lgb.Booster(model_str=one.model_text), name="model", pip_requirements=[]
        )
        checksum = check_logged_model(info.model_uri, len(one.feature_names))
        return register_version(info.model_uri, served.model_name, {CHECKSUM_TAG: checksum})


def tempfile_folder():  # type: ignore[no-untyped-def]
    import contextlib
    import tempfile

    @contextlib.contextmanager
    def folder():  # type: ignore[no-untyped-def]
        with tempfile.TemporaryDirectory() as name:
            yield Path(name)

    return folder()


def test_a_corrupt_version_is_never_promoted(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from runtime.registry import ModelArtifactError, resolve_version, set_alias

    home = copy_home(trained, tmp_path, monkeypatch)
    version = _register_a_copy_of_version_1(trained)
    assert version == "2"
    source = MlflowClient().get_model_version(trained.model_name, version).source
    file = home / "models" / "artifacts" / "models" / source.removeprefix("models:/")
    file = file / "artifacts" / "model.lgb"
    file.write_bytes(file.read_bytes()[:3000])
    with pytest.raises(ModelArtifactError, match="version 2 of "):
        set_alias(trained.model_name, "champion", version)  # what the review gate calls
    assert resolve_version(trained.model_name, alias="champion") == ("1", "champion")


def _recommender(served: Served, tmp_path: Path, **options: object):  # type: ignore[no-untyped-def]
    from serving.assembly import build_recommender
    from serving.settings import ServingSettings

    return build_recommender(
        ServingSettings(holdout_share=0.0, db_url=f"sqlite:///{tmp_path / 'ledger.db'}"),
        workspace=Path(os.environ["NEXTBEST_HOME"]) / "ws",  # the copy's own
        **options,  # type: ignore[arg-type]
    )


def test_an_unreachable_registry_serves_the_last_known_good_copy(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.registry import CHECKSUM_TAG, version_tags

    home = copy_home(trained, tmp_path, monkeypatch)
    registered = version_tags(trained.model_name, "1")[CHECKSUM_TAG]
    served = _recommender(trained, tmp_path, last_known_good=True)
    assert served.model.bundle.source == "registry"
    cache = home / "models" / "last-known-good" / f"{trained.model_name}@champion"
    manifest = json.loads((cache / "current.json").read_text())
    assert manifest["version"] == "1"
    assert sha256(cache / manifest["folder"] / "model.lgb") == registered

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    fallback = _recommender(trained, tmp_path, last_known_good=True)
    bundle = fallback.model.bundle
    assert (bundle.source, bundle.version, bundle.sha256) == (
        "last-known-good cache",
        "1",
        registered,
    )
    assert bundle.booster.model_to_string() == served.model.bundle.booster.model_to_string()
    answer = fallback.recommend("S00003", channel="web", placement="home", k=3)
    assert answer["model"]["version"] == "1" and answer["model"]["mode"] == "model"
    # /metadata (its answer goes out through the Metadata schema) says where it came from
    from serving.contract import Metadata

    # (the service adds its watcher's state to the recommender's metadata)
    watcher = {"following": True, "checked_at": None, "failing_since": None, "failure": None}
    watcher |= {"registry_reachable": False}
    published = {
        name: Metadata.model_validate(r.metadata() | {"watcher": watcher}).model_dump()[
            "model_source"
        ]
        for name, r in (("registry", served), ("cache", fallback))
    }
    assert published == {
        "registry": {"source": "registry", "version": "1", "sha256": registered},
        "cache": {"source": "last-known-good cache", "version": "1", "sha256": registered},
    }


def test_no_registry_and_no_cache_is_one_clear_error(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.registry import RegistryUnavailable

    copy_home(trained, tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryUnavailable, match=r"unreachable.*no last known good version"):
        _recommender(trained, tmp_path, last_known_good=True)


def test_a_corrupt_champion_falls_back_to_the_cache_and_a_changed_cache_is_refused(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.registry import ModelArtifactError, load_last_known_good

    home = copy_home(trained, tmp_path, monkeypatch)
    _recommender(trained, tmp_path, last_known_good=True)  # caches version 1
    file = booster_file(home)
    file.write_bytes(file.read_bytes()[:4000])
    with pytest.raises(ModelArtifactError, match="version 1 of "):
        _recommender(trained, tmp_path)
    fallback = _recommender(trained, tmp_path, last_known_good=True)
    assert fallback.model.bundle.source == "last-known-good cache"

    cache = home / "models" / "last-known-good" / f"{trained.model_name}@champion"
    manifest = json.loads((cache / "current.json").read_text())
    (cache / manifest["folder"] / "rules.yaml").write_text("name: changed\n")
    with pytest.raises(ModelArtifactError, match=r"rules\.yaml fails its checksum"):
        load_last_known_good(trained.model_name, "champion")


@pytest.mark.parametrize("variable", ["NEXTBEST_MODELS_DIR", "NEXTBEST_HOME"])
@pytest.mark.parametrize("command", ["train", "recommend-batch"])
def test_a_missing_folder_is_an_error_that_names_it(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, variable: str
) -> None:
    missing = tmp_path / "typo"
    use_home(monkeypatch, tmp_path)
    monkeypatch.setenv(variable, str(missing))
    (tmp_path / "config.yaml").write_text(json.dumps(CONFIG))
    arguments = {
        "train": ["train", "--config", str(tmp_path / "config.yaml"), "--quiet"],
        "recommend-batch": [
            "recommend-batch",
            *("--customers", "all", "--out", str(tmp_path / "out.csv")),
        ],
    }[command]
    result = CliRunner().invoke(app, [*arguments, "-w", str(trained.workspace.path)])
    assert result.exit_code == 2, result.output
    assert f"error: {variable} is {missing}, which does not exist" in result.output
    assert not missing.exists()


def _read_until(stream, text: str, seconds: float) -> list[str]:  # type: ignore[no-untyped-def]
    """Lines of ``stream`` up to one containing ``text`` (bounded wait)."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line)
            if text in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(seconds):
        raise AssertionError(f"{text!r} never came:\n{''.join(lines)[-3000:]}")
    return lines


def test_training_killed_before_registering_leaves_no_version_and_a_rerun_succeeds(
    trained: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from runtime.registry import load_bundle
    from training.tracking import PAUSE_HOOK

    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(trained.workspace.path, home / "ws")
    (home / "config.yaml").write_text(json.dumps(CONFIG | {"n_estimators": 20}))
    use_home(monkeypatch, home)
    command = [
        str(Path(sys.executable).with_name("nextbest")),
        "train",
        "-w",
        str(home / "ws"),
        "--config",
        str(home / "config.yaml"),
        "--quiet",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(ROOT), PAUSE_HOOK: "300"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _read_until(process.stderr, f"{PAUSE_HOOK}: pausing", 240)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stderr.close()  # type: ignore[union-attr]

    client = MlflowClient()
    name = trained.model_name
    assert client.search_model_versions(f"name = '{name}'") == []
    (killed,) = client.search_runs(["1"])
    assert killed.info.status == "RUNNING"  # what SIGKILL leaves behind

    del env[PAUSE_HOOK]
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["model_version"] == "1"
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    bundle = load_bundle(name, alias="challenger")
    assert bundle.version == "1" and bundle.run_id != killed.info.run_id


def test_the_last_known_good_copy_is_on_disk_before_and_after_the_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy was written and switched in without an fsync: after a power loss the
    manifest could name files that never reached the disk (then refused, not served)."""
    from runtime.registry import ModelBundle, remember_last_known_good

    (tmp_path / "models").mkdir()
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path))
    monkeypatch.setenv("NEXTBEST_MODELS_DIR", str(tmp_path / "models"))
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recorded_replace(source: str | Path, target: str | Path) -> None:
        events.append(("replace", str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    bundle = ModelBundle(
        name="m",
        version="3",
        alias="champion",
        run_id="r",
        booster=None,
        meta={"feature_names": []},
        rules_yaml="name: rules\n",
        model_text="tree\n",
    )
    folder = remember_last_known_good(bundle)
    manifest = json.loads((folder / "current.json").read_text())
    copy = folder / manifest["folder"]
    switch = events.index(("replace", str(folder / "current.json")))
    before = {path for kind, path in events[:switch] if kind == "fsync"}
    after = {path for kind, path in events[switch + 1 :] if kind == "fsync"}
    written = {str(copy / file) for file in ("model.lgb", "bundle.json", "rules.yaml")}
    assert written | {str(copy), str(folder / "current.json.tmp"), str(folder)} <= before
    assert str(folder) in after  # the rename itself is on disk


def test_the_openapi_declares_where_the_model_came_from() -> None:
    """/metadata's schema (the components serving.contract.openapi puts in /docs.json, and
    schemathesis checks the answers against) names the model's source."""
    from pydantic.json_schema import models_json_schema

    from serving.contract import Metadata

    _, top = models_json_schema([(Metadata, "serialization")], ref_template="#/$defs/{model}")
    schemas = top["$defs"]
    assert "model_source" in schemas["Metadata"]["required"]
    assert schemas["Metadata"]["properties"]["model_source"] == {"$ref": "#/$defs/ModelSource"}
    source = schemas["ModelSource"]["properties"]
    assert source["source"]["enum"] == ["registry", "last-known-good cache", "none"]
    assert {"version", "sha256"} <= set(schemas["ModelSource"]["required"])
