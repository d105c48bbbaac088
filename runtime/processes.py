"""A served process, from outside: wait until it answers ready, stop it. One reading for
`nextbest serve`, the benchmarks and the tests that start a service."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["DEGRADED", "NotReady", "stop", "wait_ready"]

NotReady = Literal["failed", "exited", "late"]

# how /readyz's 503 begins when the service answers, degraded (its ledger's database is
# down at start, say): started, but not ready for a load balancer
DEGRADED = "not ready, serving degraded"


def wait_ready(
    url: str,
    process: subprocess.Popen[Any],
    timeout: float,
    *,
    failed: Callable[[], bool] = lambda: False,
    degraded: Callable[[str], None] | None = None,
) -> NotReady | None:
    """Poll ``url`` (every 0.5 s, 2 s per try) until it answers 200: None. With
    ``degraded``, a 503 that says the service serves degraded (:data:`DEGRADED`) is started
    too: ``degraded`` gets its reason, and None. Else why not: ``failed`` said so
    ("failed"), the process exited ("exited"), or ``timeout`` seconds passed ("late"); the
    caller says it in its own words."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return None
        except urllib.error.HTTPError as error:
            reason = _degraded(error) if degraded is not None else None
            if degraded is not None and reason is not None:
                degraded(reason)
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


def _degraded(error: urllib.error.HTTPError) -> str | None:
    """The reason of a 503 that says the service serves degraded, else None."""
    if error.code != 503:
        return None
    try:
        said = json.loads(error.read() or b"{}").get("error", "")
    except (ValueError, AttributeError, OSError):
        return None
    return said if isinstance(said, str) and said.startswith(DEGRADED) else None


def stop(process: subprocess.Popen[Any], signum: int, grace: float = 60) -> None:
    """Send ``signum``, wait ``grace`` seconds, then kill it."""
    process.send_signal(signum)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
