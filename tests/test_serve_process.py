"""`nextbest serve` as a process: it starts from the last known good copy when the registry
is unreachable, refuses in one line when it has nothing to serve, stops on SIGTERM at any
stage, and never leaves BentoML running. Each test drives the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from serving_helpers import Served, free_port, nextbest_serve, train_and_register

from runtime.processes import stop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MARK = "NEXTBEST_TEST_PROCESS_MARK"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_register(tmp_path_factory.mktemp("serve-process") / "home")


@pytest.fixture
def home(trained: Served, tmp_path: Path) -> Path:
    """A copy of the trained home for one test."""
    copy = tmp_path / "home"
    shutil.copytree(trained.home, copy)
    return copy


def marked(mark: str) -> list[int]:
    """The processes (this test's `nextbest serve` and all it started) whose environment
    holds the mark."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if f"{MARK}={mark}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@contextmanager
def serve(home: Path, served: Served, log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`nextbest serve` on a free port, with its own mark; whatever it leaves running is
    killed afterwards (by pid), and the test is told."""
    mark = uuid.uuid4().hex
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment |= {
        "PYTHONPATH": str(ROOT),
        "NEXTBEST_HOME": str(home),
        "NEXTBEST_DB_URL": f"sqlite:///{home / 'ledger.db'}",
        "BENTOML_HOME": str(home / "bentoml"),
        "NEXTBEST_HOLDOUT_SHARE": "0",
        MARK: mark,
        **env,
    }
    workspace = type(served.workspace)(home / "ws")
    command = nextbest_serve(workspace, port, "--no-example")
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=environment, stdout=sink, stderr=subprocess.STDOUT)
    process.port = port  # type: ignore[attr-defined]
    process.mark = mark  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        if process.poll() is None:
            stop(process, signal.SIGTERM)
        left = still_running(mark)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"left running: {left}\n{log.read_text()[-3000:]}"


def still_running(mark: str) -> dict[int, str]:
    """The marked processes still there after BentoML's own shutdown has had its time
    (SIGINT, then SIGKILL: a few seconds), with their command lines."""
    for _ in range(100):
        left = marked(mark)
        if not left:
            return {}
        time.sleep(0.1)
    commands = {}
    for pid in left:
        try:
            commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return commands


def wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{process.port}/readyz"  # type: ignore[attr-defined]
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"not ready:\n{log.read_text()[-4000:]}")


def closed_registry() -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}


def cache_version_1(home: Path, served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a serving process leaves behind: version 1 as the last known good copy."""
    from runtime.registry import configure_tracking, load_bundle, remember_last_known_good

    monkeypatch.setenv("NEXTBEST_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    configure_tracking(serving=True)
    remember_last_known_good(load_bundle(served.model_name, alias="champion"))


def test_an_unreachable_registry_serves_the_last_known_good_version(
    trained: Served, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_version_1(home, trained, monkeypatch)
    log = tmp_path / "serve.log"
    # no watcher tick in the test's time: what /metadata says is what the start found
    env = closed_registry() | {"NEXTBEST_RELOAD_SECONDS": "3600"}
    with serve(home, trained, log, **env) as process:
        wait_ready(process, log)
        url = f"http://127.0.0.1:{process.port}/metadata"  # type: ignore[attr-defined]
        with urllib.request.urlopen(url, timeout=10) as response:
            metadata = json.loads(response.read())
        assert metadata["model"]["version"] == "1" and metadata["model"]["mode"] == "model"
        assert metadata["model_source"]["source"] == "last-known-good cache"
        assert metadata["model_source"]["version"] == "1"
        assert metadata["watcher"]["registry_reachable"] is False
        assert metadata["watcher"]["checked_at"] is None
    text = log.read_text()
    assert f"Serving version 1 of {trained.model_name}@champion from the last-known-good" in text
    assert "serving the last known good version 1" in text  # the worker's own log line


def test_a_ledger_database_down_at_start_serves_degraded_and_says_so(
    trained: Served, home: Path, tmp_path: Path
) -> None:
    """`nextbest serve` gave up after 300 s waiting for a /readyz that could not be ready:
    now it starts, says in one line why it is degraded, and the service answers."""
    log = tmp_path / "serve.log"
    down = f"postgresql+psycopg://nextbest@127.0.0.1:{free_port()}/ledger"  # nobody listens
    customer = str(trained.workspace.read("customers", ["customer_id"])["customer_id"].iloc[0])
    with serve(home, trained, log, NEXTBEST_DB_URL=down) as process:
        deadline = time.monotonic() + 150
        while "warning: the service started degraded" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        (line,) = [
            line
            for line in log.read_text().splitlines()
            if line.startswith("warning: the service started degraded")
        ]
        assert "the ledger is down" in line and "blocks cannot be read" in line
        request = urllib.request.Request(
            f"http://127.0.0.1:{process.port}/recommend",  # type: ignore[attr-defined]
            data=json.dumps({"customer_id": customer, "channel": "web"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        # the reviewers' blocks unknown: nothing is shown rather than a blocked offer
        assert answer["degraded"] is True and answer["offers"] == []
        assert process.poll() is None


def one_line_refusal(process: subprocess.Popen[bytes], log: Path, code: int = 2) -> str:
    """The process ends by itself, non-zero, with one error line (and, refused before
    BentoML starts, no traceback)."""
    assert process.wait(timeout=120) == code, log.read_text()[-3000:]
    text = log.read_text()
    if code == 2:
        assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


def test_a_worker_that_cannot_start_is_one_line_and_nothing_is_left(
    trained: Served, home: Path, tmp_path: Path
) -> None:
    """The model is fine, but the worker's settings are not: BentoML would restart the
    worker forever; `nextbest serve` stops it all and says why."""
    log = tmp_path / "serve.log"
    with serve(home, trained, log, NEXTBEST_HOLDOUT_SHARE="7") as process:
        line = one_line_refusal(process, log, code=1)
    assert line == (
        "error: the service cannot start: NEXTBEST_HOLDOUT_SHARE must be in [0, 1], not '7'"
    )


# BentoML's port race, made to happen: in the `bentoml serve` process only, and only the
# first ``NEXTBEST_TEST_LOSE_PORT_TIMES`` starts (counted in a file), the port BentoML
# reserves for its process manager is one this process already listens on, as when another
# process takes it between BentoML's choice and its bind
_LOSE_THE_PORT = """
import os, sys
marker = os.environ.get("NEXTBEST_TEST_LOSE_PORT")
times = int(os.environ.get("NEXTBEST_TEST_LOSE_PORT_TIMES", "1"))
lost = os.path.getsize(marker) if marker and os.path.exists(marker) else 0
if marker and os.path.basename(sys.argv[0]) == "bentoml" and lost < times:
    with open(marker, "a") as counted:
        counted.write("x")
    import contextlib, socket
    import bentoml._internal.utils as utils
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    real, used = utils.reserve_free_port, []
    def taken(*args, **kwargs):
        if not used and sys._getframe(1).f_globals["__name__"].endswith("utils.circus"):
            used.append(1)
            return contextlib.nullcontext(held.getsockname()[1])
        return real(*args, **kwargs)
    utils.reserve_free_port = taken
"""


@pytest.mark.parametrize("losses", [1, 2])
def test_bentoml_losing_its_process_managers_port_is_started_again_once(
    trained: Served, home: Path, tmp_path: Path, losses: int
) -> None:
    """BentoML chooses a free port for its process manager, lets it go and binds it later;
    another process can take it meanwhile, and BentoML exits before serving. `nextbest
    serve` says so and starts it again, once: lost twice, it gives up in one line."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_LOSE_THE_PORT)
    marker = tmp_path / "lost"
    log = tmp_path / "serve.log"
    env = {
        "PYTHONPATH": f"{inject}{os.pathsep}{ROOT}",
        "NEXTBEST_TEST_LOSE_PORT": str(marker),
        "NEXTBEST_TEST_LOSE_PORT_TIMES": str(losses),
    }
    with serve(home, trained, log, **env) as process:
        if losses == 1:
            wait_ready(process, log)
            assert process.poll() is None
        else:
            line = one_line_refusal(process, log, code=1)
            assert line == "error: BentoML exited with code 1 before it was ready"
            text = log.read_text()  # BentoML's last words come before ours
            assert text.rindex("ZMQError") < text.index("error: BentoML exited")
        text = log.read_text()
        assert marker.read_text() == "x" * losses
        assert text.count("ZMQError: Address already in use") >= losses
        warnings = [line for line in text.splitlines() if "lost the port" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: BentoML lost"), text
        if losses == 1:
            assert "error: " not in text


def test_no_registry_and_no_cache_refuses_in_one_line(
    trained: Served, home: Path, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with serve(home, trained, log, **closed_registry()) as process:
        line = one_line_refusal(process, log)
    assert "the model registry is unreachable" in line
    assert "no last known good version is cached" in line


def test_a_corrupt_champion_and_no_cache_refuses_in_one_line(
    trained: Served, home: Path, tmp_path: Path
) -> None:
    (file,) = (home / "models" / "artifacts" / "models").glob("*/artifacts/model.lgb")
    file.write_bytes(file.read_bytes()[:5000])
    log = tmp_path / "serve.log"
    with serve(home, trained, log) as process:
        line = one_line_refusal(process, log)
    assert f"version 1 of {trained.model_name}" in line and "not loaded" in line


def test_a_missing_models_folder_refuses_in_one_line(
    trained: Served, home: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "typo"
    log = tmp_path / "serve.log"
    with serve(home, trained, log, NEXTBEST_MODELS_DIR=str(missing)) as process:
        line = one_line_refusal(process, log)
    assert f"NEXTBEST_MODELS_DIR is {missing}, which does not exist" in line
    assert not missing.exists()


def bentoml_started(mark: str) -> bool:
    for pid in marked(mark):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"bentoml") for part in command) and b"serve" in command:
            return True
    return False


@contextmanager
def silent_registry() -> Iterator[tuple[socket.socket, str]]:
    """A "registry" that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("stage", ["waiting for the registry", "BentoML starting", "serving"])
def test_sigterm_stops_it_at_any_stage_and_nothing_is_left(
    trained: Served, home: Path, tmp_path: Path, stage: str
) -> None:
    log = tmp_path / "serve.log"
    with contextlib.ExitStack() as stack:
        env = {}
        if stage == "waiting for the registry":
            listener, url = stack.enter_context(silent_registry())
            env["MLFLOW_TRACKING_URI"] = url
        process = stack.enter_context(serve(home, trained, log, **env))
        mark = process.mark  # type: ignore[attr-defined]
        if stage == "waiting for the registry":
            listener.settimeout(150)
            connection, _ = listener.accept()  # the CLI is checking the model now
            stack.callback(connection.close)
            assert not bentoml_started(mark)
        elif stage == "BentoML starting":
            deadline = time.monotonic() + 150
            while not bentoml_started(mark):
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.05)
        else:
            wait_ready(process, log)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)  # a bounded wait: it must stop by itself
        assert still_running(mark) == {}, log.read_text()[-3000:]
