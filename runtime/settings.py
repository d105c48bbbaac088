"""Where nextbest keeps its files. Loaded by an explicit call, never on import."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["START_FAILURE", "Settings", "report_start_failure", "resolve_workspace"]

START_FAILURE = "NEXTBEST_START_FAILURE"
"""Set by ``nextbest serve`` for its workers: a file where a worker that cannot start
writes why, in one line, so that the CLI stops BentoML (which would otherwise restart the
worker in a loop) and says why."""


def report_start_failure(error: BaseException, environ: Mapping[str, str] | None = None) -> None:
    """Write ``error`` as one line to the ``NEXTBEST_START_FAILURE`` file, if one is set."""
    target = (os.environ if environ is None else environ).get(START_FAILURE)
    if target:
        line = " ".join(str(error).split()) or type(error).__name__
        Path(target).write_text(f"{line}\n")


@dataclass(frozen=True)
class Settings:
    """Paths and endpoints, from the environment or defaults under the project folder.

    * ``NEXTBEST_HOME``: the project folder (default: the current directory).
    * ``NEXTBEST_DATA_DIR``: workspaces live here (default: ``$NEXTBEST_HOME/data``).
    * ``NEXTBEST_MODELS_DIR``: the embedded MLflow store (default: ``$NEXTBEST_HOME/models``).
    """

    home: Path
    data_dir: Path
    models_dir: Path
    data_dir_given: bool = False  # NEXTBEST_DATA_DIR was set, rather than defaulted
    models_dir_given: bool = False  # NEXTBEST_MODELS_DIR was set
    home_given: bool = False  # NEXTBEST_HOME was set

    @property
    def demo_workspace(self) -> Path:
        return self.data_dir / "workspaces" / "demo"

    def require_data_dir(self) -> Path:
        """The data folder, made if it is the default one. A folder named by
        ``NEXTBEST_DATA_DIR`` (or a ``NEXTBEST_HOME``) that does not exist is an error: a
        typo there must not quietly start a new, empty history (ledger, caps) somewhere
        else."""
        return self._require(self.data_dir, "NEXTBEST_DATA_DIR", self.data_dir_given, "data")

    def require_models_dir(self) -> Path:
        """The models folder (the embedded MLflow store), made if it is the default one. A
        folder named by ``NEXTBEST_MODELS_DIR`` (or a ``NEXTBEST_HOME``) that does not
        exist is an error: a typo there must not serve from, or train into, a new empty
        store."""
        return self._require(
            self.models_dir, "NEXTBEST_MODELS_DIR", self.models_dir_given, "models"
        )

    def _require(self, folder: Path, variable: str, given: bool, default: str) -> Path:
        from features import WorkspaceError

        if folder.is_dir():
            return folder
        if given:
            raise WorkspaceError(
                f"{variable} is {folder}, which does not exist: create it "
                f"(mkdir -p {folder}) or unset {variable} to use {self.home / default}"
            )
        if self.home_given and not self.home.is_dir():
            raise WorkspaceError(
                f"NEXTBEST_HOME is {self.home}, which does not exist: create it "
                f"(mkdir -p {self.home}) or unset NEXTBEST_HOME to use the current folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("NEXTBEST_HOME") or ".").resolve()
        return cls(
            home=home,
            data_dir=Path(env.get("NEXTBEST_DATA_DIR") or home / "data").resolve(),
            models_dir=Path(env.get("NEXTBEST_MODELS_DIR") or home / "models").resolve(),
            data_dir_given=bool(env.get("NEXTBEST_DATA_DIR")),
            models_dir_given=bool(env.get("NEXTBEST_MODELS_DIR")),
            home_given=bool(env.get("NEXTBEST_HOME")),
        )


def resolve_workspace(workspace: Path | None) -> Path:
    """The given workspace, or the demo workspace, built from the package if missing."""
    from features import Workspace

    if workspace is not None:
        Workspace(workspace).require()
        return workspace
    settings = Settings.load()
    demo = settings.demo_workspace
    if not Workspace(demo).exists():
        settings.require_data_dir()
        print(f"Building the demo workspace at {demo} (first use) …", file=sys.stderr)
        from features import write_demo_workspace

        write_demo_workspace(demo)
    return demo
