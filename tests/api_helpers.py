"""A real `bentoml serve` of the storefront API for the contract, limits and keys tests,
with its log kept for the tests that read it, and schemathesis run against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving_helpers import free_port, running

from features import ScenarioConfig, Workspace, make_world, write_world


@dataclass
class Server:
    url: str
    log: Path
    pid: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def small_api_workspace(folder: Path, *, seed: int = 11) -> Workspace:
    """A small synthetic workspace (60 customers, 90 days). With no registered model it is
    served by the rules-only ranking (the API's limits and keys need no trained version);
    the contract's tests train a small model on it (fitting the default 150 x 150 world
    took a quarter of that file's time)."""
    return write_world(make_world(ScenarioConfig(n_customers=60, n_days=90, seed=seed)), folder)


@contextmanager
def serve(workspace: Workspace, home: Path, folder: Path, **env: str) -> Iterator[Server]:
    """`bentoml serve serving.service:NextBest` on a free port, ready when it answers."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)  # a home that does not exist is refused
    environment = (
        os.environ
        | {
            "NEXTBEST_HOME": str(home),
            "NEXTBEST_WORKSPACE": str(workspace.path),
            "NEXTBEST_DB_URL": f"sqlite:///{folder / 'ledger.db'}",
            "NEXTBEST_HOLDOUT_SHARE": "0",
            "BENTOML_HOME": str(folder / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        | env
    )
    environment.pop("MLFLOW_TRACKING_URI", None)
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    command = [bentoml, "serve", "serving.service:NextBest", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    log = folder / "serve.log"
    with running(command, environment, f"{url}/readyz", log, timeout=120) as process:
        yield Server(url=url, log=log, pid=process.pid)


def call(
    server: Server,
    method: str,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Answer:
    """One request; a JSON ``body`` is sent as application/json unless ``headers`` say
    otherwise; ``raw`` is sent as it is."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(
        server.url + path, data=data, method=method, headers=sent | (headers or {})
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read(), dict(error.headers))


def wait_for_log(server: Server, needle: str, timeout: float = 10) -> str:
    """The log once it holds ``needle`` (the access log is written as a response ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_text()
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never reached the server log")


@dataclass
class Fuzzed:
    """What a schemathesis run found nothing wrong with: its report, the statuses each
    operation answered (``"POST /feedback"`` to a count per status), and its OpenAPI
    links: those the document declares, those schemathesis inferred itself, and how many
    of all of them its stateful phase followed."""

    report: str
    statuses: dict[str, Counter[int]]
    declared_links: int
    inferred_links: int
    covered_links: int

    def succeeded(self, operation: str) -> int:
        return sum(
            n for status, n in self.statuses.get(operation, Counter()).items() if status < 300
        )


def schemathesis(server: Server, *options: str, max_examples: int = 40) -> Fuzzed:
    """schemathesis over every storefront endpoint (the review page has its own tests:
    its forms need a session and a CSRF token), every check, a bounded number of cases;
    fails with its report unless it found nothing (no failure and no warning)."""
    executable = str(Path(sys.executable).with_name("schemathesis"))
    har = server.log.parent / "schemathesis.har"
    command = [
        executable,
        "run",
        f"{server.url}/docs.json",
        "--checks",
        "all",
        "--max-examples",
        str(max_examples),
        "--exclude-path-regex",
        "^/review",
        "--seed",
        "13",
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        *options,
    ]
    # in the server's folder: schemathesis keeps a cache where it runs
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=240, cwd=server.log.parent
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0 and "No issues found" in report, report
    links = re.search(
        r"API Links:\s+(\d+) covered / \d+ selected / (\d+) total(?: \((\d+) inferred\))?", report
    )
    assert links is not None, report
    covered, total, inferred = (int(n or 0) for n in links.groups())
    return Fuzzed(
        report=report,
        statuses=_statuses(json.loads(har.read_text())),
        declared_links=total - inferred,
        inferred_links=inferred,
        covered_links=covered,
    )


def _statuses(har: dict[str, Any]) -> dict[str, Counter[int]]:
    """Each operation's answers in a HAR log, by status."""
    statuses: dict[str, Counter[int]] = {}
    for entry in har["log"]["entries"]:
        path = urllib.parse.urlsplit(entry["request"]["url"]).path
        operation = f"{entry['request']['method']} {path}"
        statuses.setdefault(operation, Counter())[entry["response"]["status"]] += 1
    return statuses
