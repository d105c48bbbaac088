"""Run a module or code like `python -m`/`-c`, then record this process's peak RSS (KB).

Usage: python -m bench._peak OUT_FILE (-m MODULE | -c CODE) [ARGS...]
"""

from __future__ import annotations

import resource
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    out, mode, target, *rest = sys.argv[1:]
    sys.argv = [target, *rest]
    try:
        if mode == "-m":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
    finally:
        Path(out).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
