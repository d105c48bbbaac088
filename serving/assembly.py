"""The one way to assemble a recommender.

The service (at start and when the workspace changes), ``nextbest recommend`` and
``recommend-batch``, every Dask worker of ``recommend-batch --engine dask``, the review
gate, the benchmark and the tests all call :func:`build_recommender`, so they cannot drift
apart: the same workspace, model version (checked against the workspace), rules,
settings, ledger and reviewers' blocks give the same slates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from features import Snapshot, Workspace, load_snapshot
from policy.rules import SegmentBlock
from runtime.registry import (
    CHAMPION,
    ModelArtifactError,
    ModelBundle,
    ModelMismatchError,
    RegistryUnavailable,
    configure_tracking,
    load_bundle,
    load_last_known_good,
    model_name,
    remember_last_known_good,
)
from runtime.settings import Settings, resolve_workspace
from serving.engine import Recommender
from serving.ledger import SqlLedger
from serving.settings import ServingSettings

__all__ = ["UNSET", "build_recommender", "load_model"]

log = logging.getLogger("nextbest.serving")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self) -> str:
        return "UNSET"  # unpickled (on a Dask worker) as this module's one UNSET


UNSET: Any = _Unset()
"""``bundle=UNSET`` (the default): load the version the settings name from the registry."""


def load_model(
    workspace: Workspace,
    *,
    alias: str | None = None,
    version: str | None = None,
    last_known_good: bool = False,
) -> ModelBundle | None:
    """The workspace's registered version by number, else by alias; None if the alias
    points nowhere yet (serving then ranks by the rules alone). An unknown version is an
    error (LookupError); so is a version whose files fail their checks
    (ModelArtifactError), and an unreachable registry (RegistryUnavailable).

    ``last_known_good`` (the service): when the registry is unreachable, or the alias's
    version fails its checks, the version in the local cache serves instead (verified by
    checksum, and logged as such); :func:`build_recommender` keeps what it serves there."""
    configure_tracking(serving=True)
    name = model_name(workspace.workspace_id)
    if version is not None:
        return load_bundle(name, version=version)
    used = alias or CHAMPION
    try:
        bundle = load_bundle(name, alias=used)
    except LookupError:
        log.warning("no '%s' version of %s yet: serving the rules-only ranking", used, name)
        return None
    except (RegistryUnavailable, ModelArtifactError) as error:
        if not last_known_good:
            raise
        return _last_known_good(name, used, error)
    return bundle


def _last_known_good(name: str, alias: str, error: Exception) -> ModelBundle:
    """The cached version, when the registry's cannot be had; else ``error`` again, with
    the reason it could not be replaced."""
    cached = load_last_known_good(name, alias)
    if cached is None:
        raise type(error)(f"{error}; and no last known good version is cached") from error
    cached.instead_of = type(error).__name__
    log.warning(
        "%s; serving the last known good version %s of %s@%s from the local cache "
        "(sha256 %s, verified)",
        error,
        cached.version,
        name,
        alias,
        cached.sha256,
    )
    return cached


def build_recommender(
    settings: ServingSettings,
    *,
    workspace: Workspace | Path | None = None,
    clock: str | None = None,
    alias: str | None = None,
    version: str | None = None,
    blocks: Sequence[SegmentBlock] | None = None,
    bundle: ModelBundle | None = UNSET,
    snapshot: Snapshot | None = None,
    ledger: SqlLedger | None = None,
    if_mismatch: Literal["raise", "rules_only"] = "raise",
    last_known_good: bool = False,
) -> Recommender:
    """A :class:`Recommender` from explicit inputs; anything not given comes from
    ``settings``.

    * ``workspace``: default ``settings.workspace``, else the demo (built on first use).
    * ``clock``, ``alias``: override the settings' own.
    * ``version``: a registered version number (instead of the alias); ``bundle``: an
      already loaded version (or None for the rules-only ranking).
    * ``blocks``: reviewers' segment blocks; default: those in the ledger's database.
    * ``snapshot``, ``ledger``: reuse what another recommender holds (the review gate's
      challenger beside the serving champion; a refreshed workspace on the same ledger).
    * ``if_mismatch``: a version that does not fit the workspace (``ModelMismatchError``)
      is an error, or (the service at start) is refused and logged while the rules-only
      ranking serves.
    * ``last_known_good``: keep the version loaded by alias in the local cache, and serve
      the cached one when the registry is unreachable or its version fails its checks (see
      :func:`load_model`).
    """
    settings = replace(
        settings,
        clock=clock if clock is not None else settings.clock,
        alias=alias if alias is not None else settings.alias,
    )
    target = Workspace(resolve_workspace(_path(workspace, settings)))
    if ledger is None:
        url = settings.db_url or settings.ledger_url(Settings.load().require_data_dir())
        ledger = SqlLedger(url)
    if bundle is UNSET:
        bundle = load_model(
            target, alias=settings.alias, version=version, last_known_good=last_known_good
        )
    if blocks is None:
        from serving.review import ReviewStore, segment_blocks

        blocks = segment_blocks(ReviewStore(ledger.engine))
    snapshot = snapshot if snapshot is not None else load_snapshot(target)
    try:
        recommender = Recommender(
            snapshot, bundle, ledger, settings, workspace=target, blocks=blocks
        )
    except ModelMismatchError as error:
        if if_mismatch == "raise" or bundle is None:
            raise
        log.error("refused %s: %s; serving the rules-only ranking", settings.alias, error)
        return Recommender(snapshot, None, ledger, settings, workspace=target, blocks=blocks)
    if last_known_good and bundle is not None and bundle.source == "registry":
        remember_last_known_good(bundle)
    return recommender


def _path(workspace: Workspace | Path | None, settings: ServingSettings) -> Path | None:
    if isinstance(workspace, Workspace):
        return workspace.path
    return workspace if workspace is not None else settings.workspace
