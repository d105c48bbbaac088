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
* The booster is LightGBM's **text model** (``model.lgb`` of the logged MLflow model), read
  by this module itself, never through a flavor that could unpickle: its sha256 is recorded
  at registration (tag ``model.sha256``, and in the bundle) and checked at every load, and
  it is first loaded in a child process, since LightGBM aborts the whole process on some
  truncated models instead of raising. A version that fails is refused
  (:class:`ModelArtifactError`), and :func:`set_alias` never points an alias at it.
* The embedded store's artifacts are found **relative to the store**: the SQLite database
  keeps absolute paths, so a copied or moved ``models/`` would read the original's files.
  Run and model artifacts are looked up by id under the current store's ``artifacts/``.
* A serving process keeps its **last known good** version in a local cache
  (:func:`remember_last_known_good`, :func:`load_last_known_good`): booster text, bundle
  files and their checksums, to serve when the registry is unreachable at start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
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
    "CHECKSUM_TAG",
    "EXPERIMENT",
    "FEATURES_TAG",
    "MODEL_PREFIX",
    "STAMP_TRUST_S",
    "ModelArtifactError",
    "ModelBundle",
    "ModelMismatchError",
    "RegistryUnavailable",
    "Stamp",
    "UnknownVersion",
    "booster_checksum",
    "check_logged_model",
    "configure_tracking",
    "delete_alias",
    "delete_version_tags",
    "find_version",
    "load_bundle",
    "load_last_known_good",
    "model_name",
    "register_version",
    "registered_versions",
    "remember_last_known_good",
    "resolve_version",
    "set_alias",
    "set_version_tags",
    "store_stamp",
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


CHECKSUM_TAG = "model.sha256"
"""The sha256 of the version's LightGBM text model, recorded when it is registered."""
FEATURES_TAG = "features.hash"
"""``features.registry.features_hash()`` of the code that trained the version."""
BOOSTER_FILE = "model.lgb"
BOOSTER_CLASS = "lightgbm.basic.Booster"
LAST_KNOWN_GOOD = "last-known-good"
"""The serving cache's folder, inside the models folder."""

# A serving process must not wait MLflow's four minutes of retries for an unreachable
# tracking server: one retry, 5 s per attempt for one that never answers (about 11 s at
# most per call), then the last known good version.
BOUNDED_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
# what the registry answers for a name, version or alias it does not have (not an outage)
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}

log = logging.getLogger("nextbest.registry")
_embedded_uri: str | None = None  # the embedded store this process last pointed MLflow at


class UnknownVersion(LookupError):
    """No such registered version, or the alias points nowhere (yet)."""


class ModelMismatchError(ValueError):
    """A model version that does not fit the workspace it would serve."""


class ModelArtifactError(ValueError):
    """A version whose model files are missing, corrupt, changed since registration, or not
    a LightGBM text model: it is never loaded, served or promoted."""


class RegistryUnavailable(RuntimeError):
    """The registry could not be reached (or answered with an error other than "not
    found")."""


def model_name(workspace_id: str) -> str:
    """The registered model of a workspace (see ``features.Workspace.workspace_id``)."""
    return f"{MODEL_PREFIX}-{workspace_id}"


def configure_tracking(settings: Settings | None = None, *, serving: bool = False) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded store; return the URI.

    Keeps MLflow offline and quiet, and its pickle-based flavors shut. For training (the
    default) it also makes sure the experiment exists, with its artifacts in this store's
    ``artifacts/`` (also after the store was copied or moved). ``serving=True`` only
    reads: no experiment is made, and a tracking server is given up on after a few seconds
    instead of minutes (the ``MLFLOW_HTTP_REQUEST_*`` settings, unless set already).

    The models folder must exist unless it is the default one (see
    ``Settings.require_models_dir``).
    """
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's pickle-based flavors (scikit-learn, pyfunc's Python models, …) refuse to
    # unpickle in a nextbest process, unless the variable says otherwise: nextbest loads
    # no model through a flavor (the booster is read as text here), so a crafted model in
    # a shared store cannot run code through one (CVE-2024-37052 to 37060, which have no
    # fixed version; see docs/RELIABILITY.md, pip-audit)
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    if serving:
        for key, value in BOUNDED_HTTP.items():
            os.environ.setdefault(key, value)
    global _embedded_uri
    settings = settings or Settings.load()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri == _embedded_uri:  # MLflow sets the variable itself, for child processes
        uri = None
    artifacts = None
    if not uri:
        models = settings.require_models_dir()
        uri = _embedded_uri = f"sqlite:///{models / 'mlflow.db'}"
        artifacts = (models / "artifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if serving:
        return uri
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    elif artifacts is not None and experiment.artifact_location != artifacts:
        _relocate_experiment(settings.models_dir / "mlflow.db", artifacts)
    mlflow.set_experiment(EXPERIMENT)
    return uri


def _relocate_experiment(database: Path, artifacts: str) -> None:
    """A copied or moved embedded store: new runs write their artifacts into this store,
    not the original's (the experiment's artifact location is an absolute path). MLflow has
    no call to change it, so this updates its ``experiments`` table."""
    import sqlite3

    with sqlite3.connect(database) as connection:
        connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE name = ?", (artifacts, EXPERIMENT)
        )
    log.info("the model store moved: new runs' artifacts go to %s", artifacts)


@dataclass
class ModelBundle:
    """A registered version: its booster and what serving needs to use it.

    ``model_text`` is the verified LightGBM text model (what the cache keeps), ``sha256``
    its checksum; ``source`` says where it was loaded from: ``registry`` or
    ``last-known-good cache``, and ``instead_of`` why a cached copy serves: the kind of
    error the registry's version met (``RegistryUnavailable``, ``ModelArtifactError``)."""

    name: str
    version: str
    alias: str | None
    run_id: str
    booster: Any
    meta: dict[str, Any]
    rules_yaml: str
    sha256: str | None = None
    source: str = "registry"
    model_text: str | None = None
    instead_of: str | None = None

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _registry_call(what: str, call: Any) -> Any:
    """``call()``, with "not found" as UnknownVersion and any other failure (a server that
    does not answer, a store that cannot be read) as RegistryUnavailable."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as error:
        if error.error_code in _NOT_FOUND:
            raise UnknownVersion(what) from error
        raise RegistryUnavailable(f"the model registry is unreachable ({error})") from error
    except Exception as error:  # requests' and SQLAlchemy's own errors
        raise RegistryUnavailable(f"the model registry is unreachable ({error})") from error


def resolve_version(
    name: str, version: str | int | None = None, alias: str | None = None
) -> tuple[str, str | None]:
    """(version, alias): a given version, else the alias's version (default champion).

    Raises UnknownVersion (a LookupError) when there is no such version or alias, and
    RegistryUnavailable when the registry cannot say.
    """
    client = _client()
    if version is not None:
        _registry_call(
            f"model {name} has no version {version}",
            lambda: client.get_model_version(name, str(version)),
        )
        return str(version), None
    used = alias or CHAMPION
    found = _registry_call(
        f"model {name} has no alias '{used}'",
        lambda: client.get_model_version_by_alias(name, used),
    )
    return str(found.version), used


SETTLED_S = 2.0
"""A store file written this recently is not trusted by :func:`store_stamp`: a file's
modification time moves in clock ticks (a few ms, a second on some file systems), so a
write in the same tick as the last look would leave the stamp unchanged."""

STAMP_TRUST_S = 60.0
"""How long an unchanged stamp is trusted: the service's watcher asks the registry at
least this often whatever the stamp says, so a write that no stamp shows (a file system
that does not move modification times, a store written through another path) is followed
within a minute, never missed for good."""

Stamp = tuple[tuple[str, int, int, int, int], ...]


def store_stamp(now: float | None = None) -> Stamp | None:
    """What changes whenever a SQLite registry store (the embedded one, or any
    ``sqlite:///`` registry URI) is written or replaced: the size, modification time,
    change time and inode of its database and of its journal and WAL files, where they
    exist. The database's path is resolved first (a symlinked ``mlflow.db`` keeps its
    journal and WAL beside the file it points to, where SQLite writes them). Two equal
    stamps mean that nothing was written in between, so an alias resolved at the first is
    still what the registry says.

    None means "ask the registry": a tracking server or any other store, a database that
    cannot be read, or one written within SETTLED_S of ``now`` (``time.time()``).

    Resolving an alias through ``MlflowClient`` costs 8-15 ms of the serving process's
    interpreter; the service's watcher asks every few seconds, so skipping an unchanged
    store keeps that pause off the requests in flight."""
    import os
    import time

    import mlflow

    uri = mlflow.get_registry_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(os.path.realpath(uri.removeprefix("sqlite:///")))
    now = time.time() if now is None else now
    stamp = []
    for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-journal"))):
        try:
            info = path.stat()
        except FileNotFoundError:
            if path == database:
                return None
            continue
        except OSError:
            return None
        if now - info.st_mtime < SETTLED_S:
            return None
        stamp.append((path.name, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino))
    return tuple(stamp)


def booster_checksum(text: bytes | str) -> str:
    """The sha256 (hex) of a LightGBM text model, as recorded at registration."""
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def load_bundle(
    name: str, version: str | int | None = None, alias: str | None = None
) -> ModelBundle:
    """Load a version's booster and bundle (by version, or by alias; default champion).

    The booster is verified before it is loaded here (checksum, LightGBM text model, a
    load in a child process); a version that fails is a ModelArtifactError naming it."""
    resolved, used_alias = resolve_version(name, version, alias)
    model_version = _registry_call(
        f"model {name} has no version {resolved}",
        lambda: _client().get_model_version(name, resolved),
    )
    label = f"version {resolved} of {name}"
    with tempfile.TemporaryDirectory() as folder:
        model_dir = _model_files(str(model_version.source), Path(folder) / "model", label)
        bundle_dir = _run_files(str(model_version.run_id), "bundle", Path(folder) / "bundle")
        text = _booster_text(model_dir, label)
        meta = json.loads(_read(bundle_dir / "bundle.json", label))
        rules_yaml = _read(bundle_dir / "rules.yaml", label)
    recorded = model_version.tags.get(CHECKSUM_TAG)
    return _verified(
        ModelBundle(
            name=name,
            version=resolved,
            alias=used_alias,
            run_id=str(model_version.run_id),
            booster=None,
            meta=meta,
            rules_yaml=rules_yaml,
        ),
        text,
        recorded,
        label,
    )


def _verified(bundle: ModelBundle, text: bytes, recorded: str | None, label: str) -> ModelBundle:
    """The bundle with its booster, once the text model passed every check."""
    actual = booster_checksum(text)
    expected = {str(v) for v in (recorded, bundle.meta.get("model_sha256")) if v}
    if expected and expected != {actual}:
        raise ModelArtifactError(
            f"{label}: {BOOSTER_FILE} has sha256 {actual[:16]}…, not the "
            f"{min(expected)[:16]}… recorded at registration: the file is corrupt or "
            "was changed; not loaded"
        )
    if not expected:
        log.warning(
            "%s has no recorded checksum (registered before checksums were): checked by "
            "LightGBM in a child process only",
            label,
        )
    features = _check_in_child(text, label)
    if features != len(bundle.feature_names):
        raise ModelArtifactError(
            f"{label}: the booster has {features} features, its bundle names "
            f"{len(bundle.feature_names)}; not loaded"
        )
    import lightgbm as lgb

    decoded = text.decode()
    bundle.booster = lgb.Booster(model_str=decoded)
    bundle.sha256 = actual
    bundle.model_text = decoded
    return bundle


_CHILD_CHECK = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
text = sys.stdin.buffer.read()
booster, iterations = ctypes.c_void_p(), ctypes.c_int()
if lib.LGBM_BoosterLoadModelFromString(
    ctypes.c_char_p(text), ctypes.byref(iterations), ctypes.byref(booster)
):
    sys.exit(ctypes.c_char_p(lib.LGBM_GetLastError()).value.decode(errors="replace"))
features, classes, length = ctypes.c_int(), ctypes.c_int(), ctypes.c_int64()
lib.LGBM_BoosterGetNumFeature(booster, ctypes.byref(features))
lib.LGBM_BoosterGetNumClasses(booster, ctypes.byref(classes))
row = (ctypes.c_double * max(features.value, 1))()
out = (ctypes.c_double * max(classes.value, 1))()
if lib.LGBM_BoosterPredictForMat(
    booster, row, 1, 1, features.value, 1, 0, 0, -1, b"", ctypes.byref(length), out
):
    sys.exit(ctypes.c_char_p(lib.LGBM_GetLastError()).value.decode(errors="replace"))
print(features.value)
"""


def _lightgbm_library() -> str:
    """LightGBM's shared library, found without importing the package (which takes
    seconds: it imports pandas and scikit-learn)."""
    import importlib.util

    spec = importlib.util.find_spec("lightgbm")
    assert spec is not None and spec.submodule_search_locations
    return str(Path(next(iter(spec.submodule_search_locations))) / "lib" / "lib_lightgbm.so")


def _check_in_child(text: bytes, label: str) -> int:
    """Load (and score one row with) the text model through LightGBM's C API in a child
    process: LightGBM aborts the whole process on some truncated models rather than
    raising. Returns its number of features."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD_CHECK, _lightgbm_library()],
            input=text,
            capture_output=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelArtifactError(
            f"{label}: LightGBM did not load it in 120 s; not loaded"
        ) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line]
        why = lines[-1] if lines else ""
        if done.returncode < 0:
            why = f"LightGBM crashed (signal {-done.returncode}) {why}".strip()
        raise ModelArtifactError(f"{label}: not a valid LightGBM model ({why}); not loaded")
    return int(done.stdout.split()[-1])


def _read(path: Path, label: str) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise ModelArtifactError(
            f"{label}: {path.name} is missing ({error}); not loaded"
        ) from error


def _booster_text(model_dir: Path, label: str) -> bytes:
    """The logged model's LightGBM text file, after checking from its MLmodel (read as
    plain YAML) that it is a Booster saved as text, never a pickle."""
    import yaml

    try:
        flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["lightgbm"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
        raise ModelArtifactError(
            f"{label}: no readable LightGBM MLmodel file ({error}); not loaded"
        ) from error
    if flavor.get("model_class", BOOSTER_CLASS) != BOOSTER_CLASS or flavor.get("data") != (
        BOOSTER_FILE
    ):
        raise ModelArtifactError(
            f"{label}: the model is a {flavor.get('model_class')} in {flavor.get('data')!r}, "
            f"not a LightGBM Booster's text model ({BOOSTER_FILE}); not loaded"
        )
    try:
        return (model_dir / BOOSTER_FILE).read_bytes()
    except OSError as error:
        raise ModelArtifactError(
            f"{label}: {BOOSTER_FILE} is missing ({error}); not loaded"
        ) from error


def _store_artifacts() -> Path | None:
    """The embedded store's artifacts folder (``artifacts/`` beside the ``mlflow.db`` being
    read); None with a tracking server or any other store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not (uri.startswith("sqlite:///") and uri.endswith("/mlflow.db")):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent / "artifacts"


def _model_files(source: str, destination: Path, label: str) -> Path:
    """The folder of a logged model (``models:/m-…``): in the embedded store, found by its
    model id under this store (never the absolute path the database recorded); else
    downloaded."""
    import mlflow

    root = _store_artifacts()
    if root is not None and source.startswith("models:/m-"):
        local = root / "models" / source.removeprefix("models:/") / "artifacts"
        if local.is_dir():
            return local
        raise ModelArtifactError(f"{label}: its model files are missing ({local}); not loaded")
    try:
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination))
        )
    except Exception as error:
        raise RegistryUnavailable(
            f"{label}: its model files could not be read ({error})"
        ) from error


def _run_files(run_id: str, path: str, destination: Path) -> Path:
    """A run's artifact folder, found like :func:`_model_files`."""
    import mlflow

    root = _store_artifacts()
    if root is not None:
        return root / run_id / "artifacts" / path
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(destination)
            )
        )
    except Exception as error:
        raise RegistryUnavailable(
            f"run {run_id}: its {path} could not be read ({error})"
        ) from error


def check_logged_model(model_uri: str, feature_count: int) -> str:
    """Check a just-logged model as a load would (a LightGBM text model that loads in a
    child process, with ``feature_count`` features); return its sha256, to record."""
    label = f"the logged model {model_uri}"
    with tempfile.TemporaryDirectory() as folder:
        text = _booster_text(_model_files(model_uri, Path(folder), label), label)
    features = _check_in_child(text, label)
    if features != feature_count:
        raise ModelArtifactError(f"{label} has {features} features, not {feature_count}")
    return booster_checksum(text)


def register_version(model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register a logged model as a new version of ``name`` with its tags (one registry
    transaction: no version is ever without them), and point the ``challenger`` alias at it
    (never ``champion``). Returns the version. Call it once everything else is logged."""
    import mlflow

    version = str(mlflow.register_model(model_uri, name, tags=dict(tags)).version)
    set_alias(name, CHALLENGER, version, verify=False)  # its files were just checked
    return version


def set_alias(name: str, alias: str, version: str, *, verify: bool = True) -> None:
    """Point ``alias`` at ``version``. The version's model is verified first (checksum and
    a LightGBM load in a child process): a corrupt one is never promoted
    (ModelArtifactError)."""
    if verify:
        load_bundle(name, version=version)
    _client().set_registered_model_alias(name, alias, str(version))


def _cache_folder(name: str, alias: str, settings: Settings | None = None) -> Path:
    return (settings or Settings.load()).models_dir / LAST_KNOWN_GOOD / f"{name}@{alias}"


def remember_last_known_good(bundle: ModelBundle, settings: Settings | None = None) -> Path:
    """Keep a verified version as the last known good of its alias: its text model, bundle
    and rules, with their sha256, in ``models/last-known-good/<name>@<alias>/``. The files
    go into a folder of their own, and ``current.json`` (replaced atomically) names it, so
    a crash midway leaves the previous copy whole; every file and both folders are fsynced
    before and after that switch, so a power loss leaves the old copy or the new one,
    whole, never a manifest that names files still in the page cache. Returns the folder."""
    if bundle.model_text is None or bundle.alias is None:
        raise ValueError("only a version loaded (and verified) by its alias can be cached")
    folder = _cache_folder(bundle.name, bundle.alias, settings)
    folder.mkdir(parents=True, exist_ok=True)
    copy = Path(tempfile.mkdtemp(prefix=f"v{bundle.version}-", dir=folder))
    files = {
        BOOSTER_FILE: bundle.model_text,
        "bundle.json": json.dumps(bundle.meta),
        "rules.yaml": bundle.rules_yaml,
    }
    for file, text in files.items():
        _write_durably(copy / file, text)
    _sync_folder(copy)
    manifest = {
        "name": bundle.name,
        "version": bundle.version,
        "alias": bundle.alias,
        "run_id": bundle.run_id,
        "folder": copy.name,
        "sha256": {file: booster_checksum(text) for file, text in files.items()},
        "cached_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    staged = folder / "current.json.tmp"
    _write_durably(staged, json.dumps(manifest, indent=2))
    _sync_folder(folder)  # the new copy's entry is on disk before the manifest names it
    os.replace(staged, folder / "current.json")
    _sync_folder(folder)  # and the switch itself
    for other in folder.iterdir():
        if other.is_dir() and other != copy:
            shutil.rmtree(other, ignore_errors=True)
    return folder


def _write_durably(path: Path, text: str) -> None:
    """``text`` into ``path``, on disk (fsynced) when this returns."""
    with path.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _sync_folder(folder: Path) -> None:
    """The folder's entries (files made, renamed or removed in it) on disk."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_last_known_good(
    name: str, alias: str, settings: Settings | None = None
) -> ModelBundle | None:
    """The alias's last known good version from the local cache, verified (every file's
    sha256, then the same checks as a registry load); None when there is none. A copy that
    fails its checks is a ModelArtifactError."""
    folder = _cache_folder(name, alias, settings)
    try:
        manifest = json.loads((folder / "current.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ModelArtifactError(
            f"the last-known-good cache {folder} is unreadable ({error})"
        ) from error
    label = f"the cached version {manifest.get('version')} of {name} ({folder})"
    copy = folder / str(manifest["folder"])
    texts = {file: _read(copy / file, label).encode() for file in manifest["sha256"]}
    for file, text in texts.items():
        if booster_checksum(text) != manifest["sha256"][file]:
            raise ModelArtifactError(f"{label}: {file} fails its checksum; not loaded")
    return _verified(
        ModelBundle(
            name=name,
            version=str(manifest["version"]),
            alias=alias,
            run_id=str(manifest["run_id"]),
            booster=None,
            meta=json.loads(texts["bundle.json"]),
            rules_yaml=texts["rules.yaml"].decode(),
            source="last-known-good cache",
        ),
        texts[BOOSTER_FILE],
        manifest["sha256"][BOOSTER_FILE],
        label,
    )


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
    """The newest registered version trained on this dataset with these rules and this
    code's features (``features.registry.features_hash``), if any: a version made before
    the features changed would be refused at load, so it is not "already trained"."""
    from mlflow.exceptions import MlflowException

    from features.registry import features_hash

    try:
        versions = _client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matching = [
        int(v.version)
        for v in versions
        if v.tags.get("dataset.fingerprint") == fingerprint
        and v.tags.get("rules.hash") == rules_hash
        and v.tags.get(FEATURES_TAG) == features_hash()
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
