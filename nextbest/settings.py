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

    @property
    def demo_workspace(self) -> Path:
        return self.data_dir / "workspaces" / "demo"

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("NEXTBEST_HOME", ".")).resolve()
        return cls(
            home=home,
            data_dir=Path(env.get("NEXTBEST_DATA_DIR", home / "data")).resolve(),
            models_dir=Path(env.get("NEXTBEST_MODELS_DIR", home / "models")).resolve(),
        )


def resolve_workspace(workspace: Path | None) -> Path:
    """The given workspace, or the demo workspace, built from the package if missing."""
    from features import Workspace

    if workspace is not None:
        Workspace(workspace).require()
        return workspace
    demo = Settings.load().demo_workspace
    if not Workspace(demo).exists():
        print(f"Building the demo workspace at {demo} (first use) …", file=sys.stderr)
        from features import write_demo_workspace

        write_demo_workspace(demo)
    return demo
