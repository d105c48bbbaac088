"""Where nextbest keeps its files. Loaded by an explicit call, never on import."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings", "resolve_workspace"]


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

    @property
    def demo_workspace(self) -> Path:
        return self.data_dir / "workspaces" / "demo"

    def require_data_dir(self) -> Path:
        """The data folder, made if it is the default one. A folder named by
        ``NEXTBEST_DATA_DIR`` that does not exist is an error: a typo there must not
        quietly start a new, empty history (ledger, caps) somewhere else."""
        from features import WorkspaceError

        if self.data_dir.is_dir():
            return self.data_dir
        if self.data_dir_given:
            raise WorkspaceError(
                f"NEXTBEST_DATA_DIR is {self.data_dir}, which does not exist: create it "
                f"(mkdir -p {self.data_dir}) or unset NEXTBEST_DATA_DIR to use "
                f"{self.home / 'data'}"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("NEXTBEST_HOME", ".")).resolve()
        return cls(
            home=home,
            data_dir=Path(env.get("NEXTBEST_DATA_DIR") or home / "data").resolve(),
            models_dir=Path(env.get("NEXTBEST_MODELS_DIR") or home / "models").resolve(),
            data_dir_given=bool(env.get("NEXTBEST_DATA_DIR")),
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
