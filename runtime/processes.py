"""A served process, from outside: wait until it answers ready, stop it. One reading for
`nextbest serve`, the benchmarks and the tests that start a service."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["NotReady", "stop", "wait_ready"]

NotReady = Literal["failed", "exited", "late"]


def wait_ready(
    url: str,
    process: subprocess.Popen[Any],
    timeout: float,
    *,
    failed: Callable[[], bool] = lambda: False,
) -> NotReady | None:
    """Poll ``url`` (every 0.5 s, 2 s per try) until it answers 200: None. Else why not:
    ``failed`` said so ("failed"), the process exited ("exited"), or ``timeout`` seconds
    passed ("late"); the caller says it in its own words."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return None
        except OSError:
            pass
        if failed():
            return "failed"
        if process.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "late"
        time.sleep(0.5)


def stop(process: subprocess.Popen[Any], signum: int, grace: float = 60) -> None:
    """Send ``signum``, wait ``grace`` seconds, then kill it."""
    process.send_signal(signum)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
